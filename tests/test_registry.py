"""The best-adapter registry: replace only when better on the same split; damage is detected."""

import hashlib
import itertools
import json
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from angiotune.registry.store import (
    RegistryError,
    entry_dir,
    list_entries,
    promote,
    read_entry,
)


def _adapter(tmp_path, name: str, content: bytes) -> object:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(content)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4}))
    return folder


def _record(score: float, split: str = "split-a") -> dict:
    return {"metric": "dice/LAD", "mode": "max", "score": score, "validation_split": split,
            "metrics": {"dice/LAD": score}, "zero_shot": {"dice/LAD": 0.2}, "config": {}}


def _weights(entry: dict) -> bytes:
    return (Path(entry["path"]) / "adapter" / "adapter_model.safetensors").read_bytes()


def _assert_tidy(results: Path, vessel: str) -> None:
    """After a promotion: the pointer names a versioned entry, kept beside at most the one it
    replaced; nothing a killed promotion or the layout before pointers left is still there."""
    best = results / "best"
    current = entry_dir(results, vessel)
    assert current.parent == best / "versions"
    versions = set((best / "versions").glob(f"{vessel}-*"))
    assert current in versions and len(versions) <= 2
    assert not (best / vessel).exists()
    assert not list(best.glob(".*.tmp"))


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
    assert entry["score"] == 0.7 and _weights(entry) == b"better"
    assert list_entries(results)["RCA"] is None
    _assert_tidy(results, "LAD")


def test_a_damaged_entry_is_refused(tmp_path):
    results = tmp_path / "results"
    promote(results, "RCA", _adapter(tmp_path, "a", b"weights"), _record(0.5))
    (entry_dir(results, "RCA") / "adapter" / "adapter_model.safetensors").write_bytes(b"torn")
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
        assert _weights(entry) == f"{vessel}7".encode()
        _assert_tidy(results, vessel)


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
    assert "stage 3 vessel LoRA" in (Path(entry["path"]) / "README.md").read_text()


def test_the_pointer_names_a_versioned_entry_shown_by_best(tmp_path, capsys):
    from angiotune.cli import main

    results = tmp_path / "results"
    for i, score in enumerate((0.5, 0.6, 0.7)):
        promote(results, "LAD", _adapter(tmp_path, f"a{i}", f"w{i}".encode()), _record(score))
        _assert_tidy(results, "LAD")
    entry = read_entry(results, "LAD")
    pointer = json.loads((results / "best" / "LAD.json").read_text())
    assert Path(entry["path"]) == (results / "best" / pointer["entry"]).resolve()
    assert Path(entry["path"]).parent.name == "versions" and _weights(entry) == b"w2"
    assert len(list((results / "best" / "versions").iterdir())) == 2  # the 0.6 one, for readers
    assert main(["best", "--vessel", "LAD", "--results", str(results)]) == 0
    assert entry["path"] in capsys.readouterr().out


def _to_layout_before_pointers(results: Path, vessel: str) -> None:
    """Rewrite a vessel's entry as the registry kept it before pointers: best/<VESSEL>/."""
    shutil.move(entry_dir(results, vessel), results / "best" / vessel)
    (results / "best" / f"{vessel}.json").unlink()


def test_a_registry_from_before_pointers_is_read_then_moved_to_pointers(tmp_path):
    results = tmp_path / "results"
    promote(results, "LAD", _adapter(tmp_path, "a", b"old"), _record(0.5))
    _to_layout_before_pointers(results, "LAD")
    entry = read_entry(results, "LAD")
    assert Path(entry["path"]) == (results / "best" / "LAD").resolve() and _weights(entry) == b"old"
    assert list_entries(results)["LAD"]["score"] == 0.5
    kept, _ = promote(results, "LAD", _adapter(tmp_path, "b", b"worse"), _record(0.4))
    assert not kept and (results / "best" / "LAD" / "manifest.json").exists()
    kept, _ = promote(results, "LAD", _adapter(tmp_path, "c", b"new"), _record(0.7))
    entry = read_entry(results, "LAD")
    assert kept and _weights(entry) == b"new" and entry["replaced"]["score"] == 0.5
    _assert_tidy(results, "LAD")  # the old folder is gone: no stale adapter where users looked


def test_readers_racing_promotions_always_find_an_entry(tmp_path):
    """Readers take no lock: while promotions swap entries, each read is a whole entry."""
    results = tmp_path / "results"
    scores = [0.1 * i for i in range(1, 9)]
    adapters = [_adapter(tmp_path, f"a{i}", f"w{i}".encode()) for i in range(len(scores))]
    sums = {score: hashlib.sha256(f"w{i}".encode()).hexdigest() for i, score in enumerate(scores)}
    promote(results, "LAD", adapters[0], _record(scores[0]))
    seen, failed, done = [], [], threading.Event()

    def read() -> None:
        while not done.is_set():
            try:
                entry = read_entry(results, "LAD")  # checksums verified against the files
                seen.append(entry["checksums"]["adapter_model.safetensors"] == sums[entry["score"]])
            except Exception as error:  # reported below, from the test's thread
                failed.append(error)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for adapter, score in zip(adapters[1:], scores[1:], strict=True):
            promote(results, "LAD", adapter, _record(score))
    finally:
        done.set()
        reader.join()
    assert not failed and seen and all(seen)


