"""Indexes and inputs without calibration (ARCADE-like): evaluation and prediction in pixels,
the general registry entry, and the lesion-detection score of the proposals.

The uncalibrated index is the session's NPY phantom index as a COCO import would leave it: no
pixel spacing, no mm measurements, some lesions of no vessel ("UNKNOWN", no segment), and one
test frame holding two annotated lesions.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from angiotune.cli import main
from angiotune.evaluation.detection import evaluate_detection
from angiotune.evaluation.test_split import evaluate_kept, trivial_predictions
from angiotune.model.adapters import AdapterSettings, adapt, save_adapter
from angiotune.model.sam3 import base_model_id, load_base_model
from angiotune.predict import PredictSettings, predict
from angiotune.predict.detection import FrameMatch, box_iou, match_boxes, score_frames
from angiotune.qca.pixels import in_pixels
from angiotune.registry.store import GENERAL, promote

MM_COLUMNS = ("mld_mm", "rvd_mm", "lesion_length_mm", "proximal_diameter_mm",
              "distal_diameter_mm")


def _strict_json(text: str):
    return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))


def _mm_keys(value) -> list[str]:
    """Every key, at any depth, that claims millimetres."""
    if isinstance(value, dict):
        return [k for k in value if str(k).endswith("_mm") or k == "mm_per_pixel"] + \
            [k for v in value.values() for k in _mm_keys(v)]
    if isinstance(value, list):
        return [k for v in value for k in _mm_keys(v)]
    return []


# --- detection matching ------------------------------------------------------------------------

def test_box_iou_of_half_open_pixel_boxes():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 20, 20), (0, 0, 10, 10)) == 0.25  # contains it, four times the area
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # edges touch, no pixel shared
    assert box_iou((0, 0, 10, 10), (3, 3, 3, 8)) == 0.0  # no area


def test_matching_is_one_to_one_greedy_from_the_highest_iou():
    truth = [(0, 0, 10, 10), (20, 0, 30, 10)]
    # The same lesion proposed twice: one hit, one false positive.
    twice = match_boxes([(0, 0, 10, 10), (1, 0, 11, 10)], truth[:1])
    assert twice.true_positives == 1 and twice.pairs[0][:2] == (0, 0)
    assert twice.f1 == pytest.approx(2 / 3)
    # Greedy, not the largest matching: A takes T0 (IoU 0.9) though A-T1 and B-T0 (0.5 each)
    # would have made two pairs.
    t0, t1 = (0, 0, 10, 10), (0, 0, 4.5, 10)
    a, b = (0, 0, 9, 10), (5, 0, 10, 10)
    assert [box_iou(a, t0), box_iou(a, t1), box_iou(b, t0), box_iou(b, t1)] == \
        pytest.approx([0.9, 0.5, 0.5, 0.0])
    greedy = match_boxes([a, b], [t0, t1])
    assert [(i, j) for i, j, _ in greedy.pairs] == [(0, 0)]
    assert (greedy.proposals, greedy.truths, greedy.true_positives) == (2, 2, 1)
    # The threshold is inclusive, and it decides.
    assert match_boxes([(0, 0, 20, 20)], [(0, 0, 10, 10)]).true_positives == 1  # IoU 0.25
    assert match_boxes([(0, 0, 20, 20)], [(0, 0, 10, 10)], iou_threshold=0.5).true_positives == 0
    with pytest.raises(ValueError):
        match_boxes([], [], iou_threshold=0)


def test_empty_frames_and_scores():
    nothing = match_boxes([], [])
    assert (nothing.proposals, nothing.truths, nothing.f1) == (0, 0, 1.0)
    missed = match_boxes([], [(0, 0, 5, 5)])
    assert missed.f1 == 0.0
    score = score_frames([missed])
    assert math.isnan(score.precision) and score.recall == 0.0 and score.f1 == 0.0
    spurious = score_frames([match_boxes([(0, 0, 5, 5)], [])])
    assert spurious.precision == 0.0 and math.isnan(spurious.recall)
    assert math.isnan(score_frames([]).mean_image_f1)


def test_pooled_f1_and_mean_image_f1_differ_as_they_should():
    hit = match_boxes([(0, 0, 10, 10)], [(0, 0, 10, 10)])  # F1 1
    crowded = FrameMatch(proposals=1, truths=3, pairs=())  # F1 0
    score = score_frames([hit, crowded])
    assert (score.true_positives, score.proposals, score.truths) == (1, 2, 4)
    assert score.precision == 0.5 and score.recall == 0.25
    assert score.f1 == pytest.approx(2 / 6)  # pooled: the crowded frame weighs more
    assert score.mean_image_f1 == 0.5  # per image: each frame counts once


# --- pixel-only QCA ----------------------------------------------------------------------------

def test_pixel_reports_rename_every_mm_and_keep_ratios():
    report = {"MLD_mm": 3.0, "diameter_stenosis_pct": 50.0, "mm_per_pixel": 1.0,
              "diameter_function": {"arclength_mm": [0.0, 1.0]}, "notes": ["x"]}
    assert in_pixels(report) == {"MLD_px": 3.0, "diameter_stenosis_pct": 50.0,
                                 "diameter_function": {"arclength_px": [0.0, 1.0]},
                                 "notes": ["x"]}
    assert in_pixels(None) is None


def test_trivial_baseline_without_any_measurement():
    rows = pd.DataFrame({"sample_id": ["a", "b"], "vessel": ["UNKNOWN"] * 2, "segment": ["", ""],
                         **{c: [math.nan] * 2 for c in ("diameter_stenosis_pct", "mld_mm",
                                                        "rvd_mm")}})
    trivial = trivial_predictions(rows, rows)
    assert trivial["segment_pred"].eq("").all()
    assert trivial[["stenosis_pct_pred", "mld_mm_pred", "rvd_mm_pred"]].isna().all().all()


# --- an uncalibrated index and a registry with a general entry ---------------------------------

@pytest.fixture(scope="module")
def uncalibrated(phantom_index_npy, tmp_path_factory) -> Path:
    """The NPY phantom index without calibration; the patient whose frame holds two lesions
    moves to the test split, and the RCA test lesions lose their vessel."""
    source = pq.read_table(phantom_index_npy.out)
    rows = source.to_pandas()
    shared = rows.groupby(["image_path", "frame_index"])["sample_id"].transform("size") > 1
    assert shared.any(), "the phantom export has no frame with two lesions any more"
    rows.loc[rows["patient_key"].isin(rows.loc[shared, "patient_key"]), "split"] = "test"
    unknown = (rows["split"] == "test") & ((rows["vessel"] == "RCA") | shared)
    unknown |= rows.index == rows.index[rows["split"] == "train"][0]
    rows.loc[unknown, ["vessel", "segment", "segment_name"]] = ["UNKNOWN", "", ""]
    rows.loc[unknown, "diameter_stenosis_pct"] = math.nan  # an outline says no %DS either
    rows["pixel_spacing_mm"] = math.nan
    rows["spacing_source"] = "none"
    rows[list(MM_COLUMNS)] = math.nan
    assert (rows["split"] == "train").any() and (rows["vessel"] == "LAD").any()
    table = pa.Table.from_pandas(rows, schema=source.schema, preserve_index=False)
    out = tmp_path_factory.mktemp("uncalibrated") / "lesions.parquet"
    pq.write_table(table.replace_schema_metadata(source.schema.metadata), out)
    return out


@pytest.fixture(scope="module")
def kept(uncalibrated, tmp_path_factory) -> Path:
    """A registry holding a general adapter and an LAD one (untrained, no heads), both
    searched on the uncalibrated index."""
    results = tmp_path_factory.mktemp("results")
    settings = AdapterSettings(rank=2)
    torch.manual_seed(0)
    for key in (GENERAL, "LAD"):
        folder = results.parent / f"adapter-{key}"
        save_adapter(adapt(load_base_model(), settings), settings, folder, base_model_id())
        promote(results, key, folder, {
            "metric": "dice" if key == GENERAL else f"dice/{key}", "mode": "max", "score": 0.5,
            "validation_split": "s", "metrics": {}, "zero_shot": {}, "config": {"rank": 2},
            "stage": 1, "strategy": "lora", "heads": False, "base_model": base_model_id(),
            "search": "test", "trial_id": "t0", "index": str(uncalibrated)})
    return results


def test_evaluate_scores_the_general_entry_on_every_test_lesion_in_pixels(uncalibrated, kept):
    rows = pq.read_table(uncalibrated).to_pandas()
    test = rows[rows["split"] == "test"]
    table = evaluate_kept(kept)
    overall = table[table["segment"] == "all"].set_index(["vessel", "model"])
    assert overall.loc[(GENERAL, "kept"), "n"] == len(test)  # UNKNOWN lesions included
    assert overall.loc[("LAD", "kept"), "n"] == (test["vessel"] == "LAD").sum()
    assert overall.loc[(GENERAL, "kept"), "dice"] >= 0
    # No millimetres anywhere; % stenosis where the truth has it (the LAD lesions).
    assert table[["mld_mae_mm", "rvd_mae_mm"]].isna().all().all()
    assert math.isfinite(overall.loc[(GENERAL, "trivial"), "stenosis_mae"])
    assert "" not in set(table["segment"])  # no per-segment row for lesions without one
    [note] = table.attrs["notes"]
    assert "no calibration" in note and "mm columns not reported" in note
    written = kept / "evaluation"
    records = _strict_json((written / "test_metrics.json").read_text())
    assert all(r["mld_mae_mm"] is None for r in records)
    markdown = (written / "test_metrics.md").read_text()
    assert "| general | all | kept (stage 1) |" in markdown and "no calibration" in markdown


@pytest.mark.slow
def test_evaluate_on_another_index_scores_vessel_adapters_on_unnamed_lesions_too(
        uncalibrated, kept, phantom_index_npy, capsys):
    """Transfer (phantom-trained adapters on ARCADE): --data scores every entry on that index's
    test split; a lesion whose vessel nobody named is scored by each vessel's adapter, and the
    tables are written apart from the searched index's."""
    rows = pq.read_table(uncalibrated).to_pandas()
    test = rows[rows["split"] == "test"]
    table = evaluate_kept(kept, data=uncalibrated)
    overall = table[table["segment"] == "all"].set_index(["vessel", "model"])
    assert overall.loc[("LAD", "kept"), "n"] == test["vessel"].isin(["LAD", "UNKNOWN"]).sum()
    assert overall.loc[(GENERAL, "kept"), "n"] == len(test)
    assert (kept / "evaluation" / f"test_metrics_on_{uncalibrated.stem}.json").exists()
    assert main(["evaluate", "--results", str(kept), "--vessel", "lad", "--data",
                 str(phantom_index_npy.out)]) == 0
    printed = capsys.readouterr().out
    assert f"detection_LAD_on_{phantom_index_npy.out.stem}.json" in printed
    assert main(["evaluate", "--results", str(kept), "--data", str(kept / "none.parquet")]) == 2


