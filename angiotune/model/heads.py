"""Stage-2 measurement heads on SAM 3 features of the prompted lesion.

The heads read the tracker's FPN image embeddings pooled two ways (weighted by the predicted mask,
and averaged inside the box prompt), plus the lesion's view context (positioner angles and where
the box sits in the frame: the crop alone barely shows which branch it is). They predict:

- the CASS segment, over the classes present in the index (``HeadSettings.classes`` is the
  documented mapping: class id i is segment code ``classes[i]``);
- % diameter stenosis (0-100);
- MLD and reference diameter in mm. These are predicted in model pixels and multiplied by the
  sample's mm per model pixel, so one set of weights is right across magnifications.

Once fitted (``fit_calibration``), % DS, MLD and RVD at evaluation and inference are a linear
read of three estimates: QCA of the predicted mask with edges from the crop's intensity, QCA
with edges from the mask (``angiotune.qca.readout``), and the head's own output. The weights
are fitted by least squares on the trial's training predictions, so they learn how far to trust
each estimate (QCA of a mask that follows a branch is confidently wrong; the fit shrinks it).

Saved beside the adapter as ``heads.safetensors`` + ``heads.json``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from angiotune import jsonio
from angiotune.data.context import CONTEXT_DIM
from angiotune.errors import ConfigError
from angiotune.qca.readout import QUANTITIES, READOUTS

HEADS_WEIGHTS = "heads.safetensors"
HEADS_CONFIG = "heads.json"
TASKS = ("segment", "stenosis", "mld", "rvd")
MEASURED = ("stenosis", "mld", "rvd")  # the tasks a calibration reads QCA for, in QUANTITIES order
CALIBRATION_INPUTS = (*READOUTS, "head", "bias")
MIN_CALIBRATION_SAMPLES = 12


@dataclass(frozen=True)
class HeadSettings:
    """``taxonomy``: what the segment classes' codes are (CASS, SYNTAX); ``tasks``: the heads
    that were trained (a loss weight above 0): the others' outputs are not reported."""

    classes: tuple[str, ...]
    feature_dim: int
    hidden: int = 128
    dropout: float = 0.1
    taxonomy: str = "CASS"
    tasks: tuple[str, ...] = TASKS

    def __post_init__(self) -> None:
        if len(self.classes) < 2:
            raise ConfigError(f"the CASS head needs at least two segment classes, got "
                              f"{list(self.classes)}")
        unknown = set(self.tasks) - set(TASKS)
        if unknown:
            raise ConfigError(f"unknown head task(s) {sorted(unknown)}; known: {TASKS}")


GEOMETRY_DIM = 7


def mask_geometry(mask_logits: torch.Tensor, boxes: torch.Tensor, image_size: int) -> torch.Tensor:
    """(B, 7) QCA-style sizes of the predicted mask in model pixels / 10.

    Soft area (as a side length), the box's long and short sides, area over long side (the mean
    width), and the width profile along the box's long axis over its central 60 %: its minimum,
    its median, and 1 - min / median (a diameter-stenosis estimate). These carry what MLD and
    stenosis are made of, as far as the predicted mask is right.
    """
    probs = torch.sigmoid(mask_logits.detach().float())
    if probs.shape[-1] != image_size:
        probs = F.interpolate(probs[:, None], size=(image_size, image_size), mode="bilinear",
                              align_corners=False)[:, 0]
    inside = box_weights(boxes, (image_size, image_size), image_size)[:, 0]
    probs = probs * inside
    sides = (boxes[:, 2:] - boxes[:, :2]).float().clamp(min=1.0)
    long, short = sides.max(1).values, sides.min(1).values
    area = probs.sum((1, 2))
    horizontal = sides[:, 0] >= sides[:, 1]
    profile = torch.where(horizontal[:, None], probs.sum(1), probs.sum(2))  # (B, S)
    centres = torch.arange(image_size, device=boxes.device).float() + 0.5
    start = torch.where(horizontal, boxes[:, 0], boxes[:, 1]).float()
    core = ((centres[None] >= start[:, None] + 0.2 * long[:, None])
            & (centres[None] <= start[:, None] + 0.8 * long[:, None]))
    core[core.sum(1) == 0] = True  # a box under 5 px long: use the whole profile
    minimum = torch.where(core, profile, torch.full_like(profile, float("inf"))).min(1).values
    median = torch.where(core, profile, torch.full_like(profile, float("nan"))).nanmedian(1).values
    narrowing = 1 - minimum / median.clamp(min=1e-3)
    return torch.stack([area.sqrt() / 10, long / 10, short / 10, area / long / 10,
                        minimum / 10, median / 10, narrowing], dim=1)


