"""Where a lesion sits along its coronary tree, from the frame alone.

A CASS segment is named by its place on the tree: proximal, mid and distal thirds of a main
vessel, or a side branch. A crop around the lesion cannot show that; the frame can. The
contrast-filled arteries (``angiotune.qca.vessels.vessel_mask``) are traced from their
widest lumen, where the injection enters (left main or proximal RCA), and the lesion's place is
its path length from there through the vessels, in mm and as a share of the farthest vessel's
path, and where it lies from the root across the frame (which way its branch runs from the
ostium in this view: the LAD and the LCX leave the left main in different directions). The
tree as a whole says which injection it is: a right coronary is one long vessel with few
branches, a left one two fanning out (``spread``: the tree's centre from its root; ``area``:
its vessels' share of the square of its extent). Together with the reference diameter (vessels
taper from ostium to apex, branches are narrower than their parent) this is what a reader uses
to name the segment and its vessel.

No labels are used: this is computed from the frame and the box, at indexing and at inference
alike. Foreshortening shortens every path of a view alike, so the share is the steadier number.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy import ndimage
from skimage.graph import MCP_Geometric

from angiotune.qca.vessels import contrast_density, vessel_mask

WORKING_SIDE = 384  # px: the path lengths need the tree's course, not its finest vessels
# A path may cross a gap the mask left (a faint distal stretch, an overlap) at this cost per
# pixel: dear enough to follow the vessels where they are seen, cheap enough that a tree cut in
# pieces keeps its lengths (a dearer jump made every piece past a gap look far away). Only gaps
# up to GAP_PX wide are crossed: the rest of the frame is not searched, which makes the trace
# twice as fast (benchmarks/README.md).
OFF_VESSEL_COST = 4.0
GAP_PX = 8  # working pixels, about 3.5 mm on a 170 mm field
FARTHEST_PERCENTILE = 95  # the tree's extent: robust to a stray pixel the mask joined far away
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TreePosition:
    """``distance_mm``: path length from the tree's root; ``fraction``: that over the extent;
    ``root_dx``, ``root_dy``: the box centre's offset from the root across the frame (x right,
    y down), over the extent; ``spread_dx``, ``spread_dy``, ``area``: the frame's tree, the
    same for every box (``VesselTree``). All NaN when the frame shows no vessel to trace."""

    distance_mm: float = math.nan
    fraction: float = math.nan
    root_dx: float = math.nan
    root_dy: float = math.nan
    spread_dx: float = math.nan
    spread_dy: float = math.nan
    area: float = math.nan

    @property
    def found(self) -> bool:
        return math.isfinite(self.fraction)

    def columns(self) -> dict[str, float]:
        """As the index stores it (``angiotune.data.index.TREE_COLUMNS``)."""
        return {"tree_distance_mm": self.distance_mm, "tree_fraction": self.fraction,
                "tree_root_dx": self.root_dx, "tree_root_dy": self.root_dy,
                "tree_spread_dx": self.spread_dx, "tree_spread_dy": self.spread_dy,
                "tree_area": self.area}


@dataclass(frozen=True)
class VesselTree:
    """A frame's vessel tree traced once: path lengths from its root, at the working scale."""

    costs: np.ndarray  # path length from the root, working pixels (inf off the tree's reach)
    points: np.ndarray  # (N, 2) x, y of the vessel pixels, working scale
    extent: float  # working pixels
    scale: float  # working pixels per frame pixel
    root: tuple[int, int]  # x, y of the root, working scale

    @cached_property  # once a frame, not once a box
    def spread(self) -> tuple[float, float]:
        """The centre of the tree's vessels from its root, over the extent."""
        centre = self.points.mean(axis=0)
        return ((centre[0] - self.root[0]) / self.extent, (centre[1] - self.root[1]) / self.extent)

    @cached_property
    def area(self) -> float:
        """The vessels' pixels over the extent squared: scale-free, larger for a left tree."""
        return len(self.points) / self.extent ** 2

    def position(self, box, mm_per_pixel: float | None) -> TreePosition:
        """The box centre's place: that of the vessel pixel nearest to it."""
        x0, y0, x1, y1 = (float(v) * self.scale for v in box)
        xs, ys = self.points[:, 0], self.points[:, 1]
        nearest = int(np.argmin((xs - (x0 + x1) / 2) ** 2 + (ys - (y0 + y1) / 2) ** 2))
        along = float(self.costs[ys[nearest], xs[nearest]])
        if not math.isfinite(along):
            return TreePosition()
        spacing = mm_per_pixel if mm_per_pixel and math.isfinite(mm_per_pixel) else math.nan
        return TreePosition(along / self.scale * spacing, min(along / self.extent, 1.5),
                            ((x0 + x1) / 2 - self.root[0]) / self.extent,
                            ((y0 + y1) / 2 - self.root[1]) / self.extent, *self.spread,
                            self.area)


def vessel_tree(frame: np.ndarray) -> VesselTree | None:
    """Trace the frame's contrast-filled vessels from their widest lumen; None when the frame
    shows no vessel, or is too odd to trace (logged: a lesion is indexed without its tree)."""
    try:
        return _trace(frame)
    except (ValueError, IndexError) as error:
        log.warning("angiotune: no vessel tree traced (%s); the lesion is kept without it", error)
        return None


def _trace(frame: np.ndarray) -> VesselTree | None:
    scale = min(1.0, WORKING_SIDE / max(frame.shape))
    small = ndimage.zoom(frame.astype(np.float32), scale, order=1) if scale < 1 else frame
    mask = vessel_mask(contrast_density(small))
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return None
    # The root: the widest lumen of the largest connected piece (a speck or a short piece
    # where two vessels overlap in projection is not where the injection enters).
    pieces, _ = ndimage.label(mask, structure=np.ones((3, 3)))
    largest = pieces == np.argmax(np.bincount(pieces[ys, xs]))
    radius = np.where(largest, ndimage.distance_transform_edt(mask), 0.0)
    root = np.unravel_index(int(np.argmax(radius)), radius.shape)
    near = ndimage.binary_dilation(mask, iterations=GAP_PX)
    step = np.where(mask, 1.0, np.where(near, OFF_VESSEL_COST, np.inf))
    costs, _ = MCP_Geometric(step).find_costs([(int(root[0]), int(root[1]))])
    reached = mask & np.isfinite(costs)
    extent = float(np.percentile(costs[reached], FARTHEST_PERCENTILE))
    if not extent > 0:
        return None
    ys, xs = np.nonzero(reached)
    return VesselTree(costs, np.stack([xs, ys], axis=1), extent, scale,
                      (int(root[1]), int(root[0])))


def tree_position(frame: np.ndarray, box, mm_per_pixel: float | None,
                  tree: VesselTree | None = None) -> TreePosition:
    """The box centre's place along the frame's vessel tree (see the module docstring);
    ``tree``: the frame's ``vessel_tree``, when its other boxes already traced it."""
    tree = tree if tree is not None else vessel_tree(frame)
    return tree.position(box, mm_per_pixel) if tree is not None else TreePosition()


def tree_columns(frame: np.ndarray, box, mm_per_pixel: float | None,
                 tree: VesselTree | None = None) -> dict[str, float]:
    """``tree_position`` as the index stores it (``angiotune.data.index.TREE_COLUMNS``)."""
    return tree_position(frame, box, mm_per_pixel, tree).columns()