def test_detection_is_scored_once_per_index_against_every_box_of_a_frame(uncalibrated, kept):
    rows = pq.read_table(uncalibrated).to_pandas()
    test = rows[rows["split"] == "test"]
    frames = test.groupby(["image_path", "frame_index"]).size()
    assert frames.max() == 2  # one test frame holds two lesions
    table = evaluate_detection(kept, max_proposals=2)
    [row] = table.to_dict("records")  # two entries, one index: one score
    assert row["vessels"] == "all" and row["index"] == uncalibrated.name
    assert row["frames"] == len(frames) and row["truths"] == len(test)
    assert 0 <= row["true_positives"] <= min(row["proposals"], row["truths"])
    assert row["proposals"] <= 2 * row["frames"]
    if row["proposals"]:
        assert row["precision"] == pytest.approx(row["true_positives"] / row["proposals"])
    assert 0 <= row["mean_image_f1"] <= 1
    saved = _strict_json((kept / "evaluation" / "detection.json").read_text())
    assert "IoU >= 0.25" in saved["rule"] and "not like-for-like" in saved["rule"]
    assert saved["indexes"][0]["frames"] == len(frames)
    # One vessel's entry: its lesions' frames only.
    [lad] = evaluate_detection(kept, "LAD").to_dict("records")
    assert lad["vessels"] == "LAD" and lad["frames"] == (test["vessel"] == "LAD").sum()


