"""A real two-node Ray cluster on this machine: `ray start --head` and a second `ray start` with
resources of its own, both on 127.0.0.1. `angiotune search --address` runs on it, is killed with
SIGKILL midway (once its first trial has finished and its second has started), and `--resume`
finishes it: the finished trial keeps its result, the interrupted one is run to the end, the
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

from angiotune.model.lesion import LesionModel
from angiotune.registry.store import list_entries, load_best_model

pytestmark = pytest.mark.slow  # two Ray nodes and two searches: about a minute

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


def _alive_nodes(address: str, env: dict) -> tuple[list[dict], str]:
    """The alive nodes' resources, and what went wrong when the cluster could not be asked."""
    script = (f"import json, ray; ray.init(address={address!r}, log_to_driver=False); "
              "print(json.dumps([n['Resources'] for n in ray.nodes() if n['Alive']]))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=120)
    if done.returncode != 0:
        return [], done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), ""


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
    """Head with 1 CPU, a second node with 2 CPUs and a ``second_node`` resource; yields its
    address, the environment to reach it with, the folder of its logs and the alive nodes'
    resources."""
    temp_dir = tempfile.mkdtemp(prefix="rc-", dir="/tmp")  # Ray's socket paths must be short
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
        # Generous: on a loaded 2-core machine two `ray start`s can take over a minute.
        deadline = time.time() + 180
        alive, problem = _alive_nodes(address, env)
        while len(alive) < 2 and time.time() < deadline:
            time.sleep(1)
            alive, problem = _alive_nodes(address, env)
        if len(alive) < 2:
            pytest.fail(f"the two-node cluster did not come up in 180 s ({len(alive)} alive): "
                        f"{problem}")
        yield address, env, Path(temp_dir), alive
    finally:
        for node in reversed(nodes):
            _stop(node)


def _study(run_dir):
    return optuna.load_study(study_name="resumable", storage=f"sqlite:///{run_dir / 'optuna.db'}")


def _saved_statuses(run_dir) -> list[str]:
    """The trials' statuses in the experiment state Tune last saved in the run folder: what a
    resumed search starts from. Empty until there is one (or while it is being copied)."""
    saved = sorted((run_dir / "tune").glob("experiment_state-*.json"))
    if not saved:
        return []
    try:
        state = json.loads(saved[-1].read_text())
        return sorted(json.loads(trial)["status"] for trial, _ in state["trial_data"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _histories(run_dir) -> list[list[dict]]:
    """Every trial's reported results, in order, as Tune logged them (one list per trial)."""
    logs = sorted((run_dir / "tune").glob("*/result.json"))
    return [[json.loads(line) for line in log.read_text().splitlines()] for log in logs]


def test_search_on_a_two_node_cluster_survives_a_driver_kill(two_node_cluster, phantom_index,
                                                             phi_scan, tmp_path):
    address, env, logs, resources = two_node_cluster
    assert len(resources) == 2 and any(r.get("second_node") for r in resources)
    space = tmp_path / "resumable.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    results = tmp_path / "results"  # one folder both nodes see: they share this machine's disk
    command = [sys.executable, "-m", "angiotune.cli", "search", "--space", str(space),
               "--data", str(phantom_index.out), "--results", str(results), "--address",
               address]
    run_dir = results / "searches" / "resumable"
    # Tune saves its experiment state at every step rather than every 10 s or more, so that
    # the kill below comes at a point a resume knows exactly: the first trial saved as ended.
    env = {**env, "TUNE_GLOBAL_CHECKPOINT_S": "0"}

    log = tmp_path / "driver.log"
    with open(log, "w") as output:
        driver = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env,
                                  start_new_session=True)
    # Kill once the saved state has the first trial ended and the second started: one trial at
    # a time, so the second has yet to start, train and be evaluated, and the registry to be
    # written, far longer than a poll.
    deadline = time.time() + 300
    while (_saved_statuses(run_dir) not in (["RUNNING", "TERMINATED"],
                                            ["PENDING", "TERMINATED"])
           and time.time() < deadline and driver.poll() is None):
        time.sleep(0.2)
    assert driver.poll() is None, ("the search ended before it could be killed:\n"
                                   + log.read_text()[-3000:])
    assert time.time() < deadline, "the second trial did not start within five minutes"
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    # The state at the kill (only the driver writes the study and the result logs): the first
    # trial ended and told to Optuna, the second asked for its parameters and not yet reported.
    before = {t.number: (t.state, t.value) for t in _study(run_dir).trials}
    assert before[0][0] == optuna.trial.TrialState.COMPLETE
    assert before[1][0] == optuna.trial.TrialState.RUNNING
    assert [[r["epoch"] for r in h] for h in _histories(run_dir) if h] == [[1]]
    assert not (run_dir / "summary.json").exists()  # the search never got to its end

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, env=env,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    trials = sorted(_study(run_dir).trials, key=lambda t: t.number)
    assert [t.number for t in trials] == [0, 1]  # no duplicates, no holes
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert trials[0].value == before[0][1]
    # The ended trial was not run again; the interrupted one ran its epoch, once, and its
    # result is what Optuna holds.
    histories = [h for h in _histories(run_dir) if h]
    assert [[r["epoch"] for r in h] for h in histories] == [[1], [1]]
    by_params = {(h[0]["config"]["rank"], h[0]["config"]["lr"]): h[0]["dice"] for h in histories}
    assert {(t.params["rank"], t.params["lr"]): t.value for t in trials} == pytest.approx(
        by_params)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["trials"], summary["errors"], summary["failed"]) == (2, 0, [])
    kept = {v: e for v, e in list_entries(results).items() if e}
    assert kept and all(entry["search"] == "resumable" for entry in kept.values())
    assert all(e["trial_id"] == summary["best"][v]["trial_id"] for v, e in kept.items())
    # Checksums verified on load: the kept adapter is whole, on the tracker it was trained for.
    assert isinstance(load_best_model(results, next(iter(kept))), LesionModel)
    # Nothing the driver, the two nodes or the registry wrote names a patient.
    scanned = phi_scan([results, logs])
    assert any(logs in p.parents for p in scanned)
