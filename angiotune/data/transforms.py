"""Composable sample transforms: geometry that keeps frame, mask and box aligned, intensity, jitter.

Every geometric step is one 2x3 affine from frame pixels to model pixels, applied to the image
(linear), the mask (nearest) and the box (corners) alike, so they cannot drift apart. Random
steps draw from the generator they are given; a fixed generator gives a fixed result.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# MedSAM perturbs training boxes by up to 20 px per side on 1024 px inputs.
BOX_JITTER_FRACTION = 20 / 1024


@dataclass(frozen=True)
class Affine:
    """out = matrix @ in + offset, in (x, y) pixel coordinates."""

    matrix: np.ndarray  # (2, 2)
    offset: np.ndarray  # (2,)

    @property
    def scale(self) -> float:
        """Mean linear scale: output pixels per input pixel."""
        return float(np.sqrt(abs(np.linalg.det(self.matrix))))

    def points(self, xy: np.ndarray) -> np.ndarray:
        return np.asarray(xy, dtype=float) @ self.matrix.T + self.offset

    def box(self, box: np.ndarray) -> np.ndarray:
        """Axis-aligned box (x0, y0, x1, y1) around the transformed corners."""
        x0, y0, x1, y1 = box
        corners = self.points(np.array([[x0, y0], [x1, y0], [x0, y1], [x1, y1]]))
        return np.concatenate([corners.min(axis=0), corners.max(axis=0)])

    def inverse(self) -> Affine:
        matrix = np.linalg.inv(self.matrix)
        return Affine(matrix, -matrix @ self.offset)

    def then(self, other: Affine) -> Affine:
        """This transform followed by ``other``."""
        return Affine(other.matrix @ self.matrix, other.matrix @ self.offset + other.offset)


def frame_to_square(shape: tuple[int, int], size: int) -> Affine:
    """Whole frame scaled into a size x size square, centred (letterbox)."""
    height, width = shape
    scale = size / max(height, width)
    offset = np.array([(size - scale * width) / 2, (size - scale * height) / 2])
    return Affine(np.eye(2) * scale, offset)


# The square crop around a lesion box, as a multiple of the box's longer side. A crop of 1.5
# boxes halves the model pixels per frame pixel of the former 3 boxes: on the embedded 112 px
# model that was the difference between masks twice the lumen's width and masks that follow it
# (validation Dice 0.46 -> 0.60 in one measured run; README). Adapters record theirs.
DEFAULT_CROP_CONTEXT = 1.5


def box_to_square(box: np.ndarray, size: int, context: float = DEFAULT_CROP_CONTEXT,
                  min_side_px: float = 48.0) -> Affine:
    """A square region ``context`` times the box's longer side, centred on it, to size x size."""
    x0, y0, x1, y1 = np.asarray(box, dtype=float)
    side = max(context * max(x1 - x0, y1 - y0), min_side_px)
    scale = size / side
    centre = np.array([(x0 + x1) / 2, (y0 + y1) / 2])
    return Affine(np.eye(2) * scale, size / 2 - scale * centre)


def random_similarity(rng: np.random.Generator, size: int, max_rotation_deg: float = 10.0,
                      scale_range: tuple[float, float] = (0.9, 1.1),
                      max_shift: float = 0.05) -> Affine:
    """A small rotation, scale and shift about the output centre."""
    angle = np.deg2rad(rng.uniform(-max_rotation_deg, max_rotation_deg))
    scale = rng.uniform(*scale_range)
    rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    centre = np.array([size / 2, size / 2])
    shift = rng.uniform(-max_shift, max_shift, 2) * size
    return Affine(rotation, centre - rotation @ centre + shift)


def warp(array: np.ndarray, affine: Affine, size: int | tuple[int, int], *,
         nearest: bool = False, fill: float = 0.0) -> np.ndarray:
    """Resample ``array`` (H x W) onto the output grid of ``affine``: size x size, or (H, W)."""
    shape = (size, size) if isinstance(size, int) else tuple(size)
    # Coordinates are continuous with pixel i covering [i, i + 1) (boxes are half-open), so
    # pixel centres sit at i + 0.5; ndimage indexes centres at i and orders axes (row, col).
    half = np.array([0.5, 0.5])
    index_offset = affine.offset + affine.matrix @ half - half
    inverse = np.linalg.inv(affine.matrix)
    swap = np.array([[0, 1], [1, 0]])
    matrix = swap @ inverse @ swap
    offset = swap @ (-inverse @ index_offset)
    if nearest:
        # grid-constant: a pixel counts out to its edges, not only to its centre.
        return ndimage.affine_transform(array.astype(np.uint8), matrix, offset,
                                        output_shape=shape, order=0,
                                        mode="grid-constant", cval=0)
    return ndimage.affine_transform(array.astype(np.float32), matrix, offset,
                                    output_shape=shape, order=1, mode="grid-constant",
                                    cval=fill)


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A mask at another uniform scale brought to ``shape`` by nearest neighbour."""
    rows = (np.arange(shape[0]) * mask.shape[0] // shape[0]).clip(0, mask.shape[0] - 1)
    cols = (np.arange(shape[1]) * mask.shape[1] // shape[1]).clip(0, mask.shape[1] - 1)
    return mask[np.ix_(rows, cols)]


def mask_box(mask: np.ndarray) -> np.ndarray | None:
    """Tight half-open box (x0, y0, x1, y1) of the foreground, or None when empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)


def normalise_intensity(image: np.ndarray, low_pct: float = 1.0,
                        high_pct: float = 99.0) -> np.ndarray:
    """Robust percentile window to [0, 1]; keeps contrast comparable across systems."""
    low, high = np.percentile(image, [low_pct, high_pct])
    return np.clip((image - low) / max(high - low, 1e-6), 0.0, 1.0).astype(np.float32)


def random_intensity(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gamma, contrast and noise changes of the size seen between X-ray systems."""
    gamma = np.exp(rng.uniform(np.log(0.8), np.log(1.25)))
    contrast, brightness = rng.uniform(0.85, 1.15), rng.uniform(-0.05, 0.05)
    out = (np.clip(image, 0, 1) ** gamma - 0.5) * contrast + 0.5 + brightness
    out = out + rng.normal(0, rng.uniform(0, 0.02), image.shape)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def jitter_box(box: np.ndarray, rng: np.random.Generator, size: int,
               fraction: float = BOX_JITTER_FRACTION) -> np.ndarray:
    """Move each side of the box by up to ``fraction * size`` pixels, kept inside the image."""
    shift = rng.uniform(-1, 1, 4) * fraction * size
    x0, y0, x1, y1 = np.asarray(box, dtype=float) + shift
    x0, x1 = sorted((x0, x1))
    y0, y1 = sorted((y0, y1))
    return np.clip(np.array([x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)]), 0, size) \
        .astype(np.float32)


def box_iou(a, b) -> float:
    """Intersection over union of two x0, y0, x1, y1 boxes; 0 when either has no area."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    overlap = max(width, 0.0) * max(height, 0.0)
    union = _area(a) + _area(b) - overlap
    return float(overlap / union) if union > 0 and overlap > 0 else 0.0


def _area(box) -> float:
    return max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0)
