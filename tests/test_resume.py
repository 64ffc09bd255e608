"""Kill `angiotune search` mid-run with SIGKILL, then `--resume`: the search finishes and keeps
every trial that had finished before the kill."""

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
import yaml

from angiotune.data.ingest import IndexSettings, build_index

pytestmark = pytest.mark.ray

SPACE = {
    "name": "resumable", "metric": "dice", "mode": "max", "samples": 3, "max_concurrent": 1,
    "epochs": 2, "seed": 1, "asha": {"grace_period": 2, "reduction_factor": 2},
    "data": {"image_size": 112, "batch_size": 8}, "fixed": {"strategy": "lora"},
    "params": {"rank": {"type": "int", "low": 2, "high": 8},
               "lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}},
}


def _study(run_dir):
    return optuna.load_study(study_name="resumable", storage=f"sqlite:///{run_dir / 'optuna.db'}")


def _finished(run_dir) -> list:
    if not (run_dir / "optuna.db").exists():
        return []
    try:
        return [t for t in _study(run_dir).trials if t.state.is_finished()]
    except Exception:  # noqa: BLE001 - the study may not be created yet
        return []


def test_sigkill_then_resume(ray_cluster, phantom_dir, tmp_path):
    index = tmp_path / "index.parquet"
    build_index(phantom_dir / "manifest.csv", index, IndexSettings(salt="test-salt"))
    space = tmp_path / "resumable.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    results = tmp_path / "results"
    address = ray_cluster.get_runtime_context().gcs_address
    command = [sys.executable, "-m", "angiotune.cli", "search", "--space", str(space),
               "--data", str(index), "--results", str(results), "--address", address]
    run_dir = results / "searches" / "resumable"

    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.time() + 300
    while not _finished(run_dir) and time.time() < deadline and driver.poll() is None:
        time.sleep(1)
    assert driver.poll() is None, "the search ended before it could be killed"
    before = {t.number: t.value for t in _finished(run_dir)}
    assert before, "no trial finished within five minutes"
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    trials = _study(run_dir).trials
    assert len({t.number for t in trials}) == len(trials) == 3  # no duplicates, no holes
    assert all(t.state.is_finished() for t in trials)
    after = {t.number: t.value for t in trials}
    assert all(after[number] == value for number, value in before.items())
    assert (results / "best").exists()
