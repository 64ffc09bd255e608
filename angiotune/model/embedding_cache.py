"""Image embeddings of a frozen encoder, computed once and kept on disk.

When a strategy leaves SAM 3's vision encoder (and its neck) frozen (``decoder_only``, or LoRA
only on the mask decoder), every epoch and every trial would encode the same crops to the same
embeddings; the encoder is most of the model's compute. The cache keys an embedding by the base
model (``base_model_id``: its weights, wherever they live) and by a hash of the exact pixels
the encoder sees, so any change of frame, crop, size or normalisation is a different key,
never a stale hit. Files are written whole and renamed into place, so workers and searches can
share one.

When LoRA adapts only the encoder's last blocks, the cache keeps the hidden states after the
frozen blocks before them instead (``depth``; ``angiotune.model.encoder_prefix``), and a step
runs the rest of the encoder with gradients.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from angiotune.model.encoder_prefix import encode_prefix
from angiotune.model.sam3 import to_pixel_values

ENCODER_PARTS = ("vision_encoder.", "no_memory_embedding")


def encoder_is_frozen(model: torch.nn.Module) -> bool:
    """Whether nothing the embeddings depend on trains (so a cached embedding stays right)."""
    return not any(part in name for name, p in model.named_parameters() if p.requires_grad
                   for part in ENCODER_PARTS)


class EmbeddingCache:
    """``depth`` None: the encoder's whole output (``image_embeddings``); an int: the hidden
    states after that many blocks (one tensor)."""

    def __init__(self, folder: Path, base_id: str, depth: int | None = None) -> None:
        self.depth = depth
        self.folder = Path(folder) / hashlib.sha256(base_id.encode()).hexdigest()[:16]
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "base_model.txt").write_text(base_id + "\n")
        if depth is not None:
            self.folder = self.folder / f"after-block-{depth}"
            self.folder.mkdir(exist_ok=True)
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(image: np.ndarray) -> str:
        image = np.ascontiguousarray(image, dtype=np.float32)
        return hashlib.sha256(repr(image.shape).encode() + image.tobytes()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def embeddings(self, images: np.ndarray | torch.Tensor, segmenter: torch.nn.Module,
                   device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """The tracker's ``image_embeddings`` (one tensor per feature level, batch first), or
        with a ``depth`` the prefix's hidden states (a list of one), for ``images`` (B, S, S)
        in [0, 1]: read where cached, else encoded in one batch and kept."""
        pixels = images.cpu().numpy() if torch.is_tensor(images) else np.asarray(images)
        keys = [self.key(image) for image in pixels]
        found: dict[int, list[torch.Tensor]] = {}
        for i, key in enumerate(keys):
            path = self._path(key)
            if path.exists():
                try:
                    stored = load_file(path)
                    found[i] = [stored[str(level)] for level in range(len(stored))]
                except (OSError, SafetensorError, KeyError):  # torn or damaged: encode again
                    path.unlink(missing_ok=True)
        missing = [i for i in range(len(keys)) if i not in found]
        self.hits += len(found)
        self.misses += len(missing)
        if missing:
            batch = torch.as_tensor(pixels[missing], dtype=torch.float32, device=device)
            with torch.no_grad():
                normalised = to_pixel_values(batch)
                levels = (segmenter.get_image_embeddings(normalised) if self.depth is None
                          else [encode_prefix(segmenter, normalised, self.depth)])
            for j, i in enumerate(missing):
                found[i] = [level[j].detach().cpu().contiguous() for level in levels]
                self._store(keys[i], found[i])
        return [torch.stack([found[i][level] for i in range(len(keys))]).to(device)
                for level in range(len(found[0]))]

    def _store(self, key: str, levels: list[torch.Tensor]) -> None:
        path = self._path(key)
        path.parent.mkdir(exist_ok=True)
        partial = path.with_suffix(f".{uuid.uuid4().hex[:8]}.part")
        try:
            save_file({str(level): value for level, value in enumerate(levels)}, partial)
            os.replace(partial, path)
        except OSError:  # a full disk costs the cache, never the trial
            partial.unlink(missing_ok=True)
