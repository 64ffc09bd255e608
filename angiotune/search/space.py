"""Search spaces as YAML, validated on load and compiled to one Optuna define-by-run function.

A space file::

    name: lora_rank
    metric: dice            # a reported metric, e.g. dice, iou, dice/LAD
    mode: max
    samples: 8              # trials
    epochs: 4
    seed: 0
    asha: {grace_period: 1, reduction_factor: 2}
    resources: {workers: 1, cpus_per_worker: 1, retries: 1}
    fixed: {strategy: lora}
    params:
      rank: {type: int, low: 2, high: 16, log: true}
      lr: {type: float, low: 1.0e-4, high: 5.0e-3, log: true}
      targets: {type: categorical, choices: [vision_qv, vision_attn+vision_mlp]}
      alpha_ratio: {type: categorical, choices: [1, 2], when: {strategy: lora}}

``when`` makes a parameter conditional on earlier parameters or fixed values. Every error names
the file and the key, and is raised before Ray starts. A ``SearchSpace`` checks its rules when it
is made, from a file or otherwise (``dataclasses.replace``, by hand), against the names in
``angiotune.names``: loading a space imports no torch, transformers or peft.

A space says what it searches; sizes follow the model and the machine unless it sets them
(``angiotune.search.sizing``): ``data.image_size`` (the model's own), ``data.batch_size``,
``resources.gpus_per_worker`` (one per trial when the cluster has GPUs) and ``max_concurrent``
(one trial per GPU) default to ``auto``. ``load_space(path, overrides)`` applies command-line
overrides such as ``samples=40`` or ``data.batch_size=2`` to the YAML before it is validated,
so they are checked exactly as the file is.

Stages (``stage: 1 | 2 | 3 | distill``, default 1) share the format:

- ``stage: 2`` trains the measurement heads with the adapter (``heads: true`` is implied) and may
  optimise an ``objective``: a weighted sum of metrics, e.g. ``{dice: 1, stenosis_mae: -0.01}``
  (``metric: objective``), or several metrics at once (``metric: [dice, stenosis_mae]``, ``mode:
  [max, min]``: an Optuna multi-objective search whose Pareto front is reported; no ASHA).
- ``stage: 3`` runs one study per vessel in ``vessels`` on that vessel's lesions, ``samples``
  trials each, all in one Tune run sharing the cluster.
- ``stage: distill`` searches students of the kept models (``angiotune distill``,
  ``search_spaces/distill.yaml``): its parameters are a student's shape as shares of the
  teacher's encoder (``width_ratio``, ``depth_ratio``, ``input_ratio``) and its loss and
  optimiser (``temperature``, ``distill_weight``, ``feature_weight``, ``lr``, ...); fixed
  ``frames_per_cine`` and ``max_ms_per_lesion``; ``vessels`` names the registry entries to
  distil (default: every kept one); ``metric`` is ``dice`` or ``agreement``.
- ``init`` (fixed or searched) starts trials from a kept adapter: ``best`` (the general adapter
  with the best overall validation score), ``RCA``/``LAD``/``LCX`` (that vessel's entry),
  ``vessel`` (stage 3: the entry of the trial's own vessel), or ``none``.
- ``sampler`` (default ``tpe``, seeded) or ``random``: the baseline TPE is measured against
  (``benchmarks/search_efficiency.py``); ``asha: off`` runs every trial to the end (FIFO).
- ``lora_depth`` (fixed or searched, default 1) confines LoRA's encoder targets to that share of
  the encoder's last blocks; with ``embedding_cache: true`` the frozen blocks' output is then
  computed once per crop, and ``augment_views: N`` (fixed) keeps pixel augmentation on through
  a bank of N augmented views per training lesion (``search_spaces/lora_last_blocks.yaml``).
- ``validate: rungs`` (fixed; default ``every``) validates a trial only at the epochs where
  ASHA compares it (``grace_period`` times powers of ``reduction_factor``) and at its last;
  the registry then chooses among those epochs (``validation_epochs``).
- ``select`` (default ``dice``) is the metric the registry compares per vessel (``dice/LAD``),
  the same across stages so that their adapters can replace one another.
- ``callbacks`` turns on experiment trackers beside TensorBoard: ``{mlflow: {}, wandb: {}}``
  with optional settings (``angiotune.search.trackers``; ``pip install 'angiotune[trackers]'``).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from angiotune.errors import ConfigError
from angiotune.names import (
    ADAPTER_VESSELS,
    CLASS_LOSSES,
    CROP_CONTEXT_RANGE,
    GENERAL,
    HEAD_METRICS,
    HEAD_WEIGHTINGS,
    METRIC_MODES,
    PROMPT_MODES,
    STRATEGIES,
    TARGET_GROUPS,
    TRACKERS,
    VESSELS,
    WANDB_MODES,
)
from angiotune.search.trackers import is_uri

TOP_KEYS = {"name", "stage", "metric", "mode", "samples", "max_concurrent", "epochs", "seed",
            "asha", "resources", "data", "fixed", "params", "objective", "select", "vessels",
            "sampler", "callbacks"}
SAMPLERS = ("tpe", "random")
SELECTS = ("dice", "iou")  # the registry compares every stage's adapters on segmentation
AUTO = "auto"  # a size left to the model and the machine (angiotune.search.sizing)
DISTILL = "distill"  # the stage that trains students of the kept models (search.distill)
STAGES = (1, 2, 3, DISTILL)
DEFAULT_HEAD_WEIGHT = 1.0  # a head's loss weight when the space does not set it (train.loop)
INIT_CHOICES = ("none", "best", "vessel", *ADAPTER_VESSELS)
PARAM_TYPES = {"float", "int", "categorical"}
# What a trial understands; anything else in params or fixed is a typo.
TRIAL_KEYS = {"strategy", "rank", "alpha", "alpha_ratio", "dropout", "targets", "train_decoder",
              "lr", "weight_decay", "dice_weight", "pixel_weight", "iou_weight", "pixel_loss",
              "pos_weight", "focal_gamma", "batch_size", "precision", "gradient_checkpointing",
              "prompt_mode", "score_weight", "heads", "init", "segment_weight",
              "stenosis_weight", "mld_weight", "rvd_weight", "head_weighting", "class_loss",
              "class_weights", "head_hidden", "head_lr_ratio", "embedding_cache",
              "crop_context", "refine", "lora_depth", "augment_views", "validate"}
# What a student trial understands (stage: distill; angiotune.train.distill).
DISTILL_KEYS = {"width_ratio", "depth_ratio", "input_ratio", "temperature", "distill_weight",
                "lr", "weight_decay", "batch_size", "frames_per_cine", "max_ms_per_lesion",
                "feature_weight"}
DISTILL_METRICS = ("dice", "agreement")  # what a student trial reports and is selected on
# prompt_mode: one zero-shot base per search; embedding_cache: what may train depends on it;
# augment_views, frames_per_cine: the data every trial of a search reads.
# validate: when a trial validates, which its scheduler's rungs decide.
FIXED_ONLY = {"prompt_mode", "embedding_cache", "augment_views", "frames_per_cine",
              "max_ms_per_lesion", "validate"}
# trial: one Ray Data stream for all of a trial's epochs; epoch: a fresh stream per epoch (what
# a Ray Train worker group always uses: its ranks split each epoch's stream).
STREAMS = ("trial", "epoch")
VALIDATE = ("every", "rungs")  # every epoch, or only where ASHA decides and at the end
# Each scalar field of a SearchSpace: its type, its minimum (None: any) and its key in a file,
# which errors name. A field in AUTO_FIELDS may also be None: auto (angiotune.search.sizing).
SCALAR_FIELDS = {
    "samples": (int, 1, "samples"),
    "max_concurrent": (int, 1, "max_concurrent"), "epochs": (int, 1, "epochs"),
    "seed": (int, None, "seed"), "grace_period": (int, 1, "asha.grace_period"),
    "reduction_factor": (int, 2, "asha.reduction_factor"),
    "workers": (int, 1, "resources.workers"),
    "cpus_per_worker": (float, 0, "resources.cpus_per_worker"),
    "gpus_per_worker": (float, 0, "resources.gpus_per_worker"),
    "retries": (int, 0, "resources.retries"),
    "worker_group": (bool, None, "resources.worker_group"),
    "image_size": (int, 32, "data.image_size"), "batch_size": (int, 1, "data.batch_size"),
    "stream": (str, None, "data.stream"),
    "asha": (bool, None, "asha"), "name": (str, None, "name"), "select": (str, None, "select"),
    "sampler": (str, None, "sampler"),
}
AUTO_FIELDS = {"max_concurrent", "gpus_per_worker", "image_size", "batch_size"}
# The repository's top-level search_spaces/ folder, installed (editable or from a wheel) as the
# package angiotune.search_spaces: a path beside the package would be lost by a wheel install.
SPACES_DIR = Path(str(resources.files("angiotune.search_spaces")))


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple = ()
    when: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """A parameter checks itself, so one made by hand meets the file's rules; ``when``
        is checked by its space, which knows the earlier parameters."""
        where = f"params.{self.name}"
        if self.name not in TRIAL_KEYS | DISTILL_KEYS:
            raise ConfigError(f"{where}: unknown parameter; known: {sorted(TRIAL_KEYS)} (and "
                              f"for stage: distill, {sorted(DISTILL_KEYS)})")
        if self.name in FIXED_ONLY:
            raise ConfigError(f"{where}: {self.name} cannot be searched; set it under 'fixed' "
                              "(every trial of a search shares it: one zero-shot base per "
                              "prompt mode, one data set per search)")
        _check_param_type(self.type, f"{where}.type")
        if not isinstance(self.when, dict):
            raise ConfigError(f"{where}.when: must map earlier parameter names to values")
        if self.type == "categorical":
            if not self.choices:
                raise ConfigError(f"{where}.choices: must be a non-empty list")
            for choice in self.choices:
                _check_trial_value(self.name, choice, f"{where}.choices")
            return
        if self.choices:
            raise ConfigError(f"{where}: a {self.type} parameter has low and high, not choices")
        number = int if self.type == "int" else float
        low = _typed(self.low, number, f"{where}.low")
        high = _typed(self.high, number, f"{where}.high")
        _typed(self.log, bool, f"{where}.log")
        if not low < high:
            raise ConfigError(f"{where}: empty range, low {low} is not below high {high}")
        if self.log and low <= 0:
            raise ConfigError(f"{where}: a log range needs low > 0, got {low}")
        for end, value in (("low", low), ("high", high)):
            _check_trial_value(self.name, value, f"{where}.{end}")
        object.__setattr__(self, "low", low)  # an int given for a float range becomes a float
        object.__setattr__(self, "high", high)


@dataclass(frozen=True)
class SearchSpace:
    name: str
    metric: str | tuple[str, ...]
    mode: str | tuple[str, ...]
    samples: int
    max_concurrent: int | None  # None: auto (angiotune.search.sizing)
    epochs: int
    seed: int
    grace_period: int
    reduction_factor: int
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float | None  # None: auto
    retries: int  # restarts of a trial whose worker or driver died, from its last checkpoint
    worker_group: bool  # a Ray Train worker group even for one worker (else it trains in-trial)
    image_size: int | None  # None: the model's
    batch_size: int | None  # None: auto
    fixed: dict[str, Any]
    params: tuple[Param, ...]
    stage: int = 1
    objective: dict[str, float] = field(default_factory=dict)
    select: str = "dice"
    vessels: tuple[str, ...] = ()
    asha: bool = True
    sampler: str = "tpe"
    callbacks: dict[str, dict[str, str]] = field(default_factory=dict)  # tracker -> settings
    stream: str = "trial"  # one of STREAMS

    def __post_init__(self) -> None:
        """Every rule, however the space is made (``parse_space``, ``dataclasses.replace``,
        by hand), so that no space Ray gets could not have come from a file. Errors name the
        key as a file spells it; ``parse_space`` adds the file. Lists become tuples and ints
        given for floats become floats, as a file's are."""
        for name, (kind, minimum, key) in SCALAR_FIELDS.items():
            value = getattr(self, name)
            if value is not None or name not in AUTO_FIELDS:
                object.__setattr__(self, name, _typed(value, kind, key, minimum))
        for name in ("metric", "mode", "vessels"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if isinstance(self.stage, bool) or self.stage not in STAGES:
            raise ConfigError(f"stage: {self.stage!r} must be one of 1, 2, 3 or distill")
        if not self.name:
            raise ConfigError("name: must not be empty (it names the study and its folder)")
        if self.select not in SELECTS:
            raise ConfigError(f"select: {self.select!r} must be dice or iou (the registry "
                              "compares every stage's adapters on segmentation)")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampler: {self.sampler!r} must be one of {SAMPLERS}")
        if self.stream not in STREAMS:
            raise ConfigError(f"data.stream: {self.stream!r} must be one of {STREAMS}")
        _check_metrics(self)
        _check_asha(self)
        _check_objective(self)
        _check_trial_settings(self)
        _check_vessels(self)
        _check_consistency(self)
        _check_callbacks(self)

    @property
    def trains_in_trial(self) -> bool:
        """A trial of one worker trains in Tune's trial process: a Train worker group would add
        a controller and a fresh worker process to every trial and nothing else."""
        return self.workers == 1 and not self.worker_group

    @property
    def multi_objective(self) -> bool:
        return isinstance(self.metric, tuple)

    @property
    def heads(self) -> bool:
        """Whether any trial of this space can train heads (fixed on, or searched)."""
        return bool(self.fixed.get("heads")) or any(p.name == "heads" for p in self.params)

    def init_choices(self) -> set[str]:
        """Every ``init`` value a trial of this space can get."""
        for param in self.params:
            if param.name == "init":
                return set(param.choices)
        return {self.fixed.get("init", "none")}

    def can_take(self, key: str, default: Any) -> list[Any]:
        """Every value of ``key`` a trial can get: its choices or range ends when searched."""
        for param in self.params:
            if param.name == key:
                return list(param.choices) if param.choices else [param.low, param.high]
        return [self.fixed.get(key, default)]

    def measurements_needed(self) -> tuple[str, ...]:
        """The index columns this space's heads train on. A head whose weight is fixed at 0
        needs none, so a segment-only stage 2 trains on labels alone (ARCADE's SYNTAX
        segments); learned (uncertainty) weighting trains every head."""
        if not self.heads:
            return ()
        every = "uncertainty" in self.can_take("head_weighting", "fixed")
        needed: list[str] = []
        for weight, columns in (("stenosis_weight", ("diameter_stenosis_pct",)),
                                ("mld_weight", ("mld_mm", "pixel_spacing_mm")),
                                ("rvd_weight", ("rvd_mm", "pixel_spacing_mm"))):
            if every or any(float(v) > 0 for v in self.can_take(weight, DEFAULT_HEAD_WEIGHT)):
                needed += [c for c in columns if c not in needed]
        return tuple(needed)

    def validation_epochs(self) -> tuple[int, ...] | None:
        """The epochs a trial validates at with ``validate: rungs`` (ASHA's milestones, as
        Ray's scheduler places them, and the last epoch); None: every epoch."""
        if self.fixed.get("validate", "every") == "every":
            return None
        rungs = set()
        if self.asha:
            milestone = self.grace_period
            while milestone < self.epochs:
                rungs.add(milestone)
                milestone *= self.reduction_factor
        return tuple(sorted(rungs | {self.epochs}))

    def define_by_run(self, trial) -> dict[str, Any]:
        """Suggest this space's parameters on an Optuna trial; returns the fixed values."""
        chosen = dict(self.fixed)
        for param in self.params:
            if any(chosen.get(key) != value for key, value in param.when.items()):
                continue
            if param.type == "categorical":
                chosen[param.name] = trial.suggest_categorical(param.name, list(param.choices))
            elif param.type == "int":
                chosen[param.name] = trial.suggest_int(param.name, int(param.low),
                                                       int(param.high), log=param.log)
            else:
                chosen[param.name] = trial.suggest_float(param.name, param.low, param.high,
                                                         log=param.log)
        return dict(self.fixed)


def resolve_space_path(text: str | Path) -> Path:
    """A path as given, or a file name in the shipped search_spaces/ folder."""
    path = Path(text)
    if path.exists():
        return path
    shipped = SPACES_DIR / path.name
    if shipped.exists():
        return shipped
    raise ConfigError(f"search space {text}: no such file (shipped spaces: "
                      f"{', '.join(sorted(p.name for p in SPACES_DIR.glob('*.yaml')))})")


def load_space(path: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> SearchSpace:
    """A space file, with ``overrides`` (``key=value`` or ``section.key=value``, the value in
    YAML) applied before validation."""
    path = resolve_space_path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from None
    source = str(path)
    if overrides:
        raw = apply_overrides(raw, overrides, source)
        source += f" with --set {' '.join(overrides)}"
    return parse_space(raw, source)


def apply_overrides(raw: Any, overrides: tuple[str, ...] | list[str], source: str) -> dict:
    """The YAML mapping with each ``a.b=value`` set in it (a copy; sections created as needed),
    e.g. ``samples=40``, ``data.batch_size=2`` or ``params.init.choices=[none]``."""
    import copy

    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, equals, text = item.partition("=")
        parts = key.strip().split(".")
        if not equals or not all(parts):
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE or SECTION.KEY=VALUE, e.g. "
                              "samples=40 or data.batch_size=2")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"--set {item!r}: the value is not YAML ({error})") from None
        block = raw
        for depth, part in enumerate(parts[:-1]):
            if block.get(part) is None:
                block[part] = {}
            block = block[part]
            if not isinstance(block, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(parts[:depth + 1])} is not a "
                                  f"section in {source}")
        block[parts[-1]] = value
    return raw


