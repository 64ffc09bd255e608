"""3D coronary trees with CASS-numbered segments, tapering lumens and stenoses of exact geometry.

Coordinates are patient LPS millimetres (x to the patient's left, y posterior, z toward the head),
the frame DICOM uses. The heart is a half-ellipsoid whose long axis points anterior, left and
inferior; vessels run on its surface: the coronary arteries in the atrioventricular and
interventricular grooves, the branches down the walls. Each segment is a densely sampled
centerline with a radius per sample, so the lumen is a sphere sweep (round in every cross
section), the shape QCA phantoms use.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.interpolate import CubicSpline

SAMPLE_SPACING_MM = 0.2
HEART_LENGTH_MM = 95.0
HEART_RADIUS_MM = 48.0
EPICARDIAL_OFFSET_MM = 1.5
CATHETER = "catheter"
CATHETER_RADIUS_MM = 1.0  # 6 French guiding catheter, 2.0 mm outer diameter

# Control points per segment: (h along the long axis 0=base..1=apex, azimuth deg, surface scale).
# Azimuth 0 is anterior, positive toward the left ventricle's lateral wall, negative toward the
# right ventricle. A branch starts where its parent passes at ``origin`` (parent, fraction).
_LAYOUT: dict[str, dict] = {
    "11": dict(tree="left", points=[(-0.10, 8, 0.45), (-0.05, 20, 0.65), (0.0, 32, 0.85)],
               radius=(2.25, 2.15)),
    "12": dict(tree="left", parent="11", points=[(0.06, 30, 1), (0.15, 26, 1), (0.25, 24, 1)],
               radius=(1.80, 1.55)),
    "13": dict(tree="left", parent="12", points=[(0.36, 22, 1), (0.48, 20, 1), (0.60, 18, 1)],
               radius=(1.55, 1.20)),
    "14": dict(tree="left", parent="13", points=[(0.72, 16, 1), (0.85, 14, 1), (0.96, 10, 1)],
               radius=(1.15, 0.70)),
    "15": dict(tree="left", origin=("12", 0.8), points=[(0.38, 40, 1), (0.52, 52, 1),
                                                        (0.66, 62, 1)], radius=(1.20, 0.75)),
    "16": dict(tree="left", origin=("13", 0.7), points=[(0.66, 34, 1), (0.76, 44, 1),
                                                        (0.88, 52, 1)], radius=(1.00, 0.60)),
    "18": dict(tree="left", parent="11", points=[(0.02, 50, 1), (0.04, 68, 1), (0.05, 88, 1)],
               radius=(1.70, 1.45)),
    "19": dict(tree="left", parent="18", points=[(0.06, 110, 1), (0.07, 132, 1),
                                                 (0.08, 155, 1)], radius=(1.40, 1.00)),
    "20": dict(tree="left", origin=("18", 0.9), points=[(0.20, 92, 1), (0.36, 97, 1),
                                                        (0.55, 100, 1)], radius=(1.20, 0.70)),
    "21": dict(tree="left", origin=("19", 0.6), points=[(0.20, 138, 1), (0.34, 141, 1),
                                                        (0.50, 143, 1)], radius=(1.10, 0.65)),
    "28": dict(tree="left", origin=("11", 1.0), points=[(0.12, 44, 1), (0.28, 50, 1),
                                                        (0.45, 56, 1)], radius=(1.20, 0.75)),
    "1": dict(tree="right", points=[(-0.10, -15, 0.45), (-0.02, -28, 0.8), (0.02, -42, 1),
                                    (0.04, -62, 1)], radius=(2.00, 1.85)),
    "2": dict(tree="right", parent="1", points=[(0.05, -80, 1), (0.06, -98, 1), (0.07, -115, 1)],
              radius=(1.85, 1.65)),
    "3": dict(tree="right", parent="2", points=[(0.08, -132, 1), (0.08, -148, 1),
                                                (0.09, -160, 1)], radius=(1.65, 1.45)),
    "4": dict(tree="right", parent="3", points=[(0.25, -161, 1), (0.45, -160, 1),
                                                (0.68, -157, 1)], radius=(1.05, 0.60)),
}


@dataclass
class VesselSegment:
    """One CASS segment (or the catheter): dense centerline samples and lumen radii in mm."""

    code: str
    tree: str
    points: np.ndarray  # (N, 3) mm
    reference_radius: np.ndarray  # (N,) healthy lumen, linear taper
    radius: np.ndarray  # (N,) lumen after stenoses
    render_start: int = 0  # first sample outside the parent's lumen (no double contrast)

    @property
    def arclength(self) -> np.ndarray:
        steps = np.linalg.norm(np.diff(self.points, axis=0), axis=1)
        return np.concatenate([[0.0], np.cumsum(steps)])


@dataclass(frozen=True)
class Lesion:
    """A concentric stenosis with a raised-cosine profile, and the analysed range around it.

    Indices are into the segment's samples. The taper is linear, so the interpolated reference
    diameter at the MLD is exactly the healthy diameter there.
    """

    code: str
    stenosis_pct: float
    length_mm: float
    center_index: int
    start_index: int
    end_index: int
    analysed_start: int
    analysed_end: int
    mld_mm: float
    reference_mm: float
    proximal_mm: float
    distal_mm: float


def heart_frame(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Base centre and orthonormal axes (anterior e1, lateral e2, long axis e3) of one heart."""
    long_axis = np.array([0.55, -0.50, -0.62]) + rng.normal(0, 0.04, 3)
    e3 = long_axis / np.linalg.norm(long_axis)
    anterior = np.array([0.0, -1.0, 0.0])
    e1 = anterior - (anterior @ e3) * e3
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(e3, e1)
    if e2[0] < 0:  # lateral wall of the left ventricle lies toward the patient's left
        e2 = -e2
    base = np.array([0.0, 0.0, 0.0]) - 0.45 * HEART_LENGTH_MM * e3
    return base, np.stack([e1, e2, e3])


