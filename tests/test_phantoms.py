"""Phantom exports: DICOM tags and pixels, determinism, class balance and the exact truth."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from angiotune.data.angles import parse_primary, parse_secondary
from angiotune.data.phantoms import PhantomSettings, generate_phantoms
from angiotune.data.phantoms.generate import (
    FIELD_OF_VIEW_MM,
    REAL_EXPORT_COUNTS,
    VIEW_GROUP,
    allocate_segments,
)
from angiotune.data.readers import read_frame, read_header, read_mask
from angiotune.taxonomies import load_taxonomy

SIZE, FRAMES = 256, 4  # as PHANTOM_SETTINGS in conftest


def _contour(phantom_dir: Path, row: dict) -> dict:
    return json.loads((phantom_dir / row["medis_contour_path"]).read_text(encoding="utf-8"))


def _runs(manifest_rows: list[dict]) -> dict[str, dict]:
    """One manifest row per DICOM run (the first lesion filmed in it)."""
    runs: dict[str, dict] = {}
    for row in manifest_rows:
        runs.setdefault(row["dicom_path"], row)
    return runs


# --- DICOM round trip ------------------------------------------------------------------------


def test_dicom_tags(phantom_dir, manifest_rows):
    runs = _runs(manifest_rows)
    assert len(runs) >= 10
    syntaxes = set()
    for dicom_path, row in runs.items():
        ds = pydicom.dcmread(phantom_dir / dicom_path, stop_before_pixels=True)
        assert ds.Modality == "XA"
        assert ds.SOPClassUID == pydicom.uid.XRayAngiographicImageStorage
        assert int(ds.NumberOfFrames) == FRAMES
        assert (ds.Rows, ds.Columns) == (SIZE, SIZE)
        assert ds.FrameTime == pytest.approx(1000 / 15, abs=1e-3)
        spacing = [float(v) for v in ds.ImagerPixelSpacing]
        assert spacing == pytest.approx([FIELD_OF_VIEW_MM / SIZE] * 2, abs=1e-6)
        sdd, sod = float(ds.DistanceSourceToDetector), float(ds.DistanceSourceToPatient)
        assert 700 < sod < sdd < 1200  # source-to-patient shorter than source-to-detector

        contour = _contour(phantom_dir, row)
        # DICOM PositionerPrimaryAngle is LAO positive, as the contour's labelled view says.
        assert float(ds.PositionerPrimaryAngle) == pytest.approx(
            parse_primary(contour["view_angles"]["primary"]), abs=1e-9)
        assert float(ds.PositionerSecondaryAngle) == pytest.approx(
            parse_secondary(contour["view_angles"]["secondary"]), abs=1e-9)
        if row["primary_angle"]:  # the CSV gives RAO as positive: the opposite sign
            assert float(ds.PositionerPrimaryAngle) == pytest.approx(-float(row["primary_angle"]))
            assert float(ds.PositionerSecondaryAngle) == pytest.approx(
                float(row["secondary_angle"]))
        # The calibration a core lab reports is the geometric magnification over the detector
        # pixel spacing: pixels per millimetre at the vessel.
        assert sdd / sod / spacing[0] == pytest.approx(contour["calibration"]["scale_factor"],
                                                       rel=1e-4)
        header = read_header(phantom_dir / dicom_path)
        assert header.spacing_at_vessel_mm == pytest.approx(
            1 / contour["calibration"]["scale_factor"], rel=1e-4)
        syntaxes.add(header.transfer_syntax)
    # Both stored forms are exercised: plain and RLE-compressed runs.
    assert syntaxes == {"Explicit VR Little Endian", "RLE Lossless"}


def test_dicom_frames_equal_npy_cine(phantom_dir, manifest_rows):
    for row in _runs(manifest_rows).values():
        dicom = phantom_dir / row["dicom_path"]
        npy = phantom_dir / row["dicom_path"].replace("dicom/", "cines/").replace(".dcm", ".npy")
        cine = np.load(npy)
        assert cine.shape == (FRAMES, SIZE, SIZE) and cine.dtype == np.float32
        for index in range(FRAMES):
            frame = read_frame(dicom, index)
            assert frame.dtype == np.float32
            np.testing.assert_array_equal(frame, cine[index])
            np.testing.assert_array_equal(read_frame(npy, index), cine[index])
        # Pixels are 12-bit detector values, not a constant image.
        assert np.unique(np.round(cine[-1] * 4095)).size > 50
        assert np.allclose(cine * 4095, np.round(cine * 4095), atol=1e-3)


def test_dicom_holds_patient_identity_for_the_index_to_drop(phantom_dir, manifest_rows):
    """Like a real export the DICOM names the patient: the index must be what removes it."""
    row = manifest_rows[0]
    ds = pydicom.dcmread(phantom_dir / row["dicom_path"], stop_before_pixels=True)
    assert ds.PatientID == row["patient_id"]
    assert "^" in str(ds.PatientName)


# --- determinism -----------------------------------------------------------------------------


def _all_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_same_seed_same_bytes(tmp_path):
    settings = PhantomSettings(lesions=3, size=128, frames=2, seed=11)
    generate_phantoms(tmp_path / "a", settings)
    generate_phantoms(tmp_path / "b", settings)
    a, b = tmp_path / "a", tmp_path / "b"
    assert (a / "manifest.csv").read_bytes() == (b / "manifest.csv").read_bytes()
    assert (a / "manifest_npy.csv").read_bytes() == (b / "manifest_npy.csv").read_bytes()
    cines = sorted((a / "cines").glob("*.npy"))
    assert cines
    for cine in cines:
        np.testing.assert_array_equal(np.load(cine), np.load(b / "cines" / cine.name))
    # Every file, DICOM UIDs included, is reproduced byte for byte.
    assert _all_files(a) == _all_files(b)


def test_other_seed_other_data(tmp_path):
    generate_phantoms(tmp_path / "a", PhantomSettings(lesions=3, size=128, frames=2, seed=11))
    generate_phantoms(tmp_path / "b", PhantomSettings(lesions=3, size=128, frames=2, seed=12))
    assert (tmp_path / "a" / "manifest.csv").read_bytes() != \
        (tmp_path / "b" / "manifest.csv").read_bytes()


@pytest.mark.parametrize("bad", [dict(lesions=0), dict(size=64), dict(frames=0),
                                 dict(shared_views=1.5)])
def test_settings_are_checked(bad):
    with pytest.raises(ValueError):
        PhantomSettings(**bad)


def test_runs_share_a_left_injection_and_borrow_a_neighbours_view():
    """As in real studies: a patient's LAD and LCX lesions may share one left injection, and
    a run may be filmed in another vessel's view, where the angles alone route it wrong."""
    from angiotune.data.phantoms.generate import NEIGHBOUR_VIEWS, STANDARD_VIEWS, _film

    codes = ["13", "19", "2"]  # mid LAD, distal LCX, mid RCA
    own = _film(codes, PhantomSettings(shared_views=0.0), 0)
    assert [(r.name, r.codes, r.side) for r in own] == [
        ("LAD", ["13"], "left"), ("LCX", ["19"], "left"), ("RCA", ["2"], "right")]
    assert all(r.views == STANDARD_VIEWS[r.name] for r in own)
    shared = _film(codes, PhantomSettings(shared_views=1.0), 0)
    left = [r for r in shared if r.side == "left"]
    assert len(left) == 1 and sorted(left[0].codes) == ["13", "19"]
    assert left[0].views in (STANDARD_VIEWS["LAD"], STANDARD_VIEWS["LCX"])
    right = [r for r in shared if r.side == "right"]
    assert right[0].views == NEIGHBOUR_VIEWS["RCA"] and right[0].name == "RCAX"
    alone = _film(["19"], PhantomSettings(shared_views=1.0), 3)
    assert alone[0].views == STANDARD_VIEWS["LAD"]  # an LCX lesion in an LAD view


