"""Projection of a coronary tree for a C-arm view and X-ray-like rendering of cine frames.

The projection is orthographic with one magnification for the whole heart (the heart sits at the
isocentre; real perspective varies a few per cent over its depth). A round lumen then projects to
a band of exactly its diameter times the magnification, so the truth in pixels follows from the
truth in millimetres.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from angiotune.data.phantoms.anatomy import VesselSegment

IODINE_ATTENUATION_PER_MM = 0.12
DISPLAY_OFFSET, DISPLAY_GAIN = 0.10, 0.54
FOCAL_BLUR_MM = 0.12
QUANTUM_NOISE = 0.014
COLLIMATOR_LEVEL = 0.06


@dataclass(frozen=True)
class View:
    """C-arm geometry. Angles in the stored convention: LAO positive, cranial positive."""

    lao_deg: float
    cranial_deg: float
    size: int
    imager_pixel_spacing_mm: float
    source_to_detector_mm: float = 1000.0
    source_to_patient_mm: float = 750.0
    center_px: tuple[float, float] = (0.0, 0.0)  # where the isocentre lands, (x, y)

    @property
    def magnification(self) -> float:
        return self.source_to_detector_mm / self.source_to_patient_mm

    @property
    def px_per_mm(self) -> float:
        """Pixels per millimetre at the vessel: the calibration factor a core lab reports."""
        return self.magnification / self.imager_pixel_spacing_mm

    def axes(self) -> tuple[np.ndarray, np.ndarray]:
        """Image right and image up as patient LPS directions."""
        a, b = np.deg2rad(self.lao_deg), np.deg2rad(self.cranial_deg)
        toward_detector_h = np.array([np.sin(a), -np.cos(a), 0.0])
        head = np.array([0.0, 0.0, 1.0])
        toward_detector = np.cos(b) * toward_detector_h + np.sin(b) * head
        up = -np.sin(b) * toward_detector_h + np.cos(b) * head
        right = np.cross(-toward_detector, up)
        return right, up

    def project(self, points_mm: np.ndarray) -> np.ndarray:
        """(N, 3) LPS mm -> (N, 2) pixel (x, y), y downward."""
        right, up = self.axes()
        cx, cy = self.center_px
        return np.stack([cx + self.px_per_mm * (points_mm @ right),
                         cy - self.px_per_mm * (points_mm @ up)], axis=1)


@dataclass(frozen=True)
class ProjectedSegment:
    code: str
    points_px: np.ndarray  # (N, 2) x, y
    radius_px: np.ndarray  # (N,)
    render_start: int = 0


def project_segments(segments: Iterable[VesselSegment], view: View,
                     transform=None) -> list[ProjectedSegment]:
    """Project each segment; ``transform`` maps 3D points first (cardiac motion)."""
    projected = []
    for segment in segments:
        points = segment.points if transform is None else transform(segment.points)
        projected.append(ProjectedSegment(segment.code, view.project(points),
                                          segment.radius * view.px_per_mm, segment.render_start))
    return projected


def _nearest(segment: ProjectedSegment, shape: tuple[int, int]):
    """Pixels near a segment: their flat indices, distance to and index of the nearest sample."""
    reach = float(segment.radius_px.max()) + 1.5
    lo = np.floor(segment.points_px.min(axis=0) - reach).astype(int)
    hi = np.ceil(segment.points_px.max(axis=0) + reach).astype(int)
    x0, y0 = max(lo[0], 0), max(lo[1], 0)
    x1, y1 = min(hi[0], shape[1] - 1), min(hi[1], shape[0] - 1)
    if x1 < x0 or y1 < y0:
        return None
    ys, xs = np.mgrid[y0:y1 + 1, x0:x1 + 1]
    grid = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(float)
    distance, index = cKDTree(segment.points_px).query(grid, distance_upper_bound=reach)
    hit = np.isfinite(distance)
    flat = ys.ravel()[hit] * shape[1] + xs.ravel()[hit]
    return flat, distance[hit], index[hit]


def contrast_path_mm(segments: Iterable[ProjectedSegment], shape: tuple[int, int],
                     px_per_mm: float) -> np.ndarray:
    """Length of contrast each ray crosses, in mm; crossing vessels add up as in X-ray."""
    path = np.zeros(shape[0] * shape[1])
    for segment in segments:
        start = segment.render_start
        near = _nearest(ProjectedSegment(segment.code, segment.points_px[start:],
                                         segment.radius_px[start:]), shape)
        if near is None:
            continue
        flat, distance, index = near
        chord = 2 * np.sqrt(np.clip(segment.radius_px[index] ** 2 - distance ** 2, 0, None))
        np.add.at(path, flat, chord / px_per_mm)
    return path.reshape(shape)


def segment_mask(segment: ProjectedSegment, start: int, end: int,
                 shape: tuple[int, int]) -> np.ndarray:
    """Lumen pixels of samples start..end, cut square to the centerline at both ends."""
    mask = np.zeros(shape[0] * shape[1], dtype=bool)
    near = _nearest(segment, shape)
    if near is not None:
        flat, distance, index = near
        inside = (distance <= segment.radius_px[index]) & (index >= start) & (index <= end)
        mask[flat[inside]] = True
    return mask.reshape(shape)


def background(rng: np.random.Generator, size: int, view: View) -> np.ndarray:
    """Transmission of the anatomy behind the vessels: lung, heart shadow, diaphragm, spine."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    cx, cy = np.array(view.center_px) / size
    heart = np.exp(-(((xx - cx) / 0.32) ** 2 + ((yy - cy) / 0.28) ** 2))
    tilt = rng.uniform(-0.3, 0.3)
    diaphragm = 1 / (1 + np.exp(-(yy - (0.78 + tilt * (xx - 0.5)) + rng.uniform(-0.1, 0.1)) / 0.03))
    spine_x = 0.5 + 0.5 * np.sin(np.deg2rad(view.lao_deg)) + rng.uniform(-0.05, 0.05)
    spine = np.exp(-(((xx - spine_x) / 0.07) ** 2))
    smooth = ndimage.gaussian_filter(rng.normal(size=(size, size)), size / 10)
    texture = ndimage.gaussian_filter(rng.normal(size=(size, size)), max(size / 150, 0.7))
    smooth /= smooth.std() + 1e-9
    texture /= texture.std() + 1e-9
    log_t = (-0.25 * heart - 0.55 * diaphragm - 0.2 * spine + 0.12 * smooth + 0.03 * texture
             + rng.uniform(-0.1, 0.05))
    return np.exp(log_t)


def collimator(size: int) -> np.ndarray:
    """Weight 1 inside the round field of view, falling to 0 outside."""
    yy, xx = np.mgrid[0:size, 0:size]
    radius = np.hypot(xx - (size - 1) / 2, yy - (size - 1) / 2) / size
    return np.clip((0.53 - radius) / 0.01, 0, 1)


def render_frame(anatomy: np.ndarray, path_mm: np.ndarray, fill: float, view: View,
                 rng: np.random.Generator) -> np.ndarray:
    """One frame in [0, 1]: attenuation, focal-spot blur, quantum noise, collimation."""
    transmission = anatomy * np.exp(-IODINE_ATTENUATION_PER_MM * fill * path_mm)
    blurred = ndimage.gaussian_filter(transmission, FOCAL_BLUR_MM * view.px_per_mm)
    display = DISPLAY_OFFSET + DISPLAY_GAIN * blurred
    display = display + rng.normal(size=display.shape) * QUANTUM_NOISE * np.sqrt(display)
    field = collimator(view.size)
    return np.clip(field * display + (1 - field) * COLLIMATOR_LEVEL, 0.0, 1.0)
