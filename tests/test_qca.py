"""QCA against tubes of known diameter: straight and curved, with a narrowing of known depth."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage
from shapes import SPACING_MM, arc, narrowing, straight, tube

from angiotune.qca import QCAError, measure


@pytest.mark.parametrize("shape_name", ["straight", "curved"])
@pytest.mark.parametrize("stenosis_pct", [30.0, 60.0])
def test_known_narrowing_is_measured_within_tolerance(shape_name, stenosis_pct):
    path = straight() if shape_name == "straight" else arc()
    diameters, length = narrowing(path, 3.0, stenosis_pct, plateau_mm=4.0)
    result = measure(tube(path, diameters), SPACING_MM)
    true_mld = 3.0 * (1 - stenosis_pct / 100)
    # Tolerances: half a pixel on a diameter (0.1 mm), 3 percentage points of stenosis.
    assert result.mld_mm == pytest.approx(true_mld, abs=0.1)
    assert result.rvd_mm == pytest.approx(3.0, abs=0.1)
    assert result.diameter_stenosis_pct == pytest.approx(stenosis_pct, abs=3.0)
    assert result.lesion_length_mm == pytest.approx(length, abs=1.0)
    # The MLD sits on the plateau, in the middle of the path.
    middle = path[len(path) // 2] / SPACING_MM
    plateau_half_px = 4.0 / 2 / SPACING_MM
    assert np.linalg.norm(result.centerline_px[result.mld_index] - middle) <= plateau_half_px


def test_reference_follows_a_taper():
    path = straight(length_mm=36.0)
    taper = np.linspace(3.6, 2.4, len(path))
    diameters, _ = narrowing(path, taper, 50.0, plateau_mm=3.0)
    result = measure(tube(path, diameters), SPACING_MM)
    reference_at_middle = 3.0
    assert result.rvd_mm == pytest.approx(reference_at_middle, abs=0.12)
    assert result.diameter_stenosis_pct == pytest.approx(50.0, abs=3.0)
    # A flat reference would be off by the taper: the proximal reference is wider than distal.
    assert abs(result.reference_mm[0] - result.reference_mm[-1]) > 0.6


def test_a_probability_map_places_edges_below_a_pixel():
    path = straight()
    diameters, _ = narrowing(path, 2.5, 40.0, plateau_mm=4.0)
    soft = tube(path, diameters, soft=True)
    result = measure(soft >= 0.5, SPACING_MM, probability=soft)
    assert result.mld_mm == pytest.approx(1.5, abs=0.03)
    assert result.rvd_mm == pytest.approx(2.5, abs=0.03)


def test_the_same_tube_at_two_pixel_spacings_measures_the_same_in_mm():
    path = arc()
    diameters, _ = narrowing(path, 3.0, 50.0, plateau_mm=4.0)
    coarse = measure(tube(path, diameters), SPACING_MM)
    fine = measure(tube(path, diameters, shape=(400, 400), spacing_mm=SPACING_MM / 2),
                   SPACING_MM / 2)
    assert fine.mld_mm == pytest.approx(coarse.mld_mm, abs=0.08)
    assert fine.rvd_mm == pytest.approx(coarse.rvd_mm, abs=0.08)
    assert fine.lesion_length_mm == pytest.approx(coarse.lesion_length_mm, abs=0.6)
    assert fine.mld_mm == pytest.approx(1.5, abs=0.06)  # finer pixels, closer to the truth


def test_a_mask_cut_in_two_by_a_subtotal_occlusion_is_not_called_healthy():
    path = straight()
    diameters, _ = narrowing(path, 3.0, 97.0, plateau_mm=4.0)
    mask = tube(path, diameters)
    assert ndimage.label(mask, structure=np.ones((3, 3)))[1] >= 2  # the lumen vanished
    result = measure(mask, SPACING_MM)
    assert result.mld_mm < 0.1 and result.diameter_stenosis_pct > 95
    assert any("interrupted" in note for note in result.notes)


def test_a_branching_mask_is_flagged_and_reported_as_strict_json():
    main = straight()
    mask = tube(main, np.full(len(main), 2.0))
    branch = np.stack([np.full(400, 15.0), np.linspace(23.0, 39.0, 400)], axis=1)
    mask |= tube(branch, np.full(len(branch), 1.5))
    result = measure(mask, SPACING_MM)
    assert any("branches" in note for note in result.notes)
    json.dumps(result.to_json(), allow_nan=False)  # no NaN where an edge was not found


def test_the_report_names_its_numbers_like_a_core_lab():
    path = straight()
    diameters, _ = narrowing(path, 3.0, 50.0, plateau_mm=4.0)
    report = measure(tube(path, diameters), SPACING_MM).to_json()
    assert {"MLD_mm", "interpolated_RVD_mm", "diameter_stenosis_pct", "lesion_length_mm",
            "MLD_position_px"} <= set(report["measurements"])
    profile = report["diameter_function"]
    assert len(profile["diameter_mm"]) == len(report["centerline"]) == len(report["left_edge"])


def test_unmeasurable_masks_are_refused_clearly():
    with pytest.raises(QCAError, match="too small"):
        measure(np.zeros((50, 50), dtype=bool), SPACING_MM)
    speck = np.zeros((50, 50), dtype=bool)
    speck[20:22, 20:22] = True
    with pytest.raises(QCAError, match="too small"):
        measure(speck, SPACING_MM)
    with pytest.raises(QCAError, match="pixel spacing"):
        measure(speck, 0.0)
