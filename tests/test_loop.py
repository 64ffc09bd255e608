"""The training loop (``run_training``) through a fake in-memory backend: no Ray.

The backend hands the loop datasets whose ``iter_batches`` yield what the Ray Data stream would
(``_prepare_batch`` over the rows of the session's phantom index, on the embedded tiny model's
112 px grid), and keeps every report with a copy of its checkpoint folder, as Ray does before
the loop's temporary folder goes. The real searches in ``test_search.py`` (marked slow) run the
same loop under Tune and Train; these cover its behaviour in seconds: the per-epoch reports and
checkpoints, a NaN loss and an out-of-memory error, resuming from a checkpoint (mid-search and
after the last epoch), and the embedding cache.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from fake_backend import FakeBackend, phantom_datasets

from angiotune.data.stream import load_rows
from angiotune.errors import ConfigError
from angiotune.model.adapters import read_adapter_record, settings_of
from angiotune.model.sam3 import EMBEDDED_IMAGE_SIZE
from angiotune.train.config import TrialConfig
from angiotune.train.loop import (
    ADAPTER_DIR,
    OOM_HINT,
    STATE_FILE,
    run_training,
)

BATCH = 4


@pytest.fixture(scope="module")
def splits(phantom_index):
    """The session index's training and validation rows, and the data root."""
    rows, root = load_rows(phantom_index.out)
    by_split = {split: rows[rows["split"] == split].reset_index(drop=True) for split in
                ("train", "val")}
    assert len(by_split["train"]) > BATCH and len(by_split["val"]) > 0  # two steps an epoch
    return by_split, root


def _config(tmp_path: Path, **changes) -> dict:
    """A trial's flat configuration as ``run_search`` hands it to the loop (what it reads)."""
    return {"epochs": 2, "seed": 0, "batch_size": BATCH, "metric": "dice", "metrics": ["dice"],
            "mode": "max", "strategy": "lora", "rank": 2, "lr": 5e-3, "model_path": None,
            "objective": None, "fault_dir": None, "cache_dir": str(tmp_path / "cache"),
            **changes}


def _run(config: dict, splits, tmp_path: Path, *, restore: Path | None = None,
         augment_pixels: bool = True, augment_views: int = 0, name: str = "run") -> FakeBackend:
    kept = tmp_path / name
    kept.mkdir()
    rows, root = splits
    backend = FakeBackend(phantom_datasets(rows, root, EMBEDDED_IMAGE_SIZE, augment_pixels,
                                           augment_views), kept, restore)
    run_training(config, backend)
    return backend


@pytest.fixture(scope="module")
def one_epoch(splits, tmp_path_factory) -> tuple[dict, Path]:
    """A finished one-epoch trial: its report and its checkpoint (read-only: copy to change)."""
    folder = tmp_path_factory.mktemp("one-epoch")
    backend = _run(_config(folder, epochs=1), splits, folder)
    [(metrics, checkpoint)] = backend.reports
    return metrics, checkpoint


def test_each_epoch_reports_metrics_with_an_adapter_checkpoint(splits, tmp_path):
    backend = _run(_config(tmp_path), splits, tmp_path)
    assert [m["epoch"] for m, _ in backend.reports] == [1, 2]
    assert backend.prepared == 1
    rows, _ = splits
    for metrics, folder in backend.reports:
        assert 0.0 <= metrics["dice"] <= 1.0 and metrics["n"] == len(rows["val"])
        assert math.isfinite(metrics["train_loss"]) and metrics["resumed_from_epoch"] == 0
        assert {"data_wait_s", "train_s", "eval_s"} <= set(metrics)
        assert "failed" not in metrics and "embedding_cache_hits" not in metrics
        assert folder is not None and (folder / ADAPTER_DIR).is_dir()
        settings = settings_of(read_adapter_record(folder / ADAPTER_DIR))
        assert (settings.strategy, settings.rank) == ("lora", 2)
        state = torch.load(folder / STATE_FILE, weights_only=True)
        assert state["epoch"] == metrics["epoch"]
        assert state["metrics"]["dice"] == pytest.approx(float(metrics["dice"]))
    # Every epoch read the training split once; validation was decoded once and kept.
    assert backend.datasets["train"].passes == 2 and backend.datasets["val"].passes == 1
    # Each checkpoint holds the optimiser as that epoch left it: as many steps in each epoch.
    first, second = (torch.load(f / STATE_FILE, weights_only=True) for _, f in backend.reports)
    assert first["optimizer"]["state"] and second["optimizer"]["state"]
    steps = [next(iter(s["optimizer"]["state"].values()))["step"] for s in (first, second)]
    assert float(steps[1]) == 2 * float(steps[0]) > 0


