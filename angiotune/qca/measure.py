"""Quantitative coronary analysis of one segment mask: diameters along the centerline, the
interpolated reference, MLD, % diameter stenosis and lesion length, in mm.

The method is the edge-detection QCA of core labs:

1. centerline through the middle of the lumen (``angiotune.qca.centerline``); a mask cut in two
   by a subtotal occlusion is bridged, and the gap measured as no lumen;
2. at every pixel of arc length, the lumen edges along the normal. Given the frame, as a core
   lab does: from the frame's intensity on scanlines along the normals, an edge-strength cost
   (first and second derivatives) followed across scanlines by dynamic programming, the mask
   only a prior on where to look (``angiotune.qca.edges``): a coarse model mask then gives the
   segment, its centerline and its ends, and the frame the lumen. Without a frame, where the
   (bilinearly interpolated) mask or probability map crosses one half, to sub-pixel precision.
   The result's ``edge_source`` ("frame" or "mask") says which;
3. the cut ends of the segment are dropped (``trim_diameters``) and the profile lightly smoothed;
   the MLD is not searched in its outer ``end_margin`` (a segment runs between healthy parts);
4. the reference diameter is a straight line fitted to the healthy parts: everything except the
   obstruction, the run around the narrowest point that stays more than ``healthy_tolerance``
   below the line (refitted until it settles). A line, not a constant, follows the taper;
5. MLD is the smallest diameter, RVD the reference at the MLD, %DS = 100 (1 - MLD / RVD); the
   lesion runs between the points where the obstruction falls to ``lesion_edge_fraction`` of its
   deepest, and its length is the arc length between them (projected, as on the screen).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
from scipy import ndimage

from angiotune.errors import AngiotuneError
from angiotune.qca.centerline import branched_fraction, bridge_gaps, centerline
from angiotune.qca.edges import EdgeSettings, frame_edges
from angiotune.qca.trace import TraceSettings, complete_to_box

EDGE_LEVEL = 0.5
BRANCHED_FRACTION = 0.15  # share of the mask off the centerline's tube that means a branch
_RAY_STEP_PX = 0.05


class QCAError(AngiotuneError):
    """The mask cannot be measured (too small, or not a vessel piece)."""


# A mask of healthy vessel (or one that missed the lesion): reported as measured, % DS <= 0.
NO_NARROWING = ("no narrowing: the lumen nowhere falls below the reference line, so % DS is 0 "
                "or less and the lesion length 0 (a healthy stretch, or a mask that missed the "
                "lesion)")

@dataclass(frozen=True)
class QCASettings:
    trim_diameters: float = 0.7
    profile_smoothing_px: float = 1.0
    healthy_tolerance: float = 0.05
    lesion_edge_fraction: float = 0.05
    end_margin: float = 0.1
    min_points: int = 8
    edges: EdgeSettings = EdgeSettings()
    trace: TraceSettings = TraceSettings()


@dataclass(frozen=True)
class QCAResult:
    """The diameter function and what is read from it. Points are (x, y) frame pixels."""

    mm_per_pixel: float
    centerline_px: np.ndarray
    left_edge_px: np.ndarray
    right_edge_px: np.ndarray
    arclength_mm: np.ndarray
    diameter_mm: np.ndarray
    reference_mm: np.ndarray
    healthy: np.ndarray
    mld_index: int
    lesion_start: int
    lesion_end: int
    notes: list[str] = field(default_factory=list)
    edge_source: str = "mask"  # "frame": edges from the frame's intensity; "mask": the mask's

    @property
    def mld_mm(self) -> float:
        return float(self.diameter_mm[self.mld_index])

    @property
    def rvd_mm(self) -> float:
        return float(self.reference_mm[self.mld_index])

    @property
    def diameter_stenosis_pct(self) -> float:
        """NaN when there is no reference to compare with (a mask with no healthy width)."""
        rvd = self.rvd_mm
        return 100.0 * (1.0 - self.mld_mm / rvd) if rvd > 0 else math.nan

    @property
    def lesion_length_mm(self) -> float:
        return float(self.arclength_mm[self.lesion_end] - self.arclength_mm[self.lesion_start])

    def measurements(self) -> dict[str, float | list[float]]:
        """The numbers, named as in core-lab contour exports."""
        return {
            "MLD_mm": round(self.mld_mm, 3),
            "interpolated_RVD_mm": round(self.rvd_mm, 3),
            "diameter_stenosis_pct": round(self.diameter_stenosis_pct, 2),
            "lesion_length_mm": round(self.lesion_length_mm, 2),
            "proximal_reference_mm": round(float(self.reference_mm[self.lesion_start]), 3),
            "distal_reference_mm": round(float(self.reference_mm[self.lesion_end]), 3),
            "MLD_position_px": _xy(self.centerline_px[self.mld_index]),
            "lesion_start_px": _xy(self.centerline_px[self.lesion_start]),
            "lesion_end_px": _xy(self.centerline_px[self.lesion_end]),
            "mm_per_pixel": round(self.mm_per_pixel, 5),
            "edges": self.edge_source,
        }

    def to_json(self) -> dict:
        """Measurements plus the contours and the diameter function, for reports and plots."""
        return {
            "measurements": self.measurements(),
            "centerline": [_xy(p) for p in self.centerline_px],
            "left_edge": [_xy(p) for p in self.left_edge_px],
            "right_edge": [_xy(p) for p in self.right_edge_px],
            "diameter_function": {
                "arclength_mm": [round(float(v), 3) for v in self.arclength_mm],
                "diameter_mm": [round(float(v), 3) for v in self.diameter_mm],
                "reference_mm": [round(float(v), 3) for v in self.reference_mm],
            },
            "notes": list(self.notes),
        }


def measure(mask: np.ndarray, mm_per_pixel: float, probability: np.ndarray | None = None,
            frame: np.ndarray | None = None,
            settings: QCASettings = QCASettings(), box=None) -> QCAResult:
    """QCA of the largest connected piece of ``mask`` (H x W). ``probability`` (same shape, in
    [0, 1]) places the mask's edges more finely than the binary mask can, when the model gave
    one. With ``frame`` (the angiogram the mask was drawn on, any numeric dtype), the lumen edges
    come from the frame's intensity (``angiotune.qca.edges``) and the mask only gives the
    centerline, the segment's ends and where to look; without it, from the mask.

    ``mm_per_pixel`` is the mask's spacing; a mask stored at a fraction of the frame's size is
    scaled up to the frame, and the spacing with it. ``box`` (x0, y0, x1, y1, frame pixels),
    with a frame: the analysed segment's extent; a mask that stops well inside it is traced on
    through the frame's vessel to its edge (``angiotune.qca.trace``)."""
    mask = np.asarray(mask, dtype=bool)
    if not mm_per_pixel or not np.isfinite(mm_per_pixel) or mm_per_pixel <= 0:
        raise QCAError(f"pixel spacing must be a positive number of mm, got {mm_per_pixel!r}")
    edge_field = np.asarray(probability if probability is not None else mask, dtype=np.float32)
    if frame is not None:
        frame = np.asarray(frame)
        if frame.shape[:2] != mask.shape:
            factor = frame.shape[1] / mask.shape[1]
            if abs(frame.shape[0] / mask.shape[0] - factor) > 0.02 * factor:
                raise QCAError(f"the frame ({frame.shape[1]}x{frame.shape[0]}) and the mask "
                               f"({mask.shape[1]}x{mask.shape[0]}) do not have one shape")
            zoom = (frame.shape[0] / mask.shape[0], frame.shape[1] / mask.shape[1])
            edge_field = np.clip(ndimage.zoom(edge_field, zoom, order=1, grid_mode=True,
                                              mode="nearest"), 0, 1)
            mask = edge_field >= EDGE_LEVEL
            mm_per_pixel = mm_per_pixel / factor
    trace_notes: list[str] = []
    if frame is not None and box is not None:
        r0, c0, r1, c1 = _neighbourhood(mask)
        path = centerline(bridge_gaps(mask[r0:r1, c0:c1])[0]) + np.array([c0, r0])
        completed, trace_notes = complete_to_box(mask, frame, box, path, settings.trace)
        edge_field = np.where(completed & ~mask, 1.0, edge_field).astype(np.float32)
        mask = completed
    r0, c0, r1, c1 = _neighbourhood(mask)
    result = _measure(mask[r0:r1, c0:c1], edge_field[r0:r1, c0:c1], float(mm_per_pixel),
                      settings, None if frame is None else frame[r0:r1, c0:c1])
    offset = np.array([c0, r0], dtype=float)
    return replace(result, centerline_px=result.centerline_px + offset,
                   left_edge_px=result.left_edge_px + offset,
                   right_edge_px=result.right_edge_px + offset,
                   notes=trace_notes + result.notes)


