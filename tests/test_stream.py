"""Samples from index rows (fast, no Ray), and the Ray Data stream on a real local Ray (slow):
determinism, augmentation, a broken file, starvation, a Train consumer."""

import concurrent.futures

import numpy as np
import pytest

from angiotune.data.ingest import IndexSettings, build_index
from angiotune.data.stream import (
    SampleSettings,
    TrialStream,
    lesion_dataset,
    load_rows,
    prepare_sample,
)

SETTINGS = SampleSettings(image_size=64)


@pytest.fixture(scope="module")
def stream_index(phantom_index):
    return phantom_index.out


def _take(dataset, timeout_s=240):
    """Run a Ray Data consumer with a deadline, so a hang fails the test instead of CI."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(dataset.take_all).result(timeout=timeout_s)


def test_prepare_sample_without_ray(stream_index):
    rows, root = load_rows(stream_index, "val")
    sample = prepare_sample(rows.iloc[0].to_dict(), root, SETTINGS)
    assert sample["image"].shape == (64, 64) and sample["image"].dtype == np.float32
    assert sample["image"].min() >= 0.0 and sample["image"].max() <= 1.0
    x0, y0, x1, y1 = sample["box"].astype(int)
    assert sample["mask"].sum() > 0
    assert sample["mask"][y0:y1, x0:x1].sum() == sample["mask"].sum()
    # Pixel spacing follows the crop scale: the crop's side (context times the box's longer
    # side, at least 48 px) spread over the model's 64 pixels.
    row = rows.iloc[0]
    side = max(SETTINGS.context * max(row["bbox_x1"] - row["bbox_x0"],
                                      row["bbox_y1"] - row["bbox_y0"]), 48.0)
    assert sample["pixel_spacing_mm"] == pytest.approx(row["pixel_spacing_mm"] * side / 64,
                                                       rel=1e-4)


def test_box_only_augmentation_keeps_the_pixels(stream_index):
    """For the embedding cache: the encoder must see the same crop every epoch, while the box
    prompt still varies."""
    rows, root = load_rows(stream_index, "train")
    row = rows.iloc[0].to_dict()
    fixed = SampleSettings(image_size=64, augment=True, augment_pixels=False)
    draws = [prepare_sample(row, root, fixed, np.random.default_rng(seed)) for seed in (1, 2)]
    assert np.array_equal(draws[0]["image"], draws[1]["image"])
    assert np.array_equal(draws[0]["mask"], draws[1]["mask"])
    assert not np.array_equal(draws[0]["box"], draws[1]["box"])
    moving = SampleSettings(image_size=64, augment=True)
    moved = [prepare_sample(row, root, moving, np.random.default_rng(seed)) for seed in (1, 2)]
    assert not np.array_equal(moved[0]["image"], moved[1]["image"])


def test_a_bank_of_views_moves_the_pixels_among_a_few_fixed_views(stream_index):
    """With an encoder cache, each lesion's warp and lighting come from ``augment_views``
    fixed views (cached once each); the box prompt still varies on every draw."""
    rows, root = load_rows(stream_index, "train")
    row = rows.iloc[0].to_dict()
    bank = SampleSettings(image_size=64, augment=True, augment_views=3)
    draws = [prepare_sample(row, root, bank, np.random.default_rng(seed)) for seed in range(24)]
    views = {d["image"].tobytes() for d in draws}
    assert len(views) == 3
    assert len({d["box"].tobytes() for d in draws}) > 3
    other = prepare_sample(rows.iloc[1].to_dict(), root, bank, np.random.default_rng(0))
    assert other["image"].tobytes() not in views


@pytest.mark.slow  # on the session's Ray, whose start alone takes seconds
@pytest.mark.ray
def test_stream_validation_is_deterministic(ray_cluster, stream_index):
    rows, _ = load_rows(stream_index, "val")
    first = _take(lesion_dataset(stream_index, "val", settings=SETTINGS))
    second = _take(lesion_dataset(stream_index, "val", settings=SETTINGS))
    assert len(first) == len(rows) > 0
    by_id = {s["sample_id"]: s for s in second}
    for sample in first:
        np.testing.assert_array_equal(sample["image"], by_id[sample["sample_id"]]["image"])
        np.testing.assert_array_equal(sample["box"], by_id[sample["sample_id"]]["box"])


@pytest.mark.slow  # on the session's Ray, whose start alone takes seconds
@pytest.mark.ray
def test_stream_training_augments(ray_cluster, stream_index):
    train = _take(lesion_dataset(stream_index, "train", settings=SETTINGS))
    plain = {s["sample_id"]: s for s in _take(lesion_dataset(
        stream_index, "train", settings=SampleSettings(image_size=64, augment=False)))}
    assert len(train) == len(plain)
    changed = sum(not np.array_equal(s["image"], plain[s["sample_id"]]["image"]) for s in train)
    assert changed == len(train)


class _Labelled:
    """What ``lesion_dataset(..., passes=n)`` serves, without Ray: rows 0..size-1 of each pass,
    labelled with it, in batches that straddle the passes."""

    def __init__(self, size: int, passes: int) -> None:
        self.size, self.passes = size, passes

    def iter_batches(self, batch_size: int):
        rows = np.arange(self.size * self.passes)
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            yield {"sample_id": chunk % self.size, "_pass": chunk // self.size}


@pytest.mark.parametrize("size, batch_size", [(10, 4), (12, 4), (3, 8)])
def test_a_trial_stream_cuts_its_passes_into_whole_epochs(size, batch_size):
    stream = TrialStream(lambda passes: _Labelled(size, passes), 3)
    for _ in range(3):
        batches = list(stream.iter_batches(batch_size))
        assert np.concatenate([b["sample_id"] for b in batches]).tolist() == list(range(size))
        assert [len(b["sample_id"]) for b in batches] == [
            min(batch_size, size - start) for start in range(0, size, batch_size)]
        assert "_pass" not in batches[0]
    with pytest.raises(ValueError, match="3 epochs"):
        stream.iter_batches(batch_size)


def test_closing_a_trial_stream_stops_its_execution():
    """What ``run_trial`` does when Tune stops a trial: Ray Data's iterator shuts its
    executor down when its generator is closed."""
    closed = []

    class Source(_Labelled):
        def iter_batches(self, batch_size):
            try:
                yield from super().iter_batches(batch_size)
            finally:
                closed.append(True)

    stream = TrialStream(lambda passes: Source(10, passes), 3)
    next(stream.iter_batches(4))
    stream.close()
    assert closed == [True]
    with pytest.raises(ValueError, match="closed"):
        stream.iter_batches(4)


def test_a_started_trial_stream_serves_the_same_epochs():
    """``start`` fetches the first batch in the background; the epochs are unchanged."""
    stream = TrialStream(lambda passes: _Labelled(10, passes), 2)
    stream.start(4)
    for _ in range(2):
        batches = list(stream.iter_batches(4))
        assert np.concatenate([b["sample_id"] for b in batches]).tolist() == list(range(10))
    started = TrialStream(lambda passes: _Labelled(10, passes), 2)
    started.start(4)
    started.close()  # before anything was read: waits for the background fetch, then closes
    with pytest.raises(ValueError, match="closed"):
        started.iter_batches(4)


@pytest.mark.parametrize("read", [1, 2])
def test_an_epoch_left_unfinished_leaves_the_next_one_whole(read):
    """A reader that stops inside an epoch (a failed step) gets every row of the next epoch,
    also when it stopped in the batch where that epoch begins."""
    stream = TrialStream(lambda passes: _Labelled(5, passes), 3)
    first = stream.iter_batches(4)
    for _ in range(read):
        next(first)
    nxt = [i for b in stream.iter_batches(4) for i in b["sample_id"]]
    assert nxt == list(range(5))


def test_a_trial_stream_refuses_another_batch_size():
    stream = TrialStream(lambda passes: _Labelled(10, passes), 3)
    list(stream.iter_batches(4))
    with pytest.raises(ValueError, match="batches of 4"):
        stream.iter_batches(5)


@pytest.mark.slow  # on the session's Ray, whose start alone takes seconds
@pytest.mark.ray
def test_a_trial_stream_serves_every_epoch_whole_from_one_execution(ray_cluster, stream_index):
    """Each epoch gets every training lesion exactly once, in index order, however the batches
    fall across the passes (a batch size that does not divide the split), and freshly
    augmented; an epoch left half-read (a failed step) does not leak into the next."""
    rows, _ = load_rows(stream_index, "train")
    made = []

    def make(passes):
        made.append(passes)
        return lesion_dataset(stream_index, "train", settings=SETTINGS, passes=passes)

    stream = TrialStream(make, 4)
    batch_size = 5 if len(rows) % 5 else 7
    assert len(rows) % batch_size
    epochs = []
    for _ in range(2):
        batches = list(stream.iter_batches(batch_size))
        assert "_pass" not in batches[0]
        assert {len(batch["sample_id"]) for batch in batches[:-1]} == {batch_size}
        epochs.append({name: np.concatenate([b[name] for b in batches]) for name in batches[0]})
    half = next(iter(stream.iter_batches(batch_size)))  # the third epoch, left after one batch
    assert len(half["sample_id"]) == batch_size
    fourth = list(stream.iter_batches(batch_size))
    epochs.append({name: np.concatenate([b[name] for b in fourth]) for name in fourth[0]})
    assert made == [4]  # one execution for the trial
    for epoch in epochs:
        assert list(epoch["sample_id"]) == list(rows["sample_id"])
    assert not np.array_equal(epochs[0]["image"], epochs[1]["image"])  # fresh augmentation
    with pytest.raises(ValueError, match="4 epochs"):
        stream.iter_batches(batch_size)
    single = TrialStream(make, 1)  # a one-epoch trial
    assert [i for b in single.iter_batches(batch_size) for i in b["sample_id"]] == list(
        rows["sample_id"])


@pytest.mark.slow  # on the session's Ray, whose start alone takes seconds
@pytest.mark.ray
def test_stream_skips_a_file_broken_after_indexing(ray_cluster, phantom_dir, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    index = tmp_path / "index.parquet"
    build_index(data / "manifest.csv", index, IndexSettings(salt="test-salt"))
    rows, _ = load_rows(index, "val")
    (data / rows.iloc[0]["mask_path"]).write_bytes(b"not a mask")
    samples = _take(lesion_dataset(index, "val", settings=SETTINGS))
    assert len(samples) == len(rows) - 1
    assert rows.iloc[0]["sample_id"] not in {s["sample_id"] for s in samples}


@pytest.mark.slow  # on the session's Ray, whose start alone takes seconds
@pytest.mark.ray
def test_stream_runs_while_workers_hold_the_cpus(ray_cluster, stream_index):
    """Training workers reserve all but half a CPU; the decode tasks must still run."""
    import ray

    @ray.remote
    class Hog:
        def ping(self):
            return True

    hog = Hog.options(num_cpus=ray.cluster_resources()["CPU"] - 0.5).remote()
    ray.get(hog.ping.remote())
    try:
        samples = _take(lesion_dataset(stream_index, "val", settings=SETTINGS), timeout_s=120)
        assert len(samples) > 0
    finally:
        ray.kill(hog)


@pytest.mark.slow  # on the session's Ray, whose start alone takes seconds
@pytest.mark.ray
def test_stream_feeds_ray_train_workers(ray_cluster, stream_index, tmp_path):
    import ray.train
    import torch
    from ray.train.torch import TorchTrainer

    rows, _ = load_rows(stream_index, "train")

    def consume(config):
        shard = ray.train.get_dataset_shard("train")
        seen = 0
        for batch in shard.iter_batches(batch_size=4):
            assert torch.as_tensor(batch["image"]).shape[1:] == (64, 64)
            assert batch["box"].shape[1:] == (4,)
            seen += len(batch["sample_id"])
        rank = ray.train.get_context().get_world_rank()
        (counts / f"rank{rank}").write_text(str(seen))
        ray.train.report({"seen": seen})

    counts = tmp_path / "counts"
    counts.mkdir()
    trainer = TorchTrainer(
        consume,
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        datasets={"train": lesion_dataset(stream_index, "train", settings=SETTINGS)},
        run_config=ray.train.RunConfig(name="stream-consumer", storage_path=str(tmp_path)),
    )
    result = trainer.fit()
    assert result.error is None
    seen = [int((counts / f"rank{r}").read_text()) for r in (0, 1)]
    # Ray Data splits the rows evenly between the workers; an odd remainder row may be dropped.
    assert all(n > 0 for n in seen)
    assert len(rows) - 1 <= sum(seen) <= len(rows)


def test_a_local_ray_keeps_an_idle_worker_for_every_trial_and_decoding_task():
    """Ray's default keeps one idle worker per CPU: each trial's stream then waited seconds for
    new decoding processes. 2 CPUs: 2 trial processes and 4 half-CPU decoding tasks."""
    from angiotune.search.run import idle_workers_kept

    assert idle_workers_kept(2) == 6
    assert idle_workers_kept(16) == 48
