"""How close the phantoms are to real angiograms: the same statistics on both, side by side.

Real: ../shared/data/real-xca-80 (80 clinical frames, 300 x 300, specialist vessel masks), read in
place. Phantoms: analysed frames of a fresh export, resized to 300 x 300, with vessel masks from
subtracting the contrast-free first frame (as DSA does). Statistics are taken inside the
collimated field.

    python benchmarks/phantom_realism.py [--real ../shared/data/real-xca-80] [--lesions 30]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage
from skimage.morphology import skeletonize

from angiotune.data.phantoms import PhantomSettings, generate_phantoms

SIDE = 300


def statistics(image: np.ndarray, vessels: np.ndarray) -> dict[str, float]:
    field = image > 0.1  # inside the collimator
    ring = ndimage.binary_dilation(vessels, iterations=6) & ~ndimage.binary_dilation(
        vessels, iterations=2) & field
    skeleton = skeletonize(vessels)
    residual = image - ndimage.gaussian_filter(image, 1.5)
    return {
        "mean": float(image[field].mean()),
        "p5": float(np.percentile(image[field], 5)),
        "p95": float(np.percentile(image[field], 95)),
        "vessel / background": float(image[vessels].mean() / image[ring].mean()),
        "vessel fraction": float(vessels[field].mean()),
        "vessel width px": float(vessels.sum() / max(skeleton.sum(), 1)),
        "noise sd": float(residual[field & ~vessels].std()),
    }


def real_frames(root: Path):
    for folder in ("Angios_40_training", "Angios_40_testing"):
        for image_path in sorted((root / folder).glob("[0-9]*.png")):
            if image_path.stem.endswith("_gt"):
                continue
            image = np.asarray(Image.open(image_path).convert("L"), dtype=np.float32) / 255
            mask = np.asarray(Image.open(image_path.with_name(f"{image_path.stem}_gt.png"))) > 0
            yield image, mask


def phantom_frames(out: Path, lesions: int):
    generate_phantoms(out, PhantomSettings(lesions=lesions, size=512, frames=6, seed=5))
    manifest = pd.read_csv(out / "manifest_npy.csv").drop_duplicates("cine_path")
    for path, frame in zip(manifest["cine_path"], manifest["frame_index"], strict=True):
        cine = np.load(out / path)
        filled, empty = cine[frame], cine[0]
        vessels = ndimage.gaussian_filter(empty - filled, 1.0) > 0.02

        def resize(array, mode=Image.Resampling.BILINEAR):
            return np.asarray(Image.fromarray(array).resize((SIDE, SIDE), mode))

        yield (resize(filled.astype(np.float32)),
               resize(vessels.astype(np.uint8), Image.Resampling.NEAREST) > 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = Path(__file__).resolve().parents[1]
    parser.add_argument("--real", type=Path, default=here.parent / "shared/data/real-xca-80")
    parser.add_argument("--lesions", type=int, default=30)
    args = parser.parse_args()
    real = pd.DataFrame([statistics(i, m) for i, m in real_frames(args.real)])
    with tempfile.TemporaryDirectory() as work:
        phantom = pd.DataFrame([statistics(i, m)
                                for i, m in phantom_frames(Path(work), args.lesions)])
    table = pd.DataFrame({
        "real mean": real.mean(), "real sd": real.std(),
        "phantom mean": phantom.mean(), "phantom sd": phantom.std(),
        "phantom / real": phantom.mean() / real.mean(),
    })
    print(f"{len(real)} real frames, {len(phantom)} phantom frames, all at {SIDE} x {SIDE}")
    print(table.to_string(float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