def _neighbourhood(mask: np.ndarray) -> tuple[int, int, int, int]:
    """The mask's bounding rows and columns with room for the edge search's rays: QCA works
    there, not on the whole frame."""
    rows, cols = np.nonzero(mask)
    if len(rows) < 3:
        raise QCAError(f"the mask is too small to measure ({len(rows)} pixels)")
    box = mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    margin = int(2 * ndimage.distance_transform_edt(np.pad(box, 1)).max()) + 6
    return (max(rows.min() - margin, 0), max(cols.min() - margin, 0),
            rows.max() + margin + 1, cols.max() + margin + 1)


def _measure(mask: np.ndarray, edge_field: np.ndarray, mm_per_pixel: float,
             settings: QCASettings, frame: np.ndarray | None = None) -> QCAResult:
    notes: list[str] = []
    joined, bridges = bridge_gaps(mask)
    path = centerline(joined)
    if len(path) < settings.min_points:
        raise QCAError(f"the mask is too small to measure ({int(mask.sum())} pixels, "
                       f"centerline {len(path)} px)")
    if branched_fraction(joined, path) > BRANCHED_FRACTION:
        notes.append("the mask branches (a side branch or a neighbouring vessel is in it): the "
                     "centerline follows its longest route")
    normal, (left_distance, right_distance), centre_inside = _edges(edge_field, path)
    if frame is not None:
        left_distance, right_distance = _frame_distances(frame, path, normal, left_distance,
                                                         right_distance, settings.edges)
    left = path + left_distance[:, None] * normal
    right = path - right_distance[:, None] * normal
    diameter = np.linalg.norm(left - right, axis=1)
    if bridges:
        # Where the centerline crosses a gap, there is no lumen to see: a diameter of zero.
        diameter[~centre_inside] = 0.0
        left[~centre_inside] = right[~centre_inside] = path[~centre_inside]
        notes.append(f"the lumen is interrupted ({int((~centre_inside).sum())} px of the "
                     "centerline cross a gap in the mask): subtotal or total occlusion, no "
                     "lumen across the gap")
    keep = _trimmed(path, diameter, settings.trim_diameters)
    path, left, right, diameter = path[keep], left[keep], right[keep], diameter[keep]
    valid = np.isfinite(diameter)
    if valid.sum() < settings.min_points:
        raise QCAError("too few points with both lumen edges found along the centerline")
    if not valid.all():
        notes.append(f"{int((~valid).sum())} of {len(valid)} diameters interpolated where an "
                     "edge was not found")
        diameter = _fill_gaps(diameter, valid)
        left = np.stack([_fill_gaps(left[:, k], valid) for k in range(2)], axis=1)
        right = np.stack([_fill_gaps(right[:, k], valid) for k in range(2)], axis=1)
    diameter = ndimage.gaussian_filter1d(diameter, settings.profile_smoothing_px, mode="nearest")
    arclength = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(path, axis=0), axis=1))])
    # An analysed segment runs from healthy vessel to healthy vessel: a narrowing in its outer
    # tenths is the mask ending (a rounded end), not the lesion.
    margin = int(settings.end_margin * len(diameter))
    mld = margin + int(np.argmin(diameter[margin:len(diameter) - margin]))
    if not valid[mld]:
        notes.append("the MLD falls where an edge was interpolated: check the mask there")
    reference, healthy, reference_notes = _reference(arclength, diameter, mld, settings)
    start, end = _lesion_extent(diameter, reference, mld, settings.lesion_edge_fraction)
    if diameter[mld] >= reference[mld]:
        notes.append(NO_NARROWING)
    return QCAResult(mm_per_pixel=float(mm_per_pixel), centerline_px=path, left_edge_px=left,
                     right_edge_px=right, arclength_mm=arclength * mm_per_pixel,
                     diameter_mm=diameter * mm_per_pixel, reference_mm=reference * mm_per_pixel,
                     healthy=healthy, mld_index=mld, lesion_start=start, lesion_end=end,
                     notes=notes + reference_notes,
                     edge_source="mask" if frame is None else "frame")


