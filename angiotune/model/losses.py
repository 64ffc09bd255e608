"""Segmentation losses for small targets: Dice, focal or weighted BCE, and the IoU head's loss.

Lesion segments are under 1 % of a frame, so the pixel loss either focuses on hard pixels (focal)
or weights positives (BCE with ``pos_weight``); Dice is insensitive to the imbalance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from angiotune.errors import ConfigError
from angiotune.names import CLASS_LOSSES, HEAD_WEIGHTINGS


@dataclass(frozen=True)
class LossWeights:
    dice: float = 1.0
    pixel: float = 1.0
    iou: float = 0.1
    score: float = 1.0  # text_box mode: query scores, presence and hard negatives
    pixel_loss: str = "focal"  # or "bce"
    pos_weight: float = 10.0  # for "bce"
    focal_gamma: float = 2.0
    focal_alpha: float = 0.25

    def __post_init__(self) -> None:
        if self.pixel_loss not in ("focal", "bce"):
            raise ConfigError(f"pixel_loss must be 'focal' or 'bce', got {self.pixel_loss!r}")


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice per sample, averaged. logits and target (B, H, W)."""
    probs = torch.sigmoid(logits).flatten(1)
    target = target.flatten(1)
    overlap = (probs * target).sum(1)
    return (1 - (2 * overlap + smooth) / (probs.sum(1) + target.sum(1) + smooth)).mean()


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0,
               alpha: float = 0.25) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al.), mean over pixels."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    probs = torch.sigmoid(logits)
    p_true = probs * target + (1 - probs) * (1 - target)
    weight = alpha * target + (1 - alpha) * (1 - target)
    return (weight * (1 - p_true) ** gamma * bce).mean()


def weighted_bce(logits: torch.Tensor, target: torch.Tensor, pos_weight: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(
        logits, target, pos_weight=torch.tensor(pos_weight, device=logits.device))


def hard_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of the thresholded prediction per sample (B,); 1 when both are empty."""
    pred = (logits > 0).flatten(1).float()
    target = target.flatten(1)
    inter = (pred * target).sum(1)
    union = pred.sum(1) + target.sum(1) - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-9), torch.ones_like(union))


def segmentation_loss(logits: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor,
                      weights: LossWeights) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum of Dice, the pixel loss and the IoU head's regression on the true IoU."""
    dice = dice_loss(logits, target)
    if weights.pixel_loss == "focal":
        pixel = focal_loss(logits, target, weights.focal_gamma, weights.focal_alpha)
    else:
        pixel = weighted_bce(logits, target, weights.pos_weight)
    iou = F.mse_loss(iou_pred, hard_iou(logits.detach(), target))
    total = weights.dice * dice + weights.pixel * pixel + weights.iou * iou
    parts = {"loss": total, "dice_loss": dice, "pixel_loss": pixel, "iou_loss": iou}
    return total, {name: float(value.detach()) for name, value in parts.items()}


# Regression errors are measured in these units before the Huber loss, so that one delta suits
# both: 10 percentage points of stenosis, half a millimetre of diameter.
STENOSIS_UNIT_PCT = 10.0
DIAMETER_UNIT_MM = 0.5


@dataclass(frozen=True)
class HeadLossWeights:
    """How the stage-2 head losses join the segmentation loss.

    ``weighting="uncertainty"`` learns one log-variance per task (Kendall et al., 2018) and
    ignores the fixed weights; ``class_weights`` (one per class) counter the long tail of rare
    segments, as does ``class_loss="focal"``.
    """

    segment: float = 1.0
    stenosis: float = 1.0
    mld: float = 1.0
    rvd: float = 0.5
    weighting: str = "fixed"
    class_loss: str = "ce"
    class_weights: tuple[float, ...] | None = None
    focal_gamma: float = 2.0

    def __post_init__(self) -> None:
        if self.weighting not in HEAD_WEIGHTINGS:
            raise ConfigError(f"head weighting must be one of {HEAD_WEIGHTINGS}, "
                             f"got {self.weighting!r}")
        if self.class_loss not in CLASS_LOSSES:
            raise ConfigError(f"class_loss must be one of {CLASS_LOSSES}, got {self.class_loss!r}")

    def fixed(self) -> tuple[float, ...]:
        return (self.segment, self.stenosis, self.mld, self.rvd)


def classification_loss(logits: torch.Tensor, target: torch.Tensor,
                        weights: HeadLossWeights) -> torch.Tensor:
    """Cross-entropy or focal cross-entropy over samples with a known class (target >= 0)."""
    known = target >= 0
    if not known.any():
        return logits.sum() * 0
    logits, target = logits[known].float(), target[known]
    class_weights = (None if weights.class_weights is None else
                     torch.tensor(weights.class_weights, device=logits.device,
                                  dtype=logits.dtype))
    ce = F.cross_entropy(logits, target, weight=class_weights, reduction="none")
    if weights.class_loss == "focal":
        p_true = torch.softmax(logits, 1).gather(1, target[:, None])[:, 0]
        ce = (1 - p_true) ** weights.focal_gamma * ce
    if class_weights is None:
        return ce.mean()
    return ce.sum() / class_weights[target].sum()


def regression_loss(pred: torch.Tensor, target: torch.Tensor, unit: float) -> torch.Tensor:
    """Huber loss in ``unit``s over samples whose target is known (not NaN)."""
    known = torch.isfinite(target)
    if not known.any():  # zero, still tied to the graph; NaN predictions (no mm) stay out
        return torch.nan_to_num(pred, nan=0.0).sum() * 0
    return F.smooth_l1_loss(pred[known].float() / unit, target[known].float() / unit, beta=1.0)


def head_losses(outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor],
                weights: HeadLossWeights) -> dict[str, torch.Tensor]:
    """One loss per task; ``targets`` holds class ids (-1 unknown) and NaN for unknown values."""
    return {
        "segment": classification_loss(outputs["segment_logits"], targets["segment"], weights),
        "stenosis": regression_loss(outputs["stenosis_pct"], targets["stenosis_pct"],
                                    STENOSIS_UNIT_PCT),
        "mld": regression_loss(outputs["mld_mm"], targets["mld_mm"], DIAMETER_UNIT_MM),
        "rvd": regression_loss(outputs["rvd_mm"], targets["rvd_mm"], DIAMETER_UNIT_MM),
    }


def combine_head_losses(losses: dict[str, torch.Tensor], weights: HeadLossWeights,
                        log_vars: torch.Tensor | None = None) -> torch.Tensor:
    """Fixed weighted sum, or sum of exp(-s) * L + s with learned log-variances s."""
    values = list(losses.values())
    if weights.weighting == "uncertainty":
        if log_vars is None:
            raise ValueError("uncertainty weighting needs the heads' log-variances")
        return sum(torch.exp(-s) * loss + s for s, loss in zip(log_vars, values, strict=True))
    return sum(w * loss for w, loss in zip(weights.fixed(), values, strict=True))
