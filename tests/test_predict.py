"""`angiotune predict` end to end on phantom cines, with real (untrained) peft adapters kept
per vessel: routing, frame choice, proposals, the JSON and the overlay, and user errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from shapes import angiogram, narrowing, straight

from angiotune.cli import main
from angiotune.data.readers import read_cine
from angiotune.model.adapters import AdapterSettings, adapt, save_adapter
from angiotune.model.heads import HeadSettings, LesionHeads, feature_dim_of, save_heads
from angiotune.model.sam3 import base_model_id, load_base_model
from angiotune.predict import PredictSettings, predict
from angiotune.predict.frames import select_frame
from angiotune.predict.proposals import propose_boxes
from angiotune.qca.measure import NO_NARROWING
from angiotune.registry.store import promote

# A run filmed in its own vessel group's views (a shared or neighbour's view ends in S or X).
RUN_GROUP = re.compile(r"RUN_[0-9A-F]+(RCA|LAD|LCX)\.")


@pytest.fixture(scope="module")
def kept_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry with an adapter per vessel; LAD's has stage-2 heads (random, untrained)."""
    results = tmp_path_factory.mktemp("results")
    settings = AdapterSettings(rank=2)
    torch.manual_seed(0)
    for vessel in ("RCA", "LAD", "LCX"):
        base = load_base_model()
        folder = results.parent / f"adapter-{vessel}"
        save_adapter(adapt(base, settings), settings, folder, base_model_id())
        if vessel == "LAD":
            save_heads(LesionHeads(HeadSettings(classes=("12", "13", "2"),
                                                feature_dim=feature_dim_of(base.config))), folder)
        promote(results, vessel, folder, {
            "metric": f"dice/{vessel}", "mode": "max", "score": 0.5, "validation_split": "s",
            "metrics": {}, "zero_shot": {}, "config": {"rank": 2}, "stage": 2, "strategy": "lora",
            "heads": vessel == "LAD", "base_model": base_model_id(), "search": "test",
            "trial_id": "t0"})
    return results


@pytest.mark.slow  # every cine, proposals and full-size overlays: several seconds
def test_a_folder_of_cines_is_routed_measured_and_reported(phantom_dir, kept_results, tmp_path):
    out = tmp_path / "predictions"
    summary = predict(phantom_dir / "dicom", out, PredictSettings(results=kept_results))
    accounted = {lesion.report["input"]["key"] for lesion in summary.lesions} \
        | {failure["input"] for failure in summary.failures}
    assert accounted == set(summary.inputs)  # every input measured or reported, none lost
    assert summary.lesions, summary.failures
    routed_clearly, own_views = 0, 0
    for lesion in summary.lesions:
        report = json.loads((out / f"{lesion.key}.json").read_text())
        own = RUN_GROUP.search(summary.inputs[report["input"]["key"]])
        own_views += own is not None
        if own and not report["routing"]["ambiguous"]:
            assert report["adapter"]["vessel"] == own.group(1), report["routing"]
            routed_clearly += 1
        assert report["box_source"].startswith("proposal")
        assert report["input"]["spacing_source"].startswith("DICOM ImagerPixelSpacing")
        assert "not a clinical measurement" in report["what"]
        assert set(report["timings_ms"]) == {"decode", "route_and_propose", "segment",
                                             "measure"}
        with Image.open(out / f"{lesion.key}.png") as picture:
            assert picture.size[0] > 1000 and picture.size[1] > 700
        text = (out / f"{lesion.key}.json").read_text()
        assert "RUN_" not in text and str(phantom_dir) not in text  # inputs are pseudonymous
    assert own_views and routed_clearly >= own_views // 2
    combined = json.loads((out / "predictions.json").read_text())
    assert len(combined["lesions"]) == len(summary.lesions)


