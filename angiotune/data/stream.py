"""Index rows -> ready training samples, and the Ray Data stream that feeds them to workers.

``prepare_sample`` is plain Python (usable in a DataLoader or a test); ``lesion_dataset`` wraps
it in Ray Data. The index is small metadata, so it is handed to Ray as in-memory rows: that avoids
Ray 2.60's Parquet file-listing task (and from_pandas' metadata task), which wait for a whole free
CPU and hang silently when training workers hold them. Decoding tasks ask for a fraction of a CPU
for the same reason.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from angiotune.data.context import view_context
from angiotune.data.frame_cache import FrameCache
from angiotune.data.index import index_metadata, read_index
from angiotune.data.prompts import lesion_prompt, neighbour_prompt
from angiotune.data.readers import read_frame, read_mask
from angiotune.data.transforms import (
    DEFAULT_CROP_CONTEXT,
    box_to_square,
    frame_to_square,
    jitter_box,
    mask_box,
    normalise_intensity,
    random_intensity,
    random_similarity,
    resize_mask,
    warp,
)
from angiotune.errors import ConfigError, DataError

log = logging.getLogger(__name__)

META_COLUMNS = ("sample_id", "split", "vessel", "segment", "diameter_stenosis_pct", "mld_mm",
                "rvd_mm", "angle_lao_deg", "angle_cranial_deg")
DATA_TASK_CPUS = 0.5  # 0.25 oversubscribes 2 cores: 3.5x slower (benchmarks/README.md)
ROWS_PER_BLOCK = 8  # enough rows per task to amortise its start, few enough to spread
PASS_COLUMN = "_pass"  # which pass over the split a sample of a multi-pass stream belongs to


@dataclass(frozen=True)
class SampleSettings:
    """How rows become model inputs.

    ``fit``: "crop" takes a square of ``context`` times the lesion box's longer side around it
    (lesions are under 1 % of a frame; an adapter records the context it was trained with),
    "frame" letterboxes the whole frame as SAM does at full size.
    ``augment``: train-only randomness; None means "when the split is train".
    ``augment_pixels``: with ``augment``, also warp and re-light the image (off: only the box
    prompt is jittered, so the encoder sees the same pixels every epoch and its embeddings can
    be cached).
    ``augment_views``: with ``augment_pixels``, draw each lesion's warp and lighting from a
    fixed bank of that many views (0: fresh every epoch). An encoder cache then holds every
    view after the first few epochs, so cached trials still train on moved pixels.
    ``frame_cache``: a folder where decoded frames and masks are kept (``FrameCache``), so
    that each file is decoded once per search machine rather than once per epoch and trial.
    """

    image_size: int = 224
    fit: str = "crop"
    context: float = DEFAULT_CROP_CONTEXT
    augment: bool | None = None
    seed: int = 0
    augment_pixels: bool = True
    augment_views: int = 0
    frame_cache: str | None = None

    def __post_init__(self) -> None:
        if self.fit not in ("crop", "frame"):
            raise ConfigError(f"fit must be 'crop' or 'frame', got {self.fit!r}")
        if self.image_size < 16:
            raise ConfigError("image_size must be at least 16")
        if self.augment_views < 0:
            raise ConfigError("augment_views must be 0 or more")


def prepare_sample(row: dict, root: Path, settings: SampleSettings,
                   rng: np.random.Generator | None = None) -> dict:
    """Decode the analysed frame and mask of one index row and bring them to the model grid.

    Returns image (float32 S x S in [0, 1]), mask (uint8 S x S), box (float32 x0 y0 x1 y1 in
    model pixels, from the mask after any augmentation, jittered when augmenting),
    pixel_spacing_mm of a model pixel, and the row's metadata.
    """
    augment = settings.augment if settings.augment is not None else row["split"] == "train"
    move_pixels = augment and settings.augment_pixels
    if rng is None:
        rng = np.random.default_rng([settings.seed, _stable_int(row["sample_id"])])
    if settings.frame_cache is not None:
        frames = FrameCache(settings.frame_cache)
        frame = frames.frame(root / row["image_path"], int(row["frame_index"]))
        mask = frames.mask(root / row["mask_path"])
    else:
        frame = read_frame(root / row["image_path"], int(row["frame_index"]))
        mask = read_mask(root / row["mask_path"])
    if mask.shape != frame.shape:
        mask = resize_mask(mask, frame.shape)
    box = np.array([row["bbox_x0"], row["bbox_y0"], row["bbox_x1"], row["bbox_y1"]], dtype=float)
    size = settings.image_size
    affine = (box_to_square(box, size, settings.context) if settings.fit == "crop"
              else frame_to_square(frame.shape, size))
    pixel_rng = rng
    if move_pixels and settings.augment_views:
        view = int(rng.integers(settings.augment_views))
        pixel_rng = np.random.default_rng([settings.seed, _stable_int(row["sample_id"]), view])
    if move_pixels:
        affine = affine.then(random_similarity(pixel_rng, size))
    image = normalise_intensity(warp(frame, affine, size, fill=float(np.median(frame))))
    out_mask = warp(mask, affine, size, nearest=True)
    out_box = mask_box(out_mask)
    if out_box is None:  # the mask left the grid: impossible unless the index is stale
        raise DataError("mask is empty after resampling", file=row["mask_path"])
    if move_pixels:
        image = random_intensity(image, pixel_rng)
    if augment:
        out_box = jitter_box(out_box, rng, size)
    return {
        "image": image, "mask": out_mask, "box": out_box.astype(np.float32),
        # For the text_box mode: the lesion's concept and a hard negative from its vessel.
        "prompt": lesion_prompt(row["segment_name"]),
        "negative_prompt": neighbour_prompt(row["segment"], row["taxonomy"], rng),
        "pixel_spacing_mm": np.float32(row["pixel_spacing_mm"] / affine.scale),
        "context": view_context(row),
        **{name: row[name] for name in META_COLUMNS},
    }


def _stable_int(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16)


def _prepare_batch(rows: pd.DataFrame, root: Path, settings: SampleSettings) -> dict:
    """Prepare a batch of rows into stacked arrays. A row whose files went bad since indexing is
    logged (by pseudonymous sample id) and left out: it must not stop a search."""
    # Training draws fresh augmentation each epoch; evaluation is seeded and fixed.
    samples = []
    for row in rows.to_dict("records"):
        rng = np.random.default_rng() if settings.augment else None
        try:
            sample = prepare_sample(row, root, settings, rng)
        except DataError as error:
            log.warning("angiotune: skipped sample %s (%s)", row["sample_id"], error)
            continue
        if PASS_COLUMN in row:
            sample[PASS_COLUMN] = row[PASS_COLUMN]
        samples.append(sample)
    if not samples:
        return {}
    return {name: np.stack([s[name] for s in samples]) for name in samples[0]}


def sample_batches(rows: pd.DataFrame, root: Path, settings: SampleSettings,
                   batch_size: int = 16) -> list[dict]:
    """Rows prepared in memory and stacked into batches, in order: for evaluation outside Ray,
    where a bad row should stop the caller (it names the file) rather than be skipped."""
    samples = [prepare_sample(row, root, settings) for row in rows.to_dict("records")]
    return [{name: np.stack([s[name] for s in samples[i:i + batch_size]]) for name in samples[0]}
            for i in range(0, len(samples), batch_size)]


def load_rows(index: str | Path | pd.DataFrame, split: str | None = None,
              data_root: str | Path | None = None) -> tuple[pd.DataFrame, Path]:
    """Index rows (optionally one split) and the data root their paths are relative to."""
    if isinstance(index, pd.DataFrame):
        if data_root is None:
            raise ValueError("data_root is required when the index is given as a DataFrame")
        frame = index
    else:
        import pyarrow.parquet as pq

        frame = read_index(index)
        if data_root is None:
            data_root = index_metadata(pq.read_schema(index), Path(index))["data_root"]
    if split is not None:
        frame = frame[frame["split"] == split]
    return frame.reset_index(drop=True), Path(data_root)


def lesion_dataset(index: str | Path | pd.DataFrame, split: str | None = None, *,
                   settings: SampleSettings = SampleSettings(),
                   data_root: str | Path | None = None,
                   cpus_per_task: float = DATA_TASK_CPUS, reserve_per_operator: bool = True,
                   passes: int | None = None):
    """A Ray Dataset of prepared samples for one split, decoded lazily in Ray tasks.

    ``passes``: the split that many times over, in order, each sample labelled with its pass
    in ``PASS_COLUMN`` (``TrialStream`` cuts it into epochs)."""
    import ray.data

    rows, root = load_rows(index, split, data_root)
    if rows.empty:
        raise DataError(f"no rows in split {split!r}", file=str(index) if not isinstance(
            index, pd.DataFrame) else None, field="split")
    if settings.augment is None:
        settings = replace(settings, augment=split == "train")
    records = rows.to_dict("records")
    if passes is not None:
        records = [{**record, PASS_COLUMN: number} for number in range(passes)
                   for record in records]
    # from_items only puts objects; from_pandas / from_arrow start a metadata task that asks
    # for a whole CPU and waits forever while training workers hold them (seen on Ray 2.60).
    dataset = ray.data.from_items(records, override_num_blocks=-(-len(records) // ROWS_PER_BLOCK))
    dataset = dataset.map_batches(partial(_prepare_batch, root=root, settings=settings),
                                  batch_size=ROWS_PER_BLOCK, batch_format="pandas",
                                  num_cpus=cpus_per_task)
    # Ray Data keeps part of the CPUs in reserve per operator. Without that reserve the stream
    # alone decodes 2x faster on 2 cores, but in a search there, where the step needs one of the
    # two cores, it was no faster (benchmarks/README.md), so the reserve stays by default.
    dataset.context.op_resource_reservation_enabled = reserve_per_operator
    if passes is not None:  # a pass must end before the next begins
        dataset.context.execution_options.preserve_order = True
    return dataset


class TrialStream:
    """A trial's training samples for all its epochs as one Ray Data stream.

    Each ``iter_batches`` call (one per epoch, as on a Dataset) serves the next pass. A Dataset
    starts a fresh execution for every epoch: Ray Data launching its tasks again was the data
    wait left with a warm frame cache (0.3-0.6 s per epoch, ``benchmarks/README.md``). One
    execution decodes the next epoch's first samples while this one trains. ``make(passes=n)``
    builds the dataset (a ``lesion_dataset`` partial); it is made on the first call,
    inside the trial, for ``passes`` epochs at most (a trial resumed later uses fewer; what the
    stream decoded ahead for them is dropped)."""

    def __init__(self, make: Callable[..., object], passes: int) -> None:
        self.make, self.passes = make, passes
        self._batches: Iterator[dict] | None = None
        self._batch_size: int | None = None
        self._first: concurrent.futures.Future | None = None
        self._pending: dict | None = None
        self._served = 0

    def start(self, batch_size: int) -> None:
        """Start decoding now, in the background: the first batch then comes while the trial
        loads its model rather than after (it was most of a trial's data wait)."""
        if self._batches is not None:
            raise ValueError("the trial stream has started already")
        self._open(batch_size)
        pool = concurrent.futures.ThreadPoolExecutor(1, "trial-stream")
        self._first = pool.submit(next, self._batches, None)
        pool.shutdown(wait=False)  # its one task runs on; the thread ends with it

    def iter_batches(self, batch_size: int) -> Iterator[dict]:
        self._open(batch_size)
        if self._served >= self.passes:
            raise ValueError(f"the trial stream was made for {self.passes} epochs, or closed")
        number, self._served = self._served, self._served + 1
        return self._pass(number)

    def close(self) -> None:
        """Stop decoding ahead: a trial stopped early (ASHA) leaves its process to the next
        trial (Tune reuses it), which must not share the cores with a stream nobody reads."""
        self._served = self.passes  # nothing more to serve
        close = getattr(self._batches, "close", None)
        if close is None:
            return
        if self._first is not None and not self._first.done():
            # A generator cannot be closed while another thread runs it: close it once the
            # background fetch is done, without waiting for that here.
            self._first.add_done_callback(lambda _: close())
            return
        close()

    def _open(self, batch_size: int) -> None:
        if self._batches is None:
            self._batches = iter(self.make(passes=self.passes).iter_batches(batch_size=batch_size))
            self._batch_size = batch_size
        elif batch_size != self._batch_size:
            raise ValueError(f"a trial stream serves batches of {self._batch_size}, "
                             f"not {batch_size}")

    def _next(self) -> dict | None:
        if self._first is not None:
            batch = self._first.result()
            self._first = None  # only once taken: close() must know while it is running
            return batch
        return next(self._batches, None)

    def _pass(self, number: int) -> Iterator[dict]:
        """Pass ``number``'s rows in batches of the stream's size (the last one short), as a
        Dataset of the split alone would serve them."""
        held: dict | None = None
        for piece in self._pieces(number):
            held = piece if held is None else {name: np.concatenate([held[name], piece[name]])
                                               for name in piece}
            while len(held["sample_id"]) >= self._batch_size:
                yield {name: values[:self._batch_size] for name, values in held.items()}
                held = {name: values[self._batch_size:] for name, values in held.items()}
        if held is not None and len(held["sample_id"]):
            yield held

    def _pieces(self, number: int) -> Iterator[dict]:
        """Pass ``number``'s rows as the stream's batches hold them: a batch across two passes
        is cut, and the next pass's part kept for it."""
        while True:
            batch, self._pending = self._pending, None
            if batch is None:
                batch = self._next()
            if batch is None:
                return
            labels = np.asarray(batch[PASS_COLUMN])
            # Kept before this pass's rows are served: an epoch its reader leaves unfinished
            # must not take the next pass's first rows with it.
            self._pending = (_rows(batch, labels > number, keep_label=True)
                             if labels.max() > number else None)
            mine = _rows(batch, labels == number)  # an unfinished earlier pass's rows: dropped
            if mine is not None:
                yield mine
            if self._pending is not None:  # the next pass starts inside this batch
                return


def _rows(batch: dict, keep: np.ndarray, keep_label: bool = False) -> dict | None:
    """The kept rows of a batch (without the pass label unless asked); None if none are kept."""
    if not keep.any():
        return None
    return {name: np.asarray(values)[keep] for name, values in batch.items()
            if keep_label or name != PASS_COLUMN}
