"""Knowledge distillation of a kept model into a student, in plain PyTorch: no Ray.

Two steps. ``teacher_targets`` runs the kept teacher once over every chosen frame of each
lesion's cine, with the lesion's box, and stores the crops, the teacher's mask logits and, on
the frame the core lab analysed, the true mask, as memory-mapped arrays (``DistillTargets``):
every student trial of a search reads the same targets, and the teacher never runs again.
Frames the core lab did not draw on are where the pseudo-labels come from.

``train_student`` then fits a student (``angiotune.model.student``) to a mix of the two, as
Hinton et al. (2015) mix soft targets with true labels: ``distill_weight`` times the teacher
term (a tempered sigmoid cross-entropy, scaled by T squared so its gradients keep their size,
plus soft Dice against the teacher's mask) and the rest times Dice + cross-entropy against the
true mask where there is one; and, as MobileSAM distils SAM's encoder, ``feature_weight`` times
the mean squared error between the student's encoder output and the teacher's (both have the
decoder's width): a dense signal for the encoder beside the masks' sparse one. The student sees
its own input size: crops are resized to it and its logits resized back to the teacher's grid,
so student and teacher are scored on one grid.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from angiotune.data.frame_cache import FrameCache
from angiotune.data.readers import read_frame, read_mask
from angiotune.data.transforms import box_to_square, normalise_intensity, resize_mask, warp
from angiotune.errors import ConfigError, DataError
from angiotune.model.lesion import LesionModel
from angiotune.model.losses import dice_loss
from angiotune.model.sam3 import image_size_of, to_pixel_values

SPLITS = ("train", "val", "test")
TARGETS_FILE = "targets.json"
_ARRAYS = ("images", "boxes", "teacher", "embeddings", "truth", "has_truth", "split", "lesion")


@dataclass(frozen=True)
class DistillSettings:
    """One student trial: how the loss mixes teacher and truth, and how it is optimised."""

    temperature: float = 2.0
    distill_weight: float = 0.7  # share of the mask loss that follows the teacher
    feature_weight: float = 1.0  # the encoder's output against the teacher's (MobileSAM)
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ConfigError(f"temperature {self.temperature!r} must be above 0")
        if not 0 <= self.distill_weight <= 1:
            raise ConfigError(f"distill_weight {self.distill_weight!r} must be in [0, 1]")
        if not self.feature_weight >= 0:
            raise ConfigError(f"feature_weight {self.feature_weight!r} must be 0 or more")
        if not self.lr > 0 or self.batch_size < 1:
            raise ConfigError("lr must be above 0 and batch_size at least 1")


class DistillTargets:
    """The teacher's outputs over the lesions' frames, as arrays in a folder (memory-mapped):
    ``images`` (N, S, S) uint8 crops, ``boxes`` (N, 4) in crop pixels, ``teacher`` (N, S, S)
    float16 logits, ``embeddings`` (N, C, T, T) float16, the teacher encoder's coarsest output
    (what its decoder attends to), ``truth`` (N, S, S) uint8 and ``has_truth`` (N,) on analysed
    frames,
    ``split`` (N,) 0 train / 1 val / 2 test, ``lesion`` (N,) the lesion's row in the index."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        try:
            self.meta = json.loads((self.folder / TARGETS_FILE).read_text(encoding="utf-8"))
            for name in _ARRAYS:
                setattr(self, name, np.load(self.folder / f"{name}.npy", mmap_mode="r",
                                            allow_pickle=False))
        except (OSError, ValueError) as error:
            raise DataError(f"{self.folder}: distillation targets unreadable ({error}); "
                            "delete the folder to compute them again") from None

    def __len__(self) -> int:
        return len(self.split)

    def where(self, split: str) -> np.ndarray:
        return np.flatnonzero(np.asarray(self.split) == SPLITS.index(split))

    def batch(self, rows: np.ndarray, device: torch.device | str = "cpu") -> dict:
        rows = np.sort(rows)
        return {"image": torch.as_tensor(self.images[rows] / np.float32(255)).to(device),
                "box": torch.as_tensor(np.asarray(self.boxes[rows])).to(device),
                "teacher": torch.as_tensor(self.teacher[rows].astype(np.float32)).to(device),
                "embeddings": torch.as_tensor(
                    self.embeddings[rows].astype(np.float32)).to(device),
                "truth": torch.as_tensor(self.truth[rows].astype(np.float32)).to(device),
                "has_truth": torch.as_tensor(self.has_truth[rows].astype(bool)).to(device)}


