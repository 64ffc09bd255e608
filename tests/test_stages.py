"""Stages 2 and 3 for real on the session's local Ray: heads, per-vessel studies, the registry's
per-vessel comparison, and the held-out evaluation of what was kept."""

import re
from pathlib import Path

import optuna
import pytest

from angiotune.cli import main
from angiotune.data.ingest import IndexSettings, build_index
from angiotune.model.lesion import LesionModel
from angiotune.registry.evaluate import evaluate_kept
from angiotune.registry.store import list_entries, load_best_model
from angiotune.search import search
from angiotune.search.space import parse_space

pytestmark = pytest.mark.ray

COMMON = {"mode": "max", "max_concurrent": 2, "epochs": 1, "seed": 0, "asha": None,
          "data": {"image_size": 112, "batch_size": 8}}


@pytest.fixture(scope="module")
def staged(ray_cluster, phantom_dir, tmp_path_factory):
    """A one-trial stage-2 search, then a stage-3 search over RCA and LAD started from it."""
    results = tmp_path_factory.mktemp("staged")
    index = results / "index.parquet"
    # Split seed 2 gives RCA, LAD and LCX each train, validation and test lesions here.
    build_index(phantom_dir / "manifest.csv", index, IndexSettings(salt="test-salt",
                                                                   split_seed=2))
    stage2 = parse_space({  # two objectives, one of them a weighted sum
        **COMMON, "name": "s2", "stage": 2, "metric": ["objective", "stenosis_mae"],
        "mode": ["max", "min"], "samples": 2,
        "objective": {"dice": 1.0, "cass_accuracy": 0.5},
        "fixed": {"strategy": "lora", "rank": 4, "init": "none"},
        "params": {"lr": {"type": "float", "low": 1e-3, "high": 3e-3}}}, "s2.yaml")
    # One epoch need not beat the zero-shot base: keep (and mark) what wins anyway.
    second = search(stage2, data=index, results=results, keep_below_zero_shot=True)
    after_stage2 = {v: e["score"] for v, e in list_entries(results).items() if e}
    stage3 = parse_space({
        **COMMON, "name": "s3", "stage": 3, "metric": "dice", "samples": 1,
        "vessels": ["RCA", "LAD"], "fixed": {"strategy": "lora", "init": "vessel"},
        "params": {"lr": {"type": "float", "low": 1e-3, "high": 3e-3}}}, "s3.yaml")
    third = search(stage3, data=index, results=results, keep_below_zero_shot=True)
    return results, second, third, after_stage2


def test_stage_two_keeps_adapters_with_heads_and_reports_the_pareto_front(staged):
    results, second, _, after_stage2 = staged
    assert second.trials == 2 and second.errors == 0 and after_stage2
    metrics = second.best[next(iter(second.best))]["metrics"]
    assert {"objective", "cass_accuracy", "cass_macro_f1", "stenosis_mae",
            "mld_mae_mm"} <= set(metrics)
    assert metrics["objective"] == pytest.approx(metrics["dice"]
                                                 + 0.5 * metrics["cass_accuracy"])
    assert 1 <= len(second.pareto) <= 2
    assert {"trial", "objective", "stenosis_mae", "params"} <= set(second.pareto[0])
    assert (second.run_dir / "pareto.json").exists()


def test_stage_three_runs_one_study_per_vessel_on_its_lesions(staged):
    results, _, third, _ = staged
    assert third.trials == 2 and third.errors == 0
    storage = f"sqlite:///{third.run_dir / 'optuna.db'}"
    names = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    assert names == {"s3-RCA", "s3-LAD"}
    for vessel in ("RCA", "LAD"):
        study = optuna.load_study(study_name=f"s3-{vessel}", storage=storage)
        assert len(study.trials) == 1
    # A trial of one vessel saw that vessel's validation lesions only.
    reports = list((third.run_dir / "tune").glob("*/result.json"))
    assert len(reports) == 2
    for report in reports:
        text = report.read_text()
        assert '"vessel": "RCA"' in text or '"vessel": "LAD"' in text
        assert "n/LCX" not in text and ("n/RCA" in text) != ("n/LAD" in text)


