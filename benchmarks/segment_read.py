"""What names a lesion's CASS segment: the segment read's inputs compared side by side.

    python benchmarks/segment_read.py [--index INDEX] [--folds 5]

The heads' segment read (``angiotune.model.heads.fit_segment_read``) is fitted here on the
index's true reference diameters instead of a model's read, so that the comparison is about the
inputs, not about one trial's masks: it is the most a read of these inputs can give. Each row
is the same multinomial logistic read with fewer or more inputs, scored by cross-validation
over patients on every lesion of the index (train, val and test: nothing here is selected), the
answer taken among the segments of the lesion's vessel, as ``evaluate`` does; beside it the
majority of the lesion's vessel in the other folds. Then the mean share of the tree per segment,
which uses no label (an index without calibration, such as ARCADE's, has no reference
diameters: its "+ reference diameter" rows read a missing input).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from angiotune.data.context import CONTEXT_DIM, view_context
from angiotune.data.index import read_index
from angiotune.model.heads import fit_segment_read, restrict_to_vessel
from angiotune.taxonomies.views import load_views

VIEW = list(range(6))  # angles, missing flag, box centre and size
TREE = [6, 7, 8]  # share of the tree, mm / 100, missing flag
RVD = [CONTEXT_DIM]
INPUTS = {"view and box in the frame": VIEW, "+ reference diameter": VIEW + RVD,
          "+ tree position": VIEW + TREE, "+ both (the heads' read)": VIEW + TREE + RVD}


def cross_validated(rows: pd.DataFrame, columns: list[int], folds: np.ndarray) -> float:
    inputs = np.column_stack([np.stack([view_context(r) for r in rows.to_dict("records")]),
                              rows["rvd_mm"].to_numpy(float)])[:, columns]
    classes = tuple(sorted(rows["segment"].astype(str).unique()))
    labels = np.array([classes.index(s) for s in rows["segment"].astype(str)])
    right = 0
    for fold in np.unique(folds):
        held = folds == fold
        inner = np.arange(int((~held).sum())) % 3  # the decay, chosen inside the training folds
        fit = fit_segment_read(inputs[~held], labels[~held], len(classes), inner)
        if fit is None:  # one segment (or too few lesions) in the other folds: name the commonest
            right += int((labels[held] == np.bincount(labels[~held]).argmax()).sum())
            continue
        z = np.where(np.isfinite(inputs[held]), (inputs[held] - fit["mean"]) / fit["scale"], 0)
        logits = torch.as_tensor(z @ fit["weight"].T + fit["bias"])
        logits = restrict_to_vessel(logits, classes, str(rows["taxonomy"].iloc[0]),
                                    list(rows["vessel"][held]))
        right += int((logits.argmax(1).numpy() == labels[held]).sum())
    return right / len(rows)


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
    print(f"{'inputs':<28} {'accuracy':>10}")
    print(f"{'majority of the vessel':<28} {vessel_majority(rows, folds):>10.3f}")
    for name, columns in INPUTS.items():
        print(f"{name:<28} {cross_validated(rows, columns, folds):>10.3f}")
    # No labels go into the share; does it order the segments as anatomy does?
    shares = rows.groupby("segment")["tree_fraction"].agg(["count", "mean"]).sort_values("mean")
    names = dict(zip(rows["segment"], rows["segment_name"], strict=False))
    print("\nmean share of the tree, by segment (lesions):")
    for code, (count, mean) in shares.iterrows():
        print(f"  {mean:5.2f}  {code:>4} {names[code]} ({int(count)})")


if __name__ == "__main__":
    main()