def test_shared_views_make_lesions_the_angles_route_wrong(tmp_path):
    from angiotune.predict.routing import route_by_angles

    summary = generate_phantoms(tmp_path, PhantomSettings(lesions=8, size=128, frames=1,
                                                          seed=3, messy=False,
                                                          shared_views=1.0))
    text = (summary.out / "manifest.csv").read_text(encoding="utf-8")
    rows = list(csv.DictReader(text.splitlines()))
    misrouted = [r for r in rows
                 if route_by_angles(-float(r["primary_angle"]), float(r["secondary_angle"])).vessel
                 != VIEW_GROUP[load_taxonomy("CASS").segments[r["cass_segment"]].vessel]]
    assert misrouted  # the cases the heads' vessel read is for


# --- class balance ---------------------------------------------------------------------------


def test_allocate_segments_is_long_tailed():
    codes = allocate_segments(800)
    assert len(codes) == 800
    counts = Counter(codes)
    assert set(counts) == set(REAL_EXPORT_COUNTS)
    ranked = counts.most_common()
    assert ranked[0][0] == "13" and ranked[0][1] > ranked[1][1]
    assert load_taxonomy("CASS").segments["13"].name == "mid LAD"
    assert ranked[0][1] / ranked[-1][1] > 10  # a long tail, not a uniform draw
    total = sum(REAL_EXPORT_COUNTS.values())
    for code, real in REAL_EXPORT_COUNTS.items():  # largest remainder: within one of the quota
        assert abs(counts[code] - 800 * real / total) < 1


