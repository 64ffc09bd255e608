"""QCA against tubes of known diameter: straight and curved, with a narrowing of known depth."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage
from shapes import SPACING_MM, arc, narrowing, straight, tube

from angiotune.qca import QCAError, QCASettings, measure
from angiotune.qca.blur import Blur, measured_blur, true_diameters
from angiotune.qca.edges import EdgeSettings


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


# --- edges from the frame ----------------------------------------------------------------------

def _render(path_mm: np.ndarray, diameter_mm: np.ndarray, shape=(200, 200),
            crossing: bool = False, blur_px: float = 0.8, flat: bool = False) -> np.ndarray:
    """An X-ray-like frame: a dark tube (transmission falls with the chord through the lumen) on
    a textured background, blurred and noisy; ``crossing`` adds a dark vessel across it;
    ``flat``: a uniformly dark band instead, as a vessel painted into an image."""
    from scipy.spatial import cKDTree

    ys, xs = np.mgrid[0:shape[0], 0:shape[1]]
    pixels = np.stack([xs.ravel(), ys.ravel()], axis=1)
    distance, nearest = cKDTree(path_mm / SPACING_MM).query(pixels)
    radius = (diameter_mm / SPACING_MM / 2)[nearest]
    inner = ((nearest > 0) & (nearest < len(path_mm) - 1)).reshape(shape)
    chord = np.where(inner, 2 * np.sqrt(np.clip(radius**2 - distance**2, 0, None))
                     .reshape(shape), 0.0)
    rng = np.random.default_rng(3)
    texture = ndimage.gaussian_filter(rng.normal(size=shape), 6)
    background = np.exp(0.15 * texture / texture.std() - 0.4 * (ys / shape[0]))
    attenuation = 0.06 * (np.where(chord > 0, 2 * radius.reshape(shape), 0.0) if flat else chord)
    if crossing:  # a 1.6 mm vessel crossing at 70 degrees, a third of the way along
        point = path_mm[len(path_mm) // 3] / SPACING_MM
        direction = np.array([np.cos(np.deg2rad(110)), np.sin(np.deg2rad(110))])
        offset = np.stack([xs - point[0], ys - point[1]], axis=-1)
        across = np.abs(offset @ np.array([-direction[1], direction[0]]))
        attenuation = attenuation + 0.06 * 2 * np.sqrt(np.clip(16 - across**2, 0, None))
    frame = ndimage.gaussian_filter(background * np.exp(-attenuation), blur_px)
    return np.clip(0.1 + 0.5 * frame + rng.normal(0, 0.008, shape), 0, 1).astype(np.float32)


def test_frame_edges_recover_a_stenosis_that_a_mask_twice_too_wide_hides():
    path = straight()
    diameters, _ = narrowing(path, 3.0, 50.0, plateau_mm=4.0)
    frame = _render(path, diameters)
    coarse = tube(path, np.full(len(path), 6.0))  # twice the vessel, blind to the lesion
    mask_only = measure(coarse, SPACING_MM)
    guided = measure(coarse, SPACING_MM, frame=frame)
    assert mask_only.edge_source == "mask" and guided.edge_source == "frame"
    assert guided.measurements()["edges"] == "frame"
    assert mask_only.mld_mm > 4.5 and mask_only.diameter_stenosis_pct < 20  # what it cannot see
    assert guided.mld_mm == pytest.approx(1.5, abs=0.35)
    assert guided.rvd_mm == pytest.approx(3.0, abs=0.35)
    assert guided.diameter_stenosis_pct == pytest.approx(50.0, abs=7.0)
    middle = path[len(path) // 2] / SPACING_MM
    assert np.linalg.norm(guided.centerline_px[guided.mld_index] - middle) <= 4.0 / SPACING_MM


def test_frame_edges_agree_with_a_true_mask_and_do_not_depend_on_the_dtype():
    path = arc()
    diameters, _ = narrowing(path, 3.0, 40.0, plateau_mm=4.0)
    frame = _render(path, diameters)
    mask = tube(path, diameters)
    as_float = measure(mask, SPACING_MM, frame=frame)
    assert as_float.mld_mm == pytest.approx(1.8, abs=0.35)  # one pixel
    assert as_float.rvd_mm == pytest.approx(3.0, abs=0.35)
    for dtype, peak in ((np.uint8, 255), (np.uint16, 4095)):
        other = measure(mask, SPACING_MM, frame=(frame * peak).round().astype(dtype))
        assert other.mld_mm == pytest.approx(as_float.mld_mm, abs=0.05)
        assert other.rvd_mm == pytest.approx(as_float.rvd_mm, abs=0.05)


@pytest.mark.parametrize("blur_px", [0.5, 1.5])
@pytest.mark.parametrize("diameter_px", [7, 14])
def test_the_frames_blur_is_measured_and_the_edges_width_error_undone(blur_px, diameter_px):
    """Edges at the steepest point of a blurred round lumen read it narrow by about 1.3 blur
    widths; measuring the blur at the segment and inverting the detector's response gives the
    lumen back, at light and at heavy blur."""
    path = straight()
    diameters = np.full(len(path), diameter_px * SPACING_MM)
    frame = _render(path, diameters, blur_px=blur_px)
    mask = tube(path, diameters)
    raw = measure(mask, SPACING_MM, frame=frame,
                  settings=QCASettings(edges=EdgeSettings(correct_blur=False)))
    corrected = measure(mask, SPACING_MM, frame=frame)
    read_raw = np.median(raw.diameter_mm) / SPACING_MM
    read = np.median(corrected.diameter_mm) / SPACING_MM
    assert read_raw < diameter_px - 0.6  # the error being undone is there
    assert abs(read - diameter_px) < min(0.6, 0.5 * abs(read_raw - diameter_px))


def test_the_blur_and_the_cross_section_are_read_from_the_frame():
    path = straight()
    diameters = np.full(len(path), 10 * SPACING_MM)
    mask = tube(path, diameters)
    path_px, normal = _straight_scanlines(mask)
    for flat in (False, True):
        for blur_px in (0.5, 1.5):
            frame = _render(path, diameters, blur_px=blur_px, flat=flat)
            blur = measured_blur(frame, path_px, normal, np.full(len(path_px), 5.0),
                                 np.full(len(path_px), 5.0))
            assert blur.shape == ("flat" if flat else "round")
            assert blur.sigma_px == pytest.approx(np.hypot(blur_px, 0.3), rel=0.35)


def test_a_painted_flat_band_is_not_widened():
    """A uniformly dark band (a vessel drawn into an image) has its steepest point at the wall:
    a correction for round lumens would widen it by a blur width."""
    path = straight()
    diameters = np.full(len(path), 8 * SPACING_MM)
    frame = _render(path, diameters, blur_px=0.5, flat=True)
    read = np.median(measure(tube(path, diameters), SPACING_MM, frame=frame).diameter_mm)
    assert read / SPACING_MM == pytest.approx(8, abs=0.4)


def test_the_inverse_response_is_monotone_and_shifts_wide_lumens_by_a_constant():
    blur = Blur(1.0, "round")
    measured = np.linspace(0.5, 80, 400)
    true = true_diameters(measured, blur, derivative_scale=0.7)
    assert np.all(np.diff(true) > 0)
    wide = true[measured > 60] - measured[measured > 60]
    assert wide.min() > 1.0 and np.ptp(wide) < 1e-6  # round lumens read narrow, by a constant
    assert true_diameters(np.array([np.nan]), blur, 0.7)[0] != true_diameters(  # NaN stays NaN
        np.array([np.nan]), blur, 0.7)[0]


def _straight_scanlines(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The centerline of a straight tube mask, and its unit normals."""
    from angiotune.qca.centerline import centerline

    path = centerline(mask).astype(float)[10:-10]
    tangent = path[-1] - path[0]
    tangent /= np.linalg.norm(tangent)
    return path, np.tile([tangent[1], -tangent[0]], (len(path), 1))