def _edges(edge_field: np.ndarray, path: np.ndarray):
    """Each point's unit normal, the distances out to the left (along the normal) and right
    lumen edges where the mask crosses one half (NaN where it does not), and whether each
    centerline point lies in the lumen at all."""
    tangent = np.gradient(path, axis=0)
    tangent /= np.maximum(np.linalg.norm(tangent, axis=1, keepdims=True), 1e-9)
    normal = np.stack([tangent[:, 1], -tangent[:, 0]], axis=1)
    reach = 2.0 * float(ndimage.distance_transform_edt(np.pad(edge_field >= EDGE_LEVEL, 1))
                        .max()) + 3.0
    steps = np.arange(0.0, reach, _RAY_STEP_PX)
    distances = []
    for sign in (1.0, -1.0):
        points = path[:, None, :] + sign * steps[None, :, None] * normal[:, None, :]
        values = ndimage.map_coordinates(edge_field, [points[..., 1], points[..., 0]], order=1,
                                         mode="constant", cval=0.0)
        distances.append(_first_crossing(values, steps))
        centre_inside = values[:, 0] >= EDGE_LEVEL
    return normal, distances, centre_inside


def _frame_distances(frame: np.ndarray, path: np.ndarray, normal: np.ndarray,
                     prior_left: np.ndarray, prior_right: np.ndarray,
                     settings: EdgeSettings) -> tuple[np.ndarray, np.ndarray]:
    """The frame's edge distances; an edge crossed over past the other (a lumen gone to a
    line) meets it halfway, a diameter of zero."""
    left, right = frame_edges(frame, path, normal, prior_left, prior_right, settings)
    crossed = left + right < 0
    middle = 0.5 * (left - right)
    return np.where(crossed, middle, left), np.where(crossed, -middle, right)


