"""What names a lesion's CASS segment: the segment read's inputs compared side by side.

    python benchmarks/segment_read.py [--index INDEX] [--folds 5]

The heads' segment read (``angiotune.model.heads.fit_segment_read``) is fitted here on the
index's true reference diameters instead of a model's read, so that the comparison is about the
inputs, not about one trial's masks: it is the most a read of these inputs can give. Each row
is the same multinomial logistic read with fewer or more inputs, scored by cross-validation
over patients on every lesion of the index (train, val and test: nothing here is selected), the
answer taken among the segments of the lesion's vessel, as ``evaluate`` does; beside it the
majority of the lesion's vessel in the other folds. Beside each, the vessel the read's
probabilities over every segment vote for (what routing hears from the heads where a view is
ambiguous), against the nearest standard view that routing starts from. Then the mean share of
the tree per segment,
which uses no label (an index without calibration, such as ARCADE's, has no reference
diameters: its "+ reference diameter" rows read a missing input).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from angiotune.data.context import CONTEXT_DIM, TREE_END, VIEW_END, VIEWS_END, view_context
from angiotune.data.index import read_index
from angiotune.model.heads import (
    class_vessels,
    fit_segment_read,
    restrict_to_vessel,
    vessel_read_inputs,
)
from angiotune.names import ADAPTER_VESSELS
from angiotune.predict.routing import route_by_angles
from angiotune.taxonomies.views import load_views

VIEW = list(range(VIEW_END))  # angles, missing flag, box centre and size
TREE = list(range(VIEW_END, TREE_END))  # share of the tree, mm / 100, missing flag
VIEWS = list(range(TREE_END, VIEWS_END))  # distance to each vessel's nearest standard view
FRAME_TREE = list(range(VIEWS_END, CONTEXT_DIM))  # offset from the root, the tree's spread, area
RVD = [CONTEXT_DIM]
INPUTS = {"view and box in the frame": VIEW, "+ reference diameter": VIEW + RVD,
          "+ tree position": VIEW + TREE, "+ both (the segment read before)": VIEW + TREE + RVD,
          "+ both + standard views": VIEW + TREE + RVD + VIEWS,
          "+ both + frame's tree (the heads' read)": VIEW + TREE + RVD + FRAME_TREE}


def cross_validated(rows: pd.DataFrame, columns: list[int],
                    folds: np.ndarray) -> tuple[float, np.ndarray]:
    """The segment named among the lesion's vessel's (accuracy), and the vessel the read's
    probabilities over all segments vote for (each lesion's, held out)."""
    inputs = np.column_stack([np.stack([view_context(r) for r in rows.to_dict("records")]),
                              rows["rvd_mm"].to_numpy(float)])[:, columns]
    classes = tuple(sorted(rows["segment"].astype(str).unique()))
    taxonomy = str(rows["taxonomy"].iloc[0])
    groups = np.array([group or "" for group in class_vessels(classes, taxonomy)])
    labels = np.array([classes.index(s) for s in rows["segment"].astype(str)])
    right, votes = 0, np.full(len(rows), "", dtype=object)
    for held, logits in held_out_logits(inputs, labels, len(classes), folds):
        if logits is None:  # one segment (or too few lesions) in the other folds: the commonest
            right += int((labels[held] == np.bincount(labels[~held]).argmax()).sum())
            continue
        probabilities = torch.softmax(logits, 1).numpy()
        votes[held] = [max(ADAPTER_VESSELS, key=lambda v, p=p: p[groups == v].sum())
                       for p in probabilities]
        logits = restrict_to_vessel(logits, classes, taxonomy, list(rows["vessel"][held]))
        right += int((logits.argmax(1).numpy() == labels[held]).sum())
    return right / len(rows), votes


def vessel_read(rows: pd.DataFrame, truth: np.ndarray, folds: np.ndarray,
                frame_tree: bool = True) -> np.ndarray:
    """The heads' vessel read, fitted on the other folds: each lesion's vessel, held out.
    ``frame_tree``: False reads only the view, the box and the standard views (the read before the
    frame's tree: the box's offset from its root, the tree's spread and area)."""
    context = torch.as_tensor(np.stack([view_context(r) for r in rows.to_dict("records")]))
    inputs = vessel_read_inputs(context).numpy()
    if not frame_tree:
        inputs = inputs[:, :VIEW_END + VIEWS_END - TREE_END]
    labels = np.array([ADAPTER_VESSELS.index(v) if v in ADAPTER_VESSELS else -1 for v in truth])
    votes = np.full(len(rows), "", dtype=object)
    for held, logits in held_out_logits(inputs, labels, len(ADAPTER_VESSELS), folds):
        if logits is None:  # one vessel in the other folds: that one
            known = labels[~held][labels[~held] >= 0]
            votes[held] = ADAPTER_VESSELS[np.bincount(known).argmax()] if len(known) else ""
            continue
        votes[held] = [ADAPTER_VESSELS[i] for i in logits.argmax(1).tolist()]
    return votes


def held_out_logits(inputs: np.ndarray, labels: np.ndarray, classes: int, folds: np.ndarray):
    """Per fold: the held-out rows and the read's logits for them, fitted on the other folds
    (its decay chosen inside them); None where those folds cannot fit one."""
    for fold in np.unique(folds):
        held = folds == fold
        inner = np.arange(int((~held).sum())) % 3
        fit = fit_segment_read(inputs[~held], labels[~held], classes, inner)
        if fit is None:
            yield held, None
            continue
        z = np.where(np.isfinite(inputs[held]), (inputs[held] - fit["mean"]) / fit["scale"], 0)
        yield held, torch.as_tensor(z @ fit["weight"].T + fit["bias"])


def vessel_majority(rows: pd.DataFrame, folds: np.ndarray) -> float:
    group = rows["vessel"].map(lambda v: load_views().adapter_for.get(v, v))
    right = 0
    for fold in np.unique(folds):
        held = folds == fold
        train = rows[~held]
        for vessel, segment in zip(group[held], rows["segment"][held].astype(str), strict=True):
            mine = train["segment"].astype(str)[group[~held] == vessel]
            right += int(len(mine) > 0 and mine.mode().iloc[0] == segment)
    return right / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, default=Path("results/embedded/index.parquet"))
    parser.add_argument("--folds", type=int, default=5)
    args = parser.parse_args()
    rows = read_index(args.index)
    rows = rows[rows["segment"].astype(str).str.strip() != ""].reset_index(drop=True)
    patients = rows["patient_key"].unique()
    shuffled = np.random.default_rng(0).permutation(patients)
    order = {patient: i % args.folds for i, patient in enumerate(shuffled)}
    folds = rows["patient_key"].map(order).to_numpy()
    print(f"{len(rows)} lesions of {len(patients)} patients, {args.folds}-fold by patient; "
          f"tree position found for {rows['tree_fraction'].notna().mean():.0%}")
    # The vessel: as routing sees it (ambiguous views are where the heads get a say).
    adapter_for = load_views().adapter_for
    truth = np.array([adapter_for.get(v, v) for v in rows["vessel"]], dtype=object)
    routes = [route_by_angles(a, c) for a, c in zip(rows["angle_lao_deg"],
                                                    rows["angle_cranial_deg"], strict=True)]
    by_view = np.array([r.vessel or "" for r in routes], dtype=object)
    ambiguous = np.array([r.ambiguous for r in routes])
    # Where the view misleads: another vessel's standard view is the nearest, or the frame
    # holds lesions of another vessel too (one left injection, the LAD and the LCX).
    misleading = (by_view != truth) & (by_view != "")
    frame_of = rows["image_path"].astype(str) + "#" + rows["frame_index"].astype(str)
    shared = frame_of.map(pd.Series(truth, index=rows.index).groupby(frame_of).nunique()) > 1
    where = {"all": None, "ambiguous views": ambiguous, "another's view": misleading,
             "shared frames": shared.to_numpy()}
    print(f"{'inputs':<44} {'segment':>8} " + " ".join(f"{k:>15}" for k in where))
    print(f"{'majority of the vessel':<44} {vessel_majority(rows, folds):>8.3f}")

    def line(name: str, accuracy: str, votes: np.ndarray) -> None:
        print(f"{name:<44} {accuracy:>8} "
              + " ".join(f"{_share(votes, truth, w):>15}" for w in where.values()))

    line("nearest standard view (routing)", "", by_view)
    for name, columns in INPUTS.items():
        accuracy, votes = cross_validated(rows, columns, folds)
        line(name, f"{accuracy:.3f}", votes)
    line("vessel read: view, box, views", "", vessel_read(rows, truth, folds, frame_tree=False))
    line("+ the frame's tree (the heads' read)", "", vessel_read(rows, truth, folds))
    print("(lesions: " + ", ".join(f"{int(w.sum())} in {k}" for k, w in where.items()
                                   if w is not None) + ")")
    # No labels go into the share; does it order the segments as anatomy does?
    shares = rows.groupby("segment")["tree_fraction"].agg(["count", "mean"]).sort_values("mean")
    names = dict(zip(rows["segment"], rows["segment_name"], strict=False))
    print("\nmean share of the tree, by segment (lesions):")
    for code, (count, mean) in shares.iterrows():
        print(f"  {mean:5.2f}  {code:>4} {names[code]} ({int(count)})")


def _share(predicted: np.ndarray, truth: np.ndarray, where: np.ndarray | None) -> str:
    where = np.ones(len(truth), bool) if where is None else where
    known = where & np.isin(truth, ADAPTER_VESSELS) & (predicted != "")  # "": no angles
    return f"{np.mean(predicted[known] == truth[known]):.3f}" if known.any() else "-"


if __name__ == "__main__":
    main()
