"""Predicted lesions as a COCO instance-segmentation dataset that CVAT and FiftyOne open.

Layout (CVAT's "COCO 1.0"; FiftyOne's ``COCODetectionDataset`` given both paths)::

    coco/images/<input key>_frame<N>.png        the analysed frames, 8-bit grey
    coco/annotations/instances_default.json     one image per frame, one annotation per lesion

Each annotation is the predicted mask as COCO run-length encoding (``pycocotools``), its box and
area, the model's confidence as ``score`` (FiftyOne's ``confidence``), and the QCA numbers, the
adapter's vessel and the CASS head's segment as ``attributes`` (CVAT's attribute field). Every
lesion is of one category, ``lesion``: vessel and segment are predictions about it, not its class.
Files are named by the pseudonymous keys of the predictions, never by input paths.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from angiotune import __version__, jsonio
from angiotune.errors import DataError

ANNOTATIONS = Path("annotations") / "instances_default.json"
IMAGES = "images"
CATEGORY = {"id": 1, "name": "lesion", "supercategory": "coronary stenosis"}


class CocoWriter:
    """Collects lesions (``add``) and writes the dataset's JSON (``close``); frames are written
    as they come, each once however many lesions it holds."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.images: dict[str, dict] = {}  # file name -> COCO image
        self.annotations: list[dict] = []

    def add(self, lesion, source: Path | None = None, row: dict | None = None) -> list[Path]:
        """The lesion's annotation, and its frame's PNG when the frame is new. ``source`` and
        ``row`` are not needed: COCO carries no identity."""
        mask = np.asarray(lesion.segmentation.mask, dtype=bool)
        if not mask.any():
            raise DataError("the predicted mask is empty: no COCO annotation")
        written = []
        name = f"{lesion.report['input']['key']}_frame{lesion.report['input']['frame']}.png"
        image = self.images.get(name)
        if image is None:
            height, width = mask.shape
            image = self.images[name] = {"id": len(self.images) + 1, "file_name": name,
                                         "width": width, "height": height}
            path = self.folder / IMAGES / name
            path.parent.mkdir(parents=True, exist_ok=True)
            grey = np.round(np.clip(lesion.frame, 0.0, 1.0) * 255).astype(np.uint8)
            Image.fromarray(grey).save(path)
            written.append(path)
        self.annotations.append(annotation(lesion, mask, image["id"], len(self.annotations) + 1))
        return written

    def close(self) -> list[Path]:
        """The JSON, written whole (also when predict was interrupted: what was added)."""
        path = self.folder / ANNOTATIONS
        path.parent.mkdir(parents=True, exist_ok=True)
        dataset = {
            "info": {"description": "angiotune lesion predictions (research output, not "
                                    "clinical measurements)", "version": __version__,
                     "contributor": "angiotune",
                     "date_created": datetime.datetime.now(datetime.timezone.utc).isoformat(
                         timespec="seconds")},
            "licenses": [], "categories": [CATEGORY], "images": list(self.images.values()),
            "annotations": self.annotations}
        path.write_text(jsonio.dumps(dataset, indent=1) + "\n", encoding="utf-8")
        return [path]


def annotation(lesion, mask: np.ndarray, image_id: int, annotation_id: int) -> dict:
    """One lesion as a COCO annotation: compressed RLE, box [x, y, w, h] and area of the
    mask, confidence and what was measured."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    report = lesion.report
    qca, heads, unit = report.get("qca") or {}, report.get("heads") or {}, report.get("units")
    attributes = {"lesion": lesion.key, "vessel": report["adapter"]["vessel"],
                  # the CASS head's reading (a prediction beside the routed vessel)
                  "head_cass_segment": heads.get("cass_segment"),
                  "head_segment_name": heads.get("segment_name"),
                  "head_probability": heads.get("probability"), "units": unit,
                  **{key: qca.get(key) for key in (f"MLD_{unit}", f"interpolated_RVD_{unit}",
                                                   "diameter_stenosis_pct",
                                                   f"lesion_length_{unit}")},
                  "qca_error": qca.get("error")}
    return {"id": annotation_id, "image_id": image_id, "category_id": CATEGORY["id"],
            "segmentation": {"size": [int(v) for v in rle["size"]],
                             "counts": rle["counts"].decode("ascii")},
            "area": float(mask_utils.area(rle)),
            "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0,
            "score": float(report["segmentation"]["confidence"]),
            "attributes": {k: v for k, v in attributes.items() if v is not None}}
