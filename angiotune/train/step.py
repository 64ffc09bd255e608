"""One training step and one evaluation pass in plain PyTorch: no Ray, usable anywhere.

Batches are dicts as the data stream yields them: ``image`` (B, S, S) in [0, 1], ``mask``
(B, S, S), ``box`` (B, 4) xyxy in model pixels, and ``vessel`` (B,) names for per-vessel metrics.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from angiotune.model.concept import best_query, concept_forward, concept_loss
from angiotune.model.losses import LossWeights, hard_iou, segmentation_loss
from angiotune.model.sam3 import to_pixel_values


def as_tensors(batch: dict, device: torch.device | str = "cpu") -> dict:
    """Numpy arrays from the stream -> tensors; names stay as they are."""
    out = {}
    for name, value in batch.items():
        if isinstance(value, np.ndarray) and value.dtype.kind in "fiub":
            out[name] = torch.as_tensor(value).to(device)
        else:
            out[name] = value
    return out


def predict_logits(model: torch.nn.Module, images: torch.Tensor, boxes: torch.Tensor,
                   prompts: list[str] | None = None,
                   tokenizer=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask logits at the input resolution (B, S, S) and the model's confidence (B,).

    With a ``tokenizer`` the model is the concept model, prompted by ``prompts`` and the box as
    an exemplar (``text_box``); the best-scoring instance is the prediction. Otherwise it is the
    tracker, prompted by the box (``box``), and the confidence is its IoU head.
    """
    if tokenizer is not None:
        out, _ = concept_forward(model, tokenizer, images, boxes, list(prompts))
        low_res, confidence = best_query(out)
    else:
        out = model(pixel_values=to_pixel_values(images.float()),
                    input_boxes=boxes.float()[:, None], multimask_output=False)
        low_res, confidence = out.pred_masks[:, 0, 0], out.iou_scores[:, 0, 0]
    logits = F.interpolate(low_res[:, None], size=images.shape[-2:], mode="bilinear",
                           align_corners=False)[:, 0]
    return logits, confidence


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def train_step(model: torch.nn.Module, batch: dict, optimizer: torch.optim.Optimizer,
               weights: LossWeights, *, autocast_dtype: torch.dtype | None = None,
               scaler: torch.amp.GradScaler | None = None, tokenizer=None,
               max_grad_norm: float = 1.0) -> dict[str, float]:
    """Forward, loss, backward and one optimiser step; returns the loss parts.

    ``autocast_dtype`` runs the forward pass in bf16 or fp16 (the loss stays fp32); fp16 also
    wants a ``scaler`` so small gradients do not underflow.
    """
    model.train()
    device = next(model.parameters()).device
    batch = as_tensors(batch, device)
    if tokenizer is not None:  # text_box: the lesion prompt and a hard negative, one encoding
        with _autocast(device, autocast_dtype):
            positive, vision = concept_forward(model, tokenizer, batch["image"], batch["box"],
                                               list(batch["prompt"]))
            negative, _ = concept_forward(model, tokenizer, batch["image"], batch["box"],
                                          list(batch["negative_prompt"]), vision)
        loss, parts = concept_loss(positive, negative, batch["mask"], weights)
    else:
        with _autocast(device, autocast_dtype):
            logits, iou_pred = predict_logits(model, batch["image"], batch["box"])
        loss, parts = segmentation_loss(logits.float(), iou_pred.float(), batch["mask"].float(),
                                        weights)
    optimizer.zero_grad(set_to_none=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if scaler is None:
        loss.backward()
        parts["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm))
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        parts["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm))
        scaler.step(optimizer)
        scaler.update()
    return parts


def dice_scores(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Hard Dice per sample (B,); 1 when prediction and target are both empty."""
    pred = (logits > 0).flatten(1).float()
    target = target.flatten(1).float()
    total = pred.sum(1) + target.sum(1)
    return torch.where(total > 0, 2 * (pred * target).sum(1) / total.clamp(min=1e-9),
                       torch.ones_like(total))


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[dict],
             tokenizer=None) -> dict[str, float]:
    """Mean Dice and IoU over samples, overall and per vessel (``dice/LAD``), plus counts."""
    model.eval()
    device = next(model.parameters()).device
    scores: dict[str, list[float]] = defaultdict(list)
    for batch in batches:
        batch = as_tensors(batch, device)
        logits, _ = predict_logits(model, batch["image"], batch["box"], batch.get("prompt"),
                                   tokenizer)
        dice = dice_scores(logits, batch["mask"]).tolist()
        iou = hard_iou(logits, batch["mask"].float()).tolist()
        for vessel, d, i in zip(batch["vessel"], dice, iou, strict=True):
            for key in ("", f"/{vessel}"):
                scores[f"dice{key}"].append(d)
                scores[f"iou{key}"].append(i)
    metrics = {name: float(np.mean(values)) for name, values in scores.items()}
    metrics.update({f"n{name[4:]}" if name != "dice" else "n": float(len(values))
                    for name, values in scores.items() if name.startswith("dice")})
    return metrics