def parse_space(raw: Any, source: str) -> SearchSpace:
    """A space from a file's top-level mapping. The file's layout (sections, keys, defaults,
    ``auto``) is read here; its rules are the space's own (``SearchSpace.__post_init__``).
    Every error names ``source`` and the key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; allowed: {sorted(TOP_KEYS)}")

    def get(key: str, default: Any = None) -> Any:
        value = raw.get(key, default)
        if value is None:
            raise ConfigError(f"{source}: '{key}' is required")
        return value

    def auto(value: Any) -> Any:
        """None for ``auto`` (or absent): sized from the model and the machine."""
        return None if value in (None, AUTO) else value

    def section(key: str, defaults: dict[str, Any]) -> dict:
        block = raw.get(key) or {}
        if not isinstance(block, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping")
        extra = sorted(set(block) - set(defaults))
        if extra:
            raise ConfigError(f"{source}: {key}: unknown key(s) {extra}; allowed: "
                              f"{sorted(defaults)}")
        return {name: auto(block.get(name)) if default == AUTO else block.get(name, default)
                for name, default in defaults.items()}

    stage = get("stage", 1)
    # Stage 3's trials of different vessels are not comparable on one scale: no ASHA unless set.
    use_asha = raw.get("asha", {} if stage != 3 else None) not in (None, False, "off")
    if not use_asha:
        raw = {**raw, "asha": None}
    fixed = raw.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise ConfigError(f"{source}: 'fixed' must be a mapping")
    if stage == 2:
        if fixed.get("heads") is False:
            raise ConfigError(f"{source}: fixed.heads: stage 2 trains the heads; remove "
                              "'heads: false'")
        fixed = {**fixed, "heads": True}
    fields = dict(
        name=get("name"), metric=get("metric", "dice"), mode=get("mode", "max"),
        samples=get("samples", 8), max_concurrent=auto(raw.get("max_concurrent")),
        epochs=get("epochs", 4), seed=get("seed", 0),
        **section("asha", {"grace_period": 1, "reduction_factor": 2}),
        **section("resources", {"workers": 1, "cpus_per_worker": 1.0, "gpus_per_worker": AUTO,
                                "retries": 1, "worker_group": False}),
        **section("data", {"image_size": AUTO, "batch_size": AUTO, "stream": "trial"}),
        fixed=dict(fixed), params=_parse_params(raw.get("params"), source), stage=stage,
        objective=_parse_objective(raw.get("objective"), source), select=get("select", "dice"),
        vessels=_parse_vessels(raw.get("vessels"), source), asha=use_asha,
        sampler=get("sampler", "tpe"), callbacks=raw.get("callbacks"))
    with _in_file(source):
        return SearchSpace(**fields)


@contextmanager
def _in_file(source: str) -> Iterator[None]:
    """Name the file in the errors of what is made from it (a space checks itself, and knows
    no file)."""
    try:
        yield
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None


def _parse_objective(block: Any, source: str) -> dict[str, Any]:
    if block is None:
        return {}
    if not isinstance(block, dict) or not block:
        raise ConfigError(f"{source}: objective: expected a mapping of metric -> weight")
    return dict(block)


def _parse_vessels(block: Any, source: str) -> tuple[Any, ...]:
    if block is None:
        return ()
    if not isinstance(block, list):
        raise ConfigError(f"{source}: vessels: expected a list, e.g. [RCA, LAD, LCX]")
    return tuple(block)


def _parse_params(block: Any, source: str) -> tuple[Param, ...]:
    """The ``params`` mapping as Params, in the file's order (``when`` names earlier ones)."""
    if not isinstance(block, dict):
        raise ConfigError(f"{source}: 'params' must be a mapping of name -> spec")
    params: list[Param] = []
    for name, spec in block.items():
        key = f"{source}: params.{name}"
        if not isinstance(spec, dict):
            raise ConfigError(f"{key}: expected a mapping with 'type'")
        kind = spec.get("type")
        _check_param_type(kind, f"{key}.type")  # it says which keys the spec may have
        allowed = {"type", "when"} | ({"choices"} if kind == "categorical" else
                                      {"low", "high", "log"})
        extra = sorted(set(spec) - allowed)
        if extra:
            raise ConfigError(f"{key}: unknown key(s) {extra} for a {kind} parameter")
        when = spec.get("when") or {}
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list):
                raise ConfigError(f"{key}.choices: must be a non-empty list")
            with _in_file(source):
                params.append(Param(name, kind, choices=tuple(choices), when=when))
        else:
            with _in_file(source):
                params.append(Param(name, kind, spec.get("low"), spec.get("high"),
                                    spec.get("log", False), when=when))
    return tuple(params)


