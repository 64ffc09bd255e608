"""Pre-train the embedded tiny SAM 3 tracker on generic synthetic shapes, and save it.

The real SAM 3 is a general segmenter that angiotune adapts to lesions. The embedded model must be
the same kind of thing at toy scale: it learns "segment the object in this box" on ellipses,
polygons, rings, strokes and tapering curved tubes with touching branches over textured
backgrounds (never angiograms), so LoRA on phantoms has
a zero-shot base to improve on. Regenerate the shipped weights with

    python -m angiotune.train.pretrain                        # the tracker (box prompts)
    python -m angiotune.train.pretrain --prompt-mode text_box  # the concept model
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from angiotune.data.transforms import jitter_box, mask_box
from angiotune.model.concept import build_tokenizer, tiny_concept_config
from angiotune.model.losses import LossWeights
from angiotune.model.sam3 import EMBEDDED_IMAGE_SIZE, embedded_dir, tiny_tracker_config
from angiotune.train.step import evaluate, train_step


def _ellipse(yy, xx, rng, size):
    cy, cx = rng.uniform(0.2, 0.8, 2) * size
    ry, rx = rng.uniform(0.05, 0.25, 2) * size
    angle = rng.uniform(0, np.pi)
    u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
    v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
    return (u / rx) ** 2 + (v / ry) ** 2 <= 1


def _ring(yy, xx, rng, size):
    outer = _ellipse(yy, xx, rng, size)
    return outer & ~ndimage.binary_erosion(outer, iterations=max(2, size // 40))


def _polygon(yy, xx, rng, size):
    centre = rng.uniform(0.25, 0.75, 2) * size
    count = int(rng.integers(3, 7))
    angles = np.sort(rng.uniform(0, 2 * np.pi, count))
    radii = rng.uniform(0.08, 0.25, count) * size
    inside = np.ones_like(xx, dtype=bool)
    points = centre + np.stack([np.cos(angles), np.sin(angles)], 1) * radii[:, None]
    for a, b in zip(points, np.roll(points, -1, axis=0), strict=True):  # convex hull of vertices
        cross = (b[0] - a[0]) * (yy - a[1]) - (b[1] - a[1]) * (xx - a[0])
        inside &= cross >= 0
    return inside


def _stroke(yy, xx, rng, size):
    t = np.linspace(0, 1, 4 * size)[:, None]
    p0, p1, p2 = rng.uniform(0.1, 0.9, (3, 2)) * size
    curve = np.round((1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2).astype(int)
    line = np.ones(xx.shape, dtype=bool)
    line[curve[:, 1].clip(0, size - 1), curve[:, 0].clip(0, size - 1)] = False
    return ndimage.distance_transform_edt(line) <= rng.uniform(0.015, 0.05) * size


def _tube(yy, xx, rng, size, start: np.ndarray | None = None):
    """A curved tube whose width tapers along it: thin elongated objects (cables, roads,
    vessels, roots) are what a general segmenter finds hardest, and its cells in the box are
    few."""
    points = rng.uniform(0.05, 0.95, (4, 2)) * size
    if start is not None:
        points[0] = start
    t = np.linspace(0, 1, 6 * size)[:, None]
    curve = ((1 - t) ** 3 * points[0] + 3 * (1 - t) ** 2 * t * points[1]
             + 3 * (1 - t) * t**2 * points[2] + t**3 * points[3])
    width = rng.uniform(0.012, 0.045) * size
    radius = width * (1 - (1 - rng.uniform(0.35, 1.0)) * t[:, 0])
    pixels = np.round(curve).astype(int).clip(0, size - 1)
    grid = np.ones(xx.shape, dtype=bool)
    grid[pixels[:, 1], pixels[:, 0]] = False
    distance, nearest = ndimage.distance_transform_edt(grid, return_indices=True)
    along = np.full(xx.shape, 0.0)
    along[pixels[:, 1], pixels[:, 0]] = radius
    return distance <= np.maximum(along[nearest[0], nearest[1]], 0.6)


SHAPES = {"ellipse": _ellipse, "polygon": _polygon, "stroke": _stroke, "ring": _ring,
          "tube": _tube}


def shape_sample(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, str]:
    """One image in [0, 1] with 2-4 shapes on texture, the last-drawn one's mask and kind."""
    yy, xx = np.mgrid[0:size, 0:size].astype(float)
    image = ndimage.gaussian_filter(rng.normal(size=(size, size)), rng.uniform(2, 12))
    image = 0.5 + 0.12 * image / (image.std() + 1e-9) + rng.uniform(-0.2, 0.2) * (xx / size)
    target = np.zeros((size, size), dtype=bool)
    for _ in range(int(rng.integers(2, 5))):
        while True:
            kind = str(rng.choice(list(SHAPES)))
            target = SHAPES[kind](yy, xx, rng, size)
            if target.sum() > 20:
                break
        contrast = rng.choice([-1, 1]) * rng.uniform(0.12, 0.35)
        image = np.where(target, image + contrast, image)
    if kind == "tube":  # branches leave it without being part of it: the box says which
        for _ in range(int(rng.integers(0, 3))):
            rows, cols = np.nonzero(target)
            pick = int(rng.integers(len(rows)))
            branch = _tube(yy, xx, rng, size, start=np.array([cols[pick], rows[pick]], float))
            image = np.where(branch & ~target, image + contrast * rng.uniform(0.6, 1.0), image)
    image = ndimage.gaussian_filter(image, rng.uniform(0.3, 1.2))
    image += rng.normal(0, rng.uniform(0.005, 0.04), image.shape)
    return np.clip(image, 0, 1).astype(np.float32), target.astype(np.uint8), kind


