"""Held-out scores of the kept adapters: the test split, never used for selection.

Each vessel's kept model is scored on that vessel's test lesions of the index it was searched
on; the ``general`` entry, chosen over every vessel, on all of them (any vessel, UNKNOWN too).
Beside them: the zero-shot base and the trivial baselines a measurement head has to beat, the
training split's most common segment of the lesion's vessel (the heads name a segment among
the lesion's vessel's, as ``predict`` does among the routed vessel's) and its mean stenosis,
MLD and reference diameter over all vessels (the measurements are not told the vessel). Rows
per entry and per CASS segment, written to ``results/evaluation/``.

An index without calibration (COCO sets such as ARCADE, NPY exports without a spacing) has no
millimetres: its mm columns stay empty ("-"), and what needs none (Dice, IoU, % stenosis where
the truth has it) is reported as usual; ``table.attrs["notes"]`` says which index that was.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pandas as pd

from angiotune import jsonio
from angiotune.registry.store import (
    ADAPTER,
    GENERAL,
    RegistryError,
    base_path_of,
    list_entries,
    load_best_model,
    read_entry,
)
from angiotune.taxonomies import UNKNOWN_VESSEL
from angiotune.taxonomies.views import load_views
from angiotune.train.metrics import summarise

log = logging.getLogger(__name__)
COLUMNS = ("n", "dice", "iou", "cass_accuracy", "cass_macro_f1", "stenosis_mae", "mld_mae_mm",
           "rvd_mae_mm")


def evaluate_kept(results: Path, vessel: str | None = None, batch_size: int = 16,
                  model: Path | None = None, data: Path | None = None) -> pd.DataFrame:
    """One row per (entry, segment group, model); also written as CSV, Markdown and JSON.
    ``vessel``: one registry key (RCA, LAD, LCX or general). ``model``: the base folder, when it
    has moved since the search. ``data``: score on this index's test split instead of each
    entry's own (transfer: phantom-trained adapters on ARCADE), written as ``..._on_<index>``.
    Notes on uncalibrated indexes are in ``attrs["notes"]``."""
    entries = ({vessel: read_entry(results, vessel)} if vessel else list_entries(results))
    entries = {v: e for v, e in entries.items() if e is not None}
    if not entries:
        raise RegistryError(f"no kept adapter{' for ' + vessel if vessel else ''} in "
                            f"{Path(results) / 'best'}; run `angiotune search` first")
    scored = [_evaluate_vessel(results, v, e, batch_size, model, data)
              for v, e in entries.items()]
    scored = [s for s in scored if s is not None]
    if not scored:
        raise RegistryError("no kept adapter's vessel has test lesions in its index")
    table = pd.concat([t for t, _ in scored], ignore_index=True)
    # A trivial baseline with nothing to predict (no heads' targets in the index) is no row.
    empty = (table["model"] == "trivial") & table[list(COLUMNS[1:])].isna().all(axis=1)
    table = table[~empty].reset_index(drop=True)
    notes = list(dict.fromkeys(note for _, note in scored if note))
    table.attrs["notes"] = notes
    out = Path(results) / "evaluation"
    out.mkdir(parents=True, exist_ok=True)
    name = output_name("test_metrics", vessel, data)
    table.to_csv(out / f"{name}.csv", index=False)
    (out / f"{name}.md").write_text(to_markdown(table) + "".join(f"\n{n}\n" for n in notes))
    (out / f"{name}.json").write_text(jsonio.dumps(table.to_dict("records"), indent=1))
    return table


def output_name(kind: str, vessel: str | None, data: Path | None) -> str:
    """test_metrics, test_metrics_LAD, test_metrics_on_stenosis (another index's test split)."""
    return f"{kind}{'_' + vessel if vessel else ''}{'_on_' + Path(data).stem if data else ''}"


def scored_rows(rows: pd.DataFrame, vessel: str, unnamed_too: bool = False) -> pd.DataFrame:
    """The test lesions an entry is scored on: every one for ``general``, else its vessel's;
    ``unnamed_too`` (another index, for transfer) adds those whose vessel nobody named, which
    any vessel's adapter may meet."""
    test = rows[rows["split"] == "test"]
    if vessel == GENERAL:
        return test
    return test[test["vessel"].isin([vessel, UNKNOWN_VESSEL] if unnamed_too else [vessel])]


def calibration_note(index: Path, test: pd.DataFrame) -> str | None:
    """Why mm columns are empty, when the test lesions lack a pixel spacing; else None."""
    missing = int(pd.to_numeric(test["pixel_spacing_mm"], errors="coerce").isna().sum())
    if not missing:
        return None
    if missing == len(test):
        return (f"{index.name}: no calibration (no pixel spacing): mm columns not reported; "
                "Dice, IoU and % stenosis need none")
    return (f"{index.name}: {missing} of {len(test)} test lesions have no calibration: the mm "
            "columns are over the others")


def _evaluate_vessel(results: Path, vessel: str, entry: dict, batch_size: int,
                     model: Path | None,
                     data: Path | None = None) -> tuple[pd.DataFrame, str | None] | None:
    """The entry's rows and a calibration note, or None (logged) when its index has no test
    lesions for it."""
    import torch

    from angiotune.data.stream import SampleSettings, load_rows, sample_batches
    from angiotune.model.adapters import crop_context_of
    from angiotune.model.sam3 import image_size_of, load_base_model, load_prompt_tokenizer
    from angiotune.train.step import evaluate_samples

    index = Path(data) if data is not None else Path(entry["index"])
    if data is not None and not index.exists():
        raise RegistryError(f"no such index {index}")
    if not index.exists():
        raise RegistryError(f"the {vessel} adapter was searched on {index}, which no longer "
                            "exists; its test split cannot be scored")
    rows, root = load_rows(index)
    test = scored_rows(rows, vessel, unnamed_too=data is not None)
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
    # Kept and zero-shot see the crop the adapter was trained on.
    crop = crop_context_of(Path(entry["path"]) / ADAPTER)
    batches = sample_batches(test, root, SampleSettings(image_size=image_size_of(base),
                                                        augment=False, context=crop), batch_size)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    records = {"kept": evaluate_samples(kept.to(device), batches, tokenizer),
               "zero-shot": evaluate_samples(base.to(device), batches, tokenizer),
               "trivial": trivial_predictions(test, train)}
    names = dict(zip(rows["segment"].astype(str), rows["segment_name"], strict=False))
    table = []
    for model, frame in records.items():
        frame = frame.assign(segment=frame["segment"].astype(str))
        known = frame[frame["segment"].str.strip() != ""]  # no segment: in "all" only
        groups = [("all", frame)] + [(f"{code} {names.get(code, '')}".strip(), part)
                                     for code, part in known.groupby("segment", sort=False)]
        for group, part in groups:
            metrics = summarise(part)
            table.append({"vessel": vessel, "segment": group, "model": model,
                          "stage": entry.get("stage", 1) if model == "kept" else None,
                          **{c: metrics.get(c, math.nan) for c in COLUMNS}})
    return pd.DataFrame(table), calibration_note(index, test)


def trivial_predictions(test: pd.DataFrame, train: pd.DataFrame) -> pd.DataFrame:
    """The training split's majority segment of each test lesion's vessel group (of all
    vessels where its group has none) and mean values, predicted for every test lesion (NaN
    where the training split has no value, as in an index without calibration)."""
    frame = test[["sample_id", "vessel", "segment", "diameter_stenosis_pct", "mld_mm",
                  "rvd_mm"]].copy()
    named = train[train["segment"].astype(str).str.strip() != ""]  # no segment: votes for none
    group = load_views().adapter_for
    overall = str(named["segment"].astype(str).mode().iloc[0]) if len(named) else ""
    by_group = {g: str(part.astype(str).mode().iloc[0]) for g, part
                in named["segment"].groupby(named["vessel"].map(lambda v: group.get(v, v)))}
    frame["segment_pred"] = [by_group.get(group.get(v, v), overall) for v in frame["vessel"]]
    for name in ("diameter_stenosis_pct", "mld_mm", "rvd_mm"):
        frame[name] = pd.to_numeric(frame[name], errors="coerce")
        mean = pd.to_numeric(train[name], errors="coerce").mean()
        frame["stenosis_pct_pred" if name.startswith("diameter") else f"{name}_pred"] = \
            float(mean) if pd.notna(mean) else math.nan
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
    return None if isinstance(value, float) and not math.isfinite(value) else value
