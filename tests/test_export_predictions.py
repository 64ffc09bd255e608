"""`angiotune predict --export coco --export dicom`: every written file read back with the
library its consumers use (pycocotools for CVAT and FiftyOne's COCO, pydicom and highdicom for a
PACS), identifiers kept or pseudonymised as asked, and no raw identity where none was asked."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from highdicom.sr import EnhancedSR, srread
from PIL import Image
from pycocotools.coco import COCO
from pydicom.sr.codedict import codes

from angiotune.cli import main
from angiotune.data.pseudonym import patient_key
from angiotune.errors import ConfigError
from angiotune.export.coco import ANNOTATIONS, IMAGES
from angiotune.export.dicom import finding_site
from angiotune.model.adapters import AdapterSettings, adapt, save_adapter
from angiotune.model.heads import HeadSettings, LesionHeads, feature_dim_of, save_heads
from angiotune.model.sam3 import base_model_id, load_base_model
from angiotune.predict import PredictSettings, predict
from angiotune.registry.store import promote

SALT = "export-test-salt"
BOX = (100.0, 100.0, 160.0, 150.0)
SC_CLASS, ENHANCED_SR_CLASS = "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.88.22"


@pytest.fixture(autouse=True)
def salt(monkeypatch):
    monkeypatch.setenv("ANGIOTUNE_SALT", SALT)


@pytest.fixture(scope="module")
def kept(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry with one LAD adapter with (untrained) CASS heads."""
    results = tmp_path_factory.mktemp("results")
    settings = AdapterSettings(rank=2)
    torch.manual_seed(0)
    base = load_base_model()
    folder = results.parent / "adapter-LAD"
    save_adapter(adapt(base, settings), settings, folder, base_model_id())
    save_heads(LesionHeads(HeadSettings(classes=("12", "13", "2"),
                                        feature_dim=feature_dim_of(base.config))), folder)
    promote(results, "LAD", folder, {
        "metric": "dice/LAD", "mode": "max", "score": 0.5, "validation_split": "s",
        "metrics": {}, "zero_shot": {}, "config": {"rank": 2}, "stage": 2, "strategy": "lora",
        "heads": True, "base_model": base_model_id(), "search": "test", "trial_id": "t0"})
    return results