def test_cli_evaluate_general_prints_pixel_only_scores_and_detection(kept, capsys):
    assert main(["evaluate", "--results", str(kept), "--vessel", "General",
                 "--match-iou", "0.3"]) == 0
    captured = capsys.readouterr()
    printed = " ".join(captured.out.split())
    assert "Traceback" not in captured.err
    assert "general" in printed and "no calibration" in printed
    assert "Lesion detection" in printed and "IoU >= 0.3" in printed
    assert "box-matching" in printed and "0.535" in printed
    assert (kept / "evaluation" / "test_metrics_general.csv").exists()
    assert (kept / "evaluation" / "detection_general.md").exists()


# --- predict without calibration ---------------------------------------------------------------

def test_cli_predicts_an_npy_without_spacing_in_pixels_with_the_general_adapter(
        phantom_dir, kept, tmp_path, capsys):
    npy = sorted((phantom_dir / "cines").glob("*.npy"))[0]
    out = tmp_path / "px"
    assert main(["predict", str(npy), "--box", "100,100,160,150", "--frame", "2",
                 "--out", str(out), "--results", str(kept)]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "skipped" not in captured.err
    printed = " ".join(captured.out.split())
    assert "no calibration: mm values not reported" in printed
    [written] = sorted(out.glob("*_lesion1.json"))
    report = _strict_json(written.read_text())
    assert report["units"] == "px" and report["input"]["pixel_spacing_mm"] is None
    assert report["input"]["spacing_source"] == "none"
    assert "carries no pixel spacing" in report["input"]["calibration"]
    # No angles, no CASS head: the general adapter, and the reason says so.
    assert report["adapter"]["vessel"] == GENERAL
    assert "started from the general adapter" in report["routing"]["reason"]
    assert not _mm_keys(report["qca"]) and not _mm_keys(report["contours"])
    if "error" not in report["qca"]:
        assert report["qca"]["MLD_px"] > 0 and "px" in printed
        assert 0 <= report["qca"]["diameter_stenosis_pct"] <= 100
    assert (out / written.name.replace(".json", ".png")).exists()  # the overlay in px


def test_a_folder_of_png_frames_is_predicted_frame_by_frame(phantom_dir, kept, tmp_path):
    """ARCADE-style frames (8-bit PNG, a cine of one frame) in a folder, beside a stray file."""
    import numpy as np
    from PIL import Image

    frames = tmp_path / "frames"
    frames.mkdir()
    cine = np.load(sorted((phantom_dir / "cines").glob("*.npy"))[0])
    Image.fromarray((cine[2] * 255).astype(np.uint8)).save(frames / "1.png")
    (frames / "notes.txt").write_text("not a frame")
    summary = predict(frames, tmp_path / "o", PredictSettings(
        results=kept, box=(100, 100, 160, 150), overlays=False))
    [lesion] = summary.lesions
    assert lesion.report["input"]["kind"] == "png" and lesion.report["input"]["frames"] == 1
    assert lesion.report["units"] == "px" and not summary.failures


def test_a_route_to_a_vessel_without_an_adapter_takes_the_general_one(phantom_dir, kept,
                                                                      tmp_path):
    npy = sorted((phantom_dir / "cines").glob("*.npy"))[0]
    summary = predict(npy, tmp_path / "o", PredictSettings(
        results=kept, box=(100, 100, 160, 150), angles=(-25.0, -25.0), overlays=False))
    [lesion] = summary.lesions
    assert lesion.report["adapter"]["vessel"] == GENERAL
    assert "no LCX adapter is kept, so the general adapter" in \
        lesion.report["routing"]["reason"]
    explicit = predict(npy, tmp_path / "e", PredictSettings(
        results=kept, box=(100, 100, 160, 150), vessel=GENERAL, overlays=False))
    assert explicit.lesions[0].report["routing"]["reason"] == \
        "set by the user (--vessel general)"


@pytest.mark.slow
def test_an_uncalibrated_index_and_a_dicom_without_magnification_are_measured_in_pixels(
        phantom_dir, uncalibrated, kept, tmp_path):
    import pydicom

    summary = predict(uncalibrated, tmp_path / "index", PredictSettings(results=kept,
                                                                        overlays=False))
    assert not summary.failures and len(summary.lesions) == pq.read_metadata(
        uncalibrated).num_rows
    for lesion in summary.lesions:
        report = lesion.report
        assert report["units"] == "px" and report["box_source"].startswith("index")
        assert "the index has no pixel spacing" in report["input"]["calibration"]
        assert report["core_lab"]["MLD_mm"] is None
    ds = pydicom.dcmread(sorted((phantom_dir / "dicom").glob("*.dcm"))[0])
    ds.DistanceSourceToPatient = 0
    ds.EstimatedRadiographicMagnificationFactor = 0
    ds.save_as(tmp_path / "no-magnification.dcm")
    summary = predict(tmp_path / "no-magnification.dcm", tmp_path / "dicom", PredictSettings(
        results=kept, box=(100, 100, 160, 150), overlays=False))
    [lesion] = summary.lesions
    assert lesion.report["units"] == "px"
    assert "no usable magnification" in lesion.report["input"]["calibration"]
    assert "--calibration" in lesion.report["input"]["calibration"]
    # A spacing given by the user is used as before: mm, not pixels.
    given = predict(tmp_path / "no-magnification.dcm", tmp_path / "mm", PredictSettings(
        results=kept, box=(100, 100, 160, 150), pixel_spacing_mm=0.3, overlays=False))
    assert given.lesions[0].report["units"] == "mm"
    assert given.lesions[0].report["input"]["pixel_spacing_mm"] == 0.3
    # The same mask as above, measured: in mm at the given spacing, the pixels times 0.3.
    in_px, in_mm = lesion.report["qca"], given.lesions[0].report["qca"]
    assert "error" not in in_px and "error" not in in_mm and in_mm["mm_per_pixel"] == 0.3
    assert in_mm["MLD_mm"] == pytest.approx(0.3 * in_px["MLD_px"], abs=2e-3)
    assert in_mm["lesion_length_mm"] == pytest.approx(0.3 * in_px["lesion_length_px"],
                                                      abs=0.05)  # said to 0.1 mm
    assert in_mm["diameter_stenosis_pct"] == in_px["diameter_stenosis_pct"]


def test_an_unsure_cass_head_hands_over_to_the_general_adapter(phantom_dir, uncalibrated,
                                                               tmp_path):
    """No angles: the LAD adapter starts for its CASS head, which is unsure (its segment logits
    are zeroed: even odds), so the general adapter measures. The heads' diameters, asked for,
    come in pixels."""
    from angiotune.model.heads import HeadSettings, LesionHeads, feature_dim_of, save_heads

    results = tmp_path / "results"
    settings = AdapterSettings(rank=2)
    for key in (GENERAL, "LAD"):
        base = load_base_model()
        folder = tmp_path / f"adapter-{key}"
        save_adapter(adapt(base, settings), settings, folder, base_model_id())
        if key == "LAD":
            heads = LesionHeads(HeadSettings(classes=("12", "2"),
                                             feature_dim=feature_dim_of(base.config)))
            torch.nn.init.zeros_(heads.segment.weight)
            torch.nn.init.zeros_(heads.segment.bias)
            save_heads(heads, folder)
        promote(results, key, folder, {
            "metric": "dice", "mode": "max", "score": 0.5, "validation_split": "s",
            "metrics": {}, "zero_shot": {}, "config": {"rank": 2}, "stage": 2,
            "strategy": "lora", "heads": key == "LAD", "base_model": base_model_id(),
            "search": "test", "trial_id": "t0", "index": str(uncalibrated)})
    npy = sorted((phantom_dir / "cines").glob("*.npy"))[0]
    summary = predict(npy, tmp_path / "o", PredictSettings(
        results=results, box=(100, 100, 160, 150), overlays=False))
    [lesion] = summary.lesions
    reason = lesion.report["routing"]["reason"]
    assert "started from the LAD adapter" in reason and "p=0.50" in reason
    # The vote is named by the segment it rests on, among all classes, with its vessel.
    assert "the heads' segments (CASS) favour proximal LAD (12): LAD with p=0.50" in reason
    assert "the head did not settle the vessel, so the general adapter" in reason
    assert lesion.report["adapter"]["vessel"] == GENERAL
    chosen = predict(npy, tmp_path / "lad", PredictSettings(
        results=results, box=(100, 100, 160, 150), vessel="LAD", overlays=False))
    heads = chosen.lesions[0].report["heads"]
    assert heads["MLD_px"] > 0 and heads["RVD_px"] > 0 and not _mm_keys(heads)
