"""QCA accuracy on phantoms with exact truth: the measurement alone, and the whole predict path.

(a) true masks: ``angiotune.qca.measure`` on each lesion's exported segment mask, against the
    phantom's exact MLD, % diameter stenosis, reference diameter and lesion length (contour JSON).
(b) predicted masks: ``angiotune.predict`` on the same lesions (the index's box and frame) with
    the kept adapters of ``--results``; the QCA of the predicted mask, and the stage-2 heads,
    against the same truth; with the routing (view angle, then the CASS head) against the
    lesion's vessel, and the no-box proposals' recall.

    python benchmarks/qca_accuracy.py [--results results] [--split test] [--lesions 60]

Without kept adapters in ``--results``, (b) is skipped and (a) runs on a fresh phantom export.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from angiotune.data.ingest import IndexSettings, build_index
from angiotune.data.phantoms import PhantomSettings, generate_phantoms
from angiotune.data.readers import read_frame, read_mask
from angiotune.data.stream import load_rows
from angiotune.predict import PredictSettings, predict
from angiotune.predict.proposals import propose_boxes
from angiotune.predict.routing import route_by_angles
from angiotune.qca import QCAError, measure
from angiotune.registry.store import list_entries
from angiotune.taxonomies.views import load_views

ANCHORS = """Anchors (../shared/notes/sam3-and-domain.md): ten commercial QCA systems on plexiglass
phantoms err in MLD by +0.07 to +0.31 mm (SD 0.14-0.24 mm); CAAS on in-vivo phantoms
-0.06 +/- 0.14 mm; % diameter stenosis 7 +/- 6 % against known phantoms."""
QUANTITIES = (("MLD_mm", "mld_mm", "MLD (mm)"),
              ("diameter_stenosis_pct", "diameter_stenosis_pct", "% DS (points)"),
              ("interpolated_RVD_mm", "rvd_mm", "RVD (mm)"),
              ("lesion_length_mm", "lesion_length_mm", "length (mm)"))


def true_mask_errors(rows: pd.DataFrame, root: Path) -> pd.DataFrame:
    """Errors of QCA on the exported masks, each at the resolution it was stored in."""
    records = []
    for row in rows.to_dict("records"):
        mask = read_mask(root / row["mask_path"])
        scale = row["frame_width"] / mask.shape[1]  # some exports store masks at half size
        try:
            result = measure(mask, row["pixel_spacing_mm"] * scale).measurements()
        except QCAError as error:
            records.append({"sample_id": row["sample_id"], "error": str(error)})
            continue
        records.append({"sample_id": row["sample_id"], "mask": "full" if scale == 1 else
                        f"1/{scale:g} size", **_errors(result, row)})
    return pd.DataFrame(records)


def predicted_errors(index: Path, split: str, results: Path, out: Path) -> pd.DataFrame:
    rows, _ = load_rows(index, split)
    subset = out / "subset.parquet"
    _write_subset(index, rows["sample_id"], subset)
    summary = predict(subset, out / "predictions", PredictSettings(results=results,
                                                                   overlays=False))
    truth = rows.set_index("sample_id")
    records = []
    for lesion in summary.lesions:
        report = lesion.report
        row = truth.loc[report["input"]["key"]].to_dict()
        heads = report.get("heads") or {}
        record = {"vessel": row["vessel"], "routed": report["adapter"]["vessel"],
                  "by_angle_only": route_by_angles(row["angle_lao_deg"],
                                                   row["angle_cranial_deg"]).vessel,
                  "ambiguous": report["routing"]["ambiguous"],
                  **_errors(report["qca"], row),
                  **{f"heads {label}": heads.get(name, np.nan) - row[column]
                     for name, column, label in (("MLD_mm", "mld_mm", "MLD (mm)"),
                                                 ("diameter_stenosis_pct",
                                                  "diameter_stenosis_pct", "% DS (points)"),
                                                 ("RVD_mm", "rvd_mm", "RVD (mm)"))}}
        records.append(record)
    return pd.DataFrame(records)


def proposal_recall(rows: pd.DataFrame, root: Path, proposals: int = 3) -> dict[str, float]:
    """Share of lesions whose MLD lies inside one of the frame's proposals (no box given)."""
    hits = []
    for (image, frame_index), group in rows.groupby(["image_path", "frame_index"]):
        boxes = [p.box for p in propose_boxes(read_frame(root / image, int(frame_index)),
                                              proposals)]
        for row in group.itertuples():
            inside = any(b[0] <= row.mld_x < b[2] and b[1] <= row.mld_y < b[3] for b in boxes)
            hits.append((row.diameter_stenosis_pct, inside))
    hits = np.array(hits, dtype=float)
    severe = hits[hits[:, 0] >= 50]
    return {"lesions": len(hits), "recall": float(hits[:, 1].mean()),
            "severe lesions (DS >= 50 %)": len(severe),
            "recall on severe": float(severe[:, 1].mean()) if len(severe) else float("nan")}