def _check_param_type(kind: Any, where: str) -> None:
    if kind not in PARAM_TYPES:
        raise ConfigError(f"{where}: {kind!r} is not one of {sorted(PARAM_TYPES)}")


def _check_metrics(space: SearchSpace) -> None:
    """Known metric names, each with the mode in which it is better."""
    if space.multi_objective:
        if (len(space.metric) < 2 or not isinstance(space.mode, tuple)
                or len(space.mode) != len(space.metric)):
            raise ConfigError("metric: a multi-objective search lists two or more metrics and "
                              "as many modes (mode: [max, min])")
        pairs = list(zip(space.metric, space.mode, strict=True))
    elif isinstance(space.metric, str):
        pairs = [(space.metric, space.mode)]
    else:
        raise ConfigError(f"metric: expected a metric name or a list, got {space.metric!r}")
    for name, _ in pairs:
        _check_metric_name(name, "metric")
    for name, mode in pairs:
        if mode not in ("max", "min"):
            raise ConfigError(f"mode: {mode!r} must be 'max' or 'min'")
        better = METRIC_MODES[name.split("/")[0]]
        if better != mode:
            raise ConfigError(f"mode: {name} is better when "
                              f"{'higher' if better == 'max' else 'lower'}; use mode {better}")


def _check_metric_name(name: Any, where: str) -> None:
    base, _, group = str(name).partition("/")
    if not isinstance(name, str) or base not in METRIC_MODES or (group and group not in VESSELS):
        raise ConfigError(f"{where}: unknown metric {name!r}; known: {sorted(METRIC_MODES)}, "
                          "optionally per vessel as name/VESSEL")


