"""The frame's blur at the segment, and the width error it gives the edge detector, undone.

An edge found at the steepest point of a blurred lumen profile is not at the wall. For a round
lumen of radius R the attenuation across it is a chord, 2 sqrt(R^2 - x^2), which rises as a
square root at the wall; after a Gaussian blur of sigma the steepest point lies inside the wall
when R is several sigma (diameters read narrow), and outside it when R is about sigma or less
(narrow lumens read wide: the overestimate of tight stenoses that CMS and CAAS correct). Which
way and how far depends on R / sigma, so no fixed correction fits frames of different blur.

Here the blur is measured where the lesion is: a blurred lumen profile (a line for the
background, a free contrast, the best centre and radius) is fitted to the healthier scanlines
of the segment for each sigma on a grid, and for two cross-sections: *round* (the chord of a
cylinder, what a vessel filled with contrast projects) and *flat* (a uniform band, as a vessel
painted into an image would look). The pair that fits best is kept. The edge detector's response
to lumens of every diameter with that cross-section at that blur (the same Gaussian derivative,
the same weighting) is then computed and inverted, so each measured diameter maps back to the
diameter that would have given it. Below the blur's resolution the response flattens (every
lumen under about two sigma reads alike): there the inversion stops, diameters are scaled in
proportion, and a tight lumen may still read wide. Everything is in units of sigma, from one
table of blurred profiles per cross-section, computed once.

Known limit: on a vessel whose healthy lumen is itself only two or three sigma wide, a narrower
blur with a wider lumen fits almost as well, the blur is underestimated, and the correction
widens the vessel (measured in ``benchmarks/README.md``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

_STEP = 0.05  # of the tables, in units of sigma
_MAX_RADIUS = 40.0  # in sigma; beyond it the blur shifts an edge by a constant
SHAPES = ("round", "flat")
SIGMAS_PX = (0.25, 0.35, 0.45, 0.55, 0.7, 0.85, 1.0, 1.2, 1.45, 1.75, 2.1, 2.5, 3.0)
_CENTRES = np.linspace(-0.4, 0.4, 3)  # px, around the edges' midpoint
_RADII = np.linspace(0.35, 1.4, 15)  # times the measured half-width
_SCANLINES = 8  # healthy scanlines the blur is fitted on
_SAMPLE_PX = 0.25
WINDOW_HALF_WIDTHS, WINDOW_MARGIN_PX = 1.5, 4.0  # the profile fitted: 1.5 half-widths + 4 px
MIN_SENSITIVITY = 0.25  # d(read) / d(true) below which the reading is not inverted


@dataclass(frozen=True)
class Blur:
    sigma_px: float
    shape: str  # "round" or "flat"


@lru_cache(maxsize=len(SHAPES))
def _table(shape: str) -> np.ndarray:
    """Blurred cross-sections at sigma 1: row k is a lumen of radius k * _STEP, column j the
    offset j * _STEP from its centre (the profile is even)."""
    radii = np.arange(0.0, _MAX_RADIUS + _STEP / 2, _STEP)
    reach = _MAX_RADIUS + 8.0
    offsets = np.arange(-reach, reach + _STEP / 2, _STEP)
    inside = radii[:, None] ** 2 - offsets[None, :] ** 2
    if shape == "round":
        section = 2 * np.sqrt(np.clip(inside, 0, None))
    else:
        section = 2 * radii[:, None] * (inside > 0)  # the same area scale as the round one
    blurred = ndimage.gaussian_filter1d(section, 1.0 / _STEP, axis=1, mode="constant")
    return blurred[:, len(offsets) // 2:]


def blurred_profile(offset, radius, sigma, shape: str = "round") -> np.ndarray:
    """The blurred cross-section (px of lumen) at ``offset`` px from a lumen's centre;
    broadcasts over offset, radius and sigma."""
    table = _table(shape)
    sigma = np.asarray(sigma, dtype=float)
    u = np.minimum(np.abs(np.asarray(offset, dtype=float)) / sigma / _STEP,
                   table.shape[1] - 1.001)
    rho = np.minimum(np.asarray(radius, dtype=float) / sigma, _MAX_RADIUS) / _STEP
    u, rho, sigma = np.broadcast_arrays(u, rho, sigma)
    row, col = rho.astype(np.int64), u.astype(np.int64)  # bilinear by hand: 5x map_coordinates
    a, b = rho - row, u - col
    upper = np.minimum(row + 1, table.shape[0] - 1)
    below = table[row, col] * (1 - b) + table[row, col + 1] * b
    above = table[upper, col] * (1 - b) + table[upper, col + 1] * b
    return sigma * (below * (1 - a) + above * a)


def measured_blur(image: np.ndarray, path: np.ndarray, normal: np.ndarray, left: np.ndarray,
                  right: np.ndarray) -> Blur | None:
    """The blur and cross-section that best explain the segment's healthier scanlines, or None
    when too few have both edges. ``image`` has a dark vessel; ``left``/``right`` are the edges'
    outward distances (px) along ``normal``."""
    diameter = left + right
    valid = np.isfinite(diameter) & (diameter > 1.0)
    if valid.sum() < 6:
        return None
    healthy = np.nonzero(valid & (diameter >= np.median(diameter[valid])))[0]
    chosen = healthy[np.linspace(0, len(healthy) - 1, min(_SCANLINES, len(healthy)))
                     .round().astype(int)]
    sigmas = np.array(SIGMAS_PX)
    misfit = np.zeros((len(SHAPES), len(sigmas)))
    for i in chosen:
        centre, half = 0.5 * (left[i] - right[i]), 0.5 * diameter[i]
        reach = WINDOW_HALF_WIDTHS * half + WINDOW_MARGIN_PX  # the same data for every sigma
        t = np.arange(-reach, reach + _SAMPLE_PX / 2, _SAMPLE_PX)
        points = path[i] + (centre + t)[:, None] * normal[i]
        profile = ndimage.map_coordinates(image, [points[:, 1], points[:, 0]], order=1,
                                          mode="nearest")
        for k, shape in enumerate(SHAPES):
            misfit[k] += _relative_misfits(t, profile, half, sigmas, shape)
    k, j = np.unravel_index(int(np.argmin(misfit)), misfit.shape)
    return Blur(float(sigmas[j]), SHAPES[k])


def _relative_misfits(t: np.ndarray, profile: np.ndarray, half: float, sigmas: np.ndarray,
                      shape: str) -> np.ndarray:
    """For each sigma, the least residual over centre and radius of ``profile`` = line -
    contrast * blurred cross-section, relative to the profile's variation about the line."""
    line = np.stack([np.ones_like(t), t], axis=1)
    project_out = np.eye(len(t)) - line @ np.linalg.pinv(line)
    observed = project_out @ profile
    offsets = t[None, None, None, :] - _CENTRES[None, :, None, None]
    radii = (half * _RADII)[None, None, :, None]
    sections = blurred_profile(offsets, radii, sigmas[:, None, None, None], shape)
    templates = sections.reshape(len(sigmas), -1, len(t)) @ project_out.T
    energy = np.maximum((templates * templates).sum(axis=2), 1e-12)
    fit = templates @ observed
    contrast = np.clip(-fit / energy, 0, None)  # a dark lumen
    residual = observed @ observed + 2 * contrast * fit + contrast ** 2 * energy
    return residual.min(axis=1) / max(float(observed @ observed), 1e-12)