def pooled_features(embeddings: tuple[torch.Tensor, ...], mask_logits: torch.Tensor,
                    boxes: torch.Tensor, image_size: int) -> torch.Tensor:
    """(B, 2 * sum of channels + 7): each FPN level averaged under the predicted mask and in the
    box, and the mask's geometry. The mask is detached, so the heads cannot bend the
    segmentation to suit themselves."""
    weights = torch.sigmoid(mask_logits.detach().float())[:, None]
    parts = [mask_geometry(mask_logits, boxes, image_size)]
    for level in embeddings:
        level = level.float()
        size = level.shape[-2:]
        mask = F.interpolate(weights, size=size, mode="bilinear", align_corners=False)
        parts.append((level * mask).sum((2, 3)) / mask.sum((2, 3)).clamp(min=1e-3))
        box = box_weights(boxes, size, image_size)
        parts.append((level * box).sum((2, 3)) / box.sum((2, 3)).clamp(min=1e-3))
    return torch.cat(parts, dim=1)


def box_weights(boxes: torch.Tensor, size: tuple[int, int], image_size: int) -> torch.Tensor:
    """(B, 1, h, w): 1 where a feature cell's centre lies inside the box, else 0."""
    h, w = size
    ys = (torch.arange(h, device=boxes.device) + 0.5) * image_size / h
    xs = (torch.arange(w, device=boxes.device) + 0.5) * image_size / w
    b = boxes.float()
    inside_x = (xs[None] >= b[:, 0:1]) & (xs[None] <= b[:, 2:3])
    inside_y = (ys[None] >= b[:, 1:2]) & (ys[None] <= b[:, 3:4])
    return (inside_y[:, :, None] & inside_x[:, None, :]).float()[:, None]


