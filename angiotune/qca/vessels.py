"""The contrast-filled arteries of a frame, found without a model: what lesion proposals, frame
choice and the tree position (``angiotune.qca.tree``) all start from."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.filters import apply_hysteresis_threshold, threshold_otsu

VESSEL_WIDTH_FRACTION = 0.04  # closing element: wider than a proximal lumen on any frame size


def contrast_density(frame: np.ndarray) -> np.ndarray:
    """Contrast in each pixel: the log-density top-hat of the frame, zero outside the field.

    In log space the contrast's attenuation adds to the anatomy's instead of scaling it, so the
    top-hat measures it alike over lung and spine; summed across a lumen filled with contrast
    it is proportional to the lumen's area (the densitometric signal). The collimator's edge,
    dark but not a vessel, is cut away with the unexposed corners.
    """
    size = max(3, int(round(VESSEL_WIDTH_FRACTION * max(frame.shape))) | 1)
    density = -np.log(np.clip(ndimage.gaussian_filter(frame.astype(np.float32), 1.0), 1e-3, 1))
    tophat = density - ndimage.grey_opening(density, size=(size, size))
    exposed = ndimage.gaussian_filter(frame, size) > 0.5 * float(np.median(frame))
    tophat[~ndimage.binary_erosion(exposed, iterations=size)] = 0
    return tophat


def vessel_mask(density: np.ndarray) -> np.ndarray:
    """Contrast-filled arteries from ``contrast_density``: hysteresis (Otsu's level to seed,
    half of it to grow) follows faint distal vessels from their bright proximal parts."""
    if float(density.max()) <= 0:
        return np.zeros(density.shape, dtype=bool)
    level = threshold_otsu(density[density > 0])
    mask = apply_hysteresis_threshold(density, 0.5 * level, level)
    labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    return sizes[labels] >= max(16, density.size // 2000)  # specks are noise, not vessels