def test_a_crossing_vessel_does_not_capture_the_edge():
    path = straight()
    diameters, _ = narrowing(path, 3.0, 50.0, plateau_mm=4.0)
    frame = _render(path, diameters, crossing=True)
    coarse = tube(path, np.full(len(path), 6.0))
    guided = measure(coarse, SPACING_MM, frame=frame)
    crossing = path[len(path) // 3] / SPACING_MM
    near = np.linalg.norm(guided.centerline_px - crossing, axis=1) < 1.5 / SPACING_MM
    assert near.sum() > 10
    # Around the crossing the lumen stays 3 mm: the walls do not follow the crossing vessel.
    assert np.abs(guided.diameter_mm[near] - 3.0).max() < 0.45
    assert guided.mld_mm == pytest.approx(1.5, abs=0.35)
    assert guided.rvd_mm == pytest.approx(3.0, abs=0.35)


def test_without_a_frame_the_mask_edges_are_used_as_before():
    path = straight()
    diameters, _ = narrowing(path, 3.0, 50.0, plateau_mm=4.0)
    mask = tube(path, diameters)
    default = measure(mask, SPACING_MM)
    explicit = measure(mask, SPACING_MM, frame=None)
    assert default.edge_source == explicit.edge_source == "mask"
    np.testing.assert_array_equal(default.diameter_mm, explicit.diameter_mm)
    assert default.mld_mm == pytest.approx(1.5, abs=0.1)


def test_a_mask_that_stops_before_the_lesion_is_traced_on_through_the_frame():
    """A segmenter's mask often ends where the lumen narrows most. Given the segment's box,
    QCA follows the frame's vessel on to the box's edge, as core-lab path finding follows the
    vessel between the analyst's start and end points, and measures the lesion."""
    path = straight(length_mm=36.0)
    diameters, _ = narrowing(path, 3.0, 60.0, plateau_mm=3.0)
    frame = _render(path, diameters)
    whole = tube(path, diameters)
    rows, cols = np.nonzero(whole)
    box = (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
    stops_short = tube(path[: len(path) * 2 // 5], diameters[: len(path) * 2 // 5])
    untraced = measure(stops_short, SPACING_MM, frame=frame)
    traced = measure(stops_short, SPACING_MM, frame=frame, box=box)
    assert untraced.diameter_stenosis_pct < 25  # healthy vessel only
    assert traced.diameter_stenosis_pct == pytest.approx(60.0, abs=12.0)
    assert traced.lesion_length_mm > 0 and any("traced on" in note for note in traced.notes)
    # A mask that already spans its box is left as it is.
    spanning = measure(whole, SPACING_MM, frame=frame, box=box)
    assert not any("traced" in note for note in spanning.notes)
    assert spanning.mld_mm == pytest.approx(measure(whole, SPACING_MM, frame=frame).mld_mm)
    # A centerline of a few points (a speck of a mask) is traced from its ends, not an error.
    from angiotune.qca.trace import complete_to_box

    for points in (1, 2, 3, 4):
        short = path[len(path) // 5: len(path) // 5 + points] / SPACING_MM
        completed, _ = complete_to_box(stops_short, frame, box, short)
        assert completed.shape == stops_short.shape and completed[stops_short].all()


def test_a_reference_line_that_would_reach_zero_is_flat_and_positive():
    """A few scattered healthy widths (a poor predicted mask) can fit a line that crosses zero
    inside the segment; no vessel narrows to nothing, so the reference falls back to their
    mean and says so, and the % DS stays a percentage."""
    from angiotune.qca.measure import QCASettings, _reference

    diameter = np.array([0.02, 0.64, 0.04, 0.02, 2.75, 0.3, 0.05, 7.56, 0.2, 0.08, 8.48, 4.0])
    reference, healthy, notes = _reference(np.arange(12.0), diameter, 3, QCASettings())
    assert reference.min() > 0 and np.ptp(reference) == 0
    assert reference[0] == pytest.approx(diameter[healthy].mean())
    assert any("too steeply" in note for note in notes)