@pytest.mark.parametrize("n", [1, 5, 16, 99])
def test_allocate_segments_exact_count(n):
    assert len(allocate_segments(n)) == n


def test_generated_set_matches_allocation(phantom_summary, manifest_rows):
    assert phantom_summary.lesions == 16
    assert Counter(phantom_summary.lesions_by_segment) == Counter(allocate_segments(16))
    # One CSV row per lesion plus the deliberately duplicated one.
    assert len(manifest_rows) == 17
    unique = {tuple(r.values()) for r in manifest_rows}
    assert len(unique) == 16


# --- truth -----------------------------------------------------------------------------------


def _full_resolution(mask: np.ndarray) -> np.ndarray:
    factor = SIZE // mask.shape[0]
    assert mask.shape == (SIZE // factor, SIZE // factor)
    return np.repeat(np.repeat(mask, factor, axis=0), factor, axis=1)


def test_mask_agrees_with_contour(phantom_dir, manifest_rows):
    full_resolution = 0
    for row in manifest_rows:
        raw = read_mask(phantom_dir / row["medis_mask_path"])
        mask = _full_resolution(raw)
        contour = _contour(phantom_dir, row)
        line = np.asarray(contour["centerline"], dtype=float)
        assert len(line) >= 5
        cols, rows = np.round(line[:, 0]).astype(int), np.round(line[:, 1]).astype(int)
        # The mask is cut square to the centerline at both ends, so an end point can round to
        # the pixel just outside; every point in between is on the lumen.
        near = ndimage.binary_dilation(mask, structure=np.ones((3, 3), bool))
        assert near[rows[1:-1], cols[1:-1]].all(), row["medis_mask_path"]
        if raw.shape == (SIZE, SIZE):
            full_resolution += 1
            assert near[rows, cols].all(), row["medis_mask_path"]
            assert mask[rows[1:-1], cols[1:-1]].all(), row["medis_mask_path"]
        ys, xs = np.nonzero(mask)
        mld_x, mld_y = contour["measurements"]["MLD_position_px"]
        assert xs.min() <= mld_x <= xs.max() + 1 and ys.min() <= mld_y <= ys.max() + 1
        # The mask is the analysed segment, not the whole frame.
        assert 20 < mask.sum() < 0.05 * SIZE * SIZE
    assert full_resolution >= 10


def test_measurement_truth_is_consistent(phantom_dir, manifest_rows):
    for row in manifest_rows:
        m = _contour(phantom_dir, row)["measurements"]
        assert 0 < m["MLD_mm"] < m["interpolated_RVD_mm"]
        assert m["diameter_stenosis_pct"] == pytest.approx(
            100 * (1 - m["MLD_mm"] / m["interpolated_RVD_mm"]), abs=0.01)
        assert 10 < m["diameter_stenosis_pct"] < 90
        low, high = sorted((m["proximal_normal_diameter_mm"], m["distal_normal_diameter_mm"]))
        assert low - 1e-3 <= m["interpolated_RVD_mm"] <= high + 1e-3
        assert m["lesion_length_mm"] > 0
