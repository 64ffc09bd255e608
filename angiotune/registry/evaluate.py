"""Held-out scores of the kept adapters: the test split, never used for selection.

Each vessel's kept model is scored on that vessel's test lesions of the index it was searched
on, beside the zero-shot base and the trivial baselines a measurement head has to beat: the
training split's most common segment and its mean stenosis, MLD and reference diameter. These
are taken over all vessels, because the heads are not told the vessel either (a per-vessel
majority would know the answer's vessel from the label). Rows per vessel and per CASS segment,
written to ``results/evaluation/``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pandas as pd

from angiotune.registry.store import (
    RegistryError,
    base_path_of,
    list_entries,
    load_best_model,
    read_entry,
)
from angiotune.train.metrics import summarise

log = logging.getLogger(__name__)
COLUMNS = ("n", "dice", "iou", "cass_accuracy", "cass_macro_f1", "stenosis_mae", "mld_mae_mm",
           "rvd_mae_mm")


def evaluate_kept(results: Path, vessel: str | None = None, batch_size: int = 16,
                  model: Path | None = None) -> pd.DataFrame:
    """One row per (vessel, segment group, model); also written as CSV, Markdown and JSON.
    ``model``: the base folder, when it has moved since the search."""
    entries = ({vessel: read_entry(results, vessel)} if vessel else list_entries(results))
    entries = {v: e for v, e in entries.items() if e is not None}
    if not entries:
        raise RegistryError(f"no kept adapter{' for ' + vessel if vessel else ''} in "
                            f"{Path(results) / 'best'}; run `angiotune search` first")
    tables = [_evaluate_vessel(results, v, e, batch_size, model) for v, e in entries.items()]
    tables = [t for t in tables if t is not None]
    if not tables:
        raise RegistryError("no kept adapter's vessel has test lesions in its index")
    table = pd.concat(tables, ignore_index=True)
    out = Path(results) / "evaluation"
    out.mkdir(parents=True, exist_ok=True)
    name = f"test_metrics{'_' + vessel if vessel else ''}"
    table.to_csv(out / f"{name}.csv", index=False)
    (out / f"{name}.md").write_text(to_markdown(table))
    (out / f"{name}.json").write_text(json.dumps(table.to_dict("records"), indent=1,
                                                 default=_json_number))
    return table


def _evaluate_vessel(results: Path, vessel: str, entry: dict, batch_size: int,
                     model: Path | None) -> pd.DataFrame | None:
    """The vessel's rows, or None (logged) when its index has no test lesions of it."""
    import torch

    from angiotune.data.stream import SampleSettings, load_rows, sample_batches
    from angiotune.model.sam3 import image_size_of, load_base_model, load_prompt_tokenizer
    from angiotune.train.step import evaluate_samples

    index = Path(entry["index"])
    if not index.exists():
        raise RegistryError(f"the {vessel} adapter was searched on {index}, which no longer "
                            "exists; its test split cannot be scored")
    rows, root = load_rows(index)
    test = rows[(rows["split"] == "test") & (rows["vessel"] == vessel)]
    train = rows[rows["split"] == "train"]
    if test.empty:
        log.warning("angiotune: %s has no test lesions of %s; not scored", index, vessel)
        return None
    if train.empty:
        raise RegistryError(f"{index}: no training lesions, so no trivial baseline")
    mode = entry.get("prompt_mode", "box")
    kept = load_best_model(results, vessel, model)
    base_path = base_path_of(entry, model)
    base = load_base_model(base_path, mode)
    tokenizer = load_prompt_tokenizer(base_path) if mode == "text_box" else None
    batches = sample_batches(test, root, SampleSettings(image_size=image_size_of(base),
                                                        augment=False), batch_size)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    records = {"kept": evaluate_samples(kept.to(device), batches, tokenizer),
               "zero-shot": evaluate_samples(base.to(device), batches, tokenizer),
               "trivial": trivial_predictions(test, train)}
    names = dict(zip(rows["segment"].astype(str), rows["segment_name"], strict=False))
    table = []
    for model, frame in records.items():
        frame = frame.assign(segment=frame["segment"].astype(str))
        groups = [("all", frame)] + [(f"{code} {names.get(code, '')}".strip(), part)
                                     for code, part in frame.groupby("segment", sort=False)]
        for group, part in groups:
            metrics = summarise(part)
            table.append({"vessel": vessel, "segment": group, "model": model,
                          "stage": entry.get("stage", 1) if model == "kept" else None,
                          **{c: metrics.get(c, math.nan) for c in COLUMNS}})
    return pd.DataFrame(table)


def trivial_predictions(test: pd.DataFrame, train: pd.DataFrame) -> pd.DataFrame:
    """The training split's majority segment and mean values, predicted for every test lesion."""
    frame = test[["sample_id", "vessel", "segment", "diameter_stenosis_pct", "mld_mm",
                  "rvd_mm"]].copy()
    frame["segment_pred"] = str(train["segment"].astype(str).mode().iloc[0])
    frame["stenosis_pct_pred"] = float(train["diameter_stenosis_pct"].mean())
    frame["mld_mm_pred"] = float(train["mld_mm"].mean())
    frame["rvd_mm_pred"] = float(train["rvd_mm"].mean())
    return frame


def to_markdown(table: pd.DataFrame) -> str:
    header = ["vessel", "segment", "model", *COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table.to_dict("records"):
        cells = [str(row["vessel"]), str(row["segment"]), model_label(row)]
        cells += [format_cell(row[c], c) for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def model_label(row: dict) -> str:
    return f"kept (stage {int(row['stage'])})" if row["model"] == "kept" else str(row["model"])


def format_cell(value, column: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return str(int(value)) if column == "n" else f"{value:.3f}"


def _json_number(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value
