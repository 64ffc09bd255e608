"""Lesion proposals without a box, on drawn tubes: the narrowing, not the branch point or the
vessel's end, comes first; and the proposals are different places."""

from __future__ import annotations

import numpy as np
import pytest

from angiotune.predict.proposals import propose_boxes
from tests.shapes import SPACING_MM, angiogram, narrowing, straight


def _inside(point, box) -> bool:
    return box[0] <= point[0] < box[2] and box[1] <= point[1] < box[3]


def _branched(stenosis_pct: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A tube narrowed a third of the way along, with a side branch leaving two thirds along:
    the frame, the narrowing's and the branch point's pixel positions."""
    main = straight(length_mm=70.0, start=(4.0, 8.0), angle_deg=25)
    profile = np.full(len(main), 1.6)
    lesion = slice(len(main) // 5, len(main) // 2)
    profile[lesion], _ = narrowing(main[lesion], 1.6, stenosis_pct, plateau_mm=1.5)
    fork = main[2 * len(main) // 3]
    side = straight(length_mm=25.0, start=tuple(fork), angle_deg=80)
    shape = (240, 360)
    frame = angiogram(main, profile, shape) * angiogram(side, np.full(len(side), 1.2), shape)
    frame /= 0.8  # the background was counted twice
    centre = main[(lesion.start + lesion.stop) // 2] / SPACING_MM
    return frame.astype(np.float32), centre, fork / SPACING_MM


@pytest.mark.slow
def test_the_narrowing_comes_first_and_the_branch_point_is_not_proposed():
    for stenosis in (40.0, 60.0):
        frame, lesion, fork = _branched(stenosis)
        proposals = propose_boxes(frame, max_proposals=5)
        assert proposals and _inside(lesion, proposals[0].box), (stenosis, proposals)
        assert proposals[0].kind in ("narrowing", "gap")
        for proposal in proposals:
            assert np.hypot(*(np.asarray(proposal.centre_px) - fork)) > 8, proposal


def test_a_straight_healthy_tube_has_no_narrowing_to_propose():
    path = straight(length_mm=60.0, start=(4.0, 10.0), angle_deg=30)
    frame = angiogram(path, np.full(len(path), 1.6), shape=(256, 320))
    assert not [p for p in propose_boxes(frame, 5) if p.kind == "narrowing"]


def test_five_proposals_are_five_different_places():
    path = straight(length_mm=90.0, start=(3.0, 6.0), angle_deg=20)
    profile = np.full(len(path), 1.6)
    for part in range(6):  # six narrowings of 30 to 55 %, 15 mm apart
        stretch = slice(part * len(path) // 6, (part + 1) * len(path) // 6)
        profile[stretch], _ = narrowing(path[stretch], 1.6, 30 + 5 * part, plateau_mm=1.0)
    proposals = propose_boxes(angiogram(path, profile, shape=(220, 460)), max_proposals=5)
    assert len(proposals) == 5
    for i, first in enumerate(proposals):
        for second in proposals[i + 1:]:
            assert not _inside(first.centre_px, second.box)
            assert not _inside(second.centre_px, first.box)
    scores = [p.score for p in proposals]
    assert scores == sorted(scores, reverse=True)
