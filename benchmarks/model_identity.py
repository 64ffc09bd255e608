"""Time spent naming the base weights: the old whole-file hash on every call against the
header layout plus a content hash remembered per file (``angiotune.model.fingerprint``).

Measured side by side in one run on a SAM 3 stand-in in the hub folder's layout (full widths,
fewer layers: ``tests/hub_layout.py``), or on a folder you give (``--model``), then scaled to
the 3.4 GB ``facebook/sam3`` file and to a search's calls (one per epoch checkpoint of every
trial, one per resumed or ``init`` trial, one per kept vessel; the embedding cache one more per
trial). Run: ``python benchmarks/model_identity.py [--model DIR] [--trials 24 --epochs 10]``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

HUB_BYTES = 3.4e9


def whole_file_hash(folder: Path) -> str:
    """What ``base_model_id`` did before: every byte of every weight file, on every call."""
    digest = hashlib.sha256()
    for weights in sorted(folder.glob("*.safetensors")):
        digest.update(weights.read_bytes())
    return digest.hexdigest()[:12]


def timed(call, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, help="a SAM 3 folder (default: build a stand-in)")
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="identity-"))
    os.environ["ANGIOTUNE_HOME"] = str(work / "home")  # a cold remembered-hash file
    from angiotune.model.fingerprint import weights_fingerprint

    folder = args.model
    if folder is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from hub_layout import build_hub_layout

        folder = build_hub_layout(work / "sam3")
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    before = timed(lambda: whole_file_hash(folder))
    started = time.perf_counter()
    weights_fingerprint(folder)
    cold = time.perf_counter() - started
    warm = timed(lambda: weights_fingerprint(folder), repeats=20)
    calls = args.trials * (args.epochs + 2) + 3
    scale = HUB_BYTES / size
    print(f"weights: {size / 1e6:.0f} MB in {folder}")
    print(f"per call: before {before * 1e3:.0f} ms; after {cold * 1e3:.0f} ms the first time on "
          f"a machine, then {warm * 1e3:.2f} ms ({before / warm:.0f}x less)")
    print(f"a search of {args.trials} trials x {args.epochs} epochs makes about {calls} calls:")
    print(f"  at this size: before {calls * before:.1f} s, after {cold + calls * warm:.1f} s")
    print(f"  at 3.4 GB (scaled by bytes): before {calls * before * scale / 60:.1f} min, "
          f"after {(cold * scale + calls * warm) :.1f} s")


if __name__ == "__main__":
    main()
