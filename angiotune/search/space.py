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
the file and the key, and is raised before Ray starts.

A space says what it searches; sizes follow the model and the machine unless it sets them
(``angiotune.search.sizing``): ``data.image_size`` (the model's own), ``data.batch_size``,
``resources.gpus_per_worker`` (one per trial when the cluster has GPUs) and ``max_concurrent``
(one trial per GPU) default to ``auto``. ``load_space(path, overrides)`` applies command-line
overrides such as ``samples=40`` or ``data.batch_size=2`` to the YAML before it is validated,
so they are checked exactly as the file is.

Stages (``stage: 1 | 2 | 3``, default 1) share the format:

- ``stage: 2`` trains the measurement heads with the adapter (``heads: true`` is implied) and may
  optimise an ``objective``: a weighted sum of metrics, e.g. ``{dice: 1, stenosis_mae: -0.01}``
  (``metric: objective``), or several metrics at once (``metric: [dice, stenosis_mae]``, ``mode:
  [max, min]``: an Optuna multi-objective search whose Pareto front is reported; no ASHA).
- ``stage: 3`` runs one study per vessel in ``vessels`` on that vessel's lesions, ``samples``
  trials each, all in one Tune run sharing the cluster.
- ``init`` (fixed or searched) starts trials from a kept adapter: ``best`` (the general adapter
  with the best overall validation score), ``RCA``/``LAD``/``LCX`` (that vessel's entry),
  ``vessel`` (stage 3: the entry of the trial's own vessel), or ``none``.
- ``sampler`` (default ``tpe``, seeded) or ``random``: the baseline TPE is measured against
  (``benchmarks/search_efficiency.py``); ``asha: off`` runs every trial to the end (FIFO).
- ``select`` (default ``dice``) is the metric the registry compares per vessel (``dice/LAD``),
  the same across stages so that their adapters can replace one another.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from angiotune.errors import ConfigError
from angiotune.model.adapters import CROP_CONTEXT_RANGE, STRATEGIES, TARGET_GROUPS
from angiotune.model.losses import CLASS_LOSSES, HEAD_WEIGHTINGS
from angiotune.model.sam3 import PROMPT_MODES
from angiotune.train.metrics import HEAD_METRICS, METRIC_MODES

TOP_KEYS = {"name", "stage", "metric", "mode", "samples", "max_concurrent", "epochs", "seed",
            "asha", "resources", "data", "fixed", "params", "objective", "select", "vessels",
            "sampler"}
SAMPLERS = ("tpe", "random")
AUTO = "auto"  # a size left to the model and the machine (angiotune.search.sizing)
STAGES = (1, 2, 3)
REGISTRY_VESSELS = ("RCA", "LAD", "LCX")
DEFAULT_HEAD_WEIGHT = 1.0  # a head's loss weight when the space does not set it (train.loop)
INIT_CHOICES = ("none", "best", "vessel", *REGISTRY_VESSELS)
PARAM_TYPES = {"float", "int", "categorical"}
# What a trial understands; anything else in params or fixed is a typo.
TRIAL_KEYS = {"strategy", "rank", "alpha", "alpha_ratio", "dropout", "targets", "train_decoder",
              "lr", "weight_decay", "dice_weight", "pixel_weight", "iou_weight", "pixel_loss",
              "pos_weight", "focal_gamma", "batch_size", "precision", "gradient_checkpointing",
              "prompt_mode", "score_weight", "heads", "init", "segment_weight",
              "stenosis_weight", "mld_weight", "rvd_weight", "head_weighting", "class_loss",
              "class_weights", "head_hidden", "head_lr_ratio", "embedding_cache",
              "crop_context", "refine"}
# prompt_mode: one zero-shot base per search; embedding_cache: what may train depends on it.
FIXED_ONLY = {"prompt_mode", "embedding_cache"}
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
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; allowed: {sorted(TOP_KEYS)}")

    def get(key: str, kind, default=None, *, minimum=None):
        value = raw.get(key, default)
        if value is None:
            raise ConfigError(f"{source}: '{key}' is required")
        return _typed(value, kind, f"{source}: {key}", minimum)

    def auto(value: Any, kind, where: str, minimum) -> Any:
        """None for ``auto`` (or absent): sized from the model and the machine."""
        return None if value in (None, AUTO) else _typed(value, kind, where, minimum)

    def section(key: str, allowed: dict[str, tuple]) -> dict:
        block = raw.get(key) or {}
        if not isinstance(block, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping")
        extra = sorted(set(block) - set(allowed))
        if extra:
            raise ConfigError(f"{source}: {key}: unknown key(s) {extra}; allowed: "
                              f"{sorted(allowed)}")
        return {name: auto(block.get(name), kind, f"{source}: {key}.{name}", low)
                if default == AUTO else
                _typed(block.get(name, default), kind, f"{source}: {key}.{name}", low)
                for name, (kind, default, low) in allowed.items()}

    stage = get("stage", int, 1)
    if stage not in STAGES:
        raise ConfigError(f"{source}: stage: {stage} must be one of {STAGES}")
    metric, mode = _parse_metric(raw, source)
    # Stage 3's trials of different vessels are not comparable on one scale: no ASHA unless set.
    use_asha = raw.get("asha", {} if stage != 3 else None) not in (None, False, "off")
    if use_asha and stage == 3:
        raise ConfigError(f"{source}: asha: stage 3 compares trials of different vessels, "
                          "which ASHA would rank on one scale; set 'asha: off'")
    if not use_asha:
        raw = {**raw, "asha": None}
    elif isinstance(metric, tuple):
        raise ConfigError(f"{source}: asha: ASHA cannot stop trials of a multi-objective search "
                          "(metric is a list); set 'asha: off'")
    asha = section("asha", {"grace_period": (int, 1, 1), "reduction_factor": (int, 2, 2)})
    resources = section("resources", {"workers": (int, 1, 1), "cpus_per_worker": (float, 1.0, 0),
                                      "gpus_per_worker": (float, AUTO, 0),
                                      "retries": (int, 1, 0),
                                      "worker_group": (bool, False, None)})
    data = section("data", {"image_size": (int, AUTO, 32), "batch_size": (int, AUTO, 1)})
    fixed = raw.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise ConfigError(f"{source}: 'fixed' must be a mapping")
    if stage == 2:
        if fixed.get("heads") is False:
            raise ConfigError(f"{source}: fixed.heads: stage 2 trains the heads; remove "
                              "'heads: false'")
        fixed = {**fixed, "heads": True}
    for key, value in fixed.items():
        _check_trial_value(key, value, f"{source}: fixed.{key}")
    params = _parse_params(raw.get("params"), fixed, source)
    epochs = get("epochs", int, 4, minimum=1)
    if use_asha and asha["grace_period"] > epochs:
        raise ConfigError(f"{source}: asha.grace_period {asha['grace_period']} exceeds epochs "
                          f"{epochs}")
    objective = _parse_objective(raw.get("objective"), source)
    select = get("select", str, "dice")
    if select not in ("dice", "iou"):
        raise ConfigError(f"{source}: select: {select!r} must be dice or iou (the registry "
                          "compares every stage's adapters on segmentation)")
    vessels = _parse_vessels(raw.get("vessels"), stage, source)
    sampler = get("sampler", str, "tpe")
    if sampler not in SAMPLERS:
        raise ConfigError(f"{source}: sampler: {sampler!r} must be one of {SAMPLERS}")
    space = SearchSpace(
        name=get("name", str), metric=metric, mode=mode,
        samples=get("samples", int, 8, minimum=1),
        max_concurrent=auto(raw.get("max_concurrent"), int, f"{source}: max_concurrent", 1),
        epochs=epochs,
        seed=get("seed", int, 0), **asha, **resources, **data, fixed=dict(fixed),
        params=params, stage=stage, objective=objective, select=select, vessels=vessels,
        asha=use_asha, sampler=sampler)
    _check_consistency(space, source)
    return space


def _parse_metric(raw: dict, source: str) -> tuple[str | tuple, str | tuple]:
    metric, mode = raw.get("metric", "dice"), raw.get("mode", "max")
    if isinstance(metric, list):
        if len(metric) < 2 or not isinstance(mode, list) or len(mode) != len(metric):
            raise ConfigError(f"{source}: metric: a multi-objective search lists two or more "
                              "metrics and as many modes (mode: [max, min])")
        for name in metric:
            _check_metric_name(name, f"{source}: metric")
        for value in mode:
            if value not in ("max", "min"):
                raise ConfigError(f"{source}: mode: {value!r} must be 'max' or 'min'")
        return tuple(metric), tuple(mode)
    if not isinstance(metric, str):
        raise ConfigError(f"{source}: metric: expected a metric name or a list, got {metric!r}")
    _check_metric_name(metric, f"{source}: metric")
    if mode not in ("max", "min"):
        raise ConfigError(f"{source}: mode: {mode!r} must be 'max' or 'min'")
    return metric, mode


def _check_metric_name(name: Any, where: str) -> None:
    base, _, group = str(name).partition("/")
    if base not in METRIC_MODES or (group and group not in REGISTRY_VESSELS + ("LM", "RAMUS")):
        raise ConfigError(f"{where}: unknown metric {name!r}; known: {sorted(METRIC_MODES)}, "
                          "optionally per vessel as name/VESSEL")


def _parse_objective(block: Any, source: str) -> dict[str, float]:
    if block is None:
        return {}
    if not isinstance(block, dict) or not block:
        raise ConfigError(f"{source}: objective: expected a mapping of metric -> weight")
    terms = {}
    for name, weight in block.items():
        if name not in METRIC_MODES or name == "objective":
            raise ConfigError(f"{source}: objective.{name}: unknown metric; known: "
                              f"{sorted(set(METRIC_MODES) - {'objective'})}")
        terms[name] = _typed(weight, float, f"{source}: objective.{name}")
    return terms


def _parse_vessels(block: Any, stage: int, source: str) -> tuple[str, ...]:
    if stage != 3:
        if block is not None:
            raise ConfigError(f"{source}: vessels: only a stage-3 search has one study per "
                              "vessel")
        return ()
    if not isinstance(block, list) or not block:
        raise ConfigError(f"{source}: vessels: stage 3 needs a list, e.g. [RCA, LAD, LCX]")
    unknown = [v for v in block if v not in REGISTRY_VESSELS]
    if unknown or len(set(block)) != len(block):
        raise ConfigError(f"{source}: vessels: {block} must be distinct names from "
                          f"{list(REGISTRY_VESSELS)}")
    return tuple(block)


def _check_consistency(space: SearchSpace, source: str) -> None:
    """Rules that span sections: what the metrics need, and where ``init`` can point."""
    metrics = space.metric if space.multi_objective else (space.metric,)
    if space.stage == 3 and (space.multi_objective or "/" in space.metric):
        raise ConfigError(f"{source}: metric: stage 3 takes one metric without a vessel "
                          "(each trial is scored on its own vessel's lesions)")
    modes = space.mode if space.multi_objective else (space.mode,)
    for name, mode in zip(metrics, modes, strict=True):
        better = METRIC_MODES[name.split("/")[0]]
        if better != mode:
            raise ConfigError(f"{source}: mode: {name} is better when "
                              f"{'higher' if better == 'max' else 'lower'}; use mode {better}")
    names = {m.split("/")[0] for m in metrics} | set(space.objective)
    if "objective" in names and not space.objective:
        raise ConfigError(f"{source}: metric 'objective' needs an 'objective' block of "
                          "metric weights")
    if names & set(HEAD_METRICS) and not space.heads:
        raise ConfigError(f"{source}: metric(s) {sorted(names & set(HEAD_METRICS))} need the "
                          "heads: use stage 2 or set heads: true")
    if space.heads and space.fixed.get("prompt_mode", "box") != "box":
        raise ConfigError(f"{source}: the heads read the tracker's features: prompt_mode "
                          "must be box")
    if any(space.can_take("refine", False)) and space.fixed.get("prompt_mode", "box") != "box":
        raise ConfigError(f"{source}: refine sharpens the tracker's box-prompted mask: "
                          "prompt_mode must be box")
    if space.fixed.get("embedding_cache"):
        _check_frozen_encoder(space, source)
    if "vessel" in space.init_choices() and space.stage != 3:
        raise ConfigError(f"{source}: init 'vessel' names the trial's own vessel, which only "
                          "stage 3 has")


def _check_frozen_encoder(space: SearchSpace, source: str) -> None:
    """The embedding cache is right only if no trial trains the image encoder."""
    searched = {p.name for p in space.params}
    strategy, targets = space.fixed.get("strategy", "lora"), space.fixed.get("targets")
    frozen = "strategy" not in searched and (
        strategy == "decoder_only"
        or (strategy == "lora" and "targets" not in searched and targets is not None
            and set(str(targets).split("+")) == {"decoder_attn"}))
    if not frozen:
        raise ConfigError(f"{source}: fixed.embedding_cache: every trial must leave the image "
                          "encoder frozen: fix strategy decoder_only, or strategy lora with "
                          "targets decoder_attn")
    if space.fixed.get("prompt_mode", "box") != "box" or space.init_choices() != {"none"}:
        raise ConfigError(f"{source}: fixed.embedding_cache: only for box prompts trained from "
                          "the base (init: none)")


def _parse_params(block: Any, fixed: dict, source: str) -> tuple[Param, ...]:
    if not isinstance(block, dict) or not block:
        raise ConfigError(f"{source}: 'params' must be a non-empty mapping of name -> spec")
    params: list[Param] = []
    known = set(fixed)
    for name, spec in block.items():
        key = f"{source}: params.{name}"
        if name not in TRIAL_KEYS:
            raise ConfigError(f"{key}: unknown parameter; known: {sorted(TRIAL_KEYS)}")
        if name in fixed:
            raise ConfigError(f"{key}: also given in 'fixed'")
        if name in FIXED_ONLY:
            raise ConfigError(f"{key}: {name} cannot be searched; set it under 'fixed' (run one "
                              "search per prompt mode: each has its own zero-shot base)")
        if not isinstance(spec, dict):
            raise ConfigError(f"{key}: expected a mapping with 'type'")
        kind = spec.get("type")
        if kind not in PARAM_TYPES:
            raise ConfigError(f"{key}.type: {kind!r} is not one of {sorted(PARAM_TYPES)}")
        allowed = {"type", "when"} | ({"choices"} if kind == "categorical" else
                                      {"low", "high", "log"})
        extra = sorted(set(spec) - allowed)
        if extra:
            raise ConfigError(f"{key}: unknown key(s) {extra} for a {kind} parameter")
        when = spec.get("when") or {}
        if not isinstance(when, dict):
            raise ConfigError(f"{key}.when: must map earlier parameter names to values")
        for other in when:
            if other not in known:
                raise ConfigError(f"{key}.when: '{other}' is not a fixed value or an earlier "
                                  "parameter")
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices:
                raise ConfigError(f"{key}.choices: must be a non-empty list")
            for choice in choices:
                _check_trial_value(name, choice, f"{key}.choices")
            params.append(Param(name, kind, choices=tuple(choices), when=dict(when)))
        else:
            number = int if kind == "int" else float
            low = _typed(spec.get("low"), number, f"{key}.low")
            high = _typed(spec.get("high"), number, f"{key}.high")
            log = _typed(spec.get("log", False), bool, f"{key}.log")
            if not low < high:
                raise ConfigError(f"{key}: empty range, low {low} is not below high {high}")
            if log and low <= 0:
                raise ConfigError(f"{key}: a log range needs low > 0, got {low}")
            _check_trial_value(name, low, f"{key}.low")
            params.append(Param(name, kind, low, high, log, when=dict(when)))
        known.add(name)
    return tuple(params)


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
    if name not in TRIAL_KEYS:
        raise ConfigError(f"{where}: unknown parameter; known: {sorted(TRIAL_KEYS)}")
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