def shape_batch(rng: np.random.Generator, size: int, count: int, jitter: bool) -> dict:
    images, masks, boxes, prompts, negatives = [], [], [], [], []
    for _ in range(count):
        image, mask, kind = shape_sample(rng, size)
        box = mask_box(mask)
        images.append(image)
        masks.append(mask)
        boxes.append(jitter_box(box, rng, size) if jitter else box)
        prompts.append(kind)
        negatives.append(str(rng.choice([k for k in SHAPES if k != kind])))
    return {"image": np.stack(images), "mask": np.stack(masks),
            "box": np.stack(boxes).astype(np.float32), "vessel": np.array(["shape"] * count),
            "prompt": np.array(prompts), "negative_prompt": np.array(negatives)}


def pretrain(out: Path, steps: int, batch_size: int, seed: int, lr: float,
             prompt_mode: str = "box", score_weight: float = 1.0) -> dict:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    from transformers import Sam3Model, Sam3TrackerModel

    size = EMBEDDED_IMAGE_SIZE
    tokenizer = None
    if prompt_mode == "box":
        model = Sam3TrackerModel(tiny_tracker_config(size))
    else:
        tokenizer = build_tokenizer()
        model = Sam3Model(tiny_concept_config(len(tokenizer), size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    weights = LossWeights(pixel_loss="bce", pos_weight=2.0, score=score_weight)
    validation = [shape_batch(np.random.default_rng(10_000 + k), size, 16, False)
                  for k in range(4)]
    start = time.time()
    for step in range(1, steps + 1):
        parts = train_step(model, shape_batch(rng, size, batch_size, True), optimizer, weights,
                           tokenizer=tokenizer)
        schedule.step()
        if step % 100 == 0 or step == steps:
            metrics = evaluate(model, validation, tokenizer)
            print(f"step {step:5d}  loss {parts['loss']:.3f}  shapes dice {metrics['dice']:.3f}"
                  f"  {time.time() - start:.0f}s", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    kind = "tracker (box prompts)" if prompt_mode == "box" else "concept model (text + box)"
    record = {"what": f"tiny SAM 3 {kind} pre-trained by angiotune on generic synthetic shapes "
                      "(no angiograms); a stand-in for the real SAM 3 weights",
              "prompt_mode": prompt_mode, "score_weight": score_weight,
              "steps": steps, "batch_size": batch_size, "seed": seed, "lr": lr,
              "image_size": size, "parameters": sum(p.numel() for p in model.parameters()),
              "shapes_validation_dice": round(metrics["dice"], 4),
              "seconds": round(time.time() - start)}
    (out / "pretraining.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-mode", choices=["box", "text_box"], default="box")
    parser.add_argument("--out", type=Path, help="Default: the embedded folder of the mode.")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--score-weight", type=float, default=1.0,
                        help="text_box: weight of the query-score and presence losses.")
    args = parser.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    out = args.out or embedded_dir(args.prompt_mode)
    print(pretrain(out, args.steps, args.batch_size, args.seed, args.lr, args.prompt_mode,
                   args.score_weight))


if __name__ == "__main__":
    main()
