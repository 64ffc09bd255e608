"""One box on one frame through a kept model, and the answer back in frame pixels.

The crop is made exactly as in training (a square of the adapter's ``crop_context`` times the
box around it, at the model's input size), so the adapter sees what it learned on. The mask
logits come back through the inverse of the same affine, bilinearly, so the QCA can place edges
between pixels from the probability map rather than from a blocky mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from angiotune.data.context import TREE_END, view_context
from angiotune.data.transforms import box_to_square, normalise_intensity, warp
from angiotune.errors import ConfigError
from angiotune.model.heads import class_vessels, restrict_to_vessel
from angiotune.model.lesion import LesionModel
from angiotune.model.sam3 import image_size_of
from angiotune.names import ADAPTER_VESSELS
from angiotune.qca.centerline import largest_component
from angiotune.qca.tree import tree_columns, vessel_tree
from angiotune.taxonomies import load_taxonomy

_OUTSIDE_LOGIT = -20.0


@dataclass
class Segmentation:
    probability: np.ndarray  # H x W in [0, 1], frame pixels
    mask: np.ndarray  # H x W bool: the largest piece above one half
    confidence: float  # the model's own IoU estimate
    heads: dict | None  # CASS segment, stenosis, MLD, RVD, when the adapter has heads


def segment_box(model: LesionModel, frame: np.ndarray, box: np.ndarray, mm_per_pixel: float,
                angles: tuple[float | None, float | None] = (None, None),
                vessel: str | None = None, calibrated: bool = True) -> Segmentation:
    """Segment inside ``box`` (x0, y0, x1, y1 frame pixels) on ``frame`` (H x W in [0, 1])."""
    return segment_boxes(model, frame, [box], mm_per_pixel, angles, vessel, calibrated)[0]


@torch.no_grad()
def segment_boxes(model: LesionModel, frame: np.ndarray, boxes: list[np.ndarray],
                  mm_per_pixel: float, angles: tuple[float | None, float | None] = (None, None),
                  vessel: str | None = None, calibrated: bool = True) -> list[Segmentation]:
    """Every lesion box of one frame in one pass of the model: each box's crop is a row of one
    batch, so the encoder and decoder run once per frame, not once per lesion. ``vessel``: the
    adapter vessel the lesions were routed to; the heads name a segment of that vessel.
    ``calibrated``: False when ``mm_per_pixel`` is 1 for want of a calibration; the heads'
    segment read then sees no millimetres (as it was fitted: never pixels as if mm)."""
    size = image_size_of(model.segmenter)
    height, width = frame.shape
    fill = float(np.median(frame))
    affines, images, model_boxes, contexts, spacings = [], [], [], [], []
    # Heads trained on traced frames read where each box sits along the frame's vessel tree:
    # traced once a frame. Heads that never saw a tree are not shown one.
    reads_tree = model.heads is not None and model.heads.settings.context_dim >= TREE_END
    tree = vessel_tree(frame) if reads_tree else None
    spacing_mm = mm_per_pixel if calibrated else None
    for box in boxes:
        box = np.asarray(box, dtype=float)
        affine = box_to_square(box, size, model.crop_context)
        affines.append(affine)
        images.append(normalise_intensity(warp(frame, affine, size, fill=fill)))
        model_boxes.append(np.clip(affine.box(box), 0, size).astype(np.float32))
        row = {"angle_lao_deg": angles[0], "angle_cranial_deg": angles[1],
               "frame_width": width, "frame_height": height,
               **{f"bbox_{k}": float(v) for k, v in zip(("x0", "y0", "x1", "y1"), box,
                                                         strict=True)},
               **(tree_columns(frame, box, spacing_mm, tree) if tree is not None else {})}
        contexts.append(view_context(row))
        spacings.append(mm_per_pixel / affine.scale)
    device = next(model.parameters()).device
    out = model(torch.as_tensor(np.stack(images), device=device),
                torch.as_tensor(np.stack(model_boxes), device=device),
                torch.as_tensor(np.stack(contexts), device=device),
                torch.tensor(spacings, dtype=torch.float32, device=device))
    if not calibrated and model.heads is not None and bool(model.heads.segment_fitted):
        context = torch.as_tensor(np.stack(contexts), device=device)
        out["segment_logits"] = model.heads.read_segment(
            context, torch.full((len(boxes),), math.nan, device=device))
    found = []
    for i, affine in enumerate(affines):
        logits = out["logits"][i].float().cpu().numpy()
        frame_logits = warp(logits, affine.inverse(), (height, width), fill=_OUTSIDE_LOGIT)
        probability = 1.0 / (1.0 + np.exp(-frame_logits))
        mask = largest_component(probability >= 0.5)
        found.append(Segmentation(probability.astype(np.float32), mask,
                                  float(out["confidence"][i]),
                                  _head_outputs(model, out, i, vessel)))
    return found


def _head_outputs(model: LesionModel, out: dict, i: int,
                  vessel: str | None = None) -> dict | None:
    """The heads' answers, their segment codes read in the taxonomy they were trained on; the
    measurements only of heads that were trained. The segment is named among ``vessel``'s
    (when it is one). The vessel the heads would choose, routing's second opinion, comes from
    their vessel read (format 4 on) or else from their segment probabilities summed per vessel;
    ``vessel_vote`` says which, in words."""
    if model.heads is None:
        return None
    settings = model.heads.settings
    logits = out["segment_logits"][i : i + 1].float()
    # The segment, and its probability, among the routed vessel's segments.
    named = torch.softmax(restrict_to_vessel(logits, settings.classes, settings.taxonomy,
                                             [vessel]), dim=1)[0].cpu().numpy()
    best = int(np.argmax(named))
    try:
        codes = load_taxonomy(settings.taxonomy).segments
    except ConfigError:  # a user's taxonomy file not at hand: codes without names or vessels
        codes = {}
    segment = codes.get(settings.classes[best])
    by_vessel, vote, read = _vessel_vote(settings, out, i, logits, codes)
    vessel = max(by_vessel, key=by_vessel.get) if by_vessel else None
    measured = {"diameter_stenosis_pct": ("stenosis", "stenosis_pct", 2),
                "MLD_mm": ("mld", "mld_mm", 3), "RVD_mm": ("rvd", "rvd_mm", 3)}
    return {"cass_segment": settings.classes[best], "taxonomy": settings.taxonomy,
            "segment_name": segment.name if segment else None,
            "probability": round(float(named[best]), 3),
            "vessel": vessel, "vessel_probability": round(by_vessel.get(vessel, 0.0), 3),
            "vessel_vote": vote,
            # The vessel read routes where it beat the view on its training lesions.
            "vessel_decides": read and bool(model.heads.vessel_decides),
            **{key: round(float(out[name][i]), places)
               for key, (task, name, places) in measured.items() if task in settings.tasks}}


def _vessel_vote(settings, out: dict, i: int, segment_logits: torch.Tensor,
                 codes: dict) -> tuple[dict[str, float], str, bool]:
    """Each adapter vessel's probability, what the vote rests on, and whether it is the vessel
    read: that where the heads have one and the angles are known, else the segment
    probabilities summed per vessel."""
    if "vessel_logits" in out and bool(torch.isfinite(out["vessel_logits"][i]).all()):
        probabilities = torch.softmax(out["vessel_logits"][i].float(), dim=0).cpu().numpy()
        return ({v: float(p) for v, p in zip(ADAPTER_VESSELS, probabilities, strict=True)},
                "the heads' vessel read (view angles against the standard views, the box on "
                "the frame's vessel tree)", True)
    probabilities = torch.softmax(segment_logits, dim=1)[0].cpu().numpy()
    groups = class_vessels(settings.classes, settings.taxonomy)
    by_vessel: dict[str, float] = {}
    for group, p in zip(groups, probabilities, strict=True):
        if group is not None:
            by_vessel[group] = by_vessel.get(group, 0.0) + float(p)
    if not by_vessel:
        return by_vessel, "the heads' segments", False
    winner = max(by_vessel, key=by_vessel.get)
    # Named by the likeliest segment of the vessel voted for, so the words match the vote.
    voted = max((i for i, group in enumerate(groups) if group == winner),
                key=lambda i: probabilities[i])
    code = settings.classes[voted]
    return by_vessel, (f"the heads' segments ({settings.taxonomy}) favour {codes[code].name} "
                       f"({code})"), False