def _check_asha(space: SearchSpace) -> None:
    if not space.asha:
        return
    if space.stage == 3:
        raise ConfigError("asha: stage 3 compares trials of different vessels, which ASHA "
                          "would rank on one scale; set 'asha: off'")
    if space.multi_objective:
        raise ConfigError("asha: ASHA cannot stop trials of a multi-objective search (metric "
                          "is a list); set 'asha: off'")
    if space.grace_period > space.epochs:
        raise ConfigError(f"asha.grace_period {space.grace_period} exceeds epochs "
                          f"{space.epochs}")


def _check_objective(space: SearchSpace) -> None:
    if not isinstance(space.objective, dict):
        raise ConfigError("objective: expected a mapping of metric -> weight")
    terms = {}
    for name, weight in space.objective.items():
        if name not in METRIC_MODES or name == "objective":
            raise ConfigError(f"objective.{name}: unknown metric; known: "
                              f"{sorted(set(METRIC_MODES) - {'objective'})}")
        terms[name] = _typed(weight, float, f"objective.{name}")
    object.__setattr__(space, "objective", terms)


def _check_trial_settings(space: SearchSpace) -> None:
    """The fixed values, and the parameters in order: each searched once, and conditional
    only on fixed values or earlier parameters."""
    if not isinstance(space.fixed, dict):
        raise ConfigError("fixed: must be a mapping")
    for key, value in space.fixed.items():
        _check_trial_value(key, value, f"fixed.{key}")
    allowed = DISTILL_KEYS if space.stage == DISTILL else TRIAL_KEYS
    for key, where in [*((k, f"fixed.{k}") for k in space.fixed),
                       *((p.name, f"params.{p.name}") for p in space.params)]:
        if key not in allowed:
            kind = "a student trial" if space.stage == DISTILL else "an adapter trial"
            raise ConfigError(f"{where}: not a setting of {kind} (stage {space.stage}); "
                              f"known: {sorted(allowed)}")
    if space.stage == 2 and space.fixed.get("heads") is not True:
        raise ConfigError("fixed.heads: stage 2 trains the heads; it must be true")
    if not space.params:
        raise ConfigError("params: a search needs at least one parameter")
    known = set(space.fixed)
    for param in space.params:
        where = f"params.{param.name}"
        if param.name in space.fixed:
            raise ConfigError(f"{where}: also given in 'fixed'")
        if param.name in known:
            raise ConfigError(f"{where}: searched twice")
        for other in param.when:
            if other not in known:
                raise ConfigError(f"{where}.when: '{other}' is not a fixed value or an earlier "
                                  "parameter")
        known.add(param.name)


