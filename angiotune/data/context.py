"""The view context of a lesion: what its view says about it, known at inference without labels.

Model inputs beside the pixels (the stage-2 heads read it): a crop around the lesion barely
shows which branch it is on, while the positioner angles and where the box sits in the frame do.
"""

from __future__ import annotations

import math

import numpy as np

from angiotune.data.index import TREE_COLUMNS
from angiotune.data.readers import finite_number
from angiotune.names import ADAPTER_VESSELS
from angiotune.taxonomies.views import load_views

# Where each part of ``view_context`` ends: the view and the box, the tree, the standard views,
# then the box's offset from the tree's root and the frame's tree (appended last, so that heads
# trained on a shorter context read the same numbers in the same places).
VIEW_END, TREE_END = 6, 9
VIEWS_END = TREE_END + len(ADAPTER_VESSELS)
ROOT_END = VIEWS_END + 2
CONTEXT_DIM = ROOT_END + 3


def view_context(row: dict) -> np.ndarray:
    """What the view tells about the lesion, known at inference without labels: positioner
    angles (/90, zero and flagged when missing), where the box sits in the frame (centre and
    size as fractions of the frame) and along the frame's vessel tree (``TREE_COLUMNS``: share
    of the tree's extent, mm / 100; zero, NaN and flagged when not computed, NaN mm without a
    calibration), and how far the angles are from each vessel's nearest standard view
    (``taxonomies/views.yaml``; degrees / 100, NaN when missing), the box centre's offset from
    the tree's root across the frame and the frame's tree (its centre from the root, its area:
    ``angiotune.qca.tree``; NaN when not traced). A crop around the lesion barely shows which
    branch it is. The distances let a linear read follow the view table's regions, which no
    weighting of the raw angles can (a vessel's views are not on one side of a line); the
    offset says which way the box lies from the ostium, which tells the LAD from the LCX in one
    left injection, and the tree's shape a left injection from a right one."""
    lao, cranial = row.get("angle_lao_deg"), row.get("angle_cranial_deg")
    missing = lao is None or cranial is None or not (math.isfinite(lao) and math.isfinite(cranial))
    width, height = float(row["frame_width"]), float(row["frame_height"])
    x0, y0, x1, y1 = (float(row[f"bbox_{k}"]) for k in ("x0", "y0", "x1", "y1"))
    distance, fraction, *frame_tree = (finite_number(row.get(name)) for name in TREE_COLUMNS)
    no_tree = fraction is None
    return np.array([0.0 if missing else lao / 90, 0.0 if missing else cranial / 90,
                     float(missing), (x0 + x1) / 2 / width, (y0 + y1) / 2 / height,
                     math.sqrt((x1 - x0) * (y1 - y0) / (width * height)),
                     0.0 if no_tree else fraction,
                     # No calibration (COCO, or a lesion without spacing): NaN, not "at the
                     # root". The trunk reads it as 0, the segment read as the mean.
                     math.nan if distance is None or no_tree else distance / 100,
                     float(no_tree),
                     *view_distances(None if missing else lao, None if missing else cranial),
                     *(math.nan if no_tree or v is None else v for v in frame_tree)],
                    dtype=np.float32)


def view_distances(lao: float | None, cranial: float | None) -> list[float]:
    """Degrees / 100 from the angles to each adapter vessel's nearest standard view (NaN
    without angles)."""
    if lao is None or cranial is None:
        return [math.nan] * len(ADAPTER_VESSELS)
    table = load_views()
    return [min(view.distance(lao, cranial) for view in table.of(vessel)) / 100
            for vessel in ADAPTER_VESSELS]

