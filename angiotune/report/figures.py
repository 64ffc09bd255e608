"""The report's plots, as plotly figures: Optuna's own views of the study, and learning curves
and a per-vessel ranking from the trials' epoch histories."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from angiotune.registry.store import ENTRY_KEYS, registry_metric
from angiotune.report.records import SearchRecord

log = logging.getLogger(__name__)
CURVES_SHOWN = 5  # best trials drawn in colour; the rest stay grey for context


@dataclass
class Figure:
    key: str
    title: str
    why: str  # one line under the title: what to read off it
    figure: object | None = None  # a plotly Figure, or None with ``missing`` saying why
    missing: str = ""


def study_figures(record: SearchRecord) -> list[Figure]:
    """Optimisation history, parameter importances and parallel coordinates of each study."""
    studies = record.studies()
    if len(studies) == 1:
        return _figures_of(studies[0], record, "", "")
    return [figure for i, study in enumerate(studies)
            for figure in _figures_of(study, record, f"-{i}", f" ({study.study_name})")]


def _figures_of(study, record: SearchRecord, key_suffix: str, title_suffix: str) -> list[Figure]:
    import optuna.visualization as views

    objective = record.objectives[0]
    multi = len(record.objectives) > 1
    target = (lambda t: t.values[0]) if multi else None
    name = objective + (" (first objective)" if multi else "")
    specs = [
        ("history", "Optimisation history", "Each finished trial's value and the best so far.",
         lambda: views.plot_optimization_history(study, target=target, target_name=name)),
        ("importance", "Parameter importances",
         "How much of the objective's variance each parameter explains (fANOVA).",
         lambda: views.plot_param_importances(study, target=target, target_name=name)),
        ("parallel", "Parallel coordinates",
         "Every finished trial as a line through its parameters, coloured by its value.",
         lambda: views.plot_parallel_coordinate(study, target=target, target_name=name)),
    ]
    finished = [t for t in study.trials if t.state.is_finished() and t.values is not None]
    figures = []
    for key, title, why, draw in specs:
        key, title = key + key_suffix, title + title_suffix
        if not key.startswith("history") and len(finished) < 2:
            figures.append(Figure(key, title, why, missing="needs two finished trials"))
            continue
        try:
            figures.append(Figure(key, title, why, _styled(draw())))
        except (ValueError, RuntimeError, ZeroDivisionError) as error:  # e.g. constant params
            log.warning("angiotune: %s not drawn: %s", title, error)
            figures.append(Figure(key, title, why, missing=str(error)))
    return figures


def learning_curves(record: SearchRecord) -> Figure:
    """Validation metric by epoch: the best trials in colour, the others grey."""
    import plotly.graph_objects as go

    metric = record.objectives[0]
    why = (f"Validation {metric} after each epoch; the {CURVES_SHOWN} best trials in colour. "
           "Lines that stop early were stopped by the scheduler.")
    history = record.history
    if metric not in history or history[metric].dropna().empty:
        return Figure("curves", "Learning curves", why, missing=f"no trial reported {metric}")
    best = _trial_scores(history, metric, record.space.get("mode", "max"))
    figure = go.Figure()
    for trial_id in best.index[::-1]:  # best drawn last, on top
        rows = history[history["trial_id"] == trial_id].dropna(subset=[metric])
        shown = trial_id in best.index[:CURVES_SHOWN]
        figure.add_trace(go.Scatter(
            x=rows["epoch"], y=rows[metric], mode="lines+markers", name=f"trial {trial_id}",
            showlegend=shown, opacity=1.0 if shown else 0.35,
            line={"width": 2.5 if shown else 1, **({} if shown else {"color": "#999"})},
            hovertext=_params_text(rows.iloc[-1]), hoverinfo="x+y+text+name"))
    figure.update_layout(xaxis_title="epoch", yaxis_title=f"validation {metric}")
    return Figure("curves", "Learning curves", why, _styled(figure))


def leaderboard(record: SearchRecord, rows_per_vessel: int = 5) -> dict[str, pd.DataFrame]:
    """Per registry entry (vessel, general), the trials ranked by their best epoch on the
    registry's metric."""
    boards = {}
    for vessel in ENTRY_KEYS:
        metric = registry_metric(record.select, vessel)
        if metric not in record.history:
            continue
        history = record.history.dropna(subset=[metric])
        if history.empty:
            continue
        best_rows = history.loc[history.groupby("trial_id")[metric].idxmax()]
        best_rows = best_rows.sort_values(metric, ascending=False).head(rows_per_vessel)
        kept = record.summary.get("best", {}).get(vessel)
        if kept:  # the kept epoch, when it is not its trial's best (that one was discarded)
            chosen = history[(history["trial_id"] == kept["trial_id"])
                             & (history["epoch"] == kept["epoch"])]
            best_rows = pd.concat([best_rows, chosen]).drop_duplicates(["trial_id", "epoch"])
            best_rows = best_rows.sort_values(metric, ascending=False)
        searched = {f"config/{p['name']}" for p in record.space.get("params", [])}
        params = [c for c in best_rows.columns if c in searched]
        table = best_rows[["trial_id", "epoch", metric, *params]].rename(
            columns={c: c.removeprefix("config/") for c in params})
        table["checkpoint"] = [_saved(path) for path in best_rows.get(
            "checkpoint_path", pd.Series([None] * len(best_rows)))]
        boards[vessel] = table.reset_index(drop=True)
    return boards


def _saved(path) -> str:
    return "saved" if isinstance(path, str) and (Path(path) / "adapter").exists() else "discarded"


def _trial_scores(history: pd.DataFrame, metric: str, mode: str) -> pd.Series:
    scores = history.groupby("trial_id")[metric].agg(mode)
    return scores.sort_values(ascending=mode != "max")


def _params_text(row: pd.Series) -> str:
    return "<br>".join(f"{k.removeprefix('config/')}: {_short(v)}" for k, v in row.items()
                       if k.startswith("config/"))


def _short(value) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.3g}"
    return str(value)


def _styled(figure):
    figure.update_layout(template="plotly_white", height=420,
                         margin={"l": 60, "r": 30, "t": 30, "b": 50}, title=None)
    return figure
