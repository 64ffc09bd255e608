"""Stages 2 and 3 for real on the session's local Ray (slow): heads, per-vessel studies, the
registry's per-vessel comparison, and the held-out evaluation of what was kept. Fast: what a
stage-3 search competes for in the registry, and a refused ``init``."""

import os

import optuna
import pytest
from ingest_helpers import corrupt_copy

from angiotune.cli import main
from angiotune.data.ingest import IndexSettings, build_index
from angiotune.evaluation.test_split import evaluate_kept
from angiotune.model.lesion import LesionModel
from angiotune.registry.store import list_entries, load_best_model
from angiotune.search import search
from angiotune.search.space import parse_space

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


@pytest.mark.slow  # the staged searches run on the session's Ray
@pytest.mark.ray
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


@pytest.mark.slow  # the staged searches run on the session's Ray
@pytest.mark.ray
def test_stage_three_runs_one_study_per_vessel_on_its_lesions(staged):
    results, _, third, _ = staged
    assert third.trials == 2 and third.errors == 0
    # Same lesions, weights and sizes as stage 2: its zero-shot baseline, not a second pass.
    assert third.zero_shot_reused and third.zero_shot == staged[1].zero_shot
    storage = f"sqlite:///{third.run_dir / 'optuna.db'}"
    names = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    assert names == {"s3-RCA", "s3-LAD"}
    for vessel in ("RCA", "LAD"):
        study = optuna.load_study(study_name=f"s3-{vessel}", storage=storage)
        assert len(study.trials) == 1
    # A trial of one vessel saw that vessel's validation lesions only.
    reports = list((third.run_dir / "tune").glob("*/result.json"))
    assert len(reports) == 2
    seen = set()
    for report in reports:
        text = report.read_text()
        [vessel] = [v for v in ("RCA", "LAD", "LCX") if f'"vessel": "{v}"' in text]
        assert vessel in ("RCA", "LAD"), vessel
        seen.add(vessel)
        other = "LAD" if vessel == "RCA" else "RCA"
        assert f"n/{vessel}" in text and f"n/{other}" not in text and "n/LCX" not in text
    assert seen == {"RCA", "LAD"}  # one trial per vessel


@pytest.mark.slow  # the staged searches run on the session's Ray
@pytest.mark.ray
def test_registry_replaces_per_vessel_only_when_better(staged):
    """Which way each vessel goes depends on what one epoch learned; both ways are pinned
    down, with fixed scores, by test_a_stage_three_search_competes_for_its_vessels_only."""
    results, _, third, after_stage2 = staged
    entries = list_entries(results)
    for vessel in ("RCA", "LAD"):
        entry, specialist = entries[vessel], third.best[vessel]["score"]
        # The better of the two (stage, score, the stage of what it replaced).
        expected = ((3, specialist, 2) if specialist > after_stage2[vessel]
                    else (2, after_stage2[vessel], None))
        assert (entry["stage"], entry["score"],
                (entry.get("replaced") or {}).get("stage")) == expected
    # LCX had no specialist: its stage-2 entry (kept below zero-shot if need be) stays.
    assert entries["LCX"]["stage"] == 2 and entries["LCX"]["score"] == after_stage2["LCX"]
    # Heads carried on from the stage-2 adapter the specialists started from.
    assert all(e["heads"] for e in entries.values() if e)
    assert isinstance(load_best_model(results, "RCA"), LesionModel)


@pytest.mark.slow  # the staged searches run on the session's Ray
@pytest.mark.ray
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


def test_init_best_needs_a_kept_adapter(phantom_index, tmp_path):
    """Refused before Ray starts: nothing to start from in an empty registry."""
    from angiotune.errors import AngiotuneError

    space = parse_space({**COMMON, "name": "s2", "stage": 2, "metric": "dice", "samples": 1,
                         "fixed": {"init": "best"},
                         "params": {"lr": {"type": "float", "low": 1e-3, "high": 3e-3}}},
                        "s2.yaml")
    with pytest.raises(AngiotuneError, match="init 'best' needs a kept"):
        search(space, data=phantom_index.out, results=tmp_path / "results")


