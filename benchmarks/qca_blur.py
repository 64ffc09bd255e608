"""Frame-guided QCA widths with and without the blur correction (``angiotune.qca.blur``).

(1) Known lumens: straight vessels of known diameter rendered at known blur, round (a cylinder
    of contrast: transmission falls with the chord) and flat (a uniformly dark band, as a vessel
    painted into an image), measured on their true masks; the median diameter read, uncorrected
    and corrected, and the blur and cross-section the correction measured.
(2) Real frames: straight pieces of the 80 real angiograms of ``real-xca-80`` with their expert
    vessel masks; the frame-guided median width against the width of the expert outline.
    Expert outlines are not a physical truth (they are drawn at the visible edge, and on these
    300 px frames often inside the intensity wall): this shows how the correction moves real
    widths, not which is right.

    python benchmarks/qca_blur.py [--real ../shared/data/real-xca-80] [--coarse 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.morphology import skeletonize

from angiotune.qca import QCAError, QCASettings, measure
from angiotune.qca.blur import measured_blur
from angiotune.qca.edges import EdgeSettings

RAW = QCASettings(edges=EdgeSettings(correct_blur=False))
CORRECTED = QCASettings()
SIZE = 160


def render(diameter_px: float, blur_px: float, flat: bool, seed: int = 3) -> tuple:
    """A straight vessel across a SIZE x SIZE frame (transmission exp(-0.06 per px of lumen),
    blurred, noisy), its true mask, centerline and normals."""
    ys, xs = np.mgrid[0:SIZE, 0:SIZE].astype(float)
    angle = np.deg2rad(20.0)
    normal = np.array([-np.sin(angle), np.cos(angle)])
    across = (xs - SIZE / 2) * normal[0] + (ys - SIZE / 2) * normal[1]
    along = (xs - SIZE / 2) * np.cos(angle) + (ys - SIZE / 2) * np.sin(angle)
    inside = (np.abs(across) < diameter_px / 2) & (np.abs(along) < SIZE / 3)
    if flat:
        lumen = np.where(inside, diameter_px, 0.0)
    else:
        lumen = np.where(inside, 2 * np.sqrt(np.clip((diameter_px / 2) ** 2 - across ** 2, 0,
                                                     None)), 0.0)
    rng = np.random.default_rng(seed)
    frame = ndimage.gaussian_filter(np.exp(-0.06 * lumen), blur_px)
    frame = 0.1 + 0.5 * frame + rng.normal(0, 0.008, frame.shape)
    return frame.astype(np.float32), inside


def known_lumens() -> None:
    print("(1) known lumens, true masks: median diameter read (px), uncorrected -> corrected; "
          "the blur (px) and cross-section measured")
    print(f"{'section':8s} {'blur':>5s} {'true':>5s} {'raw':>6s} {'corr.':>6s}  measured")
    errors = {"raw": [], "corrected": []}
    for flat in (False, True):
        for blur_px in (0.5, 1.0, 1.5, 2.0):
            for diameter_px in (3, 4, 6, 10, 16):
                frame, mask = render(diameter_px, blur_px, flat)
                uncorrected = measure(mask, 1.0, frame=frame, settings=RAW)
                raw = np.median(uncorrected.diameter_mm)
                corrected = np.median(measure(mask, 1.0, frame=frame,
                                              settings=CORRECTED).diameter_mm)
                seen = _blur_seen(frame, uncorrected)
                errors["raw"].append(raw - diameter_px)
                errors["corrected"].append(corrected - diameter_px)
                print(f"{'flat' if flat else 'round':8s} {blur_px:5.1f} {diameter_px:5d} "
                      f"{raw:6.2f} {corrected:6.2f}  {seen}")
    for name, values in errors.items():
        values = np.array(values)
        print(f"{name}: error {values.mean():+.2f} +/- {values.std():.2f} px, mean |error| "
              f"{np.abs(values).mean():.2f} px")


def _blur_seen(frame: np.ndarray, result) -> str:
    """The blur measured on the uncorrected edges, as the correction measures it."""
    left = np.linalg.norm(result.left_edge_px - result.centerline_px, axis=1)
    right = np.linalg.norm(result.right_edge_px - result.centerline_px, axis=1)
    direction = result.left_edge_px - result.right_edge_px
    normal = direction / np.maximum(np.linalg.norm(direction, axis=1, keepdims=True), 1e-9)
    blur = measured_blur(frame, result.centerline_px, normal, left, right)
    return "-" if blur is None else f"{blur.sigma_px:.2f} {blur.shape}"


def straight_pieces(vessels: np.ndarray, half_length: int = 12) -> list[np.ndarray]:
    """Masks of the straight middles of the expert tree's branches, away from branch points."""
    skeleton = skeletonize(vessels)
    neighbours = ndimage.convolve(skeleton.astype(int), np.ones((3, 3), int),
                                  mode="constant") - 1
    near_branch = ndimage.binary_dilation(skeleton & (neighbours > 2), iterations=8)
    labels, count = ndimage.label(skeleton & ~near_branch, structure=np.ones((3, 3)))
    _, (rows, cols) = ndimage.distance_transform_edt(~skeleton, return_indices=True)
    pieces = []
    for k in range(1, count + 1):
        ys, xs = np.nonzero(labels == k)
        if len(ys) < 30:
            continue
        points = np.stack([xs, ys], axis=1).astype(float)
        centred = points - points.mean(axis=0)
        along = centred @ np.linalg.svd(centred, full_matrices=False)[2][0]
        if np.ptp(along) < 0.85 * len(points):  # not straight
            continue
        middle = np.abs(along - np.median(along)) <= half_length
        chosen = np.zeros_like(skeleton)
        chosen[ys[middle], xs[middle]] = True
        pieces.append(vessels & chosen[rows, cols])
    return pieces