def _check_vessels(space: SearchSpace) -> None:
    if space.stage == DISTILL:  # the registry entries to distil (default: every kept one)
        keys = (*ADAPTER_VESSELS, GENERAL)
        if any(v not in keys for v in space.vessels) or len(set(space.vessels)) != len(
                space.vessels):
            raise ConfigError(f"vessels: {list(space.vessels)} must be distinct registry "
                              f"entries from {list(keys)}")
        return
    if space.stage != 3:
        if space.vessels:
            raise ConfigError("vessels: only a stage-3 search has one study per vessel")
        return
    if not space.vessels:
        raise ConfigError("vessels: stage 3 needs a list, e.g. [RCA, LAD, LCX]")
    unknown = [v for v in space.vessels if v not in ADAPTER_VESSELS]
    if unknown or len(set(space.vessels)) != len(space.vessels):
        raise ConfigError(f"vessels: {list(space.vessels)} must be distinct names from "
                          f"{list(ADAPTER_VESSELS)}")


def _check_consistency(space: SearchSpace) -> None:
    """Rules that span sections: what the metrics need, and where ``init`` can point."""
    metrics = space.metric if space.multi_objective else (space.metric,)
    if space.stage == DISTILL:
        if space.multi_objective or space.metric not in DISTILL_METRICS or space.objective:
            raise ConfigError(f"metric: a distillation search selects students on one of "
                              f"{DISTILL_METRICS} (validation Dice, or agreement with the "
                              "teacher), without a vessel or an objective")
        return
    if "agreement" in metrics:
        raise ConfigError("metric: agreement compares a student with its teacher; only a "
                          "distillation search (stage: distill) reports it")
    if space.stage == 3 and (space.multi_objective or "/" in space.metric):
        raise ConfigError("metric: stage 3 takes one metric without a vessel (each trial is "
                          "scored on its own vessel's lesions)")
    names = {m.split("/")[0] for m in metrics} | set(space.objective)
    if "objective" in names and not space.objective:
        raise ConfigError("metric 'objective' needs an 'objective' block of metric weights")
    if names & set(HEAD_METRICS) and not space.heads:
        raise ConfigError(f"metric(s) {sorted(names & set(HEAD_METRICS))} need the heads: "
                          "use stage 2 or set heads: true")
    if space.heads and space.fixed.get("prompt_mode", "box") != "box":
        raise ConfigError("the heads read the tracker's features: prompt_mode must be box")
    if any(space.can_take("refine", False)) and space.fixed.get("prompt_mode", "box") != "box":
        raise ConfigError("refine sharpens the tracker's box-prompted mask: prompt_mode must "
                          "be box")
    if space.fixed.get("embedding_cache"):
        _check_frozen_encoder(space)
    if "vessel" in space.init_choices() and space.stage != 3:
        raise ConfigError("init 'vessel' names the trial's own vessel, which only stage 3 has")


