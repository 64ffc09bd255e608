"""Carry a segment mask that stops short on through the frame's vessel to the ends of its box.

A segmenter's mask often stops where the lumen narrows most: the tight stenosis is faint and
thin, and the mask covers the healthy vessel before it. QCA of that mask measures healthy
vessel and misses the lesion. Core-lab software does not depend on an outline for the extent:
the analyst marks the segment's start and end and path finding follows the vessel between them.
Here the box plays the analyst's part (a lesion's box frames its analysed segment): where the
centerline ends well inside the box, a minimum-cost path through the frame's dark, thin
structures (black top-hat) carries it on to the box's edge, away from the mask already there,
and the mask is extended along it. The lumen's width there is left to the frame's edges
(``angiotune.qca.edges``); the traced tube only says where the vessel runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.draw import disk
from skimage.graph import MCP_Geometric


@dataclass(frozen=True)
class TraceSettings:
    short_fraction: float = 0.15  # an end this far inside the box (of its longer side) is short
    min_short_px: float = 6.0
    min_darkness: float = 0.25  # mean vessel-likeness along a trace to accept it


def complete_to_box(mask: np.ndarray, frame: np.ndarray, box, path: np.ndarray,
                    settings: TraceSettings = TraceSettings()) -> tuple[np.ndarray, list[str]]:
    """``mask`` extended along the frame's vessel from each end of its centerline ``path``
    ((x, y) points, frame pixels) that stops short of ``box`` (x0, y0, x1, y1), and notes saying
    what was traced. Unchanged when both ends reach the box or the frame shows no vessel to
    follow. The trace goes on the way the centerline was heading (within 60 degrees): a vessel
    crossing near the end, or a branch leaving it sideways, is not the segment's course."""
    height, width = mask.shape
    x0, y0, x1, y1 = (float(v) for v in box)
    side = max(x1 - x0, y1 - y0)
    limit = max(settings.short_fraction * side, settings.min_short_px)
    if len(path) < 2:  # a speck of a mask: no heading to follow
        return mask, []
    tail = min(max(3, min(len(path) // 4, 12)), len(path) - 1)  # a short path: its ends
    ends = [(path[0], path[0] - path[tail]), (path[-1], path[-1] - path[-1 - tail])]
    short = [(end, heading) for end, heading in ends
             if _room_ahead(end, heading, (x0, y0, x1, y1)) > limit]
    if not short:
        return mask, []
    half_width = float(ndimage.distance_transform_edt(mask).max())
    margin = int(3 * half_width) + 4
    c0, r0 = max(int(x0) - margin, 0), max(int(y0) - margin, 0)
    c1, r1 = min(int(np.ceil(x1)) + margin + 1, width), min(int(np.ceil(y1)) + margin + 1, height)
    darkness = _vessel_likeness(np.asarray(frame, dtype=np.float32)[r0:r1, c0:c1], half_width)
    local_mask = mask[r0:r1, c0:c1]
    out = mask.copy()
    notes = []
    for end, direction in short:
        start = (int(round(end[1])) - r0, int(round(end[0])) - c0)
        if not (0 <= start[0] < local_mask.shape[0] and 0 <= start[1] < local_mask.shape[1]):
            continue
        path = _trace(darkness, local_mask, start, (x0 - c0, y0 - r0, x1 - c0, y1 - r0),
                      half_width, direction)
        if path is None or darkness[path[:, 0], path[:, 1]].mean() < settings.min_darkness:
            notes.append("the mask stops inside the box and the frame shows no vessel to "
                         "follow from there: measured as the mask covers it")
            continue
        for row, col in path[::2]:
            rr, cc = disk((row + r0, col + c0), max(half_width, 1.0), shape=mask.shape)
            out[rr, cc] = True
        notes.append(f"the mask stopped {_room_ahead(end, direction, (x0, y0, x1, y1)):.0f} "
                     "px short of the box's edge: the segment was traced on through the frame's "
                     f"vessel to it ({len(path)} px) and measured there too")
    return out, notes


def _room_ahead(point: np.ndarray, heading: np.ndarray,
               box: tuple[float, float, float, float]) -> float:
    """How far a centerline end could go on, the way it heads, before it leaves the box (0 at
    or outside its edge)."""
    unit = np.asarray(heading, dtype=float) / max(float(np.linalg.norm(heading)), 1e-9)
    x0, y0, x1, y1 = box
    steps = [(bound - point[axis]) / unit[axis]
             for axis, (low, high) in enumerate(((x0, x1), (y0, y1)))
             for bound in (low, high) if abs(unit[axis]) > 1e-9]
    ahead = [t for t in steps if t > 0]
    return max(0.0, min(ahead)) if ahead else 0.0


def _vessel_likeness(frame: np.ndarray, half_width: float) -> np.ndarray:
    """Dark thin structures, 0-1: a black top-hat wider than the vessel, scaled by its upper
    percentile (vessels are dark on a brighter background, as in `angiotune.qca.edges`)."""
    size = int(4 * max(half_width, 2.0)) | 1
    smooth = ndimage.gaussian_filter(frame, 1.0)
    hat = ndimage.grey_closing(smooth, size=(size, size)) - smooth
    scale = float(np.percentile(hat, 99)) or 1.0
    return np.clip(hat / scale, 0.0, 1.0)


def _trace(darkness: np.ndarray, mask: np.ndarray, start: tuple[int, int],
           box: tuple[float, float, float, float], half_width: float,
           direction: np.ndarray) -> np.ndarray | None:
    """The cheapest path from ``start`` through dark pixels to the box's edge ahead of it
    (``direction``, (x, y)), kept off the mask (but its first vessel width around the start),
    as (row, col) pixels."""
    cost = 1.0 / (0.05 + darkness) ** 2
    near_start = _disc(mask.shape, start, 2 * half_width + 2)
    cost = np.where(mask & ~near_start, cost.max() * 10, cost)
    x0, y0, x1, y1 = box
    rows, cols = np.mgrid[0:mask.shape[0], 0:mask.shape[1]]
    inside = (cols >= x0) & (cols <= x1) & (rows >= y0) & (rows <= y1)
    edge = inside & ~ndimage.binary_erosion(inside)
    unit = np.asarray(direction, dtype=float) / max(float(np.linalg.norm(direction)), 1e-9)
    offset_x, offset_y = cols - start[1], rows - start[0]
    ahead = (offset_x * unit[0] + offset_y * unit[1]
             >= np.cos(np.radians(60)) * np.hypot(offset_x, offset_y))
    targets = [tuple(p) for p in np.argwhere(edge & ~mask & ahead)]
    if not targets:
        return None
    router = MCP_Geometric(cost)
    costs, _ = router.find_costs([start], targets, find_all_ends=False)
    reached = min(targets, key=lambda p: costs[p])
    if not np.isfinite(costs[reached]):
        return None
    return np.array(router.traceback(reached))


def _disc(shape: tuple[int, int], centre: tuple[int, int], radius: float) -> np.ndarray:
    rows, cols = np.ogrid[0:shape[0], 0:shape[1]]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2
