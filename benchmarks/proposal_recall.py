"""No-box lesion proposals: recall, precision and speed on phantoms, and on ARCADE if given.

    python benchmarks/proposal_recall.py [--index INDEX] [--split test] [--arcade DIR]

Phantoms (the index's lesions of ``--split``; every frame holding one is proposed on once):
a lesion is *found* when its MLD point (the index's ``mld_x``, ``mld_y``) lies inside one of
its frame's proposals (recall, also on lesions with DS >= 50 %); a proposal is a *true
positive* when it contains the MLD point of some lesion of its frame (precision). For
comparison with real frames, also the box-matching F1 of ``predict.detection`` (one to one,
IoU >= 0.25) against the analysed segments' boxes. ARCADE (``DIR/annotations/*.json`` and
``DIR/images``, e.g. its ``stenosis_val``): that box-matching score against the annotated
stenoses' boxes, there being no MLD point. Milliseconds are per frame, proposing only.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from angiotune.data.readers import read_frame
from angiotune.data.stream import load_rows
from angiotune.predict.detection import match_boxes, score_frames
from angiotune.predict.proposals import propose_boxes

BUDGETS = (3, 5)


def _proposed(frame: np.ndarray, budget: int) -> tuple[list[list[float]], float]:
    """Boxes clipped to the frame, as ``predict`` uses them, and the milliseconds taken."""
    started = time.perf_counter()
    proposals = propose_boxes(frame, budget)
    elapsed = 1000 * (time.perf_counter() - started)
    height, width = frame.shape
    return [np.clip(p.box, 0, [width, height, width, height]).tolist()
            for p in proposals], elapsed


def _inside(point: tuple[float, float], box: list[float]) -> bool:
    return box[0] <= point[0] < box[2] and box[1] <= point[1] < box[3]


def phantom_scores(index: Path, split: str, budget: int) -> dict[str, float]:
    rows, root = load_rows(index, split)
    found, severe, true_positives, proposed, times, matches = [], [], 0, 0, [], []
    for (image, frame_index), group in rows.groupby(["image_path", "frame_index"]):
        boxes, elapsed = _proposed(read_frame(root / image, int(frame_index)), budget)
        times.append(elapsed)
        points = list(zip(group["mld_x"], group["mld_y"], strict=True))
        for point, stenosis in zip(points, group["diameter_stenosis_pct"], strict=True):
            hit = any(_inside(point, box) for box in boxes)
            found.append(hit)
            if stenosis >= 50:
                severe.append(hit)
        proposed += len(boxes)
        true_positives += sum(any(_inside(p, box) for p in points) for box in boxes)
        truth = group[["bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"]].to_numpy(float).tolist()
        matches.append(match_boxes(boxes, truth))
    return {"lesions": len(found), "recall": float(np.mean(found)),
            "severe lesions": len(severe),
            "recall DS >= 50 %": float(np.mean(severe)) if severe else float("nan"),
            "precision": true_positives / proposed if proposed else float("nan"),
            "proposals per frame": proposed / len(times),
            "F1 (IoU >= 0.25)": score_frames(matches).f1,
            "ms per frame": float(np.median(times))}


def arcade_scores(folder: Path, budget: int) -> dict[str, float]:
    matches, times = [], []
    for labels in sorted((folder / "annotations").glob("*.json")):
        coco = json.loads(labels.read_text())
        stenosis = {c["id"] for c in coco["categories"] if c["name"] == "stenosis"}
        truth: dict[int, list[list[float]]] = {}
        for annotation in coco["annotations"]:
            if annotation["category_id"] in stenosis:
                x, y, w, h = annotation["bbox"]
                truth.setdefault(annotation["image_id"], []).append([x, y, x + w, y + h])
        for image in coco["images"]:
            frame = read_frame(folder / "images" / image["file_name"], 0)
            boxes, elapsed = _proposed(frame, budget)
            times.append(elapsed)
            matches.append(match_boxes(boxes, truth.get(image["id"], [])))
    score = score_frames(matches)
    return {"frames": score.frames, "stenoses": score.truths,
            "proposals per frame": score.proposals / max(score.frames, 1),
            "precision": score.precision, "recall": score.recall, "F1 (IoU >= 0.25)": score.f1,
            "mean image F1": score.mean_image_f1, "ms per frame": float(np.median(times))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", type=Path,
                        default=Path("/tmp/exp/results/embedded/index.parquet"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--arcade", type=Path, help="an ARCADE stenosis folder, e.g. stenosis_val")
    args = parser.parse_args()
    for budget in BUDGETS:
        figures = phantom_scores(args.index, args.split, budget)
        print(f"phantoms ({args.split}), up to {budget} per frame: "
              + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in figures.items()))
    if args.arcade:
        for budget in BUDGETS:
            figures = arcade_scores(args.arcade, budget)
            print(f"ARCADE ({args.arcade.name}), up to {budget} per frame: "
                  + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in figures.items()))


if __name__ == "__main__":
    main()
