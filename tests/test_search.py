"""Real searches on the session's local Ray (Tune + Optuna + ASHA over Ray Train), marked slow;
and, fast, the parts of a search that a plain call shows: the Optuna searcher's bookkeeping and a
text_box trial's adapter through the registry (the training loop itself: ``test_loop.py``)."""

import base64
import io
import json
import math
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import optuna
import pytest
import torch
from peft import PeftModel
from PIL import Image

from angiotune.cli import main
from angiotune.data.stream import load_rows
from angiotune.model.lesion import LesionModel
from angiotune.model.sam3 import load_base_model
from angiotune.registry.store import list_entries, load_best_model
from angiotune.search import search
from angiotune.search.space import parse_space

TWO_TRIALS = {
    "name": "two", "metric": "dice", "mode": "max", "samples": 2, "max_concurrent": 1,
    "epochs": 2, "seed": 0, "asha": {"grace_period": 1, "reduction_factor": 2},
    "data": {"image_size": 112, "batch_size": 8},
    "fixed": {"strategy": "lora"},
    "params": {"rank": {"type": "int", "low": 2, "high": 8},
               "lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}},
}


@pytest.fixture(scope="module")
def finished_search(ray_cluster, phantom_index, tmp_path_factory):
    """Two trials of two DDP workers each, with heads. The first trial's rank 0 is SIGKILLed
    after its first checkpoint (through the documented fault hook), so the trial must restart
    its worker group from that checkpoint.

    Also a guard: a validation set split across workers and read by rank 0 only hangs at the
    next epoch; every rank reads the whole validation split instead. Heads make DDP
    synchronise theirs too (a parameter without a gradient would stall its reduction)."""
    results = tmp_path_factory.mktemp("results")
    faults = results / "faults"
    faults.mkdir()
    (faults / "1-kill").touch()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ANGIOTUNE_FAULT_DIR", str(faults))
        space = parse_space({**TWO_TRIALS, "fixed": {"strategy": "lora", "heads": True},
                             "resources": {"workers": 2, "cpus_per_worker": 1}}, "two.yaml")
        outcome = search(space, data=phantom_index.out, results=results,
                         keep_below_zero_shot=True)
    return outcome, results


@pytest.mark.slow  # a real search on the session's Ray
@pytest.mark.ray
def test_search_runs_every_trial(finished_search):
    outcome, _ = finished_search
    assert outcome.trials == 2 and outcome.errors == 0
    assert 0.0 <= outcome.zero_shot["dice"] <= 1.0


@pytest.mark.slow  # a real search on the session's Ray
@pytest.mark.ray
def test_optuna_study_has_each_trial_once(finished_search):
    outcome, _ = finished_search
    study = optuna.load_study(study_name="two",
                              storage=f"sqlite:///{outcome.run_dir / 'optuna.db'}")
    assert len(study.trials) == 2
    assert {t.state for t in study.trials} <= {optuna.trial.TrialState.COMPLETE,
                                               optuna.trial.TrialState.PRUNED}


@pytest.mark.slow  # a real search on the session's Ray
@pytest.mark.ray
def test_a_killed_worker_restarts_its_trial_from_the_last_checkpoint(finished_search):
    outcome, results = finished_search
    assert not list((results / "faults").iterdir()), "the kill was never claimed"
    histories = [[json.loads(line) for line in path.read_text().splitlines()]
                 for path in (outcome.run_dir / "tune").glob("*/result.json")]
    restarted = [h for h in histories if any(r.get("resumed_from_epoch") == 1 for r in h)]
    assert len(restarted) == 1, histories
    assert restarted[0][-1]["epoch"] == 2  # it went on to the end after the restart
    assert outcome.errors == 0
    assert all(record["heads"] for record in outcome.best.values())


@pytest.mark.slow  # a real search on the session's Ray
@pytest.mark.ray
def test_best_adapters_are_kept_and_load_with_plain_peft(finished_search):
    _, results = finished_search
    kept = {v: e for v, e in list_entries(results).items() if e is not None}
    assert kept, "no vessel got an adapter"
    assert "general" in kept  # the best over every vessel's lesions, beside the vessels'
    for vessel, entry in kept.items():
        metric = "dice" if vessel == "general" else f"dice/{vessel}"
        assert entry["metric"] == metric and metric in entry["zero_shot"]
        # Kept with keep_below_zero_shot: marked exactly when the base alone scored as well.
        below = not entry["score"] > entry["zero_shot"][metric]
        assert entry.get("below_zero_shot", False) is below
        assert entry["config"]["strategy"] == "lora"
        folder = f"{entry['path']}/adapter"
        plain = PeftModel.from_pretrained(load_base_model(), folder)
        lora = {name: p for name, p in plain.named_parameters() if "lora_" in name}
        assert lora
        # The registry's ready model is that adapter, with the heads the trials trained.
        ready = load_best_model(results, vessel)
        assert isinstance(ready, LesionModel) and ready.heads is not None
        loaded = {name: p for name, p in ready.segmenter.named_parameters() if "lora_" in name}
        assert loaded.keys() == lora.keys()
        for name, weight in lora.items():
            torch.testing.assert_close(loaded[name], weight)
        card = (Path(entry["path"]) / "README.md").read_text()
        assert "not clinical results" in card
    assert json.loads((Path(next(iter(kept.values()))["path"]) / "manifest.json").read_text())


def test_asha_stopped_trials_are_pruned_not_complete_in_optuna(tmp_path):
    """Guard: Ray's OptunaSearch tells ASHA-stopped trials to Optuna as COMPLETE (Ray 2.60)."""
    from angiotune.search.run import _optuna_search

    space = parse_space({**TWO_TRIALS, "epochs": 4}, "two.yaml")
    searcher = _optuna_search(space, tmp_path)
    searcher.suggest("stopped")
    searcher.suggest("finished")
    early = {"dice": 0.3, "epoch": 1, "training_iteration": 1}
    searcher.on_trial_result("stopped", early)
    searcher.on_trial_complete("stopped", early)
    searcher.on_trial_complete("finished", {"dice": 0.5, "epoch": 4, "training_iteration": 4})
    study = optuna.load_study(study_name="two", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    states = [t.state for t in sorted(study.trials, key=lambda t: t.number)]
    assert states == [optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.COMPLETE]
    assert study.best_value == 0.5


def test_a_failed_trial_is_told_to_optuna_as_fail_with_its_reason(tmp_path):
    """A trial that reports ``failed`` (a NaN loss, out of memory: ``test_loop.py``) is FAIL in
    Optuna with the reason kept, and its failure report is no intermediate value; the other
    trial of the study completes as usual."""
    from angiotune.search.run import _optuna_search

    space = parse_space({**TWO_TRIALS, "name": "faults", "epochs": 1, "asha": None},
                        "faults.yaml")
    searcher = _optuna_search(space, tmp_path)
    searcher.suggest("diverged")
    searcher.suggest("fine")
    failed = {"dice": math.nan, "epoch": 1, "training_iteration": 1,
              "failed": "loss became nan in epoch 1 (diverged); try a lower lr or fp32"}
    searcher.on_trial_result("diverged", failed)
    searcher.on_trial_complete("diverged", failed)
    searcher.on_trial_complete("fine", {"dice": 0.4, "epoch": 1, "training_iteration": 1})
    study = optuna.load_study(study_name="faults",
                              storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    diverged, fine = sorted(study.trials, key=lambda t: t.number)
    assert diverged.state == optuna.trial.TrialState.FAIL
    assert diverged.user_attrs == {"failure": failed["failed"]}
    assert diverged.intermediate_values == {}
    assert fine.state == optuna.trial.TrialState.COMPLETE and fine.value == 0.4
    assert study.best_value == 0.4


def test_a_text_box_trial_keeps_a_concept_adapter(phantom_index, tmp_path):
    """What a text_box search does around its trials, without Ray: the concept model's
    zero-shot baseline, one trial trained by the loop (through the fake backend), and its
    adapter kept in the registry and loaded back on the concept model."""
    from fake_backend import FakeBackend, phantom_datasets
    from transformers import Sam3Model

    from angiotune.model.sam3 import base_model_id
    from angiotune.registry.store import promote
    from angiotune.search.api import zero_shot
    from angiotune.train.loop import ADAPTER_DIR, run_training

    baseline = zero_shot(phantom_index.out, None, 112, "text_box", batch_size=8)
    assert 0.0 <= baseline["dice"] <= 1.0
    rows, root = load_rows(phantom_index.out)
    splits = {s: rows[rows["split"] == s].reset_index(drop=True) for s in ("train", "val")}
    (tmp_path / "reports").mkdir()
    backend = FakeBackend(phantom_datasets(splits, root, 112), tmp_path / "reports")
    run_training({"epochs": 1, "batch_size": 8, "metric": "dice", "strategy": "lora",
                  "rank": 2, "lr": 5e-3, "prompt_mode": "text_box"}, backend)
    [(metrics, checkpoint)] = backend.reports
    assert 0.0 <= metrics["dice"] <= 1.0 and metrics["n"] == len(splits["val"])
    results = tmp_path / "results"
    kept, _ = promote(results, "general", checkpoint / ADAPTER_DIR, {
        "metric": "dice", "mode": "max", "score": float(metrics["dice"]),
        "validation_split": "s", "metrics": {"dice": float(metrics["dice"])},
        "zero_shot": baseline, "config": {"rank": 2}, "stage": 1, "strategy": "lora",
        "heads": False, "prompt_mode": "text_box", "base_model": base_model_id(None, "text_box"),
        "search": "text", "trial_id": "t0"})
    assert kept
    assert list_entries(results)["general"]["prompt_mode"] == "text_box"
    model = load_best_model(results, "general")
    assert isinstance(model, PeftModel) and isinstance(model.get_base_model(), Sam3Model)


@pytest.mark.slow  # starts the session's Ray
@pytest.mark.ray
def test_a_started_ray_has_its_dashboard_on_loopback_behind_a_token(local_ray):
    """Guard: ASHA-stopped trials free their workers only through the dashboard (Ray 2.60),
    so it stays on; it listens on 127.0.0.1, and an unauthenticated request to its API is
    refused (Ray 2.60 turns token authentication on for a local cluster)."""
    import urllib.error
    import urllib.request

    url = local_ray.dashboard
    assert url.startswith("127.0.0.1:")
    for _ in range(60):  # the dashboard may still be starting
        try:
            urllib.request.urlopen(f"http://{url}/nodes?view=summary", timeout=20)
        except urllib.error.HTTPError as refused:
            assert refused.code in (401, 403)
            return
        except urllib.error.URLError:
            time.sleep(0.5)
            continue
        raise AssertionError("the dashboard answered a request without the token")
    raise AssertionError(f"no dashboard at {url}")


@pytest.mark.slow  # a real search on the session's Ray
@pytest.mark.ray
def test_a_diverged_and_an_out_of_memory_trial_fail_alone(ray_cluster, phantom_index, tmp_path,
                                                          monkeypatch):
    """Faults caused for real through the documented hook (ANGIOTUNE_FAULT_DIR): one trial's
    loss turns NaN, the other's first step raises torch's out-of-memory error. Each is recorded
    as failed with its reason (FAIL in Optuna, not retried), and the search ends normally."""
    faults = tmp_path / "faults"
    faults.mkdir()
    (faults / "1-oom").touch()
    (faults / "2-nan").touch()
    monkeypatch.setenv("ANGIOTUNE_FAULT_DIR", str(faults))
    space = parse_space({**TWO_TRIALS, "name": "faults", "samples": 2, "max_concurrent": 2,
                         "epochs": 1, "asha": None}, "faults.yaml")
    results = tmp_path / "results"
    outcome = search(space, data=phantom_index.out, results=results)
    assert outcome.trials == 2 and outcome.errors == 0 and not list(faults.iterdir())
    reasons = sorted(failure["reason"] for failure in outcome.failed)
    assert len(reasons) == 2
    assert reasons[0].startswith("loss became nan in epoch 1")
    assert reasons[1].startswith("out of memory in epoch 1") and "batch_size" in reasons[1]
    study = optuna.load_study(study_name="faults",
                              storage=f"sqlite:///{outcome.run_dir / 'optuna.db'}")
    assert sorted(t.state.name for t in study.trials) == ["FAIL", "FAIL"]
    assert {t.user_attrs["failure"] for t in study.trials} == set(reasons)
    assert not any(list_entries(results).values())  # a failed trial is never kept
    summary = json.loads((outcome.run_dir / "summary.json").read_text())
    assert len(summary["failed"]) == 2


def _browser() -> str:
    """Debian's chromium, which .ci/run installs; elsewhere the test says it needs one."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have chromium for the report test (.ci/run installs it)")
        pytest.skip("needs Debian's chromium (apt-get install chromium), as .ci/run installs")
    return found


@pytest.mark.slow  # a real search on the session's Ray
@pytest.mark.ray
def test_report_renders_every_plot_in_a_headless_browser(finished_search, phantom_index,
                                                        tmp_path):
    outcome, results = finished_search
    assert main(["report", outcome.name, "--results", str(results)]) == 0
    page = outcome.run_dir / "report.html"
    profile = tmp_path / "profile"
    # The flags keep Chromium off the (closed) network; the DOM is dumped after scripts ran.
    dom = subprocess.run(
        [_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=10000",
         "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120, check=True).stdout
    sections = dict(re.findall(r"<section class=\"plot\" id=\"(\w+)\">(.*?)</section>", dom,
                               re.S))
    assert set(sections) == {"history", "importance", "parallel", "curves"}
    for key, body in sections.items():  # plotly drew an SVG: the data reached the page
        assert 'class="main-svg"' in body, f"{key} did not render"
    overlays = dom.split('id="overlays"')[1]
    pictures = re.findall(r'src="data:image/png;base64,([^"]+)"', overlays)
    rows, _ = load_rows(phantom_index.out, "val")
    assert len(pictures) == sum(min(3, len(rows) if v == "general" else
                                    int((rows["vessel"] == v).sum())) for v in outcome.best)
    image = Image.open(io.BytesIO(base64.b64decode(pictures[0])))
    assert image.size[0] == 3 * image.size[1] + 12  # truth | adapter | zero-shot
    for vessel, kept in outcome.best.items():
        board = dom.split(f"<h3>{vessel}</h3>")[1].split("</table>")[0]
        assert f'<tr class="kept"><td>{kept["trial_id"]}</td>' in board
    # Says what ran: an index the user built from phantoms is still phantoms.
    assert "Data: angiotune's synthetic phantoms (not clinical data) and the embedded" in dom
    assert "not clinical accuracy" in dom


@pytest.mark.slow  # a real search on the session's Ray
@pytest.mark.ray
def test_embedding_cache_encodes_each_crop_once_across_trials(ray_cluster, phantom_index,
                                                              tmp_path):
    """decoder_only leaves the encoder frozen: the first trial encodes every crop once, the
    second reads them all from the cache (its misses stay at zero)."""
    index = phantom_index.out
    space = parse_space({**TWO_TRIALS, "name": "cached", "epochs": 1, "asha": None,
                         "fixed": {"strategy": "decoder_only", "embedding_cache": True}},
                        "cached.yaml")
    outcome = search(space, data=index, results=tmp_path)
    assert outcome.trials == 2 and outcome.errors == 0
    rows, _ = load_rows(index)
    crops = int(rows["split"].isin(["train", "val"]).sum())
    finals = sorted((json.loads(p.read_text().splitlines()[-1])
                     for p in (outcome.run_dir / "tune").glob("*/result.json")),
                    key=lambda r: r["embedding_cache_misses"], reverse=True)
    assert [r["embedding_cache_misses"] for r in finals] == [crops, 0]
    assert finals[1]["embedding_cache_hits"] == crops
    assert len(list((tmp_path / "cache" / "embeddings").rglob("*.safetensors"))) == crops
    # One worker per trial: each trial trained in Tune's own trial process, and the second
    # reused the first one's (the training stack was imported once).
    assert finals[0]["pid"] == finals[1]["pid"]


@pytest.mark.slow  # a real search on the session's Ray
@pytest.mark.ray
def test_a_killed_single_worker_trial_resumes_from_its_last_checkpoint(ray_cluster,
                                                                       phantom_index, tmp_path,
                                                                       monkeypatch):
    """A trial of one worker trains in Tune's trial process, without a Train worker group:
    when that process dies (SIGKILL, through the documented hook), Tune restarts the trial from
    the checkpoint it keeps, and the registry finds the kept epoch's adapter there."""
    faults = tmp_path / "faults"
    faults.mkdir()
    (faults / "1-kill").touch()
    monkeypatch.setenv("ANGIOTUNE_FAULT_DIR", str(faults))
    space = parse_space({**TWO_TRIALS, "name": "killed", "samples": 1, "asha": None},
                        "killed.yaml")
    outcome = search(space, data=phantom_index.out, results=tmp_path / "results",
                     keep_below_zero_shot=True)
    assert outcome.trials == 1 and outcome.errors == 0 and not list(faults.iterdir())
    [history] = [[json.loads(line) for line in path.read_text().splitlines()]
                 for path in (outcome.run_dir / "tune").glob("*/result.json")]
    assert [(r["epoch"], r["resumed_from_epoch"]) for r in history] == [(1, 0), (2, 1)]
    assert history[0]["pid"] != history[1]["pid"]  # a new process took over
    kept = [e for e in list_entries(tmp_path / "results").values() if e is not None]
    assert kept and all((Path(e["path"]) / "adapter").is_dir() for e in kept)


@pytest.mark.slow  # a real search on the session's Ray
@pytest.mark.ray
def test_trials_are_watchable_in_tensorboard_and_optuna_dashboard(finished_search):
    from wsgiref.util import setup_testing_defaults

    from optuna_dashboard import wsgi

    outcome, _ = finished_search
    trial_dirs = [p for p in (outcome.run_dir / "tune").iterdir() if p.is_dir()]
    assert len(trial_dirs) == outcome.trials
    assert all(list(p.glob("events.out.tfevents.*")) for p in trial_dirs)  # TensorBoard's
    app = wsgi(f"sqlite:///{outcome.run_dir / 'optuna.db'}")  # what optuna-dashboard serves

    def get(path: str) -> dict:
        environ: dict = {}
        setup_testing_defaults(environ)
        environ.update(PATH_INFO=path, REQUEST_METHOD="GET")
        status = []
        body = b"".join(app(environ, lambda s, h, e=None: status.append(s)))
        assert status == ["200 OK"], (path, status, body[:200])
        return json.loads(body)

    [summary] = get("/api/studies")["study_summaries"]
    assert summary["study_name"] == "two"
    assert len(get(f"/api/studies/{summary['study_id']}")["trials"]) == outcome.trials


@pytest.mark.slow  # a real search on the session's Ray
@pytest.mark.ray
def test_paths_inside_a_search_folder_stay_short_for_windows(finished_search):
    """Windows refuses paths past 260 characters: a search's own folders (short trial names,
    not Tune's ~170-character defaults) leave most of that to the user's results folder."""
    outcome, _ = finished_search
    longest = max((p.relative_to(outcome.run_dir).as_posix() for p in outcome.run_dir.rglob("*")),
                  key=len)
    assert len(longest) <= 120, longest