@pytest.mark.slow
def test_an_index_is_predicted_row_by_row_beside_the_core_lab(phantom_index, kept_results,
                                                               tmp_path):
    out = tmp_path / "by-index"
    summary = predict(phantom_index.out, out, PredictSettings(results=kept_results,
                                                              overlays=False))
    assert len(summary.lesions) == len(phantom_index.index)
    for lesion in summary.lesions:
        report = lesion.report
        assert lesion.key.startswith(report["input"]["key"])  # the pseudonymous sample id
        assert report["box_source"].startswith("index")
        assert report["core_lab"]["MLD_mm"] > 0
        if report["adapter"]["heads"]:
            assert report["heads"]["cass_segment"] in ("12", "13", "2")
            assert report["heads"]["MLD_mm"] > 0
    assert not list(out.glob("*.png"))
    # An untrained adapter's masks can be poor: each lesion has either its numbers (and no
    # error) or a reason (and no numbers); on the phantoms most masks are measurable.
    qcas = [lesion.report["qca"] for lesion in summary.lesions]
    measured = [qca for qca in qcas if "error" not in qca]
    for qca in measured:  # MLD 0: a mask interrupted across the lesion reads as an occlusion
        assert qca["MLD_mm"] >= 0 and qca["interpolated_RVD_mm"] > 0, qca
        if NO_NARROWING in qca["notes"]:  # a mask of healthy vessel says so
            assert qca["lesion_length_mm"] == 0 and qca["diameter_stenosis_pct"] <= 0, qca
        else:
            assert qca["lesion_length_mm"] > 0, qca
            assert qca["MLD_mm"] <= qca["interpolated_RVD_mm"], qca
    for qca in (qca for qca in qcas if "error" in qca):
        assert qca["error"] and "MLD_mm" not in qca and "lesion_length_mm" not in qca, qca
    assert len(measured) >= 0.75 * len(qcas), qcas


def test_cli_predicts_a_given_box_on_a_given_frame(phantom_dir, kept_results, tmp_path, capsys):
    cine = sorted((phantom_dir / "dicom").glob("*.dcm"))[0]
    out = tmp_path / "one"
    code = main(["predict", str(cine), "--box", "100,100,160,150", "--frame", "1",
                 "--out", str(out), "--results", str(kept_results)])
    assert code == 0
    [written] = sorted(out.glob("*_lesion1.json"))
    report = json.loads(written.read_text())
    assert report["box"] == [100.0, 100.0, 160.0, 150.0] and report["input"]["frame"] == 1
    assert report["box_source"] == "given (--box)"
    printed = capsys.readouterr().out
    assert "Lesions measured" in printed and str(cine) in printed  # path on the terminal only


@pytest.mark.slow
def test_cli_user_errors_are_one_clear_line(phantom_dir, kept_results, tmp_path, capsys,
                                            monkeypatch):
    cine = sorted((phantom_dir / "dicom").glob("*.dcm"))[0]
    npy = sorted((phantom_dir / "cines").glob("*.npy"))[0]
    base = ["--out", str(tmp_path / "o"), "--results", str(kept_results)]
    assert main(["predict", str(cine), "--box", "1,2,3"] + base) == 2
    assert main(["predict", str(cine), "--box", "10,10,900,40"] + base) == 2
    assert "not inside" in capsys.readouterr().err
    # No spacing anywhere: measured in pixels and said so, not refused.
    assert main(["predict", str(npy), "--box", "100,100,160,150"] + base) == 0
    assert "no calibration: mm values not reported" in " ".join(capsys.readouterr().out.split())
    assert main(["predict", str(npy), "--box", "100,100,160,150", "--pixel-spacing", "0.3",
                 "--vessel", "RCA"] + base) == 0
    assert main(["predict", str(npy), "--angles", "RAO 25"] + base) == 2
    # Labelled angles route a file that carries none.
    angled = ["predict", str(npy), "--box", "100,100,160,150", "--pixel-spacing", "0.3",
              "--angles", "RAO 25, CAUDAL 25", "--out", str(tmp_path / "angled"),
              "--results", str(kept_results)]
    assert main(angled) == 0
    [report] = [json.loads(p.read_text()) for p in (tmp_path / "angled").glob("*_lesion1.json")]
    assert report["adapter"]["vessel"] == "LCX" and "RAO caudal" in report["routing"]["reason"]
    assert main(["predict", str(tmp_path / "missing.dcm")] + base) == 2
    monkeypatch.chdir(tmp_path)  # where the default --out would go
    assert main(["predict", str(cine), "--results", str(tmp_path / "empty")]) == 2
    assert "no box-prompted adapter kept" in capsys.readouterr().err
    assert not (tmp_path / "predictions").exists()  # a user error leaves no empty folder


def test_without_angles_the_adapter_with_heads_starts_and_the_head_may_decide(
        phantom_dir, kept_results, tmp_path):
    npy = sorted((phantom_dir / "cines").glob("*.npy"))[0]
    summary = predict(npy, tmp_path / "o", PredictSettings(
        results=kept_results, box=(100, 100, 160, 150), pixel_spacing_mm=0.3, overlays=False))
    [lesion] = summary.lesions
    routing = lesion.report["routing"]
    assert "no positioner angles" in routing["reason"] and "started from the LAD" in \
        routing["reason"]
    assert lesion.report["adapter"]["vessel"] in ("LAD", "RCA")  # the head's classes' vessels


