"""Lesion proposals when no box is given: where the segmented vessel narrows.

The arteries are segmented without a model (a log-density top-hat, thresholded with hysteresis,
specks removed) and reduced to a skeleton pruned of spurs, which is cut at its branch points
into ordered branches. Along each branch the lumen is measured densitometrically: the
log-density summed across the vessel is proportional to the lumen's cross-section area whatever
the blur, so its square root is proportional to the diameter. A lesion is narrower than the
vessel on *both* sides of it, so the reference at each point is the smaller of two robust
upper percentiles, one of the vessel before it and one after: a taper or the step down after a
side branch is narrower than one side only, and is not proposed. The narrowing is weighted by
how much vessel there is on each side to judge it by (little near a tip or a branch point), the
best few places are kept apart, and so are the gaps where a tight lesion cuts the mask in two.
Recall on the phantoms and on ARCADE is in ``benchmarks/README.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy import ndimage
from scipy.spatial import cKDTree
from skimage.morphology import skeletonize

from angiotune.qca.vessels import VESSEL_WIDTH_FRACTION, contrast_density, vessel_mask

REFERENCE_PERCENTILE = 75  # of the diameters on one side: above a lesion's shoulders, below noise
SIDE_DIAMETERS = 6  # length of vessel each side judges a point by, in reference diameters
# A cut-off is inferred from what cannot be segmented, not measured: it ranks with the mildest
# measured narrowings (tuned on the phantoms' train and val lesions; at 1 it crowds them out).
CUT_OFF_WEIGHT = 0.3


@dataclass(frozen=True)
class Proposal:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 frame pixels, half-open
    narrowing: float  # 1 - diameter / the reference of the narrower side, at the dip
    centre_px: tuple[float, float]
    kind: str = "narrowing"  # or "gap" (the mask is cut in two) or "cut-off" (ends there)
    score: float = 0.0  # narrowing x reliability (vessel to judge it by on both sides): the rank

    def as_dict(self) -> dict:
        return {"box": [round(v, 1) for v in self.box], "narrowing": round(self.narrowing, 3),
                "centre_px": [round(v, 1) for v in self.centre_px], "kind": self.kind,
                "score": round(self.score, 3)}


@dataclass(frozen=True)
class _Branch:
    """One stretch of skeleton between branch points or tips, in order, with its profiles."""

    points: np.ndarray  # (n, 2) x, y
    normals: np.ndarray  # (n, 2) unit vectors across the vessel
    diameter: np.ndarray  # densitometric: sqrt of the density summed across, any unit
    width: np.ndarray  # geometric: twice the mask's distance transform, pixels (for boxes)
    reference: np.ndarray  # the narrower side's reference diameter; NaN where unjudged
    support: np.ndarray  # in [0, 1]: how much vessel both sides have to judge by


def propose_boxes(frame: np.ndarray, max_proposals: int = 3,
                  min_narrowing: float = 0.15) -> list[Proposal]:
    """Up to ``max_proposals`` boxes around the likeliest narrowings, likeliest first, each at
    a different place (no box's centre inside another's box)."""
    density = contrast_density(frame)
    mask = vessel_mask(density)
    spur_px = max(2, int(round(VESSEL_WIDTH_FRACTION * max(frame.shape) / 2)))
    skeleton = _pruned(skeletonize(mask), spur_px)
    if not skeleton.any():
        return []
    distance = ndimage.distance_transform_edt(mask)
    radius = max(1.0, float(np.median(distance[skeleton])))
    junctions = skeleton & (_neighbour_count(skeleton) >= 3)
    near_junction = ndimage.distance_transform_edt(~junctions) <= distance + 1
    zones = ndimage.binary_dilation(junctions)
    paths = _through_junctions(_ordered_branches(skeleton & ~zones), zones)
    branches = [_profile(path, density, distance, near_junction, radius) for path in paths
                if len(path) >= max(4, 2 * radius)]
    candidates = [c for b in branches for c in _narrowings(b, radius, min_narrowing)]
    # Pruning shortened each end by up to ``spur_px``, so a gap is that much wider.
    candidates += _ends(branches, skeleton, density, radius, 12 * radius + 2 * spur_px,
                        min_narrowing)
    candidates.sort(key=lambda p: -p.score)
    kept: list[Proposal] = []
    for candidate in candidates:
        if not any(_inside(candidate.centre_px, k.box) or _inside(k.centre_px, candidate.box)
                   for k in kept):
            kept.append(candidate)
        if len(kept) >= max_proposals:
            break
    return kept


def _ordered_branches(pieces: np.ndarray) -> list[np.ndarray]:
    """Each 8-connected piece of skeleton as a walk from one end to the other, (n, 2) x, y."""
    labels, count = ndimage.label(pieces, structure=np.ones((3, 3)))
    paths = []
    for index, window in enumerate(ndimage.find_objects(labels), start=1):
        ys, xs = np.nonzero(labels[window] == index)
        pixels = {(int(y) + window[0].start, int(x) + window[1].start)
                  for y, x in zip(ys, xs, strict=True)}
        neighbours = {p: [(p[0] + dy, p[1] + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                          if (dy or dx) and (p[0] + dy, p[1] + dx) in pixels] for p in pixels}
        start = min(pixels, key=lambda p: (len(neighbours[p]), p))  # an end, unless a loop
        path, seen = [start], {start}
        while True:
            ahead = [p for p in neighbours[path[-1]] if p not in seen]
            if not ahead:
                break
            # 4-neighbours first: a staircase corner also touches the next step diagonally.
            step = min(ahead, key=lambda p: abs(p[0] - path[-1][0]) + abs(p[1] - path[-1][1]))
            path.append(step)
            seen.add(step)
        paths.append(np.array([(x, y) for y, x in path], dtype=float))
    return paths


def _through_junctions(paths: list[np.ndarray], zones: np.ndarray) -> list[np.ndarray]:
    """Pieces joined across branch points where one continues the other (the straightest pair
    of ends at a branch point, if within 60 degrees), bridged by a straight line: a vessel is
    judged along its own course, side branches and crossings notwithstanding."""
    labels, _ = ndimage.label(zones, structure=np.ones((3, 3)))
    near = ndimage.grey_dilation(labels, size=(3, 3))
    at_zone: dict[int, list[tuple[int, int, np.ndarray]]] = {}  # zone: (piece, end, outward)
    for index, path in enumerate(paths):
        for end, inward in ((0, min(4, len(path) - 1)), (len(path) - 1, max(0, len(path) - 5))):
            zone = int(near[int(path[end, 1]), int(path[end, 0])])
            if zone and end != inward:
                out = path[end] - path[inward]
                at_zone.setdefault(zone, []).append(
                    (index, 0 if end == 0 else 1, out / np.linalg.norm(out)))
    link: dict[tuple[int, int], tuple[int, int]] = {}
    for ends in at_zone.values():
        pairs = sorted(((float(a[2] @ -b[2]), i, j) for i, a in enumerate(ends)
                        for j, b in enumerate(ends) if i < j and a[0] != b[0]), reverse=True)
        used: set[int] = set()
        for straightness, i, j in pairs:
            if straightness >= 0.5 and i not in used and j not in used:
                used |= {i, j}
                a, b = ends[i][:2], ends[j][:2]
                link[a], link[b] = b, a
    joined, done = [], set()
    starts = [i for i in range(len(paths)) if (i, 0) not in link or (i, 1) not in link]
    for first in starts + list(range(len(paths))):  # open chains first, then any loops
        if first in done:
            continue
        piece, entry = first, 0 if (first, 0) not in link else 1
        chain: list[np.ndarray] = []
        while piece not in done:
            done.add(piece)
            path = paths[piece] if entry == 0 else paths[piece][::-1]
            if chain:
                gap = np.linalg.norm(path[0] - chain[-1][-1])
                steps = np.linspace(0, 1, int(np.ceil(gap)) + 1)[1:-1, None]
                chain.append(chain[-1][-1] + steps * (path[0] - chain[-1][-1]))
            chain.append(path)
            exit_end = (piece, 1 - entry)
            if exit_end not in link:
                break
            piece, entry = link[exit_end]
        joined.append(np.concatenate(chain))
    return joined


def _profile(path: np.ndarray, density: np.ndarray, distance: np.ndarray,
             near_junction: np.ndarray, radius: float) -> _Branch:
    """Diameter along a branch, and its reference: the smaller of the two sides' upper
    percentiles, so that a point counts as narrowed only against vessel on both sides."""
    smooth = ndimage.gaussian_filter1d(path, 2.0, axis=0, mode="nearest")
    tangent = np.gradient(smooth, axis=0)
    tangent /= np.maximum(np.linalg.norm(tangent, axis=1, keepdims=True), 1e-9)
    normals = np.stack([-tangent[:, 1], tangent[:, 0]], axis=1)
    ys, xs = path[:, 1].astype(int), path[:, 0].astype(int)
    # Across the vessel out to twice the local lumen radius, plus the blur: the whole lumen,
    # and little of a neighbour.
    reach = 2 * ndimage.maximum_filter1d(distance[ys, xs], 5) + 2
    offsets = np.arange(-np.ceil(reach.max()), np.ceil(reach.max()) + 1)
    across = path[:, None, :] + offsets[None, :, None] * normals[:, None, :]
    values = ndimage.map_coordinates(density, [across[..., 1], across[..., 0]], order=1,
                                     mode="constant")
    area = (values * (np.abs(offsets)[None, :] <= reach[:, None])).sum(axis=1)
    # sqrt(area) is proportional to the diameter; the scale cancels in the narrowing.
    diameter = np.sqrt(np.maximum(ndimage.gaussian_filter1d(area, 1.0, mode="nearest"), 0))
    diameter[near_junction[ys, xs]] = np.nan  # a branch point's blob is not lumen
    side = max(4, int(round(SIDE_DIAMETERS * 2 * radius)))
    padded = np.concatenate([np.full(side, np.nan), diameter, np.full(side, np.nan)])
    windows = sliding_window_view(padded, side)  # windows[k] covers padded[k : k + side]
    count = len(diameter)
    before, after = windows[:count], windows[side + 1:side + 1 + count]
    valid_before, valid_after = np.isfinite(before).sum(axis=1), np.isfinite(after).sum(axis=1)
    reference = np.fmin(_upper(before, valid_before), _upper(after, valid_after))
    support = np.minimum(1, 2 * valid_before / side) * np.minimum(1, 2 * valid_after / side)
    return _Branch(path, normals, diameter, 2 * distance[ys, xs], reference, support)


def _upper(windows: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``REFERENCE_PERCENTILE`` of the finite values of each row (NaN where none), by sorting
    (NaN sorts last): ``np.nanpercentile`` loops over rows in Python."""
    ranked = np.sort(windows, axis=1)
    at = np.round((np.maximum(valid, 1) - 1) * REFERENCE_PERCENTILE / 100).astype(int)
    return np.where(valid > 0, np.take_along_axis(ranked, at[:, None], axis=1)[:, 0], np.nan)


