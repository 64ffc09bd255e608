"""The best-adapter registry: replace only when better on the same split; damage is detected."""

import json
import multiprocessing
import random
import subprocess
from concurrent.futures import ProcessPoolExecutor

import pytest

from angiotune.registry.store import RegistryError, list_entries, promote, read_entry


def _adapter(tmp_path, name: str, content: bytes) -> object:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(content)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4}))
    return folder


def _record(score: float, split: str = "split-a") -> dict:
    return {"metric": "dice/LAD", "mode": "max", "score": score, "validation_split": split,
            "metrics": {"dice/LAD": score}, "zero_shot": {"dice/LAD": 0.2}, "config": {}}


def test_only_a_better_adapter_on_the_same_split_replaces(tmp_path):
    results = tmp_path / "results"
    kept, _ = promote(results, "LAD", _adapter(tmp_path, "a", b"first"), _record(0.5))
    assert kept
    kept, why = promote(results, "LAD", _adapter(tmp_path, "b", b"worse"), _record(0.4))
    assert not kept and "kept the existing" in why
    kept, why = promote(results, "LAD", _adapter(tmp_path, "c", b"other"),
                        _record(0.9, split="split-b"))
    assert not kept and "another validation split" in why
    kept, _ = promote(results, "LAD", _adapter(tmp_path, "d", b"better"), _record(0.7))
    assert kept
    entry = read_entry(results, "LAD")
    assert entry["score"] == 0.7
    assert (results / "best" / "LAD" / "adapter" / "adapter_model.safetensors").read_bytes() \
        == b"better"
    assert list_entries(results)["RCA"] is None
    assert not [p for p in (results / "best").iterdir() if ".staging-" in p.name
                or ".retired-" in p.name]


def test_a_damaged_entry_is_refused(tmp_path):
    results = tmp_path / "results"
    promote(results, "RCA", _adapter(tmp_path, "a", b"weights"), _record(0.5))
    (results / "best" / "RCA" / "adapter" / "adapter_model.safetensors").write_bytes(b"torn")
    with pytest.raises(RegistryError, match="checksums"):
        read_entry(results, "RCA")


def test_concurrent_promotions_from_separate_processes_keep_the_best(tmp_path):
    """Two searches (or two users) promoting at once: separate processes, each with its own
    file lock, racing on two vessels. No update is lost and no entry is torn."""
    results = tmp_path / "results"
    jobs = [(results, vessel, _adapter(tmp_path, f"{vessel}{i}", f"{vessel}{i}".encode()),
             _record(0.1 * i)) for i in range(8) for vessel in ("LCX", "RCA")]
    with ProcessPoolExecutor(4, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(promote, *zip(*jobs, strict=True)))
    for vessel in ("LCX", "RCA"):
        entry = read_entry(results, vessel)  # verified against its checksums
        assert entry["score"] == pytest.approx(0.7)
        assert (results / "best" / vessel / "adapter" / "adapter_model.safetensors"
                ).read_bytes() == f"{vessel}7".encode()
    assert not [p for p in (results / "best").iterdir() if ".staging-" in p.name
                or ".retired-" in p.name]


def test_a_replacement_records_what_it_beat(tmp_path):
    results = tmp_path / "results"
    promote(results, "LAD", _adapter(tmp_path, "a", b"general"),
            {**_record(0.5), "stage": 1, "strategy": "lora", "search": "lora_rank"})
    assert read_entry(results, "LAD")["replaced"] is None
    promote(results, "LAD", _adapter(tmp_path, "b", b"specialist"),
            {**_record(0.6), "stage": 3, "strategy": "lora", "search": "stage3_vessel"})
    entry = read_entry(results, "LAD")
    assert entry["stage"] == 3
    assert entry["replaced"]["stage"] == 1 and entry["replaced"]["score"] == 0.5
    assert "stage 3 vessel LoRA" in (results / "best" / "LAD" / "README.md").read_text()


@pytest.fixture
def small_disk(tmp_path):
    """A real 256 KiB file system (tmpfs), to fill for real."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"this machine lets no test mount a small file system: {done.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def test_a_full_disk_leaves_the_entry_as_it_was(tmp_path, small_disk):
    results = small_disk / "results"
    promote(results, "LAD", _adapter(tmp_path, "small", b"w" * 1000), _record(0.5))
    too_big = _adapter(tmp_path, "big", random.randbytes(400 * 1024))  # more than is free
    with pytest.raises(RegistryError, match="could not write the new LAD entry"):
        promote(results, "LAD", too_big, _record(0.9))
    entry = read_entry(results, "LAD")  # still verified against its checksums
    assert entry["score"] == 0.5
    assert not [p for p in (results / "best").iterdir() if ".staging-" in p.name]


def test_a_results_folder_without_room_is_refused_before_anything_starts(small_disk, capsys):
    from angiotune.cli import main

    assert main(["search", "--space", "lora_rank.yaml", "--results", str(small_disk)]) == 2
    said = capsys.readouterr().err
    assert "under 200 MB free" in said and "Traceback" not in said
    assert not (small_disk / "embedded").exists()


def test_an_adapter_no_better_than_the_zero_shot_base_is_flagged():
    from angiotune.search.api import below_zero_shot

    record = {"metric": "dice/LAD", "score": 0.40}
    assert below_zero_shot(record, {"dice/LAD": 0.39}) is None
    for zero in (0.40, 0.41):
        reason = below_zero_shot(record, {"dice/LAD": zero})
        assert "does not beat the zero-shot base" in reason and f"{zero:.4f}" in reason
    assert below_zero_shot(record, {"dice/RCA": 0.9}) is None  # no score to compare with
    assert below_zero_shot(record, {"dice/LAD": float("nan")}) is None
