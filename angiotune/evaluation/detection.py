"""Lesion detection on the test frames of the kept entries' indexes, without a model.

``predict`` measures a cine without a box by proposing where the vessel narrows
(``predict.proposals``); this scores those proposals against every annotated lesion box of each
test frame, matched as ``predict.detection`` says. The proposals do not use the adapter, so each
index is scored once however many entries were searched on it; the frames are those of the test
lesions the chosen entries are scored on (all of them for ``general``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from angiotune import jsonio
from angiotune.data.index import BOX_COLUMNS
from angiotune.errors import DataError
from angiotune.evaluation.test_split import format_cell, output_name
from angiotune.names import GENERAL
from angiotune.predict.detection import (
    DEFAULT_IOU_THRESHOLD,
    RULE,
    DetectionScore,
    match_boxes,
    score_frames,
)
from angiotune.registry.store import RegistryError, list_entries, read_entry

log = logging.getLogger(__name__)
DETECTION_COLUMNS = ("frames", "truths", "proposals", "true_positives", "precision", "recall",
                     "f1", "mean_image_f1")
ARCADE_NOTE = ("For scale only: ARCADE ranks stenosis detection by F1 per image averaged over "
               "images (second place 0.535), computed on masks; ours matches boxes.")


def detect_test_frames(index: Path, vessels: set[str] | None = None, max_proposals: int = 3,
                       iou_threshold: float = DEFAULT_IOU_THRESHOLD) -> DetectionScore:
    """Proposals on each distinct test frame of ``index`` (of ``vessels``' lesions, or all)
    against every annotated box of that frame, whatever its split or vessel."""
    from angiotune.data.readers import read_frame
    from angiotune.data.stream import load_rows
    from angiotune.predict.proposals import propose_boxes

    rows, root = load_rows(index)
    # A COCO category that names a segment outlines a stretch of vessel, not a lesion
    # (ARCADE's SYNTAX file): nothing for a lesion detector to find.
    rows = rows[rows["vessel_source"] != "category"]
    test = rows[rows["split"] == "test"]
    if vessels is not None:
        test = test[test["vessel"].isin(vessels)]
    truth = rows.groupby(["image_path", "frame_index"])[list(BOX_COLUMNS)]
    matches, skipped = [], 0
    for (image, frame_index), _ in test.groupby(["image_path", "frame_index"], sort=True):
        try:
            frame = read_frame(root / image, int(frame_index))
        except DataError:  # as in training: a file that broke after indexing (not named:
            skipped += 1     # export paths may carry IDs)
            continue
        height, width = frame.shape
        proposed = [np.clip(p.box, 0, [width, height, width, height]).tolist()  # as predict
                    for p in propose_boxes(frame, max_proposals)]
        boxes = truth.get_group((image, frame_index)).to_numpy(dtype=float).tolist()
        matches.append(match_boxes(proposed, boxes, iou_threshold))
    if skipped:
        log.warning("angiotune: detection skipped %d unreadable test frame(s) of %s", skipped,
                    Path(index).name)
    return score_frames(matches)


def evaluate_detection(results: Path, vessel: str | None = None, max_proposals: int = 3,
                       iou_threshold: float = DEFAULT_IOU_THRESHOLD,
                       data: Path | None = None) -> pd.DataFrame:
    """One row per index the kept entries (or ``vessel``'s) were searched on, or for ``data``
    (every test frame of it); also written to ``results/evaluation/detection[_<vessel>]
    [_on_<index>].{json,md}``."""
    entries = ({vessel: read_entry(results, vessel)} if vessel else list_entries(results))
    scopes: dict[str, set[str] | None] = {}
    if data is not None:
        if not Path(data).exists():
            raise RegistryError(f"no such index {data}")
        scopes[str(data)] = None
        entries = {}
    for key, entry in entries.items():
        if entry is None:
            continue
        index = entry["index"]
        if not Path(index).exists():
            raise RegistryError(f"the {key} adapter was searched on {index}, which no longer "
                                "exists; its test frames cannot be scored")
        if key == GENERAL or (index in scopes and scopes[index] is None):
            scopes[index] = None  # the general entry is scored on every test lesion
        else:
            scopes[index] = (scopes.get(index) or set()) | {key}
    if not scopes:
        raise RegistryError(f"no kept adapter{' for ' + vessel if vessel else ''} in "
                            f"{Path(results) / 'best'}; run `angiotune search` first")
    table = pd.DataFrame([
        {"index": Path(index).name,
         "vessels": "all" if scope is None else ", ".join(sorted(scope)),
         **detect_test_frames(Path(index), scope, max_proposals, iou_threshold).as_dict(),
         "iou_threshold": iou_threshold, "max_proposals": max_proposals}
        for index, scope in scopes.items()])
    out = Path(results) / "evaluation"
    out.mkdir(parents=True, exist_ok=True)
    name = output_name("detection", vessel, data)
    rule = RULE.format(threshold=iou_threshold)
    (out / f"{name}.json").write_text(jsonio.dumps(
        {"rule": rule, "note": ARCADE_NOTE, "indexes": table.to_dict("records")}, indent=1)
        + "\n")
    (out / f"{name}.md").write_text(detection_markdown(table) + f"\nRule: {rule}.\n\n"
                                    f"{ARCADE_NOTE}\n")
    return table


def detection_markdown(table: pd.DataFrame) -> str:
    header = ["index", "vessels", *DETECTION_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table.to_dict("records"):
        cells = [str(row["index"]), str(row["vessels"])]
        cells += [detection_cell(row[c], c) for c in DETECTION_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def detection_cell(value, column: str) -> str:
    """Counts as whole numbers, scores to three places, "-" where there is none."""
    if column in ("frames", "truths", "proposals", "true_positives"):
        return str(int(value))
    return format_cell(value, column)