def _narrowings(branch: _Branch, radius: float, min_narrowing: float) -> list[Proposal]:
    """The deepest point of each dip of the diameter below its reference, boxed with the
    narrowed stretch and healthy vessel either side, as an analyst would draw the segment."""
    with np.errstate(invalid="ignore", divide="ignore"):
        narrowing = np.nan_to_num(1 - branch.diameter / branch.reference, nan=0.0)
    score = narrowing * branch.support
    half = max(3, int(round(2 * radius)))
    peaks = (score >= ndimage.maximum_filter1d(score, 2 * half + 1, mode="nearest")) & (
        narrowing >= min_narrowing)
    proposals = []
    for k in np.nonzero(peaks)[0]:
        # The stretch narrowed by at least half the dip, and a reference diameter beyond.
        low = narrowing >= narrowing[k] / 2
        first, last = k, k
        while first > 0 and low[first - 1]:
            first -= 1
        while last < len(low) - 1 and low[last + 1]:
            last += 1
        width = max(float(np.percentile(branch.width, REFERENCE_PERCENTILE)), 2 * radius)
        margin = int(np.ceil(width))
        stretch = branch.points[max(0, first - margin):last + margin + 1]
        proposals.append(_boxed(stretch, branch.points[k], width / 2 + 2,
                                float(narrowing[k]), float(score[k]), "narrowing"))
    return proposals