def _errors(measured: dict, row: dict) -> dict[str, float]:
    return {label: measured.get(name, np.nan) - row[column] if measured.get(name) is not None
            else np.nan for name, column, label in QUANTITIES}


def _write_subset(index: Path, sample_ids: pd.Series, path: Path) -> None:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(index)  # keeps the index's metadata (data root, salt fingerprint)
    pq.write_table(table.filter(pc.is_in(table["sample_id"], value_set=pa_array(sample_ids))),
                   path)


def pa_array(values: pd.Series):
    import pyarrow as pa

    return pa.array(values.tolist())


def summarise(errors: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    table = {}
    for column in columns:
        values = errors[column].dropna()
        table[column] = {"n": len(values), "mean error": values.mean(), "SD": values.std(),
                         "mean |error|": values.abs().mean()}
    return pd.DataFrame(table).T


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--lesions", type=int, default=60,
                        help="phantom lesions for (a) when there are no kept adapters")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    started = time.perf_counter()
    entries = {v: e for v, e in list_entries(args.results).items() if e is not None}
    scratch = Path(tempfile.mkdtemp(prefix="angiotune-qca-"))
    if entries:
        index = Path(next(iter(entries.values()))["index"])
        print(f"Kept adapters in {args.results}: {', '.join(entries)}; index {index}")
    else:
        print(f"No kept adapters in {args.results}: (a) only, on {args.lesions} fresh phantom "
              "lesions")
        generate_phantoms(scratch / "phantoms", PhantomSettings(lesions=args.lesions, size=512,
                                                                 frames=3, seed=11))
        index = scratch / "index.parquet"
        build_index(scratch / "phantoms" / "manifest.csv", index, IndexSettings(salt="bench"))
    rows, root = load_rows(index)
    figures: dict[str, object] = {}

    true = true_mask_errors(rows, root)
    labels = [label for _, _, label in QUANTITIES]
    print(f"\n(a) QCA on the exported (true) masks, all {len(rows)} lesions of the index")
    for kind, group in true.dropna(subset=[labels[0]]).groupby("mask"):
        table = summarise(group, labels)
        print(f"\nmasks stored at {kind} ({len(group)} lesions)\n{table.round(3).to_string()}")
        figures[f"true masks ({kind})"] = table.round(4).to_dict("index")
    failures = true[true[labels[0]].isna()] if labels[0] in true else true
    print(f"not measurable: {len(failures)}")

    recall = proposal_recall(rows[rows["split"] == args.split] if entries else rows, root)
    print(f"\nNo-box proposals (3 per frame): {json.dumps(recall)}")
    figures["proposals"] = recall

    if entries:
        predicted = predicted_errors(index, args.split, args.results, scratch)
        print(f"\n(b) predict on the {args.split} split ({len(predicted)} lesions, the index's "
              "box and frame, the kept adapters)")
        table = summarise(predicted, labels + [f"heads {label}" for label in labels[:3]])
        print(table.round(3).to_string())
        truth = predicted["vessel"].map(lambda v: load_views().adapter_for.get(v, v))
        routed, by_angle = predicted["routed"] == truth, predicted["by_angle_only"] == truth
        print(f"routing to the lesion's vessel adapter: {routed.mean():.3f} with the CASS head's "
              f"second opinion, {by_angle.mean():.3f} by the view angle alone "
              f"({int(predicted['ambiguous'].sum())} lesions from ambiguous views)")
        figures["predicted masks"] = table.round(4).to_dict("index")
        figures["routing accuracy"] = {"final": float(routed.mean()),
                                       "angle only": float(by_angle.mean())}
    print("\n" + ANCHORS)
    print(f"\n{time.perf_counter() - started:.0f} s; phantoms, not clinical data.")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1, default=float) + "\n")


if __name__ == "__main__":
    main()