@pytest.fixture(scope="module")
def studies(phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two phantom cines with every study attribute a PACS files by (the phantoms leave some
    out), in a folder of their own."""
    folder = tmp_path_factory.mktemp("studies")
    for number, cine in enumerate(sorted((phantom_dir / "dicom").glob("*.dcm"))[:2], start=1):
        ds = pydicom.dcmread(cine)
        ds.StudyID, ds.AccessionNumber = f"ST{number}", f"ACC-7731{number}"
        ds.StudyTime, ds.ReferringPhysicianName = "101500", "HOUSE^GREGORY"
        ds.save_as(folder / f"case{number}.dcm")
    return folder


def _predict(source: Path, out: Path, kept: Path, **settings):
    return predict(source, out, PredictSettings(
        results=kept, vessel="LAD", box=BOX, frame=1, overlays=False, **settings))


def test_coco_export_opens_in_pycocotools_with_the_predicted_masks(studies, kept, tmp_path):
    out = tmp_path / "out"
    summary = _predict(studies, out, kept, exports=("coco",))
    assert len(summary.lesions) == 2 and not summary.failures
    coco = COCO(str(out / "coco" / ANNOTATIONS))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["lesion"]
    assert len(coco.imgs) == 2 and len(coco.anns) == 2
    for lesion in summary.lesions:
        [annotation] = [a for a in coco.anns.values() if a["attributes"]["lesion"] == lesion.key]
        image = coco.imgs[annotation["image_id"]]
        assert np.array_equal(coco.annToMask(annotation).astype(bool), lesion.segmentation.mask)
        rows, columns = np.nonzero(lesion.segmentation.mask)
        assert annotation["bbox"] == [columns.min(), rows.min(), columns.max() - columns.min() + 1,
                                      rows.max() - rows.min() + 1]
        assert annotation["area"] == lesion.segmentation.mask.sum()
        assert annotation["score"] == lesion.report["segmentation"]["confidence"]
        assert annotation["attributes"]["MLD_mm"] == lesion.report["qca"]["MLD_mm"]
        with Image.open(out / "coco" / IMAGES / image["file_name"]) as picture:
            assert picture.size == (image["width"], image["height"]) == lesion.frame.shape[::-1]
            assert np.abs(np.asarray(picture) / 255.0 - lesion.frame).max() <= 0.5 / 255 + 1e-6
        assert image["file_name"].startswith(lesion.report["input"]["key"])  # no input name
    text = (out / "coco" / ANNOTATIONS).read_text()
    assert "case1" not in text and str(studies) not in text


def _identity(path: Path) -> dict:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return {k: str(ds.get(k, "")) for k in ("PatientID", "PatientName", "PatientBirthDate",
                                            "PatientSex", "StudyInstanceUID", "StudyID",
                                            "AccessionNumber", "StudyDate", "StudyTime",
                                            "ReferringPhysicianName")}


@pytest.mark.slow
def test_dicom_export_kept_in_the_source_study(studies, kept, tmp_path):
    source = studies / "case1.dcm"
    out = tmp_path / "out"
    summary = _predict(source, out, kept, exports=("dicom",), dicom_identity="keep")
    [lesion] = summary.lesions
    capture_path, report_path = (out / "dicom" / f"{lesion.key}_{kind}.dcm"
                                 for kind in ("SC", "SR"))
    capture = pydicom.dcmread(capture_path)
    assert capture.SOPClassUID == SC_CLASS and capture.Modality == "OT"
    assert capture.pixel_array.shape[2] == 3 and capture.pixel_array.shape[0] > 500
    assert _identity(capture_path) == _identity(source)  # the PACS files it with the study
    assert _identity(report_path) == _identity(source)
    original = pydicom.dcmread(source, stop_before_pixels=True)
    assert capture.SeriesInstanceUID != original.SeriesInstanceUID  # a derived series
    report = srread(report_path)
    assert report.SOPClassUID == ENHANCED_SR_CLASS
    [group] = report.content.get_image_measurement_groups()
    cited = {(s.referenced_sop_instance_uid, tuple(s.referenced_frame_numbers or ()))
             for s in group.source_images}
    assert cited == {(capture.SOPInstanceUID, ()), (original.SOPInstanceUID, (2,))}  # frame 1
    assert group.tracking_identifier == lesion.key


def test_dicom_report_holds_the_measurements_as_coded_numbers(studies, kept, tmp_path):
    summary = _predict(studies / "case2.dcm", tmp_path / "out", kept, exports=("dicom",))
    [lesion] = summary.lesions
    qca = lesion.report["qca"]
    assert "error" not in qca, qca
    report = srread(tmp_path / "out" / "dicom" / f"{lesion.key}_SR.dcm")
    [group] = report.content.get_image_measurement_groups()
    found = {}
    for measurement in group.get_measurements():
        modifier = measurement.derivation or measurement.method
        found[(measurement.name.value, modifier.value if modifier else None)] = (
            measurement.value, measurement.unit.value)
    assert found == {
        (codes.SCT.VesselLumenDiameter.value, codes.SCT.Minimum.value): (qca["MLD_mm"], "mm"),
        (codes.SCT.VesselLumenDiameter.value, codes.DCM.InterpolatedLocalReference.value):
            (qca["interpolated_RVD_mm"], "mm"),
        (codes.SCT.LumenDiameterStenosis.value, None): (qca["diameter_stenosis_pct"], "%"),
        (codes.SCT.StenoticLesionLength.value, None): (qca["lesion_length_mm"], "mm")}
    [site] = group.finding_sites
    assert site.value.value == finding_site(lesion.report).value
    assert report.PreliminaryFlag == "PRELIMINARY" and "not for diagnosis" in \
        report.SeriesDescription


def test_the_finding_site_is_the_cass_segment_only_on_the_lesions_vessel():
    def report(vessel: str, heads: dict | None = None, core_lab: dict | None = None) -> dict:
        return {"adapter": {"vessel": vessel}, "heads": heads, "core_lab": core_lab}

    mid_lad = {"cass_segment": "13", "taxonomy": "CASS"}
    assert finding_site(report("LAD", mid_lad)) == codes.SCT.MidLeftAnteriorDescendingCoronaryArtery
    assert finding_site(report("LAD", {"cass_segment": "11", "taxonomy": "CASS"})) == \
        codes.SCT.LeftMainCoronaryArtery  # the left main goes with the LAD adapter
    assert finding_site(report("RCA", mid_lad)) == codes.SCT.RightCoronaryArtery  # disagree
    assert finding_site(report("LAD", {**mid_lad, "taxonomy": "SYNTAX"})) == \
        codes.SCT.LeftAnteriorDescendingCoronaryArtery  # another numbering: not CASS 13
    assert finding_site(report("LAD", {"cass_segment": "17", "taxonomy": "CASS"})) == \
        codes.SCT.LeftAnteriorDescendingCoronaryArtery  # no exact code: the vessel
    assert finding_site(report("general")) == codes.SCT.CoronaryArtery
    assert finding_site(report("general", core_lab={"vessel": "LCX"})) == \
        codes.SCT.CircumflexCoronaryArtery


@pytest.mark.slow
def test_pseudonymous_dicom_holds_no_identity_and_groups_by_study(studies, kept, tmp_path,
                                                                   phi_scan):
    source = studies / "case1.dcm"
    original = _identity(source)
    runs = []
    for run in ("first", "second"):
        summary = _predict(source, tmp_path / run, kept, exports=("dicom", "coco"))
        [lesion] = summary.lesions
        runs.append([pydicom.dcmread(tmp_path / run / "dicom" / f"{lesion.key}_{kind}.dcm")
                     for kind in ("SC", "SR")])
        scanned = phi_scan([tmp_path / run])
        assert any(p.suffix == ".dcm" for p in scanned)
        for path in (tmp_path / run / "dicom").iterdir():
            blob = path.read_bytes()
            for secret in ("PatientID", "PatientName", "PatientBirthDate", "StudyInstanceUID",
                           "AccessionNumber", "ReferringPhysicianName"):
                assert original[secret].encode() not in blob, (path.name, secret)
    (capture, report), (again, _) = runs
    key = patient_key(original["PatientID"], SALT)
    assert capture.PatientID == report.PatientID == key
    assert str(capture.PatientName) == f"{key}^" and not capture.get("PatientBirthDate")
    # One pseudonymous study for every export of this study; new series each run.
    assert capture.StudyInstanceUID == report.StudyInstanceUID == again.StudyInstanceUID
    assert capture.SeriesInstanceUID != again.SeriesInstanceUID
    assert capture.SOPInstanceUID != again.SOPInstanceUID
    [group] = EnhancedSR.from_dataset(report).content.get_image_measurement_groups()
    assert [s.referenced_sop_instance_uid for s in group.source_images] == \
        [capture.SOPInstanceUID]  # the source image is not cited: its UID would link back


def test_an_index_row_is_filed_under_its_patient_key(studies):
    from angiotune.export.dicom import study_identity

    source = studies / "case1.dcm"
    by_row = study_identity(source, {"patient_key": "P0123456789abcdef"}, "S1", "pseudonym", SALT)
    by_file = study_identity(source, None, "I1", "pseudonym", SALT)
    assert by_row.attributes["patient_id"] == "P0123456789abcdef"  # the index's own pseudonym
    assert by_file.attributes["patient_id"] == patient_key(_identity(source)["PatientID"], SALT)
    assert by_row.study_uid == by_file.study_uid != _identity(source)["StudyInstanceUID"]
    assert by_row.source is None and study_identity(source, None, "I1", "keep", SALT).source


def test_an_uncalibrated_npy_gets_a_pseudonym_and_no_millimetres(phantom_dir, kept, tmp_path):
    npy = sorted((phantom_dir / "cines").glob("*.npy"))[0]
    summary = _predict(npy, tmp_path / "out", kept, exports=("dicom",), dicom_identity="keep")
    [lesion] = summary.lesions
    assert lesion.report["units"] == "px"
    capture = pydicom.dcmread(tmp_path / "out" / "dicom" / f"{lesion.key}_SC.dcm")
    assert capture.PatientID == lesion.report["input"]["key"]  # nothing to keep in an NPY
    path = tmp_path / "out" / "dicom" / f"{lesion.key}_SR.dcm"
    if "error" in lesion.report["qca"]:
        assert not path.exists()  # nothing measured, nothing reported; the picture says why
        return
    [group] = srread(path).content.get_image_measurement_groups()
    [only] = group.get_measurements()  # the stenosis: a ratio needs no calibration
    assert only.name.value == codes.SCT.LumenDiameterStenosis.value and only.unit.value == "%"


def test_export_settings_are_checked_in_the_api_and_the_cli(studies, kept, tmp_path, capsys):
    for bad, match in (({"exports": ("stl",)}, "exports"), ({"exports": "coco"}, "exports"),
                       ({"dicom_identity": "real"}, "dicom_identity")):
        with pytest.raises(ConfigError, match=match):
            PredictSettings(**bad)
    assert PredictSettings(exports=["coco", "coco"]).exports == ("coco",)
    base = ["predict", str(studies / "case1.dcm"), "--results", str(kept), "--out",
            str(tmp_path / "o"), "--box", ",".join(map(str, BOX)), "--vessel", "LAD"]
    assert main([*base, "--export", "stl"]) == 2
    assert main([*base, "--dicom-identity", "keep"]) == 2
    assert "--dicom-identity applies to --export dicom" in capsys.readouterr().err
    assert main([*base, "--export", "coco", "--export", "dicom", "--no-overlay"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "Export coco:" in printed and "Export dicom:" in printed
    assert json.loads((tmp_path / "o" / "predictions.json").read_text())["failures"] == []