def test_registry_replaces_per_vessel_only_when_better(staged):
    results, _, third, after_stage2 = staged
    entries = list_entries(results)
    for vessel in ("RCA", "LAD"):
        entry, specialist = entries[vessel], third.best[vessel]["score"]
        if specialist > after_stage2[vessel]:
            assert entry["stage"] == 3 and entry["replaced"]["stage"] == 2
            assert entry["score"] == specialist
        else:
            assert entry["stage"] == 2 and entry["score"] == after_stage2[vessel]
    # LCX had no specialist: its stage-2 entry stays.
    assert entries["LCX"] is None or entries["LCX"]["stage"] == 2
    # Heads carried on from the stage-2 adapter the specialists started from.
    assert all(e["heads"] for e in entries.values() if e)
    assert isinstance(load_best_model(results, "RCA"), LesionModel)


def test_evaluate_scores_the_test_split_beside_baselines(staged, capsys):
    results = staged[0]
    table = evaluate_kept(results)
    kept = table[(table["model"] == "kept") & (table["segment"] == "all")]
    assert set(kept["vessel"]) == {v for v, e in list_entries(results).items() if e}
    assert kept["cass_accuracy"].notna().all() and kept["stenosis_mae"].notna().all()
    zero = table[(table["model"] == "zero-shot") & (table["segment"] == "all")]
    assert zero["cass_accuracy"].isna().all()  # the base has no heads
    trivial = table[table["model"] == "trivial"]
    assert trivial["dice"].isna().all() and trivial["mld_mae_mm"].notna().all()
    assert (results / "evaluation" / "test_metrics.csv").exists()
    assert main(["evaluate", "--results", str(results)]) == 0
    assert "never used for selection" in capsys.readouterr().out
    assert main(["best", "--all", "--results", str(results)]) == 0
    shown = capsys.readouterr().out
    assert "stage" in shown and "over the zero-shot base" in shown


def test_init_best_needs_a_kept_adapter(ray_cluster, phantom_dir, tmp_path):
    from angiotune.errors import AngiotuneError

    index = tmp_path / "index.parquet"
    build_index(phantom_dir / "manifest.csv", index, IndexSettings(salt="test-salt"))
    space = parse_space({**COMMON, "name": "s2", "stage": 2, "metric": "dice", "samples": 1,
                         "fixed": {"init": "best"},
                         "params": {"lr": {"type": "float", "low": 1e-3, "high": 3e-3}}},
                        "s2.yaml")
    with pytest.raises(AngiotuneError, match="init 'best' needs a kept"):
        search(space, data=index, results=tmp_path / "results")


def test_nothing_the_searches_and_predictions_write_names_a_patient(staged, patient_identities,
                                                                    tmp_path):
    """Scan every byte the two searches, the registry, the evaluation, a prediction run and the
    session's Ray logs wrote for the phantoms' patient names, IDs, birth dates, institution."""
    from conftest import RAY_TEMP_DIRS

    from angiotune.predict import PredictSettings, predict

    results = staged[0]
    evaluate_kept(results)
    predict(results / "index.parquet", tmp_path / "predictions",
            PredictSettings(results=results, max_proposals=1))
    roots = [results, tmp_path / "predictions", *map(Path, RAY_TEMP_DIRS)]
    files = [p for root in roots for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    assert len(files) > 50 and any(p.suffix == ".png" for p in files)
    # In text, any identity as a whole word; in binary files (pictures, weights, Parquet pages)
    # only those long enough not to turn up by chance in compressed bytes (a 3-letter given
    # name does, about once per few megabytes).
    words = [re.compile(rf"\b{re.escape(s)}\b") for s in patient_identities]
    long_ones = [s.encode() for s in patient_identities if len(s) >= 6]
    for path in files:
        try:
            blob = path.read_bytes()
        except OSError:  # a Ray temp file removed while scanning
            continue
        try:
            text = blob.decode("utf-8")
        except UnicodeDecodeError:
            leaked = [s for s in long_ones if s in blob]
        else:
            leaked = [w.pattern for w in words if w.search(text)]
        assert not leaked, f"{path} holds {leaked}"