def real_frames(root: Path, coarse: int) -> None:
    from qca_accuracy import coarse_mask

    differences = {"raw": [], "corrected": []}
    widths = []
    for path in sorted(root.glob("Angios_40_*/*_gt.png")):
        frame = np.asarray(Image.open(path.with_name(path.name.replace("_gt", "")))
                           .convert("L"), dtype=np.float32)
        vessels = np.asarray(Image.open(path).convert("L")) > 127
        for piece in straight_pieces(vessels):
            given = coarse_mask(piece, piece.shape, coarse) if coarse else piece
            try:
                expert = float(np.median(measure(piece, 1.0).diameter_mm))
                read = {name: float(np.median(measure(given, 1.0, frame=frame,
                                                      settings=settings).diameter_mm))
                        for name, settings in (("raw", RAW), ("corrected", CORRECTED))}
            except QCAError:
                continue
            widths.append(expert)
            for name, value in read.items():
                differences[name].append(value - expert)
    print(f"\n(2) real-xca-80: {len(widths)} straight pieces (expert width median "
          f"{np.median(widths):.1f} px), mask given: "
          f"{'expert outline' if not coarse else f'expert outline coarsened (+{coarse} px)'}")
    for name, values in differences.items():
        values = np.array(values)
        print(f"{name}: frame-guided width minus expert {values.mean():+.2f} +/- "
              f"{values.std():.2f} px (mean |difference| {np.abs(values).mean():.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real", type=Path,
                        default=Path(__file__).resolve().parents[2] / "shared/data/real-xca-80")
    parser.add_argument("--coarse", type=int, default=0,
                        help="coarsen the expert masks like a model's (dilate, 3.5 px grid)")
    args = parser.parse_args()
    started = time.perf_counter()
    known_lumens()
    if args.real.is_dir():
        real_frames(args.real, args.coarse)
    else:
        print(f"\n(2) skipped: no {args.real}")
    print(f"\n{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
