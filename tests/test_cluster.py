"""A real two-node Ray cluster on this machine: `ray start --head` and a second `ray start` with
resources of its own, both on 127.0.0.1. `angiotune search --address` runs on it, is killed with
SIGKILL midway, and `--resume` finishes it: every trial that had finished keeps its result, the
Optuna study has no duplicates or holes, and the registry is intact. Then the cluster is stopped.

The nodes run as `ray start --block` processes in their own process groups, so stopping them
never touches the test session's own Ray (which `ray stop` would kill).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml

from angiotune.data.ingest import IndexSettings, build_index
from angiotune.registry.store import list_entries, load_best_model

SPACE = {
    "name": "resumable", "metric": "dice", "mode": "max", "samples": 2, "max_concurrent": 1,
    "epochs": 1, "seed": 1, "asha": None,
    "data": {"image_size": 112, "batch_size": 8}, "fixed": {"strategy": "lora"},
    "params": {"rank": {"type": "int", "low": 2, "high": 8},
               "lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}},
}
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _alive_nodes(address: str, env: dict) -> list[dict]:
    script = (f"import json, ray; ray.init(address={address!r}, log_to_driver=False); "
              "print(json.dumps([n['Resources'] for n in ray.nodes() if n['Alive']]))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=120)
    return json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else []


def _stop(node: subprocess.Popen) -> None:
    """SIGTERM the node's process group, then SIGKILL what is left a second later (the GCS
    takes its time over SIGTERM)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(node.pid, sig)
        except ProcessLookupError:
            return
        time.sleep(1)
    node.wait(timeout=30)


def _wait_for_port(port: int, seconds: float) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)


@pytest.fixture
def two_node_cluster():
    """Head with 1 CPU, a second node with 2 CPUs and a ``second_node`` resource."""
    from conftest import RAY_TEMP_DIRS

    temp_dir = tempfile.mkdtemp(prefix="rc-", dir="/tmp")  # Ray's socket paths must be short
    RAY_TEMP_DIRS.append(temp_dir)  # the PHI scan in test_stages reads its logs too
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    env.pop("RAY_ADDRESS", None)
    port = _free_port()
    address = f"127.0.0.1:{port}"
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--num-cpus=1", "--dashboard-host=127.0.0.1", f"--dashboard-port={_free_port()}",
         f"--temp-dir={temp_dir}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    nodes = [head]
    try:
        _wait_for_port(port, 60)
        nodes.append(subprocess.Popen(
            [RAY, "start", "--block", f"--address={address}", "--node-ip-address=127.0.0.1",
             "--num-cpus=2", '--resources={"second_node": 1}'],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True))
        deadline = time.time() + 60
        while len(_alive_nodes(address, env)) < 2 and time.time() < deadline:
            time.sleep(1)
        yield address, env
    finally:
        for node in reversed(nodes):
            _stop(node)


def _study(run_dir):
    return optuna.load_study(study_name="resumable", storage=f"sqlite:///{run_dir / 'optuna.db'}")


def _finished(run_dir) -> list:
    if not (run_dir / "optuna.db").exists():
        return []
    try:
        return [t for t in _study(run_dir).trials if t.state.is_finished()]
    except Exception:  # noqa: BLE001 - the study may not be created yet
        return []


def test_search_on_a_two_node_cluster_survives_a_driver_kill(two_node_cluster, phantom_dir,
                                                             tmp_path):
    address, env = two_node_cluster
    resources = _alive_nodes(address, env)
    assert len(resources) == 2 and any(r.get("second_node") for r in resources)
    index = tmp_path / "index.parquet"
    build_index(phantom_dir / "manifest.csv", index, IndexSettings(salt="test-salt"))
    space = tmp_path / "resumable.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    results = tmp_path / "results"  # one folder both nodes see: they share this machine's disk
    command = [sys.executable, "-m", "angiotune.cli", "search", "--space", str(space),
               "--data", str(index), "--results", str(results), "--address", address]
    run_dir = results / "searches" / "resumable"

    log = tmp_path / "driver.log"
    with open(log, "w") as output:
        driver = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env,
                                  start_new_session=True)
    deadline = time.time() + 300
    while not _finished(run_dir) and time.time() < deadline and driver.poll() is None:
        time.sleep(0.5)
    assert driver.poll() is None, ("the search ended before it could be killed:\n"
                                   + log.read_text()[-3000:])
    before = {t.number: t.value for t in _finished(run_dir)}
    assert before, "no trial finished within five minutes"
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, env=env,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    trials = _study(run_dir).trials
    assert len({t.number for t in trials}) == len(trials) == 2  # no duplicates, no holes
    assert all(t.state.is_finished() for t in trials)
    after = {t.number: t.value for t in trials}
    assert all(after[number] == value for number, value in before.items())
    kept = {v: e for v, e in list_entries(results).items() if e}
    assert kept and all(entry["search"] == "resumable" for entry in kept.values())
    assert load_best_model(results, next(iter(kept))) is not None  # checksums verified