def cine_frames(analysed: int, frames: int, wanted: int) -> list[int]:
    """The analysed frame and up to ``wanted - 1`` others spread evenly over the cine."""
    others = [f for f in np.linspace(0, frames - 1, num=min(wanted, frames)).round().astype(int)
              if f != analysed]
    return [analysed, *sorted(set(int(f) for f in others))[:max(wanted - 1, 0)]]


@torch.no_grad()
def teacher_targets(teacher: LesionModel, rows: pd.DataFrame, root: Path, folder: Path,
                    frames_per_cine: int = 4, frame_cache: str | None = None,
                    batch_size: int = 8) -> DistillTargets:
    """Run ``teacher`` over ``frames_per_cine`` frames of each row's cine (the analysed one
    first) and store what ``DistillTargets`` reads, written as it goes (at 1008 px a crop's
    arrays are about 5 MB: a few hundred lesions would not fit in memory at once). A row whose
    files cannot be read is left out and named in ``targets.json``, as a search leaves out a
    bad sample."""
    teacher = LesionModel(teacher.segmenter, None, teacher.crop_context, teacher.refiner).eval()
    size = image_size_of(teacher.segmenter)
    device = next(teacher.parameters()).device
    frames = FrameCache(frame_cache) if frame_cache else None
    records = rows.to_dict("records")
    planned = sum(len(cine_frames(int(r["frame_index"]), int(r.get("frames") or 1),
                                  frames_per_cine)) for r in records)
    out = _ArrayWriter(Path(folder), planned)
    skipped = []
    for position, row in enumerate(records):
        try:
            crops = _lesion_crops(row, root, size, teacher.crop_context, frames_per_cine, frames)
        except DataError as error:
            skipped.append({"sample_id": row["sample_id"], "reason": str(error)})
            continue
        for start in range(0, len(crops), batch_size):
            chosen = crops[start:start + batch_size]
            images = np.stack([np.round(image * 255).astype(np.uint8) for image, _, _ in chosen])
            boxes = np.stack([box for _, box, _ in chosen]).astype(np.float32)
            pixels = torch.as_tensor(images / np.float32(255), device=device)
            levels = teacher.segmenter.get_image_embeddings(to_pixel_values(pixels))
            logits = teacher(pixels, torch.as_tensor(boxes, device=device),
                             embeddings=levels)["logits"]
            out.add(images=images, boxes=boxes,
                    teacher=logits.float().cpu().numpy().astype(np.float16),
                    embeddings=levels[-1].float().cpu().numpy().astype(np.float16),
                    truth=np.stack([np.zeros((size, size), np.uint8) if truth is None
                                    else truth.astype(np.uint8) for _, _, truth in chosen]),
                    has_truth=np.array([truth is not None for _, _, truth in chosen]),
                    split=np.full(len(chosen), SPLITS.index(row["split"]), np.int8),
                    lesion=np.full(len(chosen), position, np.int32))
    if out.count == 0:
        raise DataError("no lesion could be read for distillation", file=str(root))
    out.finish()
    (Path(folder) / TARGETS_FILE).write_text(json.dumps(
        {"image_size": size, "crop_context": teacher.crop_context,
         "frames_per_cine": frames_per_cine, "samples": out.count,
         "lesions": int(len(rows) - len(skipped)), "skipped": skipped}, indent=1),
        encoding="utf-8")
    return DistillTargets(folder)


