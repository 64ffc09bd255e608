"""The lesion index: both layouts, pseudonymity, quarantined rows, repairs, whole-file errors."""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
import pytest
from ingest_helpers import (
    TEST_SALT,
    corrupt_copy,
    edit_contour,
    edit_row,
    index,
    read_csv_rows,
    row_at,
    save_mask,
    solo_line,
    write_csv_rows,
)
from PIL import Image, ImageDraw
from pydicom.data import get_testdata_file

from angiotune.data.index import METADATA_KEY, SCHEMA_VERSION, missing_measurements, read_index
from angiotune.data.ingest import REQUIRED_MEASUREMENTS, IndexSettings, IndexSummary, build_index
from angiotune.data.pseudonym import patient_key
from angiotune.data.readers import read_contour, read_frame, read_header, read_mask
from angiotune.errors import DataError
from angiotune.taxonomies import load_taxonomy

# Columns that depend only on the lesion, not on how its cine is stored.
LAYOUT_INDEPENDENT = [
    "patient_key", "split", "row", "vessel", "vessel_source", "segment", "segment_name",
    "segment_position", "taxonomy", "phase", "frame_index", "frames", "frame_height",
    "frame_width", "mask_path", "contour_path", "pixel_spacing_mm", "spacing_source", "bbox_x0",
    "bbox_y0", "bbox_x1", "bbox_y1", "mask_area_px", "mld_mm", "diameter_stenosis_pct", "rvd_mm",
    "lesion_length_mm", "proximal_diameter_mm", "distal_diameter_mm", "mld_x", "mld_y",
    "angle_lao_deg", "angle_cranial_deg", "warnings",
]
BBOX = ["bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"]


# --- helpers ---------------------------------------------------------------------------------


def assert_quarantined(report: IndexSummary, baseline: IndexSummary, line: int, field: str,
                       reason: str, file: str | None = None) -> None:
    """Row ``line`` and only it is quarantined, for ``field``; every other good row is indexed."""
    mine = [p for p in report.quarantined if p.row == line]
    assert len(mine) == 1, report.quarantined
    assert mine[0].field == field, mine[0]
    assert reason in mine[0].reason, mine[0]
    if file is not None:
        assert mine[0].file == file, mine[0]
    assert sorted(p.row for p in report.quarantined) == \
        sorted([line] + [p.row for p in baseline.quarantined])
    assert sorted(report.index["row"]) == sorted(set(baseline.index["row"]) - {line})
    written = pd.read_csv(report.quarantine_path)
    assert list(written.columns) == ["row", "field", "file", "reason"]
    assert written.loc[written["row"] == line, "field"].tolist() == [field]


def record(report: IndexSummary, line: int) -> pd.Series:
    rows = report.index[report.index["row"] == line]
    assert len(rows) == 1, f"row {line} is not in the index"
    return rows.iloc[0]


# --- the clean phantom set -------------------------------------------------------------------


def test_clean_set_indexes_every_lesion(phantom_index, manifest_rows):
    assert phantom_index.rows_read == len(manifest_rows) == 17
    assert len(phantom_index.index) == 16
    assert phantom_index.index["sample_id"].is_unique
    assert set(phantom_index.index["split"]) <= {"train", "val", "test"}
    assert (phantom_index.index["image_format"] == "dicom").all()
    taxonomy = load_taxonomy("CASS")
    for _, rec in phantom_index.index.iterrows():
        row = manifest_rows[rec["row"] - 2]
        assert rec["segment"] == row["cass_segment"]
        assert rec["vessel"] == taxonomy.segments[rec["segment"]].vessel
        assert rec["bbox_x0"] < rec["bbox_x1"] and rec["bbox_y0"] < rec["bbox_y1"]
        assert rec["mask_area_px"] <= (rec["bbox_x1"] - rec["bbox_x0"]) * \
            (rec["bbox_y1"] - rec["bbox_y0"])
        assert rec["bbox_x0"] <= rec["mld_x"] <= rec["bbox_x1"]
        assert rec["bbox_y0"] <= rec["mld_y"] <= rec["bbox_y1"]


def test_duplicated_row_is_quarantined(phantom_index, manifest_rows):
    last = manifest_rows[-1]
    original = manifest_rows.index(last) + 2
    assert original < len(manifest_rows) + 1
    [problem] = phantom_index.quarantined
    assert problem.row == len(manifest_rows) + 1
    assert problem.field == "row"
    assert f"duplicate of row {original}" in problem.reason
    assert original in set(phantom_index.index["row"])
    written = pd.read_csv(phantom_index.quarantine_path)
    assert written["row"].tolist() == [problem.row]
    assert "duplicate of row" in written["reason"].iloc[0]


def test_both_layouts_give_the_same_index(phantom_index, phantom_index_npy):
    dicom, npy = phantom_index.index, phantom_index_npy.index
    assert len(dicom) == len(npy) == 16
    pd.testing.assert_frame_equal(dicom[LAYOUT_INDEPENDENT], npy[LAYOUT_INDEPENDENT])
    assert (npy["image_format"] == "npy").all() and (npy["transfer_syntax"] == "npy").all()
    assert npy["image_path"].str.startswith("cines/").all()
    assert dicom["image_path"].str.startswith("dicom/").all()
    assert not set(dicom["sample_id"]) & set(npy["sample_id"])
    assert [p.row for p in phantom_index.quarantined] == \
        [p.row for p in phantom_index_npy.quarantined]


def test_index_readers_agree(phantom_index):
    by_pandas = pd.read_parquet(phantom_index.out)
    by_arrow = pq.read_table(phantom_index.out).to_pandas()
    by_us = read_index(phantom_index.out)
    for frame in (by_pandas, by_arrow, by_us):
        pd.testing.assert_frame_equal(frame, phantom_index.index)
    metadata = json.loads(pq.read_schema(phantom_index.out).metadata[METADATA_KEY])
    assert metadata["schema_version"] == SCHEMA_VERSION
    assert metadata["taxonomy"] == "CASS"
    assert "LAO positive" in metadata["angle_convention"]
    assert TEST_SALT not in json.dumps(metadata)