def _check_frozen_encoder(space: SearchSpace) -> None:
    """The embedding cache is right only if every trial leaves the image encoder, or a prefix
    of its blocks (LoRA on the last blocks: ``lora_depth`` < 1), as the base has it."""
    searched = {p.name for p in space.params}
    strategy, targets = space.fixed.get("strategy", "lora"), space.fixed.get("targets")
    shallow = all(float(v) < 1 for v in space.can_take("lora_depth", 1.0))
    frozen = "strategy" not in searched and (
        strategy == "decoder_only"
        or (strategy == "lora" and (shallow or (
            "targets" not in searched and targets is not None
            and set(str(targets).split("+")) == {"decoder_attn"}))))
    if not frozen:
        raise ConfigError("fixed.embedding_cache: every trial must leave the image encoder, or "
                          "its first blocks, frozen: fix strategy decoder_only, or strategy "
                          "lora with targets decoder_attn or every lora_depth below 1")
    if space.fixed.get("prompt_mode", "box") != "box" or space.init_choices() != {"none"}:
        raise ConfigError("fixed.embedding_cache: only for box prompts trained from the base "
                          "(init: none)")


def _check_callbacks(space: SearchSpace) -> None:
    """Known trackers with known settings, each a string, and the tracker's package installed:
    a tracker that cannot start would otherwise fail the search after Ray and the zero-shot
    baseline. ``mlflow:`` with no settings (None) means the defaults."""
    block = {} if space.callbacks is None else space.callbacks
    if not isinstance(block, dict):
        raise ConfigError("callbacks: expected a mapping of tracker -> settings, e.g. "
                          "{mlflow: {}, wandb: {mode: offline}}")
    checked = {}
    for name, settings in block.items():
        if name not in TRACKERS:
            raise ConfigError(f"callbacks.{name}: unknown tracker; known: {sorted(TRACKERS)}")
        settings = {} if settings is None else settings
        if not isinstance(settings, dict):
            raise ConfigError(f"callbacks.{name}: expected a mapping of settings ({{}} for the "
                              f"defaults); allowed: {list(TRACKERS[name])}")
        for key, value in settings.items():
            where = f"callbacks.{name}.{key}"
            if key not in TRACKERS[name]:
                raise ConfigError(f"{where}: unknown setting; allowed: {list(TRACKERS[name])}")
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"{where}: expected a non-empty string, got {value!r}")
        if settings.get("mode", WANDB_MODES[0]) not in WANDB_MODES:
            raise ConfigError(f"callbacks.{name}.mode: {settings['mode']!r} is not one of "
                              f"{WANDB_MODES}")
        uri = settings.get("tracking_uri", ".db")
        if not is_uri(uri) and not uri.endswith(".db"):
            raise ConfigError(f"callbacks.{name}.tracking_uri: {uri!r} would be a folder store, "
                              "which MLflow 3.13+ refuses; name an SQLite file (mlflow.db) or a "
                              "server (http://host:5000)")
        if importlib.util.find_spec(name) is None:
            raise ConfigError(f"callbacks.{name}: {name} is not installed; pip install "
                              "'angiotune[trackers]'")
        checked[name] = dict(settings)
    object.__setattr__(space, "callbacks", checked)