class _ArrayWriter:
    """Rows appended to ``.npy`` files on disk (memory-mapped), cut to the rows written."""

    def __init__(self, folder: Path, planned: int) -> None:
        self.folder, self.planned, self.count = folder, planned, 0
        self.arrays: dict[str, np.ndarray] = {}
        folder.mkdir(parents=True, exist_ok=True)

    def add(self, **parts: np.ndarray) -> None:
        rows = len(next(iter(parts.values())))
        for name, part in parts.items():
            if name not in self.arrays:
                self.arrays[name] = np.lib.format.open_memmap(
                    self.folder / f"{name}.npy", mode="w+", dtype=part.dtype,
                    shape=(self.planned, *part.shape[1:]))
            self.arrays[name][self.count:self.count + rows] = part
        self.count += rows

    def finish(self) -> None:
        """Flush, and where lesions were left out, cut each file to the rows written (the
        full-length map is let go first: Windows cannot replace a file that is mapped)."""
        for name in list(self.arrays):
            array = self.arrays.pop(name)
            array.flush()
            if self.count == self.planned:
                continue
            path = self.folder / f"{name}.npy"
            part = path.with_suffix(".part")
            cut = np.lib.format.open_memmap(part, mode="w+", dtype=array.dtype,
                                            shape=(self.count, *array.shape[1:]))
            cut[:] = array[:self.count]
            cut.flush()
            del cut, array
            part.replace(path)


def _lesion_crops(row: dict, root: Path, size: int, context: float, wanted: int,
                  frames: FrameCache | None) -> list[tuple[np.ndarray, np.ndarray, object]]:
    """(crop in [0, 1], box in crop pixels, true mask or None) for the chosen frames."""
    box = np.array([row["bbox_x0"], row["bbox_y0"], row["bbox_x1"], row["bbox_y1"]], float)
    affine = box_to_square(box, size, context)
    crop_box = np.clip(affine.box(box), 0, size).astype(np.float32)
    path = root / row["image_path"]
    analysed = int(row["frame_index"])
    read = frames.frame if frames is not None else read_frame
    mask = (frames.mask if frames is not None else read_mask)(root / row["mask_path"])
    crops = []
    for index in cine_frames(analysed, int(row.get("frames") or 1), wanted):
        frame = read(path, index)
        image = normalise_intensity(warp(frame, affine, size, fill=float(np.median(frame))))
        truth = None
        if index == analysed:
            if mask.shape != frame.shape:
                mask = resize_mask(mask, frame.shape)
            truth = warp(mask, affine, size, nearest=True)
        crops.append((image, crop_box, truth))
    return crops


