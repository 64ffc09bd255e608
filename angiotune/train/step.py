"""One training step and one evaluation pass in plain PyTorch: no Ray, usable anywhere.

Batches are dicts as the data stream yields them: ``image`` (B, S, S) in [0, 1], ``mask``
(B, S, S), ``box`` (B, 4) xyxy in model pixels, ``vessel`` and ``segment`` (B,) for per-group
metrics; the stage-2 heads also read ``context``, ``pixel_spacing_mm`` and the QCA values.
The model is a ``LesionModel`` (tracker, optionally with heads), a bare tracker, or the concept
model with its ``tokenizer``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import replace

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from angiotune.model.concept import best_query, concept_forward, concept_loss
from angiotune.model.heads import restrict_to_vessel
from angiotune.model.lesion import LesionModel, unwrap
from angiotune.model.losses import (
    HeadLossWeights,
    LossWeights,
    combine_head_losses,
    hard_iou,
    head_losses,
    segmentation_loss,
)
from angiotune.train.metrics import summarise_by


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
    if tokenizer is None:
        out = forward(model if isinstance(unwrap(model), LesionModel) else LesionModel(model),
                      {"image": images, "box": boxes})
        return out["logits"], out["confidence"]
    out, _ = concept_forward(model, tokenizer, images, boxes, list(prompts))
    low_res, confidence = best_query(out)
    logits = F.interpolate(low_res[:, None], size=images.shape[-2:], mode="bilinear",
                           align_corners=False)[:, 0]
    return logits, confidence


def forward(model: torch.nn.Module, batch: dict, tokenizer=None) -> dict[str, torch.Tensor]:
    """Everything the model predicts for a batch: ``logits``, ``confidence``, head outputs."""
    if isinstance(unwrap(model), LesionModel):
        return model(batch["image"], batch["box"], batch.get("context"),
                     batch.get("pixel_spacing_mm"), batch.get("image_embeddings"),
                     batch.get("encoder_prefix"))
    logits, confidence = predict_logits(model, batch["image"], batch["box"], batch.get("prompt"),
                                        tokenizer)
    return {"logits": logits, "confidence": confidence}


def head_targets(batch: dict, classes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Class ids (-1 for a segment outside the heads' classes) and QCA values as tensors."""
    device = batch["image"].device
    index = {code: i for i, code in enumerate(classes)}
    targets = {"segment": torch.tensor([index.get(str(c), -1) for c in batch["segment"]],
                                       device=device)}
    for name in ("diameter_stenosis_pct", "mld_mm", "rvd_mm"):
        targets["stenosis_pct" if name.startswith("diameter") else name] = torch.as_tensor(
            batch[name], dtype=torch.float32, device=device)
    return targets


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def train_step(model: torch.nn.Module, batch: dict, optimizer: torch.optim.Optimizer,
               weights: LossWeights, *, autocast_dtype: torch.dtype | None = None,
               scaler: torch.amp.GradScaler | None = None, tokenizer=None,
               head_weights: HeadLossWeights | None = None,
               max_grad_norm: float = 1.0,
               on_outputs: Callable[[dict, dict], None] | None = None) -> dict[str, float]:
    """Forward, loss, backward and one optimiser step; returns the loss parts.

    ``autocast_dtype`` runs the forward pass in bf16 or fp16 (the loss stays fp32); fp16 also
    wants a ``scaler`` so small gradients do not underflow. With heads, their losses
    (``head_weights``) join the segmentation loss. ``on_outputs(batch, outputs)`` sees the box
    model's detached predictions (the heads' calibration is fitted from them, at no extra
    forward pass).
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
            out = forward(model, batch)
        loss, parts = segmentation_loss(out["logits"].float(), out["confidence"].float(),
                                        batch["mask"].float(), weights)
        if "coarse_logits" in out:  # deep supervision: the decoder's own mask keeps its loss
            coarse, _ = segmentation_loss(out["coarse_logits"].float(),
                                          out["confidence"].float(), batch["mask"].float(),
                                          replace(weights, iou=0.0))
            loss = loss + coarse
            parts.update(coarse_loss=float(coarse.detach()), loss=float(loss.detach()))
        if on_outputs is not None:
            on_outputs(batch, {name: value.detach() for name, value in out.items()})
        heads = getattr(unwrap(model), "heads", None)
        if heads is not None:
            head_weights = head_weights or HeadLossWeights()
            losses = head_losses(out, head_targets(batch, heads.settings.classes), head_weights)
            loss = loss + combine_head_losses(losses, head_weights, heads.log_vars)
            parts.update({f"{name}_loss": float(value.detach()) for name, value in losses.items()})
            parts["loss"] = float(loss.detach())
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
def evaluate_samples(model: torch.nn.Module, batches: Iterable[dict],
                     tokenizer=None) -> pd.DataFrame:
    """One row per lesion: its metadata, Dice and IoU, and the heads' predictions if any."""
    model.eval()
    device = next(model.parameters()).device
    heads = getattr(unwrap(model), "heads", None)
    rows: list[pd.DataFrame] = []
    for batch in batches:
        batch = as_tensors(batch, device)
        out = forward(model, batch, tokenizer)
        part = {name: list(batch[name]) for name in ("sample_id", "vessel", "segment")
                if name in batch}
        part["dice"] = dice_scores(out["logits"], batch["mask"]).tolist()
        part["iou"] = hard_iou(out["logits"], batch["mask"].float()).tolist()
        for name in ("diameter_stenosis_pct", "mld_mm", "rvd_mm"):
            if name in batch:
                part[name] = np.asarray(batch[name].cpu() if torch.is_tensor(batch[name])
                                        else batch[name], dtype=float)
        if heads is not None:
            settings = heads.settings
            # Named among the segments of the lesion's vessel, as predict names them among the
            # routed vessel's (see the README on what that assumes).
            logits = restrict_to_vessel(out["segment_logits"].float(), settings.classes,
                                        settings.taxonomy, list(batch["vessel"]))
            part["segment_pred"] = [settings.classes[i] for i in logits.argmax(1).tolist()]
            for task, name in (("stenosis", "stenosis_pct"), ("mld", "mld_mm"),
                               ("rvd", "rvd_mm")):
                if task in heads.settings.tasks:  # an untrained head is not scored
                    part[f"{name}_pred"] = out[name].float().cpu().numpy().astype(float)
        rows.append(pd.DataFrame(part))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()


def evaluate(model: torch.nn.Module, batches: Iterable[dict],
             tokenizer=None) -> dict[str, float]:
    """Metrics overall and per vessel (``dice/LAD``): Dice and IoU, the heads' metrics when
    there are heads, and counts (``n``, ``n/LAD``)."""
    return summarise_by(evaluate_samples(model, batches, tokenizer), "vessel")