def build_tree(rng: np.random.Generator) -> dict[str, VesselSegment]:
    """A patient's left and right coronary trees plus the guiding catheter, all healthy."""
    base, axes = heart_frame(rng)
    size = rng.normal(1.0, 0.06)
    calibre = rng.normal(1.0, 0.08)
    length, radius = HEART_LENGTH_MM * size, HEART_RADIUS_MM * size

    def surface(h: np.ndarray, azimuth_deg: np.ndarray, scale: np.ndarray) -> np.ndarray:
        rho = radius * np.sqrt(np.clip(1.0 - np.clip(h, 0, 1) ** 2, 0.02, 1)) + EPICARDIAL_OFFSET_MM
        phi = np.deg2rad(azimuth_deg)
        ring = np.cos(phi)[:, None] * axes[0] + np.sin(phi)[:, None] * axes[1]
        return base + (h * length)[:, None] * axes[2] + (rho * scale)[:, None] * ring

    segments: dict[str, VesselSegment] = {}
    jitter = {code: (rng.normal(0, 0.02), rng.normal(0, 4.0), rng.uniform(1.0, 2.5),
                     rng.uniform(0, 2 * np.pi)) for code in _LAYOUT}
    for code, spec in _LAYOUT.items():
        dh, dphi, waves, phase = jitter[code]
        controls = np.array(spec["points"], dtype=float)
        controls[:, 0] += dh * (controls[:, 2] >= 1)
        controls[:, 1] += dphi
        t = np.linspace(0, 1, 400)
        h = CubicSpline(np.linspace(0, 1, len(controls)), controls[:, 0])(t)
        phi = CubicSpline(np.linspace(0, 1, len(controls)), controls[:, 1])(t)
        phi += 1.5 * np.sin(2 * np.pi * waves * t + phase)  # tortuosity
        scale = np.interp(t, np.linspace(0, 1, len(controls)), controls[:, 2])
        path = surface(h, phi, scale)
        start = _start_point(spec, segments)
        if start is not None:
            path = np.vstack([start, path])
        points = _resample(path, SAMPLE_SPACING_MM)
        r0, r1 = np.array(spec["radius"]) * calibre
        taper = np.linspace(r0, r1, len(points))
        inside = 0
        if start is not None:
            parent = segments[spec.get("parent") or spec["origin"][0]]
            joint = np.argmin(np.linalg.norm(parent.points - start, axis=1))
            reach = np.linalg.norm(points - start, axis=1) < parent.reference_radius[joint]
            inside = int(np.argmin(reach)) if not reach.all() else 0
        segments[code] = VesselSegment(code, spec["tree"], points, taper, taper.copy(), inside)
    for ostium_code in ("11", "1"):
        catheter = _catheter(segments[ostium_code])
        segments[catheter.code] = catheter
    return segments


