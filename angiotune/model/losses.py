"""Segmentation losses for small targets: Dice, focal or weighted BCE, and the IoU head's loss.

Lesion segments are under 1 % of a frame, so the pixel loss either focuses on hard pixels (focal)
or weights positives (BCE with ``pos_weight``); Dice is insensitive to the imbalance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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
            raise ValueError(f"pixel_loss must be 'focal' or 'bce', got {self.pixel_loss!r}")


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