@lru_cache(maxsize=64)
def _response(shape: str, sigma_edge: float,
              second_weight: float) -> tuple[np.ndarray, np.ndarray]:
    """True and measured diameters (px) of lumens seen by an edge at the steepest point (plus
    ``second_weight`` times the second derivative) at a total blur of ``sigma_edge``."""
    table = _table(shape)
    slope = -np.gradient(table, _STEP, axis=1)  # rising outward: the vessel is dark
    curve = -np.gradient(np.gradient(table, _STEP, axis=1), _STEP, axis=1)
    strength = slope - (second_weight / sigma_edge) * curve
    half = np.argmax(strength, axis=1) * _STEP
    true = 2 * np.arange(table.shape[0]) * _STEP * sigma_edge
    return true, 2 * half * sigma_edge


def true_diameters(measured: np.ndarray, blur: Blur, derivative_scale: float,
                   second_weight: float = 0.0) -> np.ndarray:
    """The diameters (px) that an edge detector with a Gaussian derivative of
    ``derivative_scale`` px reads as ``measured`` on a frame of this blur."""
    sigma_edge = float(np.hypot(blur.sigma_px, derivative_scale))
    true, read = _response(blur.shape, round(sigma_edge, 3), second_weight)
    # Where the reading changes less than a quarter as fast as the lumen, inverting it would
    # turn noise into diameter: below there, diameters are scaled in proportion instead.
    sensitive = np.gradient(read, true) >= MIN_SENSITIVITY
    start = len(true) - int(np.argmin(sensitive[::-1])) if not sensitive.all() else 0
    true, read = true[start:], np.maximum.accumulate(read[start:])
    keep = np.concatenate([[True], np.diff(read) > 0])
    true, read = true[keep], read[keep]
    measured = np.asarray(measured, dtype=float)
    beyond = measured - (read[-1] - true[-1])  # wide lumens: a constant shift
    below = measured * (true[0] / read[0])
    return np.where(measured > read[-1], beyond,
                    np.where(measured < read[0], below, np.interp(measured, read, true)))