def fit_calibration(readouts: np.ndarray, own: np.ndarray, targets: np.ndarray,
                    ridge: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares weights over ``CALIBRATION_INPUTS`` for each of ``MEASURED``.

    ``readouts`` (N, 6) from ``crop_readouts``; ``own`` (N, 3): the heads' % DS, MLD and RVD
    (model pixels); ``targets`` (N, 3) alike. Returns weights (3, 4) and whether each task was
    fitted: one with under ``MIN_CALIBRATION_SAMPLES`` complete rows keeps the head's own
    output. A light ridge on the slopes keeps two nearly equal QCA readouts from cancelling.
    """
    weights = np.tile(np.array([0.0, 0.0, 1.0, 0.0]), (len(MEASURED), 1))
    fitted = np.zeros(len(MEASURED), dtype=bool)
    for j in range(len(MEASURED)):
        x = np.column_stack([readouts[:, j], readouts[:, len(QUANTITIES) + j], own[:, j],
                             np.ones(len(own))]).astype(np.float64)
        y = targets[:, j].astype(np.float64)
        ok = np.isfinite(x).all(1) & np.isfinite(y)
        if ok.sum() < MIN_CALIBRATION_SAMPLES:
            continue
        x, y = x[ok], y[ok]
        gram = x.T @ x
        penalty = ridge * np.trace(gram[:3, :3]) / 3 * np.diag([1.0, 1.0, 1.0, 0.0])
        weights[j] = np.linalg.solve(gram + penalty, x.T @ y)
        fitted[j] = True
    return weights, fitted


class LesionHeads(nn.Module):
    """A shared trunk and one output per task; ``log_vars`` serve uncertainty weighting."""

    def __init__(self, settings: HeadSettings) -> None:
        super().__init__()
        self.settings = settings
        half = settings.hidden // 2
        # Image features and view context get their own projections: hundreds of pooled
        # channels would otherwise drown six context numbers that decide the branch.
        self.image = nn.Sequential(nn.LayerNorm(settings.feature_dim),
                                   nn.Linear(settings.feature_dim, half))
        self.context = nn.Linear(CONTEXT_DIM, settings.hidden - half)
        self.trunk = nn.Sequential(nn.GELU(), nn.Dropout(settings.dropout),
                                   nn.Linear(settings.hidden, settings.hidden), nn.GELU())
        self.segment = nn.Linear(settings.hidden, len(settings.classes))
        self.stenosis = nn.Linear(settings.hidden, 1)
        self.diameters_px = nn.Linear(settings.hidden, 2)  # MLD, reference, in model pixels
        self.log_vars = nn.Parameter(torch.zeros(len(TASKS)))
        # The QCA read (see the module's docstring): buffers, so they travel in the weights.
        weights, _ = fit_calibration(np.empty((0, 6)), np.empty((0, 3)), np.empty((0, 3)))
        self.register_buffer("calibration", torch.as_tensor(weights, dtype=torch.float32))
        self.register_buffer("calibrated", torch.zeros(len(MEASURED), dtype=torch.bool))

    @property
    def reads_qca(self) -> bool:
        return bool(self.calibrated.any())

    def set_calibration(self, weights: np.ndarray, fitted: np.ndarray) -> None:
        self.calibration.copy_(torch.as_tensor(weights, dtype=torch.float32))
        self.calibrated.copy_(torch.as_tensor(fitted, dtype=torch.bool))

    def forward(self, features: torch.Tensor, context: torch.Tensor,
                mm_per_pixel: torch.Tensor,
                readouts: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``readouts``: ``crop_readouts`` of the batch; given, and the heads calibrated, % DS,
        MLD and RVD are the calibrated read (training passes none: the heads learn alone)."""
        hidden = self.trunk(torch.cat([self.image(features.float()),
                                       self.context(context.float())], dim=1))
        stenosis = 100 * torch.sigmoid(self.stenosis(hidden)[:, 0])
        diameters_px = F.softplus(self.diameters_px(hidden))
        if readouts is not None and self.reads_qca:
            own = torch.cat([stenosis[:, None], diameters_px], dim=1)
            read = self.read_qca(own, readouts.to(own))
            stenosis, diameters_px = read[:, 0].clamp(0, 100), read[:, 1:].clamp(min=0)
        # Without calibration (COCO data) there are no mm: NaN out, with no NaN in the
        # gradients (a product with NaN would poison them even where the loss skips it).
        scale = mm_per_pixel.float()[:, None]
        calibrated = torch.isfinite(scale)
        diameters = diameters_px * torch.where(calibrated, scale, torch.zeros_like(scale))
        diameters = torch.where(calibrated, diameters, torch.full_like(diameters, math.nan))
        return {"segment_logits": self.segment(hidden), "stenosis_pct": stenosis,
                "mld_mm": diameters[:, 0], "rvd_mm": diameters[:, 1]}

    def read_qca(self, own: torch.Tensor, readouts: torch.Tensor) -> torch.Tensor:
        """(B, 3): per task, the calibrated read where its inputs are all there, else ``own``."""
        k = len(QUANTITIES)
        inputs = torch.stack([readouts[:, :k], readouts[:, k:], own, torch.ones_like(own)],
                             dim=2)  # (B, 3 tasks, 4 inputs)
        read = (inputs * self.calibration[None]).sum(2)
        usable = torch.isfinite(inputs).all(2) & self.calibrated[None]
        return torch.where(usable, read, own)


def feature_dim_of(config) -> int:
    """Width of ``pooled_features`` for a tracker config, without running the model: each
    of the three feature levels pooled two ways, plus the box geometry. The two finer levels
    come out of the mask decoder's projections (``conv_s0``, ``conv_s1``: hidden / 8 and
    hidden / 4 channels), the coarsest straight from the neck."""
    hidden = int(config.mask_decoder_config.hidden_size)
    channels = hidden // 8 + hidden // 4 + int(config.vision_config.fpn_hidden_size)
    return 2 * channels + GEOMETRY_DIM


def save_heads(heads: LesionHeads, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in heads.state_dict().items()},
              folder / HEADS_WEIGHTS)
    fitted = heads.calibrated.tolist()
    record = {**asdict(heads.settings), "classes": list(heads.settings.classes),
              "tasks": list(heads.settings.tasks), "format": 2,
              "class_mapping": {str(i): code for i, code in enumerate(heads.settings.classes)},
              # For people reading the folder; the weights themselves are in the safetensors.
              "qca_read": {task: dict(zip(CALIBRATION_INPUTS, map(float, w), strict=True))
                           for task, w, ok in zip(MEASURED, heads.calibration.tolist(), fitted,
                                                  strict=True) if ok}}
    (folder / HEADS_CONFIG).write_text(jsonio.dumps(record, indent=1) + "\n")


def has_heads(folder: Path) -> bool:
    return (Path(folder) / HEADS_CONFIG).is_file()


def load_heads(folder: Path) -> LesionHeads:
    record = json.loads((Path(folder) / HEADS_CONFIG).read_text(encoding="utf-8"))
    settings = HeadSettings(classes=tuple(record["classes"]),
                            feature_dim=int(record["feature_dim"]),
                            hidden=int(record["hidden"]), dropout=float(record["dropout"]),
                            # Heads saved before these were recorded: CASS, every task.
                            taxonomy=str(record.get("taxonomy", "CASS")),
                            tasks=tuple(record.get("tasks", TASKS)))
    heads = LesionHeads(settings)
    state = load_file(Path(folder) / HEADS_WEIGHTS)
    # Format-1 heads have no QCA read: they keep the uncalibrated buffers, their own outputs.
    missing = set(heads.state_dict()) - set(state)
    if missing - {"calibration", "calibrated"}:
        raise ConfigError(f"{folder}: {HEADS_WEIGHTS} lacks {sorted(missing)}")
    heads.load_state_dict(state, strict=False)
    return heads.eval()
