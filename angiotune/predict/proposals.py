"""Lesion proposals when no box is given: where the segmented vessel narrows.

The arteries are segmented without a model (a log-density top-hat, thresholded with hysteresis,
specks removed) and reduced to a skeleton pruned of spurs. At each skeleton pixel the contrast,
which across a round lumen peaks in proportion to its diameter, is compared with the local
reference (a high percentile of it along the vessel around); where it dips by
``min_narrowing`` or more, and where a tight lesion has cut the vessel mask in two, the stretch
around becomes a box, to be segmented and measured by the vessel's adapter. Recall on the
phantoms is in ``benchmarks/README.md``: a starting point, not a detector.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree
from skimage.filters import apply_hysteresis_threshold, threshold_otsu
from skimage.morphology import skeletonize

from angiotune.predict.frames import VESSEL_WIDTH_FRACTION


@dataclass(frozen=True)
class Proposal:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 frame pixels, half-open
    narrowing: float  # 1 - contrast / its local reference at the dip
    centre_px: tuple[float, float]
    kind: str = "narrowing"  # or "gap": the vessel mask is cut in two there

    def as_dict(self) -> dict:
        return {"box": [round(v, 1) for v in self.box], "narrowing": round(self.narrowing, 3),
                "centre_px": [round(v, 1) for v in self.centre_px], "kind": self.kind}


def contrast_density(frame: np.ndarray) -> np.ndarray:
    """Contrast in each pixel: the log-density top-hat of the frame, zero outside the field.

    In log space the contrast's attenuation adds to the anatomy's instead of scaling it, so the
    top-hat measures it alike over lung and spine; across a round lumen filled with contrast
    it peaks on the centerline in proportion to the diameter (the densitometric signal). The
    collimator's edge, dark but not a vessel, is cut away with the unexposed corners.
    """
    size = max(3, int(round(VESSEL_WIDTH_FRACTION * max(frame.shape))) | 1)
    density = -np.log(np.clip(ndimage.gaussian_filter(frame.astype(np.float32), 1.0), 1e-3, 1))
    tophat = density - ndimage.grey_opening(density, size=(size, size))
    exposed = ndimage.gaussian_filter(frame, size) > 0.5 * float(np.median(frame))
    tophat[~ndimage.binary_erosion(exposed, iterations=size)] = 0
    return tophat


def vessel_mask(density: np.ndarray) -> np.ndarray:
    """Contrast-filled arteries from ``contrast_density``: hysteresis (Otsu's level to seed,
    half of it to grow) follows faint distal vessels from their bright proximal parts."""
    if float(density.max()) <= 0:
        return np.zeros(density.shape, dtype=bool)
    level = threshold_otsu(density[density > 0])
    mask = apply_hysteresis_threshold(density, 0.5 * level, level)
    labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    return sizes[labels] >= max(16, density.size // 2000)  # specks are noise, not vessels


def propose_boxes(frame: np.ndarray, max_proposals: int = 3,
                  min_narrowing: float = 0.25) -> list[Proposal]:
    """Up to ``max_proposals`` boxes around the deepest narrowings, deepest first."""
    density = contrast_density(frame)
    mask = vessel_mask(density)
    spur_px = max(2, int(round(VESSEL_WIDTH_FRACTION * max(frame.shape) / 2)))
    skeleton = _pruned(skeletonize(mask), spur_px)
    if not skeleton.any():
        return []
    radius = float(np.median(ndimage.distance_transform_edt(mask)[skeleton]))
    window = max(9, int(12 * radius)) | 1
    # The skeleton may sit a pixel off the centerline, where the contrast peaks.
    ys, xs = np.nonzero(skeleton)
    points = np.stack([xs, ys], axis=1).astype(float)
    lumen_map = ndimage.maximum_filter(density, size=3)
    lumen = lumen_map[ys, xs]
    # Reference: a high percentile of the lumen signal along the vessel around each point (a
    # percentile, not the maximum, so that crossings, where contrast adds up, do not count).
    around = cKDTree(points).query_ball_point(points, r=window / 2)
    reference = np.array([np.percentile(lumen[i], 75) for i in around])
    narrowing = 1 - lumen / np.maximum(reference, 1e-9)
    deepest_around = np.array([narrowing[i].max() for i in around])
    # Tips of the skeleton are where a vessel fades out: thinning there is not a lesion.
    tips = (skeleton & (_neighbour_count(skeleton) <= 1))[ys, xs]
    near_tip = np.zeros(len(points), dtype=bool)
    for i in np.nonzero(tips)[0]:
        near_tip[around[i]] = True
    peaks = (narrowing >= deepest_around) & ~near_tip & (narrowing >= min_narrowing)
    candidates = []
    for index in np.nonzero(peaks)[0]:
        # The lesion and healthy vessel either side of it, as an analyst would draw the segment.
        near = points[around[index]]
        x0, y0 = near.min(axis=0) - 2 * radius
        x1, y1 = near.max(axis=0) + 2 * radius + 1
        centre = (float(points[index, 0]), float(points[index, 1]))
        candidates.append(Proposal((float(x0), float(y0), float(x1), float(y1)),
                                   float(narrowing[index]), centre))
    candidates += _gaps(points, tips, skeleton, lumen_map, reference, window, radius)
    candidates.sort(key=lambda p: -p.narrowing)
    kept: list[Proposal] = []
    for candidate in candidates:  # one box per lesion: drop boxes centred inside a kept one
        if not any(_inside(candidate.centre_px, k.box) for k in kept):
            kept.append(candidate)
        if len(kept) >= max_proposals:
            break
    return kept


def _gaps(points: np.ndarray, tips: np.ndarray, skeleton: np.ndarray, lumen_map: np.ndarray,
          reference: np.ndarray, window: int, radius: float) -> list[Proposal]:
    """A tight lesion can cut the vessel mask in two: tips of different pieces facing each
    other across a short gap. The gap is a candidate; its narrowing is the contrast in the
    middle of the gap against the tips' reference, and ``kind`` says it is a gap."""
    labels, _ = ndimage.label(skeleton, structure=np.ones((3, 3)))
    piece = labels[points[:, 1].astype(int), points[:, 0].astype(int)]
    tip_index = np.nonzero(tips)[0]
    if len(tip_index) < 2:
        return []
    tree = cKDTree(points)
    outward = {}
    for i in tip_index:  # which way each tip points: from the skeleton behind it to the tip
        behind = points[tree.query_ball_point(points[i], r=5)].mean(axis=0)
        direction = points[i] - behind
        outward[i] = direction / max(float(np.linalg.norm(direction)), 1e-9)
    proposals = []
    for first, second in cKDTree(points[tip_index]).query_pairs(r=window):
        a, b = tip_index[first], tip_index[second]
        across = points[b] - points[a]
        across /= max(float(np.linalg.norm(across)), 1e-9)
        if piece[a] == piece[b] or outward[a] @ across < 0.5 or outward[b] @ -across < 0.5:
            continue  # the same piece, or tips that do not face each other
        half = window / 2 + 2 * radius
        x, y = (float(v) for v in (points[a] + points[b]) / 2)
        narrowing = 1 - float(lumen_map[int(round(y)), int(round(x))]) / max(
            float(max(reference[a], reference[b])), 1e-9)
        proposals.append(Proposal((x - half, y - half, x + half, y + half), float(narrowing),
                                  (x, y), kind="gap"))
    return proposals


def _neighbour_count(skeleton: np.ndarray) -> np.ndarray:
    return ndimage.convolve(skeleton.astype(np.uint8), np.ones((3, 3), np.uint8),
                            mode="constant") - 1


def _pruned(skeleton: np.ndarray, length_px: int) -> np.ndarray:
    """The skeleton without spurs shorter than ``length_px``: a ragged wall makes twigs that
    would cut a vessel into pieces too short to show a narrowing. Real tips shorten as much."""
    skeleton = skeleton.copy()
    for _ in range(length_px):
        skeleton &= ~(skeleton & (_neighbour_count(skeleton) <= 1))
    return skeleton


def _inside(point: tuple[float, float], box: tuple[float, float, float, float]) -> bool:
    return box[0] <= point[0] < box[2] and box[1] <= point[1] < box[3]