def _ends(branches: list[_Branch], skeleton: np.ndarray, density: np.ndarray, radius: float,
          reach: float, min_narrowing: float) -> list[Proposal]:
    """Where a vessel's skeleton ends at full calibre: a tight lesion either cuts the vessel
    mask in two (ends of different pieces facing each other across a gap: ``kind`` "gap"), or
    leaves the vessel beyond it too faint to segment ("cut-off"), which a natural end, thinning
    out, is not. The narrowing is the least densitometric diameter across the gap, or just
    beyond the end, against the end's reference; a cut-off ranks by its calibre too."""
    labels, _ = ndimage.label(skeleton, structure=np.ones((3, 3)))
    tips = skeleton & (_neighbour_count(skeleton) <= 1)
    ends = []  # (point, outward, reference, width, calibre, piece) for each end at a tip
    for branch in branches:
        finite = np.nonzero(np.isfinite(branch.diameter))[0]
        if len(branch.points) < 4 or not len(finite):
            continue
        for k, inward in ((0, 3), (len(branch.points) - 1, -4)):
            x, y = branch.points[k].astype(int)
            if not tips[y, x]:
                continue
            direction = branch.points[k] - branch.points[k + inward]
            # The end's reference: the upper percentile of its own last stretch of diameters.
            near = finite[np.argsort(np.abs(finite - k))[:max(4, int(6 * radius))]]
            ends.append((branch.points[k], direction / max(np.linalg.norm(direction), 1e-9),
                         float(np.percentile(branch.diameter[near], REFERENCE_PERCENTILE)),
                         float(np.percentile(branch.width[near], REFERENCE_PERCENTILE)),
                         float(np.percentile(branch.width, REFERENCE_PERCENTILE)),
                         int(labels[y, x])))
    proposals, paired = [], set()
    pairs = cKDTree([e[0] for e in ends]).query_pairs(r=reach) if len(ends) > 1 else set()
    for first, second in pairs:
        (a, out_a, ref_a, width_a, _, piece_a) = ends[first]
        (b, out_b, ref_b, width_b, _, piece_b) = ends[second]
        across = (b - a) / max(float(np.linalg.norm(b - a)), 1e-9)
        if piece_a == piece_b or out_a @ across < 0.5 or out_b @ -across < 0.5:
            continue  # the same piece, or ends that do not face each other
        paired |= {first, second}
        width = max(width_a, width_b, 2 * radius)
        narrowing = 1 - _least_diameter(density, a, b, width) / max(min(ref_a, ref_b), 1e-9)
        if narrowing >= min_narrowing:
            stretch = np.array([a - width * out_a, b - width * out_b])
            proposals.append(_boxed(stretch, (a + b) / 2, width / 2 + 2, float(narrowing),
                                    float(narrowing), "gap"))
    for index, (a, out, reference, width, calibre, _) in enumerate(ends):
        beyond = a + out * (reach / 2)
        inside = bool(np.all((beyond >= 0) & (beyond < np.array(density.shape[::-1]) - 1)))
        if index in paired or not inside or density[int(beyond[1]), int(beyond[0])] == 0:
            continue  # paired, or running out of the field (no contrast measured there)
        narrowing = 1 - _least_diameter(density, a, beyond, max(width, 2 * radius)) / max(
            reference, 1e-9)
        if narrowing >= min_narrowing:
            stretch = np.array([a - 2 * width * out, a + width * out])
            # A natural end thins out first: weigh by the calibre kept up to the end.
            score = CUT_OFF_WEIGHT * float(narrowing) * min(1.0, width / calibre) ** 2
            proposals.append(_boxed(stretch, a, width / 2 + 2, float(narrowing), score,
                                    "cut-off"))
    return proposals