def student_input(images: torch.Tensor, boxes: torch.Tensor, size: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops and boxes brought from the teacher's grid to the student's input side."""
    if images.shape[-1] == size:
        return images, boxes
    scale = size / images.shape[-1]
    resized = F.interpolate(images[:, None], size=(size, size), mode="bilinear",
                            antialias=True, align_corners=False)[:, 0]
    return resized, boxes * scale


def student_forward(student: LesionModel, images: torch.Tensor, boxes: torch.Tensor,
                    size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's mask logits on the teacher's grid (B, S, S), and its encoder's coarsest
    output (B, C, t, t) on its own grid."""
    small_images, small_boxes = student_input(images, boxes, size)
    levels = student.segmenter.get_image_embeddings(to_pixel_values(small_images))
    logits = student(small_images, small_boxes, embeddings=levels)["logits"]
    if logits.shape[-1] != images.shape[-1]:
        logits = F.interpolate(logits[:, None], size=images.shape[-2:], mode="bilinear",
                               align_corners=False)[:, 0]
    return logits, levels[-1]


def feature_loss(embedding: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the student's embedding against the teacher's, on the student's
    grid (the teacher's averaged down to it), in units of the teacher's variance."""
    if teacher.shape[-1] != embedding.shape[-1]:
        teacher = F.adaptive_avg_pool2d(teacher, embedding.shape[-2:])
    return F.mse_loss(embedding, teacher) / teacher.var().clamp(min=1e-6)


def distill_loss(logits: torch.Tensor, batch: dict, settings: DistillSettings,
                 embedding: torch.Tensor | None = None) -> torch.Tensor:
    """Teacher term and truth term mixed by ``distill_weight``, plus ``feature_weight`` times
    the encoder's match to the teacher's (module docstring)."""
    temperature = settings.temperature
    soft = torch.sigmoid(batch["teacher"] / temperature)
    follow = (F.binary_cross_entropy_with_logits(logits / temperature, soft)
              * temperature ** 2
              + dice_loss(logits, (batch["teacher"] > 0).float()))
    truth = batch["has_truth"]
    learn = logits.new_zeros(())
    if truth.any():
        learn = (F.binary_cross_entropy_with_logits(logits[truth], batch["truth"][truth])
                 + dice_loss(logits[truth], batch["truth"][truth]))
    loss = settings.distill_weight * follow + (1 - settings.distill_weight) * learn
    if embedding is not None and settings.feature_weight > 0:
        loss = loss + settings.feature_weight * feature_loss(embedding, batch["embeddings"])
    return loss


def dice_per_sample(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice of binary masks (B, S, S), 1 where both are empty."""
    prediction, target = prediction.float().flatten(1), target.float().flatten(1)
    overlap = (prediction * target).sum(1)
    total = prediction.sum(1) + target.sum(1)
    return torch.where(total > 0, 2 * overlap / total.clamp(min=1), torch.ones_like(total))


@torch.no_grad()
def score(data: DistillTargets, split: str, student: LesionModel | None, size: int,
          batch_size: int = 16, device: torch.device | str = "cpu") -> dict[str, float]:
    """On one split: ``dice`` against the true masks and ``agreement``, the Dice between the
    student's and the teacher's masks, both on the analysed frames (where users segment);
    ``agreement_all_frames`` on every frame; ``teacher_dice``. Without a student, only the
    teacher's Dice."""
    rows = data.where(split)
    if len(rows) == 0:
        return {}
    if student is not None:
        student.eval()
    dice, agreement, every, teacher_dice = [], [], [], []
    for start in range(0, len(rows), batch_size):
        batch = data.batch(rows[start:start + batch_size], device)
        truth = batch["has_truth"]
        teacher_mask = batch["teacher"] > 0
        teacher_dice.append(dice_per_sample(teacher_mask[truth], batch["truth"][truth]))
        if student is None:
            continue
        mask = student_forward(student, batch["image"], batch["box"], size)[0] > 0
        every.append(dice_per_sample(mask, teacher_mask))
        agreement.append(dice_per_sample(mask[truth], teacher_mask[truth]))
        dice.append(dice_per_sample(mask[truth], batch["truth"][truth]))
    scores = {"teacher_dice": float(torch.cat(teacher_dice).mean())}
    if student is not None:
        scores.update(dice=float(torch.cat(dice).mean()),
                      agreement=float(torch.cat(agreement).mean()),
                      agreement_all_frames=float(torch.cat(every).mean()))
    return scores


def train_student(student: LesionModel, data: DistillTargets, settings: DistillSettings,
                  epochs: int, size: int,
                  report: Callable[[int, dict[str, float], torch.optim.Optimizer], None],
                  start_epoch: int = 0, optimiser_state: dict | None = None,
                  device: torch.device | str = "cpu") -> None:
    """Fit ``student`` (input side ``size``) on the training frames; after each epoch
    ``report(epoch, validation scores, optimiser)`` (the caller checkpoints there)."""
    train = data.where("train")
    if len(train) == 0:
        raise DataError("no training frames to distil on", file=str(data.folder))
    student.to(device).train()
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay)
    if optimiser_state is not None:
        optimiser.load_state_dict(optimiser_state)
    generator = np.random.default_rng([settings.seed, start_epoch])
    steps = -(-len(train) // settings.batch_size)
    for epoch in range(start_epoch + 1, epochs + 1):
        student.train()
        order = generator.permutation(train)
        losses = []
        for step, start in enumerate(range(0, len(order), settings.batch_size)):
            # Cosine decay to zero over the run: the last epochs settle instead of jumping.
            done = ((epoch - 1) * steps + step) / (epochs * steps)
            for group in optimiser.param_groups:
                group["lr"] = settings.lr * 0.5 * (1 + math.cos(math.pi * done))
            batch = data.batch(order[start:start + settings.batch_size], device)
            logits, embedding = student_forward(student, batch["image"], batch["box"], size)
            loss = distill_loss(logits, batch, settings, embedding)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
        scores = score(data, "val", student, size, device=device)
        report(epoch, {**scores, "train_loss": float(np.mean(losses))}, optimiser)