def _typed(value: Any, kind, where: str, minimum=None):
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(f"{where}: expected {kind.__name__}, got {value!r}")
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"{where}: {value} is not finite")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{where}: {value} is below the minimum {minimum}")
    return value


def _check_trial_value(name: str, value: Any, where: str) -> None:
    if name not in TRIAL_KEYS | DISTILL_KEYS:
        raise ConfigError(f"{where}: unknown parameter; known: {sorted(TRIAL_KEYS)} (and for "
                          f"stage: distill, {sorted(DISTILL_KEYS)})")
    number = not isinstance(value, bool) and isinstance(value, int | float)
    if name in ("width_ratio", "depth_ratio", "input_ratio") and not (number and 0 < value <= 1):
        raise ConfigError(f"{where}: {value!r} is not a share in (0, 1] of the teacher's")
    if name == "temperature" and not (number and value > 0):
        raise ConfigError(f"{where}: {value!r} is not a temperature above 0")
    if name == "validate" and value not in VALIDATE:
        raise ConfigError(f"{where}: {value!r} is not one of {VALIDATE}")
    if name == "batch_size" and not (isinstance(value, int) and not isinstance(value, bool)
                                     and value >= 1):
        raise ConfigError(f"{where}: {value!r} is not a batch size (a whole number, 1 or more)")
    if name in ("weight_decay", "feature_weight") and not (number and value >= 0):
        raise ConfigError(f"{where}: {value!r} must be a number, 0 or more")
    if name == "max_ms_per_lesion" and not (number and value > 0):
        raise ConfigError(f"{where}: {value!r} is not a time in ms above 0")
    if name == "distill_weight" and not (number and 0 <= value <= 1):
        raise ConfigError(f"{where}: {value!r} is not a share in [0, 1] of the loss")
    if name == "frames_per_cine" and not (isinstance(value, int) and not isinstance(value, bool)
                                          and value >= 1):
        raise ConfigError(f"{where}: {value!r} is not a number of frames (1: the analysed "
                          "frame only)")
    if name == "strategy" and value not in STRATEGIES:
        raise ConfigError(f"{where}: {value!r} is not one of {STRATEGIES}")
    if name == "prompt_mode" and value not in PROMPT_MODES:
        raise ConfigError(f"{where}: {value!r} is not one of {PROMPT_MODES}")
    choices = {"init": INIT_CHOICES, "head_weighting": HEAD_WEIGHTINGS,
               "class_loss": CLASS_LOSSES, "class_weights": ("none", "balanced")}
    if name in choices and value not in choices[name]:
        raise ConfigError(f"{where}: {value!r} is not one of {tuple(choices[name])}")
    if name in ("embedding_cache", "refine") and not isinstance(value, bool):
        raise ConfigError(f"{where}: {value!r} must be true or false")
    if name == "lora_depth" and (isinstance(value, bool) or not isinstance(value, int | float)
                                 or not 0 < value <= 1):
        raise ConfigError(f"{where}: {value!r} is not a share in (0, 1] of the image "
                          "encoder's blocks (the last ones) that LoRA adapts")
    if name == "augment_views" and (isinstance(value, bool) or not isinstance(value, int)
                                    or value < 0):
        raise ConfigError(f"{where}: {value!r} is not a number of augmented views per "
                          "training lesion (0: fresh each epoch)")
    low, high = CROP_CONTEXT_RANGE
    if name == "crop_context" and (isinstance(value, bool) or not isinstance(value, int | float)
                                   or not low <= value <= high):
        raise ConfigError(f"{where}: {value!r} is not a crop of {low:g} to {high:g} lesion "
                          "boxes")
    if name == "precision" and value not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"{where}: {value!r} is not one of fp32, bf16, fp16")
    if name == "targets":
        groups = str(value).split("+")
        unknown = [g for g in groups if g not in TARGET_GROUPS]
        if unknown:
            raise ConfigError(f"{where}: unknown target module group(s) {unknown} for this "
                              f"model; known: {sorted(TARGET_GROUPS)}")