def test_a_stage_three_search_competes_for_its_vessels_only(tmp_path):
    """What the staged searches show for whatever one epoch learned, with fixed scores: a
    stage-3 search competes for its own vessels' entries only, each on that vessel's metric; a
    specialist that scores higher replaces the stage-2 entry (which it names), one that scores
    lower leaves it, and a vessel without a specialist keeps its entry."""
    from angiotune.model.adapters import AdapterSettings, adapt, save_adapter
    from angiotune.model.sam3 import base_model_id, load_base_model
    from angiotune.registry.store import promote, registry_metric
    from angiotune.search.api import registry_keys

    stage3 = parse_space({**COMMON, "name": "s3", "stage": 3, "metric": "dice", "samples": 1,
                          "vessels": ["RCA", "LAD"], "fixed": {"strategy": "lora",
                                                               "init": "vessel"},
                          "params": {"lr": {"type": "float", "low": 1e-3, "high": 3e-3}}},
                         "s3.yaml")
    assert registry_keys(stage3) == ("RCA", "LAD")
    assert [registry_metric(stage3.select, v) for v in ("RCA", "LAD")] == ["dice/RCA",
                                                                          "dice/LAD"]
    settings = AdapterSettings(rank=2)
    adapter = tmp_path / "adapter"
    save_adapter(adapt(load_base_model(), settings), settings, adapter, base_model_id())
    results = tmp_path / "results"

    def keep(vessel: str, stage: int, score: float) -> bool:
        kept, _ = promote(results, vessel, adapter, {
            "metric": f"dice/{vessel}", "mode": "max", "score": score, "stage": stage,
            "validation_split": "s", "metrics": {}, "zero_shot": {}, "config": {"rank": 2},
            "strategy": "lora", "heads": False, "base_model": base_model_id(),
            "search": f"s{stage}", "trial_id": f"t{stage}"})
        return kept

    assert all(keep(vessel, 2, 0.5) for vessel in ("RCA", "LAD", "LCX"))
    assert keep("RCA", 3, 0.6) is True
    assert keep("LAD", 3, 0.4) is False
    entries = list_entries(results)
    assert (entries["RCA"]["stage"], entries["RCA"]["score"]) == (3, 0.6)
    assert entries["RCA"]["replaced"]["stage"] == 2 and entries["RCA"]["replaced"]["score"] == 0.5
    assert (entries["LAD"]["stage"], entries["LAD"]["score"]) == (2, 0.5)
    assert (entries["LCX"]["stage"], entries["LCX"]["score"]) == (2, 0.5)


@pytest.mark.slow  # the staged searches run on the session's Ray
@pytest.mark.ray
def test_nothing_the_searches_and_predictions_write_names_a_patient(staged, local_ray, phi_scan,
                                                                    tmp_path):
    """Scan every byte the two searches, the registry, the evaluation, a prediction run and the
    session's Ray logs wrote for the phantoms' patient names, IDs, birth dates, institution."""
    from angiotune.predict import PredictSettings, predict

    results = staged[0]
    evaluate_kept(results)
    predict(results / "index.parquet", tmp_path / "predictions",
            PredictSettings(results=results, max_proposals=1))
    files = phi_scan([results, tmp_path / "predictions", local_ray.temp_dir])
    assert len(files) > 50 and any(p.suffix == ".png" for p in files)
    assert any(local_ray.temp_dir in p.parents for p in files)  # the Ray logs were read


def test_the_zero_shot_baseline_is_reused_only_for_the_same_question(phantom_dir, tmp_path):
    from angiotune.data.stream import load_rows
    from angiotune.search.api import zero_shot_key

    data = corrupt_copy(phantom_dir, tmp_path)
    index = build_index(data / "manifest.csv", tmp_path / "index.parquet",
                        IndexSettings(salt="test-salt")).out
    raw = {**COMMON, "name": "s", "metric": "dice", "samples": 1, "fixed": {"strategy": "lora"},
           "params": {"lr": {"type": "float", "low": 1e-3, "high": 3e-3}}}
    space = parse_space(raw, "s.yaml")
    key = zero_shot_key(space, index, None, "embedded:abc", "box")
    assert key is not None and zero_shot_key(space, index, None, "embedded:abc", "box") == key
    larger = parse_space({**raw, "data": {"image_size": 128, "batch_size": 8}}, "s.yaml")
    wider = parse_space({**raw, "fixed": {"strategy": "lora", "crop_context": 4.0}}, "s.yaml")
    gpu = parse_space({**raw, "resources": {"gpus_per_worker": 1}}, "s.yaml")
    others = {zero_shot_key(larger, index, None, "embedded:abc", "box"),
              zero_shot_key(wider, index, None, "embedded:abc", "box"),
              zero_shot_key(gpu, index, None, "embedded:abc", "box"),
              zero_shot_key(space, index, None, "sam3@def", "box"),
              zero_shot_key(space, index, None, "embedded:abc", "text_box")}
    assert key not in others and len(others) == 5
    # A validation frame rewritten in place (same index) is another question.
    rows, root = load_rows(index, "val")
    frame = root / rows["image_path"].iloc[0]
    stat = frame.stat()
    os.utime(frame, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert zero_shot_key(space, index, None, "embedded:abc", "box") != key
    # A validation file the driver cannot see: no key, so no cache; the trials report it.
    frame.unlink()
    assert zero_shot_key(space, index, None, "embedded:abc", "box") is None