def _first_crossing(values: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """Distance out from the centre where each row first drops below one half (linear)."""
    inside = values >= EDGE_LEVEL
    outside = ~inside
    outside[:, 0] = False
    first = np.argmax(outside, axis=1)
    found = outside[np.arange(len(values)), first] & inside[:, 0]
    j = np.maximum(first, 1)
    rows = np.arange(len(values))
    v0, v1 = values[rows, j - 1], values[rows, j]
    fraction = np.clip((v0 - EDGE_LEVEL) / np.maximum(v0 - v1, 1e-9), 0, 1)
    distance = steps[j - 1] + fraction * (steps[j] - steps[j - 1])
    return np.where(found, distance, np.nan)


def _trimmed(path: np.ndarray, diameter: np.ndarray, trim_diameters: float) -> np.ndarray:
    """Points far enough from the cut ends that the edges there belong to the vessel's sides."""
    finite = diameter[np.isfinite(diameter)]
    trim = trim_diameters * (float(np.median(finite)) if len(finite) else 0.0)
    arclength = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(path, axis=0), axis=1))])
    return (arclength >= trim) & (arclength <= arclength[-1] - trim)


def _fill_gaps(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    index = np.arange(len(values))
    return np.interp(index, index[valid], values[valid])


def _reference(arclength: np.ndarray, diameter: np.ndarray, mld: int,
               settings: QCASettings) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The reference diameter line fitted to the healthy parts, and which points those are."""
    healthy = np.ones(len(diameter), dtype=bool)
    notes: list[str] = []
    for _ in range(10):
        line = _fit_line(arclength, diameter, healthy, mld)
        below = diameter < line * (1.0 - settings.healthy_tolerance)
        obstruction = _run_around(below, mld)
        updated = ~obstruction
        if updated.sum() < max(3, len(diameter) // 10):
            notes.append("little healthy vessel in the segment: the reference is uncertain")
            break
        if np.array_equal(updated, healthy):
            break
        healthy = updated
    line = _fit_line(arclength, diameter, healthy, mld)
    if not healthy[:mld].any() or not healthy[mld + 1:].any():
        notes.append("no healthy vessel on one side of the lesion: the reference is flat")
    elif line.min() <= 0:  # a steep taper read off a few points: no vessel narrows to nothing
        line = np.full(len(diameter), float(diameter[healthy].mean()))
        notes.append("the healthy parts taper too steeply to extrapolate: the reference is "
                     "flat")
    if line.min() <= 0:
        raise QCAError("no healthy lumen to take a reference diameter from")
    return line, healthy, notes


def _fit_line(arclength: np.ndarray, diameter: np.ndarray, healthy: np.ndarray,
              mld: int) -> np.ndarray:
    """A straight line through the healthy points when they lie on both sides of the MLD (a
    taper can only be read across the lesion), else their mean."""
    if healthy[:mld].any() and healthy[mld + 1:].any():
        slope, intercept = np.polyfit(arclength[healthy], diameter[healthy], 1)
        return intercept + slope * arclength
    return np.full(len(diameter), float(diameter[healthy].mean()))


def _run_around(flags: np.ndarray, centre: int) -> np.ndarray:
    """The contiguous run of True containing ``centre`` (all False if it is False there)."""
    run = np.zeros(len(flags), dtype=bool)
    if not flags[centre]:
        return run
    start = centre
    while start > 0 and flags[start - 1]:
        start -= 1
    end = centre
    while end < len(flags) - 1 and flags[end + 1]:
        end += 1
    run[start:end + 1] = True
    return run


def _lesion_extent(diameter: np.ndarray, reference: np.ndarray, mld: int,
                   edge_fraction: float) -> tuple[int, int]:
    obstruction = reference - diameter
    deepest = obstruction[mld]
    if deepest <= 0:
        return mld, mld
    run = np.nonzero(_run_around(obstruction >= edge_fraction * deepest, mld))[0]
    return int(run[0]), int(run[-1])


def _xy(point: np.ndarray) -> list[float]:
    return [round(float(point[0]), 2), round(float(point[1]), 2)]
