"""One trial's configuration, typed: built once from the flat dict that Tune hands a trial.

Tune samples a search space into a flat dict (the searched parameters beside the run's
settings, which ``angiotune.search.run`` adds). ``TrialConfig.from_flat`` reads it once, with
each concern's defaults taken from the module that owns it (``AdapterSettings``,
``LossWeights``, ``HeadLossWeights``), and every part validates itself when it is made, so a
trial built by hand in a notebook is checked like one a search built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from angiotune.data.transforms import DEFAULT_CROP_CONTEXT
from angiotune.errors import ConfigError
from angiotune.model.adapters import AdapterSettings, crop_context_of
from angiotune.model.heads import TASKS
from angiotune.model.losses import HeadLossWeights, LossWeights
from angiotune.names import PROMPT_MODES

PRECISION_NAMES = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class RunSettings:
    """How the trial runs, whatever it trains. ``precision`` and ``gradient_checkpointing``
    left None follow the device (bf16 and checkpointing on a GPU, fp32 without on a CPU)."""

    epochs: int
    batch_size: int = 8
    seed: int = 0
    precision: str | None = None
    gradient_checkpointing: bool | None = None
    model_path: str | None = None
    prompt_mode: str = "box"
    base_id: str | None = None
    metrics: tuple[str, ...] = ("dice",)
    objective: dict[str, float] | None = None
    vessel: str | None = None  # stage 3: the data is already narrowed to this vessel
    embedding_cache: str | None = None  # the shared cache's folder, when the space wants one
    augment_views: int = 0  # augmented views per training lesion; 0: fresh every epoch
    validate_at: tuple[int, ...] | None = None  # epochs to validate (and report) at; None: all
    fault_dir: str | None = None  # tests only (``angiotune.train.faults``)

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"epochs: {self.epochs} must be at least 1")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: {self.batch_size} must be at least 1")
        if self.augment_views < 0:
            raise ConfigError(f"augment_views: {self.augment_views} must be 0 or more")
        if self.precision is not None and self.precision not in PRECISION_NAMES:
            raise ConfigError(f"precision: {self.precision!r} is not one of {PRECISION_NAMES}")
        if self.prompt_mode not in PROMPT_MODES:
            raise ConfigError(f"prompt_mode: {self.prompt_mode!r} is not one of {PROMPT_MODES}")
        if not self.metrics:
            raise ConfigError("a trial needs at least one metric to report")
        if self.validate_at is not None and self.epochs not in self.validate_at:
            raise ConfigError(f"validate_at {self.validate_at} must include the last epoch "
                              f"({self.epochs}): a trial reports its final scores there")


@dataclass(frozen=True)
class OptimiserSettings:
    """AdamW over the adapter at ``lr``, and the heads (which start from nothing rather than
    adjust a pre-trained model) at ``lr * head_lr_ratio``."""

    lr: float = 1e-3
    weight_decay: float = 1e-4
    head_lr_ratio: float = 10.0

    def __post_init__(self) -> None:
        for name in ("lr", "head_lr_ratio"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name}: {value} must be a positive number")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"weight_decay: {self.weight_decay} must be 0 or more")


@dataclass(frozen=True)
class StartSettings:
    """Where the trial's weights start: ``init`` "none" (the base), "vessel" (stage 3: the
    trial's vessel's kept adapter) or a key of ``init_adapters`` (kept adapters the search
    copied into its folder first, so a resumed trial starts from the same weights)."""

    init: str = "none"
    init_adapters: dict[str, str] = field(default_factory=dict)
    vessel: str | None = None

    def __post_init__(self) -> None:
        if self.init == "none":
            return
        key = self.vessel if self.init == "vessel" else self.init
        if key is None:
            raise ConfigError("init: vessel needs the trial's vessel (a stage-3 search)")
        if key not in self.init_adapters:
            raise ConfigError(f"init: no kept adapter {key!r} was copied for this search "
                              f"(have: {sorted(self.init_adapters) or 'none'})")

    @property
    def adapter(self) -> Path | None:
        """The kept adapter's folder, or None to start from the base."""
        if self.init == "none":
            return None
        return Path(self.init_adapters[self.vessel if self.init == "vessel" else self.init])


@dataclass(frozen=True)
class HeadsChoice:
    """Stage 2: which heads train, over which segment classes, and how their losses weigh."""

    classes: tuple[str, ...]
    losses: HeadLossWeights = HeadLossWeights()
    hidden: int = 128
    taxonomy: str = "CASS"
    context_dim: int | None = None  # None: all of the view context (HeadSettings' default)

    def __post_init__(self) -> None:
        if len(self.classes) < 2:
            raise ConfigError(f"the segment head needs at least two classes, got "
                              f"{list(self.classes)}")
        if self.hidden < 1:
            raise ConfigError(f"head_hidden: {self.hidden} must be at least 1")

    @property
    def tasks(self) -> tuple[str, ...]:
        """All tasks with learned (uncertainty) weighting, else those weighted above 0 (the
        segment head always)."""
        if self.losses.weighting == "uncertainty":
            return TASKS
        return tuple(task for task, weight in zip(TASKS, self.losses.fixed(), strict=True)
                     if task == "segment" or weight > 0)