def test_a_batch_keeps_going_reports_strictly_and_names_no_input(phantom_dir, kept_results,
                                                                  tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    cine = sorted((phantom_dir / "dicom").glob("*.dcm"))[0]
    (folder / "IM0001").write_bytes(cine.read_bytes())  # DICOM without an extension
    (folder / "DOE_JOHN_1961.dcm").write_bytes(b"not a dicom at all")
    summary = predict(folder, tmp_path / "out", PredictSettings(results=kept_results,
                                                                overlays=False))
    assert summary.lesions and all(lesion.report["input"]["kind"] == "dicom"
                                   for lesion in summary.lesions)
    [failure] = [f for f in summary.failures if "DICOM" in f["error"]]
    text = (tmp_path / "out" / "predictions.json").read_text()
    assert "DOE_JOHN" not in text and "IM0001" not in text
    json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))
    assert failure["input"] in summary.inputs


def test_the_chosen_frame_is_a_contrast_filled_one(phantom_dir, manifest_rows):
    analysed = {row["dicom_path"]: int(row["frame_index"]) for row in manifest_rows}
    for relative, frame_index in analysed.items():
        best, reason, scores = select_frame(read_cine(phantom_dir / relative))
        assert best != 0 and scores[0] < scores[best]  # frame 0 has no contrast yet
        assert scores[frame_index] >= 0.8 * scores[best], (relative, scores)
        assert f"frame {best}" in reason


@pytest.mark.slow
def test_proposals_find_a_drawn_narrowing_and_nothing_on_a_blank_frame():
    path = straight(length_mm=60.0, start=(4.0, 10.0), angle_deg=30)
    for stenosis in (50.0, 70.0):
        diameters, _ = narrowing(path, 1.4, stenosis, plateau_mm=2.0)
        proposals = propose_boxes(angiogram(path, diameters, shape=(256, 320)))
        x, y = path[len(path) // 2] / 0.2
        first = proposals[0].box
        assert first[0] <= x < first[2] and first[1] <= y < first[3], proposals
    assert propose_boxes(np.full((128, 128), 0.7, dtype=np.float32)) == []


def test_dicom_pixel_spacing_is_corrected_for_magnification_only_at_the_detector(phantom_dir,
                                                                                   tmp_path):
    import pydicom

    from angiotune.data.readers import read_header

    source = sorted((phantom_dir / "dicom").glob("*.dcm"))[0]
    ds = pydicom.dcmread(source)
    detector = float(ds.ImagerPixelSpacing[0])
    header = read_header(source)
    assert header.vessel_spacing()[0] == pytest.approx(detector / header.magnification)
    # PixelSpacing is the system's calibration at the patient: used as it is, not divided.
    del ds.ImagerPixelSpacing
    ds.PixelSpacing = [0.2, 0.2]
    ds.save_as(tmp_path / "calibrated.dcm")
    assert read_header(tmp_path / "calibrated.dcm").vessel_spacing()[0] == pytest.approx(0.2)
    # A broken magnification (zero distance) is not used; the spacing is then unknown.
    ds = pydicom.dcmread(source)
    ds.DistanceSourceToPatient = 0
    ds.EstimatedRadiographicMagnificationFactor = 0
    ds.save_as(tmp_path / "broken.dcm")
    broken = read_header(tmp_path / "broken.dcm")
    assert broken.magnification is None and broken.vessel_spacing() is None


def test_predict_settings_refuse_bad_values_however_they_are_made(capsys):
    """The API checks what the CLI checked: a negative calibration must not become a negative
    pixel spacing, and a user error is a ConfigError the CLI prints without a traceback."""
    from dataclasses import replace

    from angiotune.cli import main
    from angiotune.errors import ConfigError
    from angiotune.predict import PredictSettings

    for bad, match in (({"calibration_px_per_mm": -5.0}, "--calibration"),
                       ({"pixel_spacing_mm": float("nan")}, "--pixel-spacing"),
                       ({"box": (10, 10, 5, 20)}, "x1 > x0"), ({"frame": -1}, "frame"),
                       ({"max_proposals": 0}, "max_proposals"), ({"vessel": "LM"}, "vessel")):
        with pytest.raises(ConfigError, match=match):
            PredictSettings(**bad)
    with pytest.raises(ConfigError, match="positive"):
        replace(PredictSettings(), pixel_spacing_mm=0.0)
    assert main(["predict", "missing.dcm", "--calibration", "-5"]) == 2
    assert "--calibration" in capsys.readouterr().err  # refused before the file is looked at


@pytest.mark.slow
def test_kept_lora_adapters_share_one_base_and_switch_per_vessel(tmp_path):
    """One base in memory for every vessel's LoRA: each vessel's adapter runs when asked for,
    and gives what that adapter alone on its own base gives."""
    from angiotune.predict import KeptModels

    results, settings = tmp_path / "results", AdapterSettings(rank=2)
    torch.manual_seed(1)
    for vessel in ("RCA", "LAD"):
        model = adapt(load_base_model(), settings)
        with torch.no_grad():  # trained adapters differ; fresh ones (B = 0) would not
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.05)
        folder = tmp_path / f"adapter-{vessel}"
        save_adapter(model, settings, folder, base_model_id())
        promote(results, vessel, folder, {
            "metric": f"dice/{vessel}", "mode": "max", "score": 0.5, "validation_split": "s",
            "metrics": {}, "strategy": "lora", "base_model": base_model_id()})
    shared, separate = KeptModels(results, "cpu"), KeptModels(results, "cpu", share_base=False)
    images, boxes = torch.rand(2, 112, 112), torch.tensor([[20.0, 30, 80, 70], [10, 10, 60, 90]])
    logits = {}
    with torch.no_grad():
        for vessel in ("RCA", "LAD", "RCA"):  # and back: the switch is not one-way
            logits[vessel] = shared.get(vessel)(images, boxes)["logits"]
            alone = separate.get(vessel)(images, boxes)["logits"]
            torch.testing.assert_close(logits[vessel], alone)
    assert not torch.allclose(logits["RCA"], logits["LAD"])
    assert shared.get("RCA").segmenter is shared.get("LAD").segmenter

    def stored_bytes(models: KeptModels) -> int:
        tensors = {p.data_ptr(): p.numel() * p.element_size()
                   for model in models._models.values() for p in model.parameters()}
        return sum(tensors.values())

    assert stored_bytes(shared) < 0.75 * stored_bytes(separate)