class Killed(BaseException):
    """A kill: unlike an ``OSError``, nothing in the code under test catches it to clean up."""


def _promote_stopped_at(step: int | None, stop: Callable[[], None], results: Path,
                        adapter: Path, rmtree_walk: bool = False) -> int:
    """Promote ``adapter`` (LAD, 0.7) with ``stop()`` called before the step-th line it runs
    in the registry or in ``shutil`` (every point a kill can fall between two steps, the copy's
    inner steps included); the number of such lines it ran. ``rmtree_walk`` adds the lines of
    ``shutil.rmtree``, where only a real kill may stop: an exception raised there runs its
    ``finally`` blocks, which close a folder twice."""
    count = itertools.count(1)
    ran = 0

    def line(frame, event, arg):
        nonlocal ran
        if event == "line":
            ran = next(count)
            if ran == step:
                stop()
        return line

    def call(frame, event, arg):
        traced = (frame.f_globals.get("__name__") in (promote.__module__, "shutil")
                  and (rmtree_walk or "rmtree" not in frame.f_code.co_name))
        return line if traced else None

    tracing = sys.gettrace()
    sys.settrace(call)
    try:
        promote(results, "LAD", adapter, _record(0.7))
    finally:
        sys.settrace(tracing)
    return ran


def _kill() -> None:
    raise Killed


def _sigkill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _registry_before(tmp_path: Path, layout: str,
                     rmtree_walk: bool = False) -> tuple[Path, Path, int]:
    """A registry holding the old LAD entry (0.5, b"old") in ``layout``, a better adapter
    (0.7, b"new") to promote into a copy of it, and how many steps that promotion runs."""
    results = tmp_path / "pristine"
    promote(results, "LAD", _adapter(tmp_path, "old", b"old"), _record(0.5))
    if layout == "before pointers":
        _to_layout_before_pointers(results, "LAD")
    new = _adapter(tmp_path, "new", b"new")
    trial = tmp_path / "dry-run"
    shutil.copytree(results, trial)
    return results, new, _promote_stopped_at(None, _kill, trial, new, rmtree_walk)


def _assert_old_or_new_then_promotable(results: Path, tmp_path: Path) -> float:
    """The entry a killed promotion left is whole (checksums verified), the old or the new, and
    the next promotion works and tidies up after the killed one; the score it found."""
    entry = read_entry(results, "LAD")
    assert entry is not None, "no entry: the kill fell between removing the old and naming the new"
    assert (entry["score"], _weights(entry)) in {(0.5, b"old"), (0.7, b"new")}
    assert (Path(entry["path"]) / "README.md").exists()
    found = entry["score"]
    next_adapter = tmp_path / "next"
    if not next_adapter.exists():
        _adapter(tmp_path, "next", b"next")
    assert promote(results, "LAD", next_adapter, _record(0.9))[0]
    assert _weights(read_entry(results, "LAD")) == b"next"
    _assert_tidy(results, "LAD")
    return found


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["pointers", "before pointers"])
def test_a_promotion_killed_between_any_two_steps_leaves_the_old_or_the_new_entry(
        tmp_path, monkeypatch, layout):
    """Kills a promotion between every step and finds the old or the new entry, never none."""
    monkeypatch.setattr(os, "fsync", lambda handle: None)  # for power cuts; slow, hundreds of times
    pristine, new, steps = _registry_before(tmp_path, layout)
    found = []
    for step in range(1, steps + 1):
        results = tmp_path / f"killed-at-{step}"
        shutil.copytree(pristine, results)
        with pytest.raises(Killed):
            _promote_stopped_at(step, _kill, results, new)
        found.append(_assert_old_or_new_then_promotable(results, tmp_path))
        shutil.rmtree(results)
    swap = found.index(0.7)  # the first kill after the pointer moved
    assert found == [0.5] * swap + [0.7] * (steps - swap) and 0 < swap < steps


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="no SIGKILL on Windows")
def test_a_process_sigkilled_mid_promotion_leaves_the_old_or_the_new_entry(tmp_path):
    """The same in a real process killed outright (no ``finally`` runs, files stay open), at
    six points from the first step to the last, rmtree's walk included."""
    pristine, new, steps = _registry_before(tmp_path, "pointers", rmtree_walk=True)
    run = ("import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
           "import test_registry as t; t._promote_stopped_at(int(sys.argv[2]), t._sigkill, "
           "Path(sys.argv[3]), Path(sys.argv[4]), rmtree_walk=True)")
    found = set()
    for step in sorted({1 + (steps - 1) * i // 5 for i in range(6)}):
        results = tmp_path / f"sigkilled-at-{step}"
        shutil.copytree(pristine, results)
        done = subprocess.run([sys.executable, "-c", run, str(Path(__file__).parent), str(step),
                               str(results), str(new)], capture_output=True, text=True)
        assert done.returncode == -signal.SIGKILL, done.stderr
        found.add(_assert_old_or_new_then_promotable(results, tmp_path))
    assert found == {0.5, 0.7}


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
    assert list((results / "best" / "versions").iterdir()) == [entry_dir(results, "LAD")]
    assert not list((results / "best").glob(".*.tmp"))


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
