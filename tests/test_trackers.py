"""Experiment trackers (a space's ``callbacks``): the section validates naming the key, the
callbacks are built with their stores resolved, and, slow, a real search's trials read back from
MLflow's SQLite store and W&B's offline runs with those libraries' own readers."""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from angiotune.data.stream import load_rows
from angiotune.errors import ConfigError
from angiotune.search.space import load_space, parse_space
from angiotune.search.trackers import is_uri, logger_callbacks, mlflow_uri

SPACE = {
    "name": "tracked", "metric": "dice", "mode": "max", "samples": 2, "max_concurrent": 2,
    "epochs": 2, "seed": 0, "asha": None, "data": {"image_size": 112, "batch_size": 8},
    "fixed": {"strategy": "lora"},
    "params": {"rank": {"type": "int", "low": 2, "high": 8},
               "lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}},
}


def test_a_callbacks_section_turns_trackers_on_with_their_settings(tmp_path):
    path = tmp_path / "tracked.yaml"
    path.write_text(json.dumps({**SPACE, "callbacks": {
        "mlflow": None, "wandb": {"project": "angio", "mode": "offline"}}}))
    assert load_space(path).callbacks == {"mlflow": {}, "wandb": {"project": "angio",
                                                                  "mode": "offline"}}
    assert parse_space(SPACE, "plain.yaml").callbacks == {}  # off unless asked for
    # The command line's --set reaches the nested settings.
    space = load_space(path, ["callbacks.mlflow.experiment=mine", "callbacks.wandb={}"])
    assert space.callbacks == {"mlflow": {"experiment": "mine"}, "wandb": {}}


@pytest.mark.parametrize(("callbacks", "key"), [
    (["mlflow"], "callbacks"),
    ({"tensorboard": {}}, "callbacks.tensorboard"),
    ({"mlflow": True}, "callbacks.mlflow"),
    ({"mlflow": {"uri": "mlflow.db"}}, "callbacks.mlflow.uri"),
    ({"mlflow": {"tracking_uri": "mlruns"}}, "callbacks.mlflow.tracking_uri"),
    ({"mlflow": {"experiment": ""}}, "callbacks.mlflow.experiment"),
    ({"wandb": {"mode": "cloud"}}, "callbacks.wandb.mode"),
    ({"wandb": {"project": 7}}, "callbacks.wandb.project"),
])
def test_a_bad_callbacks_section_is_refused_naming_the_file_and_key(callbacks, key):
    with pytest.raises(ConfigError, match=rf"^bad\.yaml: {key}: "):
        parse_space({**SPACE, "callbacks": callbacks}, "bad.yaml")


def test_a_tracker_that_is_not_installed_is_refused_before_ray(monkeypatch):
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name == "wandb" else found(name, *rest))
    with pytest.raises(ConfigError, match=r"callbacks\.wandb: .*pip install 'angiotune\[trackers"):
        parse_space({**SPACE, "callbacks": {"wandb": {}}}, "t.yaml")


