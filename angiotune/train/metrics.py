"""Validation and test metrics from per-sample records, overall and per group.

Evaluation first collects one record per lesion (``evaluate_samples`` in ``train.step``); these
functions turn records into numbers, so the same code scores a Tune trial, ``angiotune
evaluate``'s per-segment table, and the trivial baselines.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd


def accuracy(true: Iterable, pred: Iterable) -> float:
    true, pred = np.asarray(list(true), dtype=object), np.asarray(list(pred), dtype=object)
    return float(np.mean(true == pred)) if len(true) else math.nan


def macro_f1(true: Iterable, pred: Iterable) -> float:
    """Unweighted mean F1 over every class that occurs in the truth or the predictions."""
    true, pred = list(true), list(pred)
    if not true:
        return math.nan
    scores = []
    for label in sorted(set(true) | set(pred), key=str):
        tp = sum(t == label and p == label for t, p in zip(true, pred, strict=True))
        fp = sum(t != label and p == label for t, p in zip(true, pred, strict=True))
        fn = sum(t == label and p != label for t, p in zip(true, pred, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return float(np.mean(scores))


def mean_absolute_error(true: Iterable[float], pred: Iterable[float]) -> float:
    """MAE over pairs where both values are known."""
    true, pred = np.asarray(list(true), float), np.asarray(list(pred), float)
    known = np.isfinite(true) & np.isfinite(pred)
    return float(np.abs(true[known] - pred[known]).mean()) if known.any() else math.nan


def summarise(records: pd.DataFrame) -> dict[str, float]:
    """Metrics of one group of per-sample records (whatever columns are present)."""
    metrics: dict[str, float] = {"n": float(len(records))}
    for name in ("dice", "iou"):
        if name in records:
            metrics[name] = float(records[name].mean())
    if "segment_pred" in records:
        # Over lesions whose segment is known: a stenosis outline without one (ARCADE) has "".
        known = records[records["segment"].astype(str).str.strip() != ""]
        metrics["cass_accuracy"] = accuracy(known["segment"], known["segment_pred"])
        metrics["cass_macro_f1"] = macro_f1(known["segment"], known["segment_pred"])
    for name, true, pred in (("stenosis_mae", "diameter_stenosis_pct", "stenosis_pct_pred"),
                             ("mld_mae_mm", "mld_mm", "mld_mm_pred"),
                             ("rvd_mae_mm", "rvd_mm", "rvd_mm_pred")):
        if pred in records:
            metrics[name] = mean_absolute_error(records[true], records[pred])
    return metrics


def summarise_by(records: pd.DataFrame, column: str = "vessel") -> dict[str, float]:
    """Overall metrics plus ``name/<group>`` for each value of ``column`` (e.g. ``dice/LAD``)."""
    metrics = summarise(records)
    if records.empty:
        return metrics
    for group, part in records.groupby(column, sort=True):
        metrics.update({f"{name}/{group}": value for name, value in summarise(part).items()})
    return metrics


def objective(metrics: Mapping[str, float], terms: Mapping[str, float],
              suffix: str = "") -> float:
    """A weighted sum of metrics, as a search space's ``objective`` defines it (to maximise).

    A term without a value (stenosis MAE on data with no QCA values in the validation split) is
    left out rather than making every trial's objective NaN; NaN only when no term has one.
    """
    values = [(weight, metrics.get(f"{name}{suffix}", math.nan))
              for name, weight in terms.items()]
    known = [weight * value for weight, value in values if math.isfinite(value)]
    return float(sum(known)) if known else math.nan


def with_objective(metrics: dict[str, float], terms: Mapping[str, float] | None,
                   groups: Iterable[str]) -> dict[str, float]:
    """Adds ``objective`` and ``objective/<group>`` when the space defines one."""
    if not terms:
        return metrics
    metrics["objective"] = objective(metrics, terms)
    for group in groups:
        if f"n/{group}" in metrics:
            metrics[f"objective/{group}"] = objective(metrics, terms, f"/{group}")
    return metrics