@pytest.mark.parametrize(("fault", "reason"), [
    ("nan", "loss became nan in epoch 1 (diverged)"),
    ("oom", "out of memory in epoch 1 (injected through ANGIOTUNE_FAULT_DIR)"),
])
def test_an_injected_fault_ends_the_trial_with_its_reason(splits, tmp_path, fault, reason):
    """Through the documented hook: the trial takes the fault file and reports the failure,
    without a checkpoint, instead of raising (a retry would fail the same way)."""
    faults = tmp_path / "faults"
    faults.mkdir()
    (faults / f"1-{fault}").touch()
    (faults / "README").touch()  # not a fault: left alone
    backend = _run(_config(tmp_path, fault_dir=str(faults), metrics=["dice", "iou"]),
                   splits, tmp_path)
    [(metrics, folder)] = backend.reports
    assert folder is None
    assert metrics["failed"].startswith(reason)
    assert metrics["epoch"] == 1
    assert math.isnan(metrics["dice"]) and math.isnan(metrics["iou"])
    if fault == "oom":
        assert OOM_HINT in metrics["failed"]
    assert sorted(p.name for p in faults.iterdir()) == ["README"]  # claimed once


def test_a_nan_loss_from_the_step_fails_the_trial_in_its_epoch(splits, tmp_path, monkeypatch):
    """A loss that turns NaN later (here in the second epoch) ends the trial there, after the
    first epoch's checkpoint was reported."""
    import angiotune.train.loop as loop

    real_step, calls = loop.train_step, []

    def diverging(*args, **kwargs):
        calls.append(1)
        parts = real_step(*args, **kwargs)
        return {**parts, "loss": math.nan} if len(calls) > steps_per_epoch else parts

    rows, _ = splits
    steps_per_epoch = -(-len(rows["train"]) // BATCH)
    monkeypatch.setattr(loop, "train_step", diverging)
    backend = _run(_config(tmp_path), splits, tmp_path)
    assert [m["epoch"] for m, _ in backend.reports] == [1, 2]
    assert backend.reports[0][1] is not None and "failed" not in backend.reports[0][0]
    last, folder = backend.reports[1]
    assert folder is None and last["failed"].startswith("loss became nan in epoch 2")
    assert len(calls) == steps_per_epoch + 1  # it stopped at the first bad step


def test_an_out_of_memory_step_fails_the_trial_with_a_hint(splits, tmp_path, monkeypatch):
    import angiotune.train.loop as loop

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(loop, "train_step", out_of_memory)
    backend = _run(_config(tmp_path, epochs=1), splits, tmp_path)
    [(metrics, folder)] = backend.reports
    assert folder is None and math.isnan(metrics["dice"])
    assert metrics["failed"] == (f"out of memory in epoch 1 (CUDA out of memory. Tried to "
                                 f"allocate 2.00 GiB); {OOM_HINT}")


def test_a_restored_trial_continues_from_its_saved_epoch(splits, one_epoch, tmp_path):
    _, checkpoint = one_epoch
    resumed = _run(_config(tmp_path, epochs=2), splits, tmp_path, restore=checkpoint,
                   name="resumed")
    [(metrics, folder)] = resumed.reports  # only the epoch that was left
    assert metrics["epoch"] == 2 and metrics["resumed_from_epoch"] == 1
    assert resumed.datasets["train"].passes == 1
    state = torch.load(folder / STATE_FILE, weights_only=True)
    assert state["epoch"] == 2
    # The optimizer went on from the saved one (its step count carried over).
    saved = torch.load(checkpoint / STATE_FILE, weights_only=True)
    step = [next(iter(s["optimizer"]["state"].values()))["step"] for s in (saved, state)]
    assert float(step[1]) == 2 * float(step[0])


def test_a_fault_is_not_claimed_again_by_a_restored_trial(splits, one_epoch, tmp_path):
    """A trial restored from its checkpoint already had its turn at the faults: the next
    fault file is left for another trial."""
    faults = tmp_path / "faults"
    faults.mkdir()
    (faults / "1-nan").touch()
    resumed = _run(_config(tmp_path, epochs=2, fault_dir=str(faults)), splits, tmp_path,
                   restore=one_epoch[1], name="resumed")
    [(metrics, _)] = resumed.reports
    assert "failed" not in metrics and metrics["epoch"] == 2
    assert (faults / "1-nan").exists()


def test_a_trial_restored_after_its_last_epoch_reports_its_saved_metrics(splits, one_epoch,
                                                                         tmp_path):
    """A search resumed after a kill may restore a trial that had already finished: it says
    its result again (without training or a new checkpoint), or Tune ends it without one."""
    metrics, checkpoint = one_epoch
    again = _run(_config(tmp_path, epochs=1), splits, tmp_path, restore=checkpoint,
                 name="again")
    [(repeated, folder)] = again.reports
    assert folder is None
    assert repeated["epoch"] == 1
    assert repeated["dice"] == pytest.approx(float(metrics["dice"]))
    assert repeated["train_loss"] == pytest.approx(metrics["train_loss"])
    assert again.datasets["train"].passes == 0 and again.datasets["val"].passes == 0


def test_the_embedding_cache_serves_the_second_epoch(splits, tmp_path):
    """decoder_only keeps the encoder frozen, and with pixel augmentation off (as the search
    sets it with the cache) every crop is encoded in the first epoch and read in the second."""
    rows, _ = splits
    crops = len(rows["train"]) + len(rows["val"])
    backend = _run(_config(tmp_path, strategy="decoder_only", embedding_cache=True),
                   splits, tmp_path, augment_pixels=False)
    first, second = (m for m, _ in backend.reports)
    assert (first["embedding_cache_misses"], first["embedding_cache_hits"]) == (crops, 0)
    assert (second["embedding_cache_misses"], second["embedding_cache_hits"]) == (crops, crops)
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == crops
    # Another trial of the same base reads every crop from the cache.
    other = _run(_config(tmp_path, strategy="decoder_only", embedding_cache=True, epochs=1,
                         lr=1e-3), splits, tmp_path, augment_pixels=False, name="other")
    [(metrics, _)] = other.reports
    assert (metrics["embedding_cache_misses"], metrics["embedding_cache_hits"]) == (0, crops)


def test_lora_on_the_last_blocks_caches_the_frozen_blocks_output_per_augmented_view(
        splits, tmp_path):
    """lora_depth 0.5 leaves the embedded encoder's first 2 of 4 blocks frozen: the cache keeps
    their output. With a bank of 2 augmented views per lesion, training crops are new only
    while their views are; validation crops are read from the second epoch on."""
    rows, _ = splits
    train, val = len(rows["train"]), len(rows["val"])
    backend = _run(_config(tmp_path, lora_depth=0.5, targets="vision_qv", embedding_cache=True,
                           epochs=3), splits, tmp_path, augment_views=2)
    reports = [m for m, _ in backend.reports]
    assert all(0.0 <= m["dice"] <= 1.0 and math.isfinite(m["train_loss"]) for m in reports)
    assert reports[0]["embedding_cache_misses"] == train + val
    assert reports[-1]["embedding_cache_misses"] <= 2 * train + val  # at most 2 views each
    assert reports[-1]["embedding_cache_hits"] >= 3 * (train + val) - (2 * train + val)
    assert {p.parent.parent.name for p in (tmp_path / "cache").rglob("*.safetensors")} == {
        "after-block-2"}
    adapter = json.loads((backend.reports[-1][1] / "adapter" / "adapter_config.json").read_text())
    assert "layers\\.(2|3)" in adapter["target_modules"]


def test_the_embedding_cache_is_refused_when_the_encoder_trains(splits, tmp_path):
    with pytest.raises(ConfigError, match="embedding_cache needs a frozen image encoder"):
        _run(_config(tmp_path, strategy="lora", targets="vision_qv", embedding_cache=True),
             splits, tmp_path)


def test_a_trial_that_validates_at_the_rungs_only_reports_there(splits, tmp_path):
    """``validate: rungs``: the epochs between ASHA's milestones train without a validation
    pass, a report or a checkpoint; the last epoch always reports."""
    backend = _run(_config(tmp_path, epochs=3, validate_at=[2, 3]), splits, tmp_path)
    assert [m["epoch"] for m, _ in backend.reports] == [2, 3]
    assert backend.datasets["train"].passes == 3
    first = torch.load(backend.reports[0][1] / STATE_FILE, weights_only=True)
    assert first["epoch"] == 2
    with pytest.raises(ConfigError, match="must include the last epoch"):
        TrialConfig.from_flat(_config(tmp_path, epochs=3, validate_at=[2]))