def test_loading_a_space_with_trackers_imports_neither_tracker():
    code = ("import sys; from angiotune.search.space import parse_space; "
            "import angiotune.search.run, angiotune.search.trackers; "
            f"parse_space({{**{SPACE!r}, 'callbacks': {{'mlflow': {{}}, 'wandb': {{}}}}}}, 's'); "
            "print(sorted(m for m in ('mlflow', 'wandb', 'torch') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, check=True)
    assert ast.literal_eval(done.stdout.strip().splitlines()[-1]) == []


def test_paths_name_sqlite_stores_under_the_search_folder(tmp_path):
    assert mlflow_uri("mlflow.db", tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert mlflow_uri(str(tmp_path / "x.db"), Path("elsewhere")) == f"sqlite:///{tmp_path}/x.db"
    for uri in ("http://127.0.0.1:5000", "sqlite:////srv/mlflow.db"):
        assert mlflow_uri(uri, tmp_path) == uri
    assert not is_uri(r"C:\results\mlflow.db")  # a Windows path, not a scheme


@pytest.mark.slow
def test_the_builder_makes_tune_callbacks_with_resolved_stores(tmp_path):
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.air.integrations.wandb import WandbLoggerCallback

    said = []
    mlflow, wandb = logger_callbacks({"mlflow": {}, "wandb": {"entity": "team"}}, tmp_path,
                                     "s1", said.append)
    assert isinstance(mlflow, MLflowLoggerCallback) and isinstance(wandb, WandbLoggerCallback)
    uri = f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert (mlflow.tracking_uri, mlflow.experiment_name) == (uri, "s1")
    assert (tmp_path / "mlflow.db").is_file()  # the store was opened before Tune starts
    assert (wandb.project, wandb.group) == ("angiotune", "s1")
    assert wandb.kwargs == {"mode": "offline", "dir": str(tmp_path), "entity": "team"}
    assert f"mlflow ui --backend-store-uri {uri}" in said[0]
    assert f"wandb sync {tmp_path / 'wandb'}" in said[1]
    server = "http://127.0.0.1:9"  # passed on as given; a server is not contacted yet
    [named] = logger_callbacks({"mlflow": {"experiment": "e", "tracking_uri": server}},
                               tmp_path, "s2")
    assert (named.tracking_uri, named.experiment_name) == (server, "e")
    assert logger_callbacks({}, tmp_path, "s3") == []


def test_a_folder_store_that_mlflow_refuses_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(ConfigError, match="^callbacks.mlflow.tracking_uri: file:"):
        logger_callbacks({"mlflow": {"tracking_uri": (tmp_path / "runs").as_uri()}}, tmp_path,
                         "s")


def test_online_wandb_without_a_login_is_a_config_error(tmp_path, monkeypatch):
    for name in ("WANDB_API_KEY", "WANDB_MODE", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a key
    with pytest.raises(ConfigError, match="callbacks.wandb.mode: online: .*wandb login"):
        logger_callbacks({"wandb": {"mode": "online"}}, tmp_path, "s")


def _wandb_records(run_dir: Path) -> list[dict]:
    """A W&B offline run's records, as wandb's own reader (``wandb leet inspect``) prints them."""
    done = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json",
                           str(run_dir)], capture_output=True, text=True, timeout=120,
                          check=True)
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow  # a real search on the session's Ray
@pytest.mark.ray
def test_each_trial_is_an_mlflow_and_a_wandb_run_with_its_params_and_epochs(
        ray_cluster, phantom_index, phi_scan, tmp_path):
    from mlflow.tracking import MlflowClient

    from angiotune.search import search

    space = parse_space({**SPACE, "callbacks": {"mlflow": {}, "wandb": {"project": "p"}}},
                        "tracked.yaml")
    said: list[str] = []
    outcome = search(space, data=phantom_index.out, results=tmp_path, announce=said.append)
    assert outcome.trials == 2 and outcome.errors == 0
    # What Tune itself wrote per epoch, the truth to compare with; TensorBoard's files as ever.
    trials = {}
    for folder in (outcome.run_dir / "tune").glob("t-*"):
        epochs = [json.loads(line) for line in (folder / "result.json").read_text().splitlines()]
        trials[f"t-{epochs[0]['trial_id']}"] = epochs
        assert list(folder.glob("events.out.tfevents.*"))
    assert len(trials) == 2 and all(len(epochs) == 2 for epochs in trials.values())
    uri = f"sqlite:///{outcome.run_dir}/mlflow.db"
    assert any(uri in line for line in said)

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("tracked")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(run.info.run_name for run in runs) == sorted(trials)
    for run in runs:
        epochs = trials[run.info.run_name]
        config = epochs[0]["config"]
        # The hyperparameters and nothing else: no index path or other constant.
        assert run.data.params == {key: str(value) for key, value in config.items()}
        assert set(config) == {"rank", "lr", "strategy"}
        assert run.info.status == "FINISHED" and run.data.tags["search"] == "tracked"
        history = client.get_metric_history(run.info.run_id, "dice")
        assert [m.step for m in history] == [1, 2]
        assert [m.value for m in history] == [e["dice"] for e in epochs]
        assert all(math.isfinite(m.value) for m in history)
        losses = client.get_metric_history(run.info.run_id, "train_loss")
        assert [m.value for m in losses] == [e["train_loss"] for e in epochs]

    wandb_runs = sorted((outcome.run_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2
    for folder in wandb_runs:
        records = _wandb_records(folder)
        [run] = [r["run"] for r in records if r["type"] == "run"]
        epochs = trials[run["display_name"]]
        assert (run["project"], run["run_group"]) == ("p", "tracked")
        config = run["config"]["update"]
        assert {k: config[k] for k in ("rank", "lr", "strategy")} == epochs[0]["config"]
        history = [r["history"]["item"] for r in records if r["type"] == "history"]
        assert [h["dice"] for h in history] == [e["dice"] for e in epochs]

    # Nothing the trackers wrote names a patient or a sample, or where the index lies.
    rows, _ = load_rows(phantom_index.out)
    stores = [outcome.run_dir / "mlflow.db", outcome.run_dir / "wandb"]
    assert len(phi_scan(stores)) > 2
    secrets = [str(phantom_index.out).encode(), *(s.encode() for s in rows["sample_id"])]
    for path in [stores[0], *stores[1].rglob("*")]:
        if path.is_file():
            blob = path.read_bytes()
            assert not [s for s in secrets if s in blob], path
