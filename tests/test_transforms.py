"""Geometry keeps frame, mask and box aligned; random steps are reproducible for a seed."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from angiotune.data.transforms import (
    box_to_square,
    frame_to_square,
    jitter_box,
    mask_box,
    normalise_intensity,
    random_intensity,
    random_similarity,
    resize_mask,
    warp,
)


@st.composite
def frame_with_box(draw):
    height = draw(st.integers(64, 400))
    width = draw(st.integers(64, 400))
    x0 = draw(st.integers(0, width - 12))
    y0 = draw(st.integers(0, height - 12))
    x1 = draw(st.integers(x0 + 10, min(width, x0 + 120)))
    y1 = draw(st.integers(y0 + 10, min(height, y0 + 120)))
    return (height, width), np.array([x0, y0, x1, y1], dtype=float)


def _rectangle_mask(shape, box):
    mask = np.zeros(shape, dtype=bool)
    x0, y0, x1, y1 = box.astype(int)
    mask[y0:y1, x0:x1] = True
    return mask


@settings(max_examples=60, deadline=None)
@given(frame_with_box(), st.sampled_from([64, 128, 224]), st.sampled_from(["crop", "frame"]))
def test_mask_box_follows_the_affine(frame_box, size, fit):
    shape, box = frame_box
    affine = box_to_square(box, size) if fit == "crop" else frame_to_square(shape, size)
    warped = warp(_rectangle_mask(shape, box), affine, size, nearest=True)
    expected = np.clip(affine.box(box), 0, size)
    found = mask_box(warped)
    assert found is not None
    # Nearest resampling moves an edge by at most one output pixel.
    assert np.all(np.abs(found - expected) <= 1.0 + 1e-6), (found, expected)


@settings(max_examples=40, deadline=None)
@given(frame_with_box(), st.integers(0, 2**31 - 1))
def test_random_geometry_keeps_mask_inside_transformed_box(frame_box, seed):
    shape, box = frame_box
    size = 128
    affine = box_to_square(box, size).then(random_similarity(np.random.default_rng(seed), size))
    warped = warp(_rectangle_mask(shape, box), affine, size, nearest=True)
    found = mask_box(warped)
    outer = affine.box(box)
    assert found is not None
    assert found[0] >= np.floor(outer[0]) - 1 and found[1] >= np.floor(outer[1]) - 1
    assert found[2] <= np.ceil(outer[2]) + 1 and found[3] <= np.ceil(outer[3]) + 1


def test_affine_scale_and_composition():
    first = frame_to_square((512, 512), 256)
    second = box_to_square(np.array([0, 0, 32, 32]), 64, context=2.0)
    both = first.then(second)
    point = np.array([[100.0, 50.0]])
    np.testing.assert_allclose(both.points(point), second.points(first.points(point)))
    assert first.scale == 0.5
    assert np.isclose(both.scale, 0.5 * 1.0)


def test_letterbox_centres_a_wide_frame():
    affine = frame_to_square((100, 200), 100)
    np.testing.assert_allclose(affine.box(np.array([0, 0, 200, 100])), [0, 25, 100, 75])


def test_resize_mask_uniform_scale():
    small = np.zeros((4, 4), dtype=bool)
    small[1, 2] = True
    big = resize_mask(small, (8, 8))
    assert big.shape == (8, 8)
    assert big.sum() == 4 and big[2:4, 4:6].all()


def test_random_steps_repeat_for_a_seed_and_differ_across_seeds():
    image = np.random.default_rng(0).random((32, 32)).astype(np.float32)
    box = np.array([4, 4, 20, 20], dtype=np.float32)

    def draw(seed):
        rng = np.random.default_rng
        return random_intensity(image, rng(seed)), jitter_box(box, rng(seed), 224)

    a, b, c = draw(7), draw(7), draw(8)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    assert not np.array_equal(a[1], c[1])


def test_box_jitter_is_bounded_like_medsam():
    box = np.array([100, 100, 140, 130], dtype=np.float32)
    for seed in range(50):
        jittered = jitter_box(box, np.random.default_rng(seed), 1024)
        assert np.all(np.abs(jittered - box) <= 20 + 1e-4)
        assert jittered[2] > jittered[0] and jittered[3] > jittered[1]


def test_normalise_intensity_window():
    image = np.linspace(0.2, 0.6, 10000, dtype=np.float32).reshape(100, 100)
    out = normalise_intensity(image)
    assert out.min() == 0.0 and out.max() == 1.0
    assert out.dtype == np.float32
