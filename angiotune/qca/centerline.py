"""The centerline of a vessel-segment mask: the central path between its two far ends.

Coordinates are (x, y) with pixel (row r, column c) centred at (c, r), as in the contour JSON.
The path is a minimum-cost route through the mask where a step costs more near the wall (cost
1 / distance-to-wall squared), between the two pixels furthest apart along the mask; so it
follows the middle of the lumen round bends instead of cutting corners.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import dijkstra
from scipy.spatial import cKDTree
from skimage.draw import line as draw_line

_NEIGHBOURS = [(0, 1), (1, -1), (1, 0), (1, 1)]  # half of the 8-neighbourhood, each edge once


def largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
    if count <= 1:
        return mask.astype(bool)
    sizes = ndimage.sum(mask, labels, index=np.arange(1, count + 1))
    return labels == 1 + int(np.argmax(sizes))


def bridge_gaps(mask: np.ndarray, reach_widths: float = 3.0) -> tuple[np.ndarray, int]:
    """The mask with large pieces joined to the largest across short gaps, and how many.

    A lumen narrowed below a pixel splits a segment mask in two; measuring the larger piece
    alone would report healthy vessel. Pieces of at least a fifth of the largest, within
    ``reach_widths`` vessel widths of it, are joined by a one-pixel line across the gap.
    """
    mask = np.asarray(mask, dtype=bool)
    labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
    if count <= 1:
        return mask, 0
    sizes = ndimage.sum(mask, labels, index=np.arange(1, count + 1))
    order = 1 + np.argsort(sizes)[::-1]
    joined = labels == order[0]
    width = 2.0 * float(ndimage.distance_transform_edt(np.pad(joined, 1)).max())
    bridges = 0
    for label in order[1:]:
        piece = labels == label
        if piece.sum() < 0.2 * sizes.max():
            break
        distance, (rows, cols) = ndimage.distance_transform_edt(~joined, return_indices=True)
        r, c = np.unravel_index(np.argmin(np.where(piece, distance, np.inf)), mask.shape)
        if distance[r, c] > reach_widths * width:
            continue
        line_rows, line_cols = draw_line(int(r), int(c), int(rows[r, c]), int(cols[r, c]))
        joined |= piece
        joined[line_rows, line_cols] = True
        bridges += 1
    return joined, bridges


def branched_fraction(mask: np.ndarray, path: np.ndarray) -> float:
    """Share of the mask farther from the centerline than its own widest half-width: what a
    side branch or a neighbouring vessel adds."""
    rows, cols = np.nonzero(mask)
    if len(path) == 0 or len(rows) == 0:
        return 0.0
    half_width = float(ndimage.distance_transform_edt(np.pad(mask, 1)).max())
    distance, _ = cKDTree(path).query(np.stack([cols, rows], axis=1))
    return float((distance > half_width + 1.5).mean())


def centerline(mask: np.ndarray, smoothing_px: float | None = None) -> np.ndarray:
    """(N, 2) points every pixel of arc length along the mask's central path, end to end.

    Empty when the mask has fewer than three pixels. ``smoothing_px`` (default: the mean
    half-width) smooths the staircase of the pixel path before it is resampled.
    """
    mask = largest_component(mask)
    rows, cols = np.nonzero(mask)
    if len(rows) < 3:
        return np.empty((0, 2))
    wall = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    graph = _pixel_graph(mask, wall)
    # Two sweeps by plain path length find the far ends; then the central, wall-averse route.
    start = _farthest(graph, 0)
    other = _farthest(graph, start)
    _, previous = dijkstra(graph, directed=False, indices=start, return_predecessors=True)
    order = [other]
    while order[-1] != start and previous[order[-1]] >= 0:
        order.append(int(previous[order[-1]]))
    path = np.stack([cols[order], rows[order]], axis=1).astype(float)
    if smoothing_px is None:
        smoothing_px = max(1.0, float(wall[rows[order], cols[order]].mean()))
    return resample(smooth_path(path, smoothing_px), 1.0)


def _farthest(graph, source: int) -> int:
    hops = dijkstra(graph, directed=False, indices=source, unweighted=True)
    return int(np.argmax(np.where(np.isfinite(hops), hops, -1.0)))


def _pixel_graph(mask: np.ndarray, wall: np.ndarray):
    """Sparse graph over mask pixels, 8-connected; a step costs its length / wall distance^2."""
    index = -np.ones(mask.shape, dtype=np.int64)
    index[mask] = np.arange(int(mask.sum()))
    height, width = mask.shape
    sources, targets, costs = [], [], []
    for dr, dc in _NEIGHBOURS:
        r0, r1 = max(0, -dr), height - max(0, dr)
        c0, c1 = max(0, -dc), width - max(0, dc)
        a = index[r0:r1, c0:c1]
        b = index[r0 + dr:r1 + dr, c0 + dc:c1 + dc]
        both = (a >= 0) & (b >= 0)
        mean_wall = 0.5 * (wall[r0:r1, c0:c1] + wall[r0 + dr:r1 + dr, c0 + dc:c1 + dc])[both]
        sources.append(a[both])
        targets.append(b[both])
        costs.append(np.hypot(dr, dc) / mean_wall**2)
    n = int(mask.sum())
    graph = coo_matrix((np.concatenate(costs), (np.concatenate(sources),
                                                np.concatenate(targets))), shape=(n, n))
    return graph.tocsr()


def smooth_path(path: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian smoothing along the path, ends held in place (they are the segment's ends)."""
    if len(path) < 3 or sigma_px <= 0:
        return path
    smoothed = ndimage.gaussian_filter1d(path, sigma_px, axis=0, mode="nearest")
    smoothed[0], smoothed[-1] = path[0], path[-1]
    return smoothed


def resample(path: np.ndarray, step_px: float) -> np.ndarray:
    """Points every ``step_px`` of arc length (the last one at the path's end)."""
    if len(path) < 2:
        return path
    arclength = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(path, axis=0), axis=1))])
    samples = np.append(np.arange(0.0, arclength[-1], step_px), arclength[-1])
    samples = np.unique(samples)
    return np.stack([np.interp(samples, arclength, path[:, k]) for k in range(2)], axis=1)
