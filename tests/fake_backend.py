"""A fake ``TrainBackend`` for running the training loop in-process, without Ray.

``FakeBackend`` hands the loop datasets whose ``iter_batches`` yield what the Ray Data stream
would (``_prepare_batch`` over index rows, as ``lesion_dataset`` maps them), and keeps every
report with a copy of its checkpoint folder, as Ray does before the loop's temporary folder goes.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import torch

from angiotune.data.stream import SampleSettings, _prepare_batch
from angiotune.train.loop import TrainBackend


class RowsDataset:
    """A split as ``ray.data`` streams it to a worker: each pass prepares its rows afresh
    (training draws new augmentation every epoch), in batches of ``batch_size``."""

    def __init__(self, rows, root: Path, settings: SampleSettings) -> None:
        self.rows, self.root, self.settings = rows, root, settings
        self.passes = 0

    def iter_batches(self, batch_size: int):
        self.passes += 1
        for start in range(0, len(self.rows), batch_size):
            batch = _prepare_batch(self.rows.iloc[start:start + batch_size], self.root,
                                   self.settings)
            if batch:
                yield batch


class Restored:
    """What ``ray.train.get_checkpoint()`` gives back: a folder behind ``as_directory``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def as_directory(self):
        return contextlib.nullcontext(str(self.folder))


class FakeBackend(TrainBackend):
    """One CPU worker, rank 0: reports are kept in ``reports`` as (metrics, kept folder)."""

    def __init__(self, datasets: dict, kept: Path, restore: Path | None = None) -> None:
        self.datasets = datasets
        self.kept = kept
        self.restore = restore
        self.reports: list[tuple[dict, Path | None]] = []
        self.prepared = 0

    def restored(self):
        return Restored(self.restore) if self.restore is not None else None

    def device(self) -> torch.device:
        return torch.device("cpu")

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        self.prepared += 1
        return model

    def dataset(self, name: str):
        return self.datasets[name]

    def report(self, metrics: dict, folder: Path | None = None) -> None:
        copy = None
        if folder is not None:  # the loop deletes its folder once report returns
            copy = self.kept / f"checkpoint-{len(self.reports)}"
            shutil.copytree(folder, copy)
        self.reports.append((dict(metrics), copy))

    def wait_for_checkpoints(self) -> None:
        pass


def phantom_datasets(rows: dict, root: Path, image_size: int,
                     augment_pixels: bool = True, augment_views: int = 0) -> dict:
    """The train and val splits as a trial streams them: training augmented (the box only,
    without ``augment_pixels``, as a search with the embedding cache sets it; from a bank of
    views with ``augment_views``), validation fixed."""
    return {"train": RowsDataset(rows["train"], root, SampleSettings(
                image_size=image_size, augment=True, augment_pixels=augment_pixels,
                augment_views=augment_views)),
            "val": RowsDataset(rows["val"], root, SampleSettings(image_size=image_size,
                                                                 augment=False))}