def test_read_index_refuses_other_files(tmp_path):
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"a": [1, 2]}), plain)
    with pytest.raises(DataError, match="not an angiotune index"):
        read_index(plain)
    with pytest.raises(DataError, match="no such index"):
        read_index(tmp_path / "missing.parquet")
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet at all" * 10)
    with pytest.raises(DataError, match="not a readable Parquet"):
        read_index(garbage)


# --- pseudonymity ----------------------------------------------------------------------------


def test_no_raw_patient_identity_is_written(phantom_dir, phantom_index, phantom_index_npy,
                                            manifest_rows, patient_identities):
    secrets = patient_identities
    assert len({row["patient_id"] for row in manifest_rows}) == 10
    for report in (phantom_index, phantom_index_npy):
        files = [report.out.read_bytes(), report.quarantine_path.read_bytes()]
        table = pq.read_table(report.out)
        decoded = [json.dumps(table.to_pylist()), str(table.schema.metadata),
                   report.index.to_csv(), json.dumps([vars(p) for p in report.quarantined]),
                   json.dumps([vars(p) for p in report.warnings]), " ".join(report.notes)]
        for secret in secrets:
            assert all(secret.encode() not in blob for blob in files), secret
            assert all(secret not in text for text in decoded), secret
            assert all(secret.upper() not in text.upper() for text in decoded), secret


def test_patient_keys_are_salted_hmacs(phantom_index, manifest_rows):
    for _, rec in phantom_index.index.iterrows():
        raw = manifest_rows[rec["row"] - 2]["patient_id"]
        assert rec["patient_key"] == patient_key(raw, TEST_SALT)
        assert rec["patient_key"] != patient_key(raw, "another-salt")
    # Lesions of one patient share a key and a split; different patients get different keys.
    by_patient = Counter(row["patient_id"] for row in manifest_rows[:-1])
    keys = phantom_index.index.groupby("patient_key")
    assert sorted(keys.size()) == sorted(by_patient.values())
    assert (keys["split"].nunique() == 1).all()


# --- other encodings of the pixels -----------------------------------------------------------


def test_jpeg_lossless_decodes_through_readers():
    path = Path(get_testdata_file("SC_rgb_jpeg_gdcm.dcm"))
    header = read_header(path)
    assert header.transfer_syntax.startswith("JPEG Lossless")
    assert (header.frames, header.height, header.width) == (1, 100, 100)
    frame = read_frame(path, 0)
    rgb = pydicom.dcmread(path).pixel_array.astype(np.float32)
    expected = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32) / 255
    assert frame.shape == (100, 100) and frame.dtype == np.float32
    np.testing.assert_allclose(frame, expected, atol=1e-6)
    assert frame.max() - frame.min() > 0.5
    with pytest.raises(DataError) as error:
        read_frame(path, 1)
    assert error.value.field == "frame_index"


