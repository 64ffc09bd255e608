"""Decoded frames and masks kept on disk, so that a search decodes each file once.

Every epoch of every trial reads the same analysed frame and mask of each lesion; decoding them
(pydicom parsing the header twice, JPEG or RLE decompression, PNG inflation) is nearly all of a
sample's preparation, and what made the Ray Data stream slower than a DataLoader
(``benchmarks/data_throughput.py``). The cache keeps the decoded float32 frame (exactly what
``read_frame`` returns) and the mask as ``.npy`` files, memory-mapped when read, so a crop
touches only the pages it samples. The key is the file's resolved path, size and modification
time and the frame's number: a file replaced or edited since is decoded again, never served
stale. Files are written whole and renamed into place, so concurrent tasks can share one
folder; the names are hashes, and the arrays hold pixels only, no header.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from pathlib import Path

import numpy as np

from angiotune.data.readers import read_frame, read_mask


class FrameCache:
    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def frame(self, path: Path, index: int) -> np.ndarray:
        """``read_frame(path, index)``, decoded once."""
        return self._cached(path, f"frame{index}", lambda: read_frame(path, index))

    def mask(self, path: Path) -> np.ndarray:
        """``read_mask(path)``, decoded once."""
        return self._cached(path, "mask", lambda: read_mask(path))

    def _cached(self, path: Path, part: str, decode) -> np.ndarray:
        stat = path.stat()
        identity = f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0{part}"
        key = hashlib.sha256(identity.encode()).hexdigest()
        stored = self.folder / key[:2] / f"{key}.npy"
        try:
            return np.load(stored, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError):  # absent, or torn by a crash: decode again
            pass
        array = decode()
        self._store(stored, array)
        return array

    @staticmethod
    def _store(stored: Path, array: np.ndarray) -> None:
        partial = stored.with_suffix(f".{uuid.uuid4().hex[:8]}.part")
        try:
            stored.parent.mkdir(parents=True, exist_ok=True)
            with open(partial, "wb") as handle:
                np.save(handle, np.ascontiguousarray(array))
            os.replace(partial, stored)
        except OSError:  # a full or read-only disk costs the cache, never the sample
            with contextlib.suppress(OSError):
                partial.unlink(missing_ok=True)
