"""Search spaces as YAML, validated on load and compiled to one Optuna define-by-run function.

A space file::

    name: lora_rank
    metric: dice            # a reported metric, e.g. dice, iou, dice/LAD
    mode: max
    samples: 8              # trials
    max_concurrent: 2
    epochs: 4
    seed: 0
    asha: {grace_period: 1, reduction_factor: 2}
    resources: {workers: 1, cpus_per_worker: 1, gpus_per_worker: 0}
    data: {image_size: 112, batch_size: 8}
    fixed: {strategy: lora}
    params:
      rank: {type: int, low: 2, high: 16, log: true}
      lr: {type: float, low: 1.0e-4, high: 5.0e-3, log: true}
      targets: {type: categorical, choices: [vision_qv, vision_attn+vision_mlp]}
      alpha_ratio: {type: categorical, choices: [1, 2], when: {strategy: lora}}

``when`` makes a parameter conditional on earlier parameters or fixed values. Every error names
the file and the key, and is raised before Ray starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from angiotune.errors import ConfigError
from angiotune.model.adapters import STRATEGIES, TARGET_GROUPS
from angiotune.model.sam3 import PROMPT_MODES

TOP_KEYS = {"name", "metric", "mode", "samples", "max_concurrent", "epochs", "seed", "asha",
            "resources", "data", "fixed", "params"}
PARAM_TYPES = {"float", "int", "categorical"}
# What a trial understands; anything else in params or fixed is a typo.
TRIAL_KEYS = {"strategy", "rank", "alpha", "alpha_ratio", "dropout", "targets", "train_decoder",
              "lr", "weight_decay", "dice_weight", "pixel_weight", "iou_weight", "pixel_loss",
              "pos_weight", "focal_gamma", "batch_size", "precision", "gradient_checkpointing",
              "prompt_mode", "score_weight"}
FIXED_ONLY = {"prompt_mode"}  # one zero-shot base per search
SPACES_DIR = Path(__file__).resolve().parents[2] / "search_spaces"


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
    metric: str
    mode: str
    samples: int
    max_concurrent: int
    epochs: int
    seed: int
    grace_period: int
    reduction_factor: int
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    image_size: int
    batch_size: int
    fixed: dict[str, Any]
    params: tuple[Param, ...]

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


def load_space(path: str | Path) -> SearchSpace:
    path = resolve_space_path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from None
    return parse_space(raw, str(path))


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

    def section(key: str, allowed: dict[str, tuple]) -> dict:
        block = raw.get(key) or {}
        if not isinstance(block, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping")
        extra = sorted(set(block) - set(allowed))
        if extra:
            raise ConfigError(f"{source}: {key}: unknown key(s) {extra}; allowed: "
                              f"{sorted(allowed)}")
        return {name: _typed(block.get(name, default), kind, f"{source}: {key}.{name}", low)
                for name, (kind, default, low) in allowed.items()}

    mode = get("mode", str, "max")
    if mode not in ("max", "min"):
        raise ConfigError(f"{source}: mode: {mode!r} must be 'max' or 'min'")
    asha = section("asha", {"grace_period": (int, 1, 1), "reduction_factor": (int, 2, 2)})
    resources = section("resources", {"workers": (int, 1, 1), "cpus_per_worker": (float, 1.0, 0),
                                      "gpus_per_worker": (float, 0.0, 0)})
    data = section("data", {"image_size": (int, 112, 32), "batch_size": (int, 8, 1)})
    fixed = raw.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise ConfigError(f"{source}: 'fixed' must be a mapping")
    for key, value in fixed.items():
        _check_trial_value(key, value, f"{source}: fixed.{key}")
    params = _parse_params(raw.get("params"), fixed, source)
    epochs = get("epochs", int, 4, minimum=1)
    if asha["grace_period"] > epochs:
        raise ConfigError(f"{source}: asha.grace_period {asha['grace_period']} exceeds epochs "
                          f"{epochs}")
    return SearchSpace(
        name=get("name", str), metric=get("metric", str, "dice"), mode=mode,
        samples=get("samples", int, 8, minimum=1),
        max_concurrent=get("max_concurrent", int, 1, minimum=1), epochs=epochs,
        seed=get("seed", int, 0), **asha, **resources, **data, fixed=dict(fixed),
        params=params)


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
    if name == "precision" and value not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"{where}: {value!r} is not one of fp32, bf16, fp16")
    if name == "targets":
        groups = str(value).split("+")
        unknown = [g for g in groups if g not in TARGET_GROUPS]
        if unknown:
            raise ConfigError(f"{where}: unknown target module group(s) {unknown} for this "
                              f"model; known: {sorted(TARGET_GROUPS)}")
