"""Tubes of known diameter drawn on a pixel grid: the truth QCA and proposals are tested on."""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

SPACING_MM = 0.2  # mm per pixel, a typical value at the vessel


def tube(path_mm: np.ndarray, diameter_mm: np.ndarray, shape=(200, 200),
         soft: bool = False, spacing_mm: float = SPACING_MM) -> np.ndarray:
    """Pixels (centres at integer coordinates) within the local radius of a dense centerline;
    ``soft`` gives a probability map with a 0.5 crossing exactly on the wall."""
    points = path_mm / spacing_mm
    radius = diameter_mm / spacing_mm / 2
    ys, xs = np.mgrid[0:shape[0], 0:shape[1]]
    distance, nearest = cKDTree(points).query(np.stack([xs.ravel(), ys.ravel()], axis=1))
    # The ends are cut square, as a segment mask is: only pixels beside the path count.
    inner = (nearest > 0) & (nearest < len(points) - 1)
    signed = (radius[nearest] - distance).reshape(shape)
    inner = inner.reshape(shape)
    if soft:
        return np.where(inner, 1 / (1 + np.exp(-signed / 0.3)), 0.0)
    return inner & (signed >= 0)


def straight(length_mm: float = 30.0, start=(5.0, 20.0), angle_deg: float = 20.0) -> np.ndarray:
    s = np.arange(0, length_mm, 0.02)
    direction = np.array([np.cos(np.deg2rad(angle_deg)), np.sin(np.deg2rad(angle_deg))])
    return np.asarray(start) + s[:, None] * direction


def arc(radius_mm: float = 15.0, sweep_deg: float = 120.0, centre=(20.0, 20.0)) -> np.ndarray:
    angles = np.deg2rad(np.arange(0, sweep_deg, 0.05))
    return np.asarray(centre) + radius_mm * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def narrowing(path_mm: np.ndarray, reference_mm, stenosis_pct: float, plateau_mm: float,
              shoulder_mm: float = 1.0) -> tuple[np.ndarray, float]:
    """Diameters along the path: a flat narrowing with cosine shoulders in the middle. Returns
    them and the lesion's full length (plateau plus both shoulders)."""
    s = np.concatenate([[0], np.cumsum(np.linalg.norm(np.diff(path_mm, axis=0), axis=1))])
    from_middle = np.abs(s - s[-1] / 2) - plateau_mm / 2
    ramp = np.clip(from_middle / shoulder_mm, 0, 1)
    depth = np.where(from_middle <= 0, 1.0, 0.5 * (1 + np.cos(np.pi * ramp)))
    reference = np.broadcast_to(np.asarray(reference_mm, dtype=float), s.shape)
    return reference * (1 - stenosis_pct / 100 * depth), plateau_mm + 2 * shoulder_mm


def angiogram(path_mm: np.ndarray, diameter_mm: np.ndarray, shape=(200, 200)) -> np.ndarray:
    """An X-ray-like frame of the tube: transmission falls with the contrast's chord length,
    over a flat background, with a little noise."""
    mask_soft = tube(path_mm, diameter_mm, shape, soft=True)
    ys, xs = np.mgrid[0:shape[0], 0:shape[1]]
    points = path_mm / SPACING_MM
    distance, nearest = cKDTree(points).query(np.stack([xs.ravel(), ys.ravel()], axis=1))
    radius = (diameter_mm / SPACING_MM / 2)[nearest]
    chord = 2 * np.sqrt(np.clip(radius**2 - distance**2, 0, None)).reshape(shape)
    frame = 0.8 * np.exp(-0.08 * chord * (mask_soft > 0))
    rng = np.random.default_rng(0)
    return np.clip(frame + rng.normal(0, 0.005, shape), 0, 1).astype(np.float32)