@dataclass(frozen=True)
class TrialConfig:
    run: RunSettings
    adapter: AdapterSettings = AdapterSettings()
    losses: LossWeights = LossWeights()
    optimiser: OptimiserSettings = OptimiserSettings()
    start: StartSettings = StartSettings()
    heads: HeadsChoice | None = None
    refine: bool = False

    @classmethod
    def from_flat(cls, config: dict) -> TrialConfig:
        """The typed config of Tune's flat dict. Keys that only the trial's runner reads
        (the index, image size, workers, storage) are ignored here."""
        get = config.get
        vessel = get("vessel")
        start = StartSettings(init=str(get("init", "none")),
                              init_adapters={k: str(v) for k, v in
                                             (get("init_adapters") or {}).items()},
                              vessel=vessel)
        rank = int(get("rank", AdapterSettings.rank))
        alpha = get("alpha") or rank * float(get("alpha_ratio", 2))
        # A trial that starts from an adapter keeps the crop that adapter learned.
        crop = (crop_context_of(start.adapter) if start.adapter is not None
                else float(get("crop_context", DEFAULT_CROP_CONTEXT)))
        adapter = AdapterSettings(strategy=str(get("strategy", AdapterSettings.strategy)),
                                  rank=rank, alpha=float(alpha),
                                  dropout=float(get("dropout", AdapterSettings.dropout)),
                                  targets=tuple(str(get("targets", "vision_qv")).split("+")),
                                  train_decoder=bool(get("train_decoder", True)),
                                  crop_context=crop,
                                  lora_depth=float(get("lora_depth", AdapterSettings.lora_depth)))
        losses = LossWeights(**{name: cast(get(key)) for key, name, cast in _LOSS_KEYS
                                if get(key) is not None})
        heads = None
        if get("heads"):
            heads = HeadsChoice(classes=tuple(str(c) for c in get("classes") or ()),
                                losses=head_loss_weights(config),
                                hidden=int(get("head_hidden", 128)),
                                taxonomy=str(get("taxonomy", "CASS")),
                                context_dim=(None if get("context_dim") is None
                                             else int(get("context_dim"))))
        metrics = get("metrics") or [get("metric", "dice")]
        run = RunSettings(epochs=int(config["epochs"]), batch_size=int(get("batch_size", 8)),
                          seed=int(get("seed", 0)), precision=get("precision"),
                          gradient_checkpointing=get("gradient_checkpointing"),
                          model_path=get("model_path"),
                          prompt_mode=str(get("prompt_mode", "box")), base_id=get("base_id"),
                          metrics=tuple(metrics), objective=get("objective"), vessel=vessel,
                          embedding_cache=get("cache_dir") if get("embedding_cache") else None,
                          augment_views=int(get("augment_views", 0)),
                          validate_at=(None if get("validate_at") is None else
                                       tuple(int(e) for e in get("validate_at"))),
                          fault_dir=get("fault_dir"))
        optimiser = OptimiserSettings(lr=float(get("lr", 1e-3)),
                                      weight_decay=float(get("weight_decay", 1e-4)),
                                      head_lr_ratio=float(get("head_lr_ratio", 10.0)))
        if get("embedding_cache") and not get("cache_dir"):
            raise ConfigError("embedding_cache needs the search's cache_dir")
        return cls(run=run, adapter=adapter, losses=losses, optimiser=optimiser, start=start,
                   heads=heads, refine=bool(get("refine", False)))


# Flat key, LossWeights field, type: the space names losses by what they weigh.
_LOSS_KEYS = (("dice_weight", "dice", float), ("pixel_weight", "pixel", float),
              ("iou_weight", "iou", float), ("score_weight", "score", float),
              ("pixel_loss", "pixel_loss", str), ("pos_weight", "pos_weight", float),
              ("focal_gamma", "focal_gamma", float))


def head_loss_weights(config: dict) -> HeadLossWeights:
    """The heads' loss weights of a flat config; ``class_weights: balanced`` weighs classes by
    inverse training frequency (mean 1; a class absent from training weighs as one seen once)."""
    counts = config.get("class_counts")
    class_weights = None
    if config.get("class_weights", "none") == "balanced" and counts:
        inverse = [1.0 / max(int(c), 1) for c in counts]
        class_weights = tuple(w * len(inverse) / sum(inverse) for w in inverse)
    defaults = HeadLossWeights()
    return HeadLossWeights(segment=float(config.get("segment_weight", defaults.segment)),
                           stenosis=float(config.get("stenosis_weight", defaults.stenosis)),
                           mld=float(config.get("mld_weight", defaults.mld)),
                           rvd=float(config.get("rvd_weight", defaults.rvd)),
                           weighting=str(config.get("head_weighting", defaults.weighting)),
                           class_loss=str(config.get("class_loss", defaults.class_loss)),
                           class_weights=class_weights)