def _least_diameter(density: np.ndarray, start: np.ndarray, stop: np.ndarray,
                    width: float) -> float:
    """The least densitometric diameter (sqrt of the density summed across) between two
    points, across the line joining them, out to ``width`` + 2 pixels either side."""
    along = (stop - start) / max(float(np.linalg.norm(stop - start)), 1e-9)
    normal = np.array([-along[1], along[0]])
    steps = np.linspace(0, 1, max(2, int(np.linalg.norm(stop - start)) + 1))
    offsets = np.arange(-np.ceil(width + 2), np.ceil(width + 2) + 1)
    points = (start + steps[:, None] * (stop - start))[:, None, :] + \
        offsets[None, :, None] * normal[None, None, :]
    area = ndimage.map_coordinates(density, [points[..., 1], points[..., 0]], order=1,
                                   mode="constant").sum(axis=1)
    return float(np.sqrt(max(float(area.min()), 0.0)))


def _boxed(stretch: np.ndarray, centre: np.ndarray, half_width: float, narrowing: float,
           score: float, kind: str) -> Proposal:
    x0, y0 = stretch.min(axis=0) - half_width
    x1, y1 = stretch.max(axis=0) + half_width + 1
    return Proposal((float(x0), float(y0), float(x1), float(y1)), narrowing,
                    (float(centre[0]), float(centre[1])), kind, score)


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