def _start_point(spec: dict, segments: dict[str, VesselSegment]) -> np.ndarray | None:
    if "parent" in spec:
        return segments[spec["parent"]].points[-1]
    if "origin" in spec:
        parent, fraction = spec["origin"]
        points = segments[parent].points
        return points[min(int(fraction * (len(points) - 1)), len(points) - 1)]
    return None


def _catheter(ostium_segment: VesselSegment) -> VesselSegment:
    """A catheter engaged in an ostium, running up the aorta out of the field."""
    ostium = ostium_segment.points[0]
    path = np.array([ostium, ostium + [-8, 4, 12], ostium + [-14, 8, 40], ostium + [-16, 8, 140]])
    smooth = CubicSpline(np.linspace(0, 1, len(path)), path)(np.linspace(0, 1, 200))
    points = _resample(smooth, SAMPLE_SPACING_MM * 4)
    radius = np.full(len(points), CATHETER_RADIUS_MM)
    return VesselSegment(f"{CATHETER}_{ostium_segment.tree}", ostium_segment.tree, points, radius,
                         radius.copy())


def _resample(path: np.ndarray, spacing: float) -> np.ndarray:
    steps = np.linalg.norm(np.diff(path, axis=0), axis=1)
    arclength = np.concatenate([[0.0], np.cumsum(steps)])
    samples = np.arange(0.0, arclength[-1], spacing)
    return np.stack([np.interp(samples, arclength, path[:, k]) for k in range(3)], axis=1)


def place_lesion(segment: VesselSegment, stenosis_pct: float, length_mm: float,
                 rng: np.random.Generator) -> Lesion:
    """Narrow ``segment`` in place and return the exact truth of the stenosis."""
    s = segment.arclength
    total = s[-1]
    length_mm = float(min(length_mm, 0.55 * total))
    margin = 0.5 * length_mm + 0.1 * total
    center_s = rng.uniform(margin, total - margin)
    offset = (s - center_s) / (0.5 * length_mm)
    bump = np.where(np.abs(offset) <= 1, 0.5 * (1 + np.cos(np.pi * offset)), 0.0)
    segment.radius *= 1.0 - (stenosis_pct / 100.0) * bump

    def index(at: float) -> int:
        return int(np.clip(np.searchsorted(s, at), 0, len(s) - 1))

    start, end = index(center_s - 0.5 * length_mm), index(center_s + 0.5 * length_mm)
    center = start + int(np.argmin(segment.radius[start:end + 1]))  # the MLD
    analysed_start = index(center_s - 0.5 * length_mm - rng.uniform(4, 8))
    analysed_end = index(center_s + 0.5 * length_mm + rng.uniform(4, 8))
    mld = 2 * float(segment.radius[center])
    reference = 2 * float(segment.reference_radius[center])
    return Lesion(
        code=segment.code, stenosis_pct=100.0 * (1 - mld / reference), length_mm=length_mm,
        center_index=center, start_index=start, end_index=end,
        analysed_start=analysed_start, analysed_end=analysed_end, mld_mm=mld,
        reference_mm=reference, proximal_mm=2 * float(segment.reference_radius[start]),
        distal_mm=2 * float(segment.reference_radius[end]),
    )