def test_jpeg_ls_decodes_through_readers():
    path = Path(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"))
    header = read_header(path)
    assert header.transfer_syntax.startswith("JPEG-LS Lossless")
    assert (header.frames, header.height, header.width) == (1, 64, 64)
    frame = read_frame(path, 0)
    stored = pydicom.dcmread(path).pixel_array.astype(np.float64)  # signed 16 bit
    np.testing.assert_allclose(frame, (stored + 2**15) / (2**16 - 1), atol=1e-6)
    # Lossless: the stored values come back exactly, up to the [0, 1] scaling.
    reference = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array
    np.testing.assert_array_equal(stored, reference)


# --- quarantine: one test per kind of bad row ------------------------------------------------


def test_missing_file(phantom_dir, phantom_index, manifest_rows, tmp_path):
    data = corrupt_copy(phantom_dir, tmp_path)
    line = solo_line(manifest_rows, phantom_index)
    dicom = row_at(data / "manifest.csv", line)["dicom_path"]
    (data / dicom).unlink()
    report = index(data, tmp_path)
    assert_quarantined(report, phantom_index, line, "dicom_path", "missing file", dicom)


def test_corrupt_dicom(phantom_dir, phantom_index, manifest_rows, tmp_path):
    data = corrupt_copy(phantom_dir, tmp_path)
    line = solo_line(manifest_rows, phantom_index)
    dicom = row_at(data / "manifest.csv", line)["dicom_path"]
    size = (data / dicom).stat().st_size
    (data / dicom).write_bytes(np.random.default_rng(0).bytes(size))
    report = index(data, tmp_path)
    assert_quarantined(report, phantom_index, line, "dicom_path", "not a DICOM file", dicom)


def test_truncated_dicom(phantom_dir, phantom_index, manifest_rows, tmp_path):
    data = corrupt_copy(phantom_dir, tmp_path)
    line = solo_line(manifest_rows, phantom_index,
                     lambda row, rec: rec["transfer_syntax"] == "Explicit VR Little Endian")
    dicom = row_at(data / "manifest.csv", line)["dicom_path"]
    content = (data / dicom).read_bytes()
    (data / dicom).write_bytes(content[:len(content) // 2])
    report = index(data, tmp_path)
    # The analysed frame lies in the half that was cut off: its pixels cannot be decoded.
    assert_quarantined(report, phantom_index, line, "PixelData", "cannot decode frame", dicom)


@pytest.mark.parametrize(("frame", "reason"), [("4", "out of range"), ("99", "out of range"),
                                               ("-1", "not a non-negative whole number"),
                                               ("2.5", "not a non-negative whole number"),
                                               ("", "not a non-negative whole number")])
def test_frame_index_out_of_range(phantom_dir, phantom_index, manifest_rows, tmp_path, frame,
                                  reason):
    data = corrupt_copy(phantom_dir, tmp_path)
    line = solo_line(manifest_rows, phantom_index)
    edit_row(data / "manifest.csv", line, frame_index=frame)
    report = index(data, tmp_path)
    assert_quarantined(report, phantom_index, line, "frame_index", reason)


def test_empty_mask(phantom_dir, phantom_index, manifest_rows, tmp_path):
    data = corrupt_copy(phantom_dir, tmp_path)
    line = solo_line(manifest_rows, phantom_index)
    mask_path = row_at(data / "manifest.csv", line)["medis_mask_path"]
    save_mask(data / mask_path, np.zeros_like(read_mask(data / mask_path)))
    report = index(data, tmp_path)
    assert_quarantined(report, phantom_index, line, "medis_mask_path", "empty mask", mask_path)


def test_mask_not_a_uniform_scale(phantom_dir, phantom_index, manifest_rows, tmp_path):
    data = corrupt_copy(phantom_dir, tmp_path)
    line = solo_line(manifest_rows, phantom_index,
                     lambda row, rec: row["medis_mask_path"].endswith(".png"))
    mask_path = row_at(data / "manifest.csv", line)["medis_mask_path"]
    mask = read_mask(data / mask_path)
    assert mask.shape == (256, 256)
    save_mask(data / mask_path, mask[:250])  # 250 rows x 256 columns
    report = index(data, tmp_path)
    assert_quarantined(report, phantom_index, line, "medis_mask_path", "not a uniform scale",
                       mask_path)


def test_vessel_text_contradicts_segment(phantom_dir, phantom_index, manifest_rows, tmp_path):
    data = corrupt_copy(phantom_dir, tmp_path)
    line = solo_line(manifest_rows, phantom_index, lambda row, rec: row["cass_segment"] == "13")
    edit_row(data / "manifest.csv", line, vessel_pattern="MID LCX")
    report = index(data, tmp_path)
    assert_quarantined(report, phantom_index, line, "vessel_pattern", "segment number says LAD")


@pytest.mark.parametrize("code", ["99", "0", "abc", ""])
def test_segment_outside_taxonomy(phantom_dir, phantom_index, manifest_rows, tmp_path, code):
    data = corrupt_copy(phantom_dir, tmp_path)
    line = solo_line(manifest_rows, phantom_index)
    edit_row(data / "manifest.csv", line, cass_segment=code)
    report = index(data, tmp_path)
    assert_quarantined(report, phantom_index, line, "cass_segment", "not a segment of the CASS")


def test_contradicting_measurements(phantom_dir, phantom_index, manifest_rows, tmp_path):
    data = corrupt_copy(phantom_dir, tmp_path)
    line = solo_line(manifest_rows, phantom_index)
    contour = row_at(data / "manifest.csv", line)["medis_contour_path"]

    def contradict(payload: dict) -> None:
        m = payload["measurements"]
        m["diameter_stenosis_pct"] = min(m["diameter_stenosis_pct"] + 20, 99)

    edit_contour(data / contour, contradict)
    report = index(data, tmp_path)
    assert_quarantined(report, phantom_index, line, "measurements.diameter_stenosis_pct",
                       "contradicts", contour)


def test_contradiction_within_tolerance_is_kept(phantom_dir, phantom_index, manifest_rows,
                                                tmp_path):
    data = corrupt_copy(phantom_dir, tmp_path)
    line = solo_line(manifest_rows, phantom_index)
    contour = row_at(data / "manifest.csv", line)["medis_contour_path"]
    edit_contour(data / contour,
                 lambda p: p["measurements"].update(
                     diameter_stenosis_pct=p["measurements"]["diameter_stenosis_pct"] + 3))
    report = index(data, tmp_path)
    assert [p.row for p in report.quarantined] == [p.row for p in phantom_index.quarantined]
    assert record(report, line)["diameter_stenosis_pct"] == pytest.approx(
        record(phantom_index, line)["diameter_stenosis_pct"] + 3)


def test_mld_larger_than_reference(phantom_dir, phantom_index, manifest_rows, tmp_path):
    data = corrupt_copy(phantom_dir, tmp_path)
    line = solo_line(manifest_rows, phantom_index)
    contour = row_at(data / "manifest.csv", line)["medis_contour_path"]
    edit_contour(data / contour, lambda p: p["measurements"].update(MLD_mm=9.0))
    report = index(data, tmp_path)
    assert_quarantined(report, phantom_index, line, "measurements.MLD_mm", "exceeds", contour)


def test_missing_calibration_npy_layout_is_quarantined(phantom_dir, phantom_index_npy,
                                                       manifest_rows, tmp_path):
    data = corrupt_copy(phantom_dir, tmp_path, "npy")
    line = solo_line(manifest_rows, phantom_index_npy)
    contour = row_at(data / "manifest_npy.csv", line)["medis_contour_path"]
    edit_contour(data / contour, lambda p: p.pop("calibration"))
    report = index(data, tmp_path, "manifest_npy.csv")
    assert_quarantined(report, phantom_index_npy, line, "calibration", "missing calibration",
                       contour)


def test_missing_calibration_dicom_layout_falls_back_to_dicom(phantom_dir, phantom_index,
                                                              manifest_rows, tmp_path):
    data = corrupt_copy(phantom_dir, tmp_path)
    line = solo_line(manifest_rows, phantom_index)
    contour = row_at(data / "manifest.csv", line)["medis_contour_path"]
    edit_contour(data / contour, lambda p: p.pop("calibration"))
    report = index(data, tmp_path)
    assert [p.row for p in report.quarantined] == [p.row for p in phantom_index.quarantined]
    kept, before = record(report, line), record(phantom_index, line)
    assert kept["spacing_source"] == "dicom" and before["spacing_source"] == "calibration"
    # ImagerPixelSpacing over SDD / SOD is the calibration the core lab would have reported.
    assert kept["pixel_spacing_mm"] == pytest.approx(before["pixel_spacing_mm"], rel=1e-4)
    assert [w.field for w in report.warnings if w.row == line] == ["calibration"]
    assert "calibration" in kept["warnings"]


def test_nan_measurement(phantom_dir, phantom_index, manifest_rows, tmp_path):
    data = corrupt_copy(phantom_dir, tmp_path)
    line = solo_line(manifest_rows, phantom_index)
    contour = row_at(data / "manifest.csv", line)["medis_contour_path"]
    edit_contour(data / contour, lambda p: p["measurements"].update(MLD_mm=math.nan))
    assert "NaN" in (data / contour).read_text()
    report = index(data, tmp_path)
    assert_quarantined(report, phantom_index, line, "measurements.MLD_mm",
                       "not a positive finite number", contour)


@pytest.mark.parametrize("outside", ["../../etc/passwd", "/etc/passwd", "dicom/../../x.dcm"])
def test_path_outside_data_root(phantom_dir, phantom_index, manifest_rows, tmp_path, outside):
    data = corrupt_copy(phantom_dir, tmp_path)
    line = solo_line(manifest_rows, phantom_index)
    edit_row(data / "manifest.csv", line, dicom_path=outside)
    report = index(data, tmp_path)
    assert_quarantined(report, phantom_index, line, "dicom_path", "outside the data root",
                       outside)


def test_mask_path_outside_data_root(phantom_dir, phantom_index, manifest_rows, tmp_path):
    data = corrupt_copy(phantom_dir, tmp_path)
    line = solo_line(manifest_rows, phantom_index)
    edit_row(data / "manifest.csv", line, medis_mask_path="../../etc/passwd")
    report = index(data, tmp_path)
    assert_quarantined(report, phantom_index, line, "medis_mask_path", "outside the data root")


def test_swapped_mask(phantom_dir, phantom_index, manifest_rows, tmp_path):
    data = corrupt_copy(phantom_dir, tmp_path)
    line = solo_line(manifest_rows, phantom_index)
    target = row_at(data / "manifest.csv", line)
    other = next(r for r in manifest_rows
                 if r["patient_id"] != target["patient_id"]
                 and r["medis_mask_path"].endswith(".png"))
    edit_row(data / "manifest.csv", line, medis_mask_path=other["medis_mask_path"])
    report = index(data, tmp_path)
    assert_quarantined(report, phantom_index, line, "medis_mask_path", "centerline",
                       other["medis_mask_path"])


# --- cosmetic faults: repaired with a warning, never dropped ---------------------------------


@pytest.mark.parametrize("text", ["see report", "LESION 1", ""])
def test_unreadable_vessel_text_is_kept(phantom_dir, phantom_index, manifest_rows, tmp_path,
                                        text):
    data = corrupt_copy(phantom_dir, tmp_path)
    line = solo_line(manifest_rows, phantom_index,
                     lambda row, rec: rec["vessel_source"] == "text")
    edit_row(data / "manifest.csv", line, vessel_pattern=text)
    report = index(data, tmp_path)
    assert [p.row for p in report.quarantined] == [p.row for p in phantom_index.quarantined]
    kept = record(report, line)
    assert kept["vessel_source"] == "segment"
    assert kept["vessel"] == record(phantom_index, line)["vessel"]
    assert [w.field for w in report.warnings if w.row == line] == ["vessel_pattern"]


def test_half_resolution_mask_is_rescaled(phantom_dir, phantom_index, manifest_rows, tmp_path):
    data = corrupt_copy(phantom_dir, tmp_path)
    line = solo_line(manifest_rows, phantom_index,
                     lambda row, rec: row["medis_mask_path"].endswith(".png")
                     and "rescaled" not in rec["warnings"])
    mask_path = row_at(data / "manifest.csv", line)["medis_mask_path"]
    full = read_mask(data / mask_path)
    assert full.shape == (256, 256)
    save_mask(data / mask_path, full[::2, ::2])
    report = index(data, tmp_path)
    assert [p.row for p in report.quarantined] == [p.row for p in phantom_index.quarantined]
    kept, before = record(report, line), record(phantom_index, line)
    warnings = [w for w in report.warnings if w.row == line]
    assert [w.field for w in warnings] == ["medis_mask_path"]
    assert "rescaled by 2" in warnings[0].reason and warnings[0].file == mask_path
    ys, xs = np.nonzero(full)
    truth = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    assert [before[c] for c in BBOX] == truth
    assert np.abs(np.array([kept[c] for c in BBOX]) - truth).max() <= 2
    assert kept["mask_area_px"] == pytest.approx(before["mask_area_px"], rel=0.3)
    assert (kept["frame_height"], kept["frame_width"]) == (256, 256)


def _angles_missing(phantom_dir, baseline, manifest_rows, tmp_path, manifest) -> tuple:
    data = corrupt_copy(phantom_dir, tmp_path, "npy" if "npy" in manifest else "dicom")
    line = solo_line(manifest_rows, baseline, lambda row, rec: abs(rec["angle_lao_deg"]) > 5
                     and row["primary_angle"] != "")
    csv_primary = float(row_at(data / manifest, line)["primary_angle"])
    csv_secondary = float(row_at(data / manifest, line)["secondary_angle"])
    edit_row(data / manifest, line, primary_angle="", secondary_angle="")
    report = index(data, tmp_path, manifest)
    assert [p.row for p in report.quarantined] == [p.row for p in baseline.quarantined]
    return record(report, line), csv_primary, csv_secondary


def test_angles_missing_filled_from_dicom(phantom_dir, phantom_index, manifest_rows, tmp_path):
    kept, primary, secondary = _angles_missing(phantom_dir, phantom_index, manifest_rows,
                                               tmp_path, "manifest.csv")
    assert kept["angle_source"] == "dicom"
    assert kept["angle_lao_deg"] == pytest.approx(-primary)  # CSV RAO positive, stored LAO
    assert kept["angle_cranial_deg"] == pytest.approx(secondary)


def test_angles_missing_filled_from_contour(phantom_dir, phantom_index_npy, manifest_rows,
                                            tmp_path):
    kept, primary, secondary = _angles_missing(phantom_dir, phantom_index_npy, manifest_rows,
                                               tmp_path, "manifest_npy.csv")
    assert kept["angle_source"] == "contour"
    assert kept["angle_lao_deg"] == pytest.approx(-primary)
    assert kept["angle_cranial_deg"] == pytest.approx(secondary)


def test_angles_missing_everywhere_are_nan(phantom_dir, phantom_index_npy, manifest_rows,
                                           tmp_path):
    data = corrupt_copy(phantom_dir, tmp_path, "npy")
    line = solo_line(manifest_rows, phantom_index_npy)
    row = edit_row(data / "manifest_npy.csv", line, primary_angle="", secondary_angle="")
    edit_contour(data / row["medis_contour_path"], lambda p: p.pop("view_angles"))
    report = index(data, tmp_path, "manifest_npy.csv")
    kept = record(report, line)
    assert kept["angle_source"] == "none"
    assert math.isnan(kept["angle_lao_deg"]) and math.isnan(kept["angle_cranial_deg"])
    assert "primary_angle" in [w.field for w in report.warnings if w.row == line]


def test_labelled_csv_angles(phantom_dir, phantom_index, manifest_rows, tmp_path):
    data = corrupt_copy(phantom_dir, tmp_path)
    line = solo_line(manifest_rows, phantom_index)
    edit_row(data / "manifest.csv", line, primary_angle="LAO 80", secondary_angle="CAUDAL 45")
    report = index(data, tmp_path)
    kept = record(report, line)
    assert (kept["angle_lao_deg"], kept["angle_cranial_deg"]) == (80.0, -45.0)
    assert kept["angle_source"] == "csv"
    # The DICOM says otherwise: the CSV is kept, and the disagreement is reported.
    disagreement = [w for w in report.warnings if w.row == line and w.field == "primary_angle"]
    assert len(disagreement) == 1 and "differ from dicom" in disagreement[0].reason


def test_unrecognised_phase_is_kept_as_unknown(phantom_dir, phantom_index, manifest_rows,
                                               tmp_path):
    data = corrupt_copy(phantom_dir, tmp_path)
    line = solo_line(manifest_rows, phantom_index)
    edit_row(data / "manifest.csv", line, phase="??")
    report = index(data, tmp_path)
    assert record(report, line)["phase"] == "UNKNOWN"
    assert "phase" in [w.field for w in report.warnings if w.row == line]


# --- strict mode -----------------------------------------------------------------------------


def test_strict_raises_naming_file_row_and_field(phantom_dir, phantom_index, manifest_rows,
                                                 tmp_path):
    data = corrupt_copy(phantom_dir, tmp_path)
    line = solo_line(manifest_rows, phantom_index)
    edit_row(data / "manifest.csv", line, cass_segment="99")
    with pytest.raises(DataError) as error:
        index(data, tmp_path, strict=True)
    message = str(error.value)
    assert str(data / "manifest.csv") in message
    assert f"row {line}" in message
    assert "field cass_segment" in message
    assert (error.value.row, error.value.field) == (line, "cass_segment")
    assert not (tmp_path / "out" / "index.parquet").exists()


def test_strict_stops_at_the_duplicate(phantom_dir, tmp_path):
    with pytest.raises(DataError) as error:
        index(phantom_dir, tmp_path, strict=True)
    assert error.value.row == 18 and error.value.field == "row"
    assert "duplicate of row" in str(error.value)


# --- whole-file problems ---------------------------------------------------------------------


def test_empty_csv(tmp_path):
    (tmp_path / "manifest.csv").write_bytes(b"")
    with pytest.raises(DataError, match="empty CSV") as error:
        index(tmp_path, tmp_path)
    assert error.value.file == str(tmp_path / "manifest.csv")


def test_header_without_rows(phantom_dir, tmp_path):
    header = (phantom_dir / "manifest.csv").read_text().splitlines()[0]
    (tmp_path / "manifest.csv").write_text(header + "\n")
    with pytest.raises(DataError, match="no data rows"):
        index(tmp_path, tmp_path)


def test_missing_columns(phantom_dir, tmp_path):
    data = corrupt_copy(phantom_dir, tmp_path)
    fieldnames, rows = read_csv_rows(data / "manifest.csv")
    fieldnames.remove("frame_index")
    write_csv_rows(data / "manifest.csv", fieldnames,
                   [{k: v for k, v in r.items() if k != "frame_index"} for r in rows])
    with pytest.raises(DataError, match="missing column") as error:
        index(data, tmp_path)
    assert (error.value.row, error.value.field) == (1, "frame_index")
    assert "frame_index" in str(error.value)


def test_no_image_column(phantom_dir, tmp_path):
    data = corrupt_copy(phantom_dir, tmp_path)
    fieldnames, rows = read_csv_rows(data / "manifest.csv")
    drop = {"dicom_path", "cine_path"}
    write_csv_rows(data / "manifest.csv", [f for f in fieldnames if f not in drop],
                   [{k: v for k, v in r.items() if k not in drop} for r in rows])
    with pytest.raises(DataError, match="dicom_path or a cine_path"):
        index(data, tmp_path)


def test_semicolon_delimiter(phantom_dir, phantom_index, tmp_path):
    data = corrupt_copy(phantom_dir, tmp_path)
    fieldnames, rows = read_csv_rows(data / "manifest.csv")
    write_csv_rows(data / "manifest.csv", fieldnames, rows, delimiter=";")
    assert (data / "manifest.csv").read_text().count(",") == 0
    report = index(data, tmp_path)
    assert any("';'" in note and "delimiter" in note for note in report.notes)
    pd.testing.assert_frame_equal(report.index[LAYOUT_INDEPENDENT],
                                  phantom_index.index[LAYOUT_INDEPENDENT])
    assert [p.row for p in report.quarantined] == [p.row for p in phantom_index.quarantined]


def test_cp1252_csv(phantom_dir, phantom_index, manifest_rows, tmp_path):
    data = corrupt_copy(phantom_dir, tmp_path)
    fieldnames, rows = read_csv_rows(data / "manifest.csv")
    line = solo_line(manifest_rows, phantom_index, lambda row, rec: rec["vessel"] == "LAD"
                     and rec["vessel_source"] == "text")
    rows[line - 2]["vessel_pattern"] = "LAD \u2013 r\u00e9sultat"  # en dash, e acute
    write_csv_rows(data / "manifest.csv", fieldnames, rows, encoding="cp1252")
    raw = (data / "manifest.csv").read_bytes()
    assert b"\x96" in raw and b"\xe9" in raw  # really cp1252, not UTF-8
    report = index(data, tmp_path)
    assert any("Windows-1252" in note for note in report.notes)
    pd.testing.assert_frame_equal(report.index[LAYOUT_INDEPENDENT],
                                  phantom_index.index[LAYOUT_INDEPENDENT])


def test_utf8_bom_and_header_case(phantom_dir, phantom_index, tmp_path):
    data = corrupt_copy(phantom_dir, tmp_path)
    text = (data / "manifest.csv").read_text(encoding="utf-8")
    header, rest = text.split("\n", 1)
    (data / "manifest.csv").write_text(header.upper() + "\n" + rest, encoding="utf-8-sig")
    report = index(data, tmp_path)
    assert report.notes == []
    assert len(report.index) == len(phantom_index.index)


def test_binary_file_is_not_a_csv(tmp_path):
    (tmp_path / "manifest.csv").write_bytes(b"PK\x03\x04\x00\x00binary")
    with pytest.raises(DataError, match="binary"):
        index(tmp_path, tmp_path)


def test_stray_delimiter_row(phantom_dir, phantom_index, manifest_rows, tmp_path):
    data = corrupt_copy(phantom_dir, tmp_path)
    line = solo_line(manifest_rows, phantom_index)
    lines = (data / "manifest.csv").read_text(encoding="utf-8").splitlines()
    lines[line - 1] += ",extra"
    (data / "manifest.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = index(data, tmp_path)
    assert_quarantined(report, phantom_index, line, "row", "more cells than header")


# --- faults found in review: each once crashed the index or slipped through ------------------


@pytest.mark.parametrize("syntax", ["Explicit VR Little Endian", "RLE Lossless"])
def test_truncated_dicom_with_intact_analysed_frame(phantom_dir, phantom_index, manifest_rows,
                                                    tmp_path, syntax):
    data = corrupt_copy(phantom_dir, tmp_path)
    line = solo_line(manifest_rows, phantom_index,
                     lambda row, rec: rec["transfer_syntax"] == syntax)
    dicom = edit_row(data / "manifest.csv", line, frame_index="0")["dicom_path"]
    content = (data / dicom).read_bytes()
    (data / dicom).write_bytes(content[:int(len(content) * 0.8)])
    report = index(data, tmp_path)
    assert_quarantined(report, phantom_index, line, "PixelData", "truncated", dicom)


@pytest.mark.parametrize("change", [
    lambda c: c.update(calibration=0.52),
    lambda c: c["measurements"].update(MLD_position_px=5),
    lambda c: c["measurements"].update(MLD_position_px={"x": 1, "y": 2}),
    lambda c: c.update(centerline="not a list"),
])
def test_malformed_contour_json_never_stops_the_index(phantom_dir, phantom_index, manifest_rows,
                                                      tmp_path, change):
    data = corrupt_copy(phantom_dir, tmp_path)
    line = solo_line(manifest_rows, phantom_index)
    edit_contour(data / row_at(data / "manifest.csv", line)["medis_contour_path"], change)
    report = index(data, tmp_path)
    # Kept with what can be trusted (calibration falls back to the DICOM), or quarantined;
    # never an exception, and every other row is indexed.
    assert line in set(report.index["row"]) | {p.row for p in report.quarantined}
    assert set(report.index["row"]) >= set(phantom_index.index["row"]) - {line}


def test_single_value_imager_pixel_spacing(phantom_dir, phantom_index, manifest_rows, tmp_path):
    data = corrupt_copy(phantom_dir, tmp_path)
    line = solo_line(manifest_rows, phantom_index)
    row = row_at(data / "manifest.csv", line)
    ds = pydicom.dcmread(data / row["dicom_path"])
    ds.ImagerPixelSpacing = ds.ImagerPixelSpacing[0]
    ds.save_as(data / row["dicom_path"])
    edit_contour(data / row["medis_contour_path"], lambda c: c.pop("calibration"))
    report = index(data, tmp_path)
    kept = record(report, line)
    assert kept["spacing_source"] == "dicom"
    assert kept["pixel_spacing_mm"] == pytest.approx(
        record(phantom_index, line)["pixel_spacing_mm"], rel=1e-4)


def test_path_naming_the_patient_is_quarantined_without_leaking(phantom_dir, phantom_index,
                                                                manifest_rows, tmp_path):
    data = corrupt_copy(phantom_dir, tmp_path)
    line = solo_line(manifest_rows, phantom_index)
    row = row_at(data / "manifest.csv", line)
    folder = data / row["patient_id"]
    folder.mkdir()
    moved = f"{row['patient_id']}/{Path(row['dicom_path']).name}"
    shutil.move(data / row["dicom_path"], data / moved)
    edit_row(data / "manifest.csv", line, dicom_path=moved)
    report = index(data, tmp_path)
    assert_quarantined(report, phantom_index, line, "dicom_path", "contains the patient ID")
    for path in (report.out, report.quarantine_path):
        assert row["patient_id"].encode() not in path.read_bytes()


def test_all_rows_quarantined_still_writes_a_typed_index(phantom_dir, tmp_path):
    data = corrupt_copy(phantom_dir, tmp_path)
    fieldnames, rows = read_csv_rows(data / "manifest.csv")
    write_csv_rows(data / "manifest.csv", fieldnames, [{**r, "cass_segment": "99"} for r in rows])
    report = index(data, tmp_path)
    assert report.index.empty and len(report.quarantined) == len(rows)
    schema = pq.read_schema(report.out)
    assert schema.field("frame_index").type == pa.int64()
    assert schema.field("mld_mm").type == pa.float64()
    assert pa.types.is_string(schema.field("split").type) or \
        pa.types.is_large_string(schema.field("split").type)


def test_a_search_says_phantoms_whoever_indexed_them(phantom_dir, phantom_index, tmp_path):
    """The data note that search records and reports carry: an index built from phantoms is
    phantoms; the same files without the generator's record beside them are user data."""
    from angiotune.search.api import data_note

    index = phantom_index.out
    assert data_note(index, None).startswith("angiotune's synthetic phantoms (not clinical")
    assert data_note(index, None).endswith("the embedded tiny SAM 3 model")
    copy = tmp_path / "export"
    shutil.copytree(phantom_dir, copy, ignore=shutil.ignore_patterns("phantoms.json"))
    build_index(copy / "manifest.csv", tmp_path / "user.parquet", IndexSettings(salt="s"))
    assert data_note(tmp_path / "user.parquet", tmp_path) == (
        "user data and the SAM 3 weights given")


# --- the minimal export: no contour JSON, measurements as CSV columns ------------------------

MINIMAL_COLUMNS = ["patient_id", "frame_index", "cass_segment", "medis_mask_path"]
DOCS = Path(__file__).resolve().parents[1] / "docs"
EXAMPLE_CONTOUR = DOCS / "examples" / "contour_example.json"
QCA_COLUMNS = ["mld_mm", "diameter_stenosis_pct", "rvd_mm"]


def write_minimal_csv(data: Path, manifest: str, *, keep: tuple[str, ...] = (),
                      measured: bool = False, spacing: bool = False) -> Path:
    """Rewrite ``manifest`` with only the columns stage 1 needs (and ``keep``); ``measured``
    adds the contour JSON's MLD, % DS and RVD as CSV columns, ``spacing`` its calibration as
    ``pixel_spacing_mm``. Returns the CSV's path."""
    path = data / manifest
    _, rows = read_csv_rows(path)
    image = "dicom_path" if rows[0]["dicom_path"] else "cine_path"
    written = []
    for row in rows:
        cells = {name: row[name] for name in (*MINIMAL_COLUMNS, image, *keep)}
        contour = json.loads((data / row["medis_contour_path"]).read_text(encoding="utf-8"))
        if measured:
            cells |= {name: str(contour["measurements"][name]) for name in REQUIRED_MEASUREMENTS}
        if spacing:
            cells["pixel_spacing_mm"] = repr(1 / contour["calibration"]["scale_factor"])
        written.append(cells)
    write_csv_rows(path, list(written[0]), written)
    return path


@pytest.mark.parametrize("layout", ["dicom", "npy"])
def test_minimal_csv_indexes_every_row(phantom_dir, phantom_index, phantom_index_npy, tmp_path,
                                       layout):
    from angiotune.data.stream import SampleSettings, prepare_sample

    baseline, manifest = {"dicom": (phantom_index, "manifest.csv"),
                          "npy": (phantom_index_npy, "manifest_npy.csv")}[layout]
    data = corrupt_copy(phantom_dir, tmp_path, layout)
    # NPY cines carry no angles: keep the CSV's (the "+ angles when present" of a minimal export).
    write_minimal_csv(data, manifest,
                      keep=("primary_angle", "secondary_angle") if layout == "npy" else ())
    report = index(data, tmp_path, manifest)
    assert [(p.row, p.field) for p in report.quarantined] == \
        [(p.row, p.field) for p in baseline.quarantined]  # only the duplicated row
    got = report.index.sort_values("row").reset_index(drop=True)
    want = baseline.index.sort_values("row").reset_index(drop=True)
    same = ["row", "sample_id", "patient_key", "split", "vessel", "segment", "frame_index",
            "image_path", "mask_path", *BBOX, "mask_area_px"]
    pd.testing.assert_frame_equal(got[same], want[same])
    assert got[[*QCA_COLUMNS, "lesion_length_mm", "mld_x"]].isna().all().all()
    assert (got["contour_path"] == "").all() and (got["vessel_source"] == "segment").all()
    assert (got["phase"] == "UNKNOWN").all()
    assert not [w for w in report.warnings if w.field in ("calibration", "phase", "vessel_pattern")]
    if layout == "dicom":  # ImagerPixelSpacing over SDD / SOD, as the calibration would say
        assert (got["spacing_source"] == "dicom").all() and (got["angle_source"] == "dicom").all()
        np.testing.assert_allclose(got["pixel_spacing_mm"], want["pixel_spacing_mm"], rtol=1e-4)
        assert missing_measurements(report.out) == QCA_COLUMNS
    else:  # nothing says mm per pixel: absent, which stage 1 does not need
        assert (got["spacing_source"] == "none").all() and got["pixel_spacing_mm"].isna().all()
        assert missing_measurements(report.out) == [*QCA_COLUMNS, "pixel_spacing_mm"]
    # Stage 1 reads such a row like any other; its QCA values travel as NaN.
    sample = prepare_sample(got.iloc[0].to_dict(), data, SampleSettings(image_size=32))
    assert sample["mask"].any() and math.isnan(sample["mld_mm"])


def test_measurements_from_csv_columns(phantom_dir, phantom_index_npy, tmp_path):
    data = corrupt_copy(phantom_dir, tmp_path, "npy")
    write_minimal_csv(data, "manifest_npy.csv", measured=True, spacing=True)
    report = index(data, tmp_path, "manifest_npy.csv")
    got = report.index.set_index("row").sort_index()
    want = phantom_index_npy.index.set_index("row").sort_index()
    assert list(got.index) == list(want.index)
    for column in (*QCA_COLUMNS, "pixel_spacing_mm"):
        np.testing.assert_allclose(got[column], want[column], rtol=1e-12, err_msg=column)
    assert (got["spacing_source"] == "csv").all()
    assert got["lesion_length_mm"].isna().all()  # not given in this CSV
    assert missing_measurements(report.out) == []


def test_csv_measurements_without_any_spacing_are_quarantined(phantom_dir, tmp_path):
    data = corrupt_copy(phantom_dir, tmp_path, "npy")  # NPY: no spacing in the image file
    write_minimal_csv(data, "manifest_npy.csv", measured=True)
    report = index(data, tmp_path, "manifest_npy.csv")
    assert report.index.empty
    assert {p.field for p in report.quarantined} == {"calibration"}
    assert "no pixel_spacing_mm in the CSV" in report.quarantined[0].reason


@pytest.mark.parametrize(("cells", "field", "reason"), [
    ({"MLD_mm": "one point two"}, "MLD_mm", "not a positive finite number"),
    ({"MLD_mm": "-1.2"}, "MLD_mm", "not a positive finite number"),
    ({"diameter_stenosis_pct": "140"}, "diameter_stenosis_pct", "outside 0..100"),
    ({"interpolated_RVD_mm": "NaN"}, "interpolated_RVD_mm", "not a positive finite number"),
    ({"interpolated_RVD_mm": ""}, "interpolated_RVD_mm", "give all three"),
    ({"pixel_spacing_mm": "0"}, "pixel_spacing_mm", "not a positive finite number"),
])
def test_bad_measurement_cell_is_quarantined(phantom_dir, manifest_rows, tmp_path, cells, field,
                                             reason):
    data = corrupt_copy(phantom_dir, tmp_path, "npy")
    manifest = write_minimal_csv(data, "manifest_npy.csv", measured=True, spacing=True)
    baseline = index(data, tmp_path / "baseline", "manifest_npy.csv")
    line = solo_line(manifest_rows, baseline)
    edit_row(manifest, line, **cells)
    report = index(data, tmp_path, "manifest_npy.csv")
    assert_quarantined(report, baseline, line, field, reason, "manifest_npy.csv")


def test_csv_and_contour_measurements_must_agree(phantom_dir, phantom_index, manifest_rows,
                                                 tmp_path):
    data = corrupt_copy(phantom_dir, tmp_path)
    manifest = write_minimal_csv(data, "manifest.csv", keep=("medis_contour_path",),
                                 measured=True)
    fieldnames, rows = read_csv_rows(manifest)
    for row in rows:  # as an export rounds them: still the same values
        row.update({name: f"{float(row[name]):.2f}" for name in REQUIRED_MEASUREMENTS})
    write_csv_rows(manifest, fieldnames, rows)
    agreed = index(data, tmp_path / "agreed")
    assert sorted(agreed.index["row"]) == sorted(phantom_index.index["row"])
    pd.testing.assert_frame_equal(agreed.index[QCA_COLUMNS], phantom_index.index[QCA_COLUMNS])
    line = solo_line(manifest_rows, phantom_index)
    row = edit_row(manifest, line, MLD_mm=f"{float(row_at(manifest, line)['MLD_mm']) + 0.3:.2f}")
    report = index(data, tmp_path)
    assert_quarantined(report, agreed, line, "measurements.MLD_mm", "disagree",
                       row["medis_contour_path"])
    assert "the CSV's MLD_mm" in next(p for p in report.quarantined if p.row == line).reason


def test_example_contour_json_is_accepted(tmp_path):
    """docs/examples/contour_example.json goes through the real reader and index checks."""
    contour = read_contour(EXAMPLE_CONTOUR)
    shutil.copyfile(EXAMPLE_CONTOUR, tmp_path / "contour.json")
    np.save(tmp_path / "cine.npy", np.full((2, 512, 512), 0.5, np.float32))
    mask = Image.new("L", (512, 512))
    ImageDraw.Draw(mask).line([tuple(p) for p in contour["centerline"]], fill=255, width=9)
    mask.save(tmp_path / "mask.png")
    row = {"patient_id": "P-0001", "frame_index": "1", "cass_segment": "13",
           "cine_path": "cine.npy", "medis_mask_path": "mask.png",
           "medis_contour_path": "contour.json"}
    write_csv_rows(tmp_path / "manifest.csv", list(row), [row])
    report = index(tmp_path, tmp_path)
    assert not report.quarantined and not report.warnings
    kept = report.index.iloc[0]
    m = contour["measurements"]
    assert (kept["mld_mm"], kept["diameter_stenosis_pct"], kept["rvd_mm"]) == \
        (m["MLD_mm"], m["diameter_stenosis_pct"], m["interpolated_RVD_mm"])
    assert (kept["lesion_length_mm"], kept["proximal_diameter_mm"],
            kept["distal_diameter_mm"], kept["mld_x"], kept["mld_y"]) == \
        (m["lesion_length_mm"], m["proximal_normal_diameter_mm"],
         m["distal_normal_diameter_mm"], *m["MLD_position_px"])
    assert kept["spacing_source"] == "calibration"
    assert kept["pixel_spacing_mm"] == pytest.approx(1 / contour["calibration"]["scale_factor"])
    assert (kept["angle_lao_deg"], kept["angle_cranial_deg"], kept["angle_source"]) == \
        (-30.0, 25.0, "contour")  # "RAO 30", "CRANIAL 25"
    assert missing_measurements(report.out) == []
    # Every key of the example is documented.
    doc = (DOCS / "contour_schema.md").read_text(encoding="utf-8")
    keys = [f"{top}.{inner}" if isinstance(value, dict) else top
            for top, value in contour.items()
            for inner in (value if isinstance(value, dict) else [None])]
    assert [key for key in keys if f"`{key}`" not in doc] == []


def test_missing_measurements_of_full_and_partial_indexes(phantom_index):
    assert missing_measurements(phantom_index.out) == []
    assert missing_measurements(phantom_index.index, split="train") == []
    frame = phantom_index.index.copy()
    frame.loc[frame.index[:3], "mld_mm"] = math.nan  # partly measured: the losses skip those
    assert missing_measurements(frame) == []
    frame["rvd_mm"] = math.nan
    frame.loc[frame.index[0], "pixel_spacing_mm"] = math.nan  # one row poisons a batch
    assert missing_measurements(frame) == ["rvd_mm", "pixel_spacing_mm"]
    assert missing_measurements(frame.drop(columns="diameter_stenosis_pct")) == \
        ["diameter_stenosis_pct", "rvd_mm", "pixel_spacing_mm"]


def test_missing_measurements_matches_what_the_head_losses_tolerate():
    """Why the rules differ: an unknown target is skipped, an unknown spacing is not."""
    import torch

    from angiotune.model.losses import regression_loss

    pred = torch.tensor([2.0, 3.0], requires_grad=True)
    for target in ([math.nan, 2.5], [math.nan, math.nan]):
        loss = regression_loss(pred * 1.0, torch.tensor(target), 1.0)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(pred.grad).all()
    pred.grad = None
    in_mm = pred * torch.tensor([math.nan, 0.2])  # the heads' pixels -> mm, one spacing unknown
    regression_loss(in_mm, torch.tensor([math.nan, 0.5]), 1.0).backward()
    assert not torch.isfinite(pred.grad).all()


def test_stage_two_refuses_an_index_without_measurements_naming_them(phantom_dir, tmp_path):
    """Before Ray starts: the heads would train on nothing but NaN targets."""
    from angiotune.errors import AngiotuneError
    from angiotune.search import load_space, search

    data = corrupt_copy(phantom_dir, tmp_path, "dicom")
    write_minimal_csv(data, "manifest.csv")
    minimal = index(data, tmp_path, "manifest.csv").out
    with pytest.raises(AngiotuneError, match=r"need mld_mm, which the index lacks \(missing: "
                                             r"mld_mm, diameter_stenosis_pct, rvd_mm"):
        search(load_space("stage2_multitask.yaml"), data=minimal, results=tmp_path / "results")
    assert not (tmp_path / "results" / "searches").exists()
