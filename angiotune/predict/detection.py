"""How well the lesion proposals find annotated lesions: boxes matched one to one by IoU.

It lives beside ``proposals`` because it scores them, and it knows nothing of adapters or
indexes: ``angiotune evaluate`` feeds it each test frame's proposals and annotated boxes.

The rule: every (proposal, annotation) pair of a frame is ranked by box IoU, highest first, and
taken greedily while neither side is taken yet; a taken pair is a true positive when its IoU is
at least ``iou_threshold``. The default, 0.25, suits boxes that frame a short narrowed stretch
of vessel: such boxes are small (tens of pixels) and thin, so the 0.5 of COCO drops a proposal
shifted by a quarter of a side in both directions, and a proposal frames the narrowing with
some healthy vessel either side (as an analyst draws a segment), so a correct one can be several
times the annotation's area. At 0.25 a proposal that contains the annotation counts up to four
times its area; one merely beside it does not.

Scores are pooled over frames (precision, recall, F1 over all boxes) and also averaged per image
(F1 of each frame, then the mean), as the ARCADE challenge ranks stenosis detection. ARCADE's F1
is computed on masks, so these box-matching numbers are comparable in spirit only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from angiotune.data.transforms import box_iou
from angiotune.errors import ConfigError

DEFAULT_IOU_THRESHOLD = 0.25
RULE = ("one-to-one greedy matching of proposal and annotated boxes by box IoU (highest first), "
        "a match counts at IoU >= {threshold:g}; a box-matching rule, not the mask-based F1 of "
        "the ARCADE challenge, so not like-for-like with its leaderboard")

Box = Sequence[float]  # x0, y0, x1, y1 pixel edges, half-open


@dataclass(frozen=True)
class FrameMatch:
    """One frame's counts, and which proposal matched which annotation."""

    proposals: int
    truths: int
    pairs: tuple[tuple[int, int, float], ...]  # (proposal index, truth index, IoU)

    @property
    def true_positives(self) -> int:
        return len(self.pairs)

    @property
    def f1(self) -> float:
        """2 TP / (proposals + truths); 1 for a frame with nothing to find and nothing claimed."""
        total = self.proposals + self.truths
        return 2 * self.true_positives / total if total else 1.0


def match_boxes(proposed: Sequence[Box], truth: Sequence[Box],
                iou_threshold: float = DEFAULT_IOU_THRESHOLD) -> FrameMatch:
    """Greedy one-to-one matching by IoU, highest first (ties: earlier proposal, then truth)."""
    if not 0 < iou_threshold <= 1:
        raise ConfigError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    ranked = sorted(((box_iou(p, t), i, j) for i, p in enumerate(proposed)
                     for j, t in enumerate(truth)), key=lambda pair: (-pair[0], pair[1], pair[2]))
    used_p, used_t, pairs = set(), set(), []
    for iou, i, j in ranked:
        if iou < iou_threshold:
            break
        if i not in used_p and j not in used_t:
            used_p.add(i)
            used_t.add(j)
            pairs.append((i, j, iou))
    return FrameMatch(len(proposed), len(truth), tuple(pairs))


@dataclass(frozen=True)
class DetectionScore:
    frames: int
    proposals: int
    truths: int
    true_positives: int
    precision: float  # NaN when nothing was proposed
    recall: float  # NaN when nothing was annotated
    f1: float  # pooled over every box of every frame
    mean_image_f1: float  # per frame, then averaged (ARCADE's ranking, on boxes)

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def score_frames(matches: Iterable[FrameMatch]) -> DetectionScore:
    """Pooled and per-image scores of a set of frames."""
    matches = list(matches)
    proposals = sum(m.proposals for m in matches)
    truths = sum(m.truths for m in matches)
    hits = sum(m.true_positives for m in matches)
    return DetectionScore(
        frames=len(matches), proposals=proposals, truths=truths, true_positives=hits,
        precision=hits / proposals if proposals else math.nan,
        recall=hits / truths if truths else math.nan,
        f1=2 * hits / (proposals + truths) if proposals + truths else math.nan,
        mean_image_f1=sum(m.f1 for m in matches) / len(matches) if matches else math.nan)