def test_every_lesion_of_a_frame_is_segmented_in_one_pass_as_each_would_be_alone(
        phantom_dir, kept_results):
    """predict segments a frame's boxes as one batch (one encoder and decoder pass per frame):
    each lesion's probability map, mask, confidence and head outputs are what segmenting it
    alone gives."""
    from angiotune.data.readers import read_frame
    from angiotune.predict import KeptModels
    from angiotune.predict.segment import segment_box, segment_boxes

    model = KeptModels(kept_results, "cpu").get("LAD")  # with heads
    frame = read_frame(sorted((phantom_dir / "dicom").glob("*.dcm"))[0], 0)
    boxes = [np.array(b, dtype=float) for b in ((100, 100, 160, 150), (300, 220, 330, 300),
                                                 (40, 380, 140, 420))]
    together = segment_boxes(model, frame, boxes, 0.3, (30.0, 20.0))
    assert len(together) == 3
    for box, batched in zip(boxes, together, strict=True):
        alone = segment_box(model, frame, box, 0.3, (30.0, 20.0))
        assert np.allclose(batched.probability, alone.probability, atol=1e-4)
        assert np.array_equal(batched.mask, alone.mask)
        assert batched.confidence == pytest.approx(alone.confidence, abs=1e-5)
        assert batched.heads["cass_segment"] == alone.heads["cass_segment"]
        assert batched.heads["MLD_mm"] == pytest.approx(alone.heads["MLD_mm"], abs=1e-3)


@pytest.mark.parametrize(("data_note", "base_model", "says", "never"), [
    ("synthetic phantoms and the embedded tiny SAM 3 model", "embedded:abc",
     "synthetic phantoms with the embedded tiny SAM 3", None),
    ("angiotune's synthetic phantoms (not clinical data) and the SAM 3 weights given",
     "sam3@abc", "synthetic phantoms with the SAM 3 weights given", "tiny"),
    ("user data and the embedded tiny SAM 3 model", "embedded:abc",
     "the data given with the embedded tiny SAM 3", "phantoms"),
    ("user data and the SAM 3 weights given", "sam3@abc", "research output; not", "phantoms"),
])
def test_a_report_says_what_its_adapter_was_trained_on_and_from(data_note, base_model, says,
                                                                never):
    from angiotune.predict.pipeline import _what

    what = _what({"data_note": data_note, "base_model": base_model})
    assert says in what and "not a clinical measurement" in what
    assert never is None or never not in what
