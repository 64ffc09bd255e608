"""The CASS segment read: where a box sits along the frame's vessel tree, the logistic read
fitted on a trial's training lesions, the answer among the lesion's vessel's segments, and the
per-vessel majority it is measured against."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pandas as pd
import pytest
import torch

from angiotune.data.context import CONTEXT_DIM, TREE_END, VIEW_END, VIEWS_END, view_context
from angiotune.errors import ConfigError
from angiotune.evaluation.test_split import trivial_predictions
from angiotune.model.heads import (
    SEGMENT_READ_DECAYS,
    SEGMENT_READ_DIM,
    HeadSettings,
    LesionHeads,
    fit_segment_read,
    load_heads,
    restrict_to_vessel,
    save_heads,
)
from angiotune.qca.tree import tree_position, vessel_tree
from tests.shapes import SPACING_MM, angiogram, straight

TREE = slice(VIEW_END, TREE_END)  # share, mm / 100, missing flag


def _tree() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A main vessel tapering from 3.6 to 1.6 mm with a 1.2 mm side branch leaving halfway:
    the frame, and the main vessel's and the branch's centerlines in pixels."""
    main = straight(length_mm=60.0, start=(4.0, 10.0), angle_deg=20)
    fork = main[len(main) // 2]
    side = straight(length_mm=20.0, start=tuple(fork), angle_deg=85)
    shape = (200, 320)
    frame = (angiogram(main, np.linspace(3.6, 1.6, len(main)), shape)
             * angiogram(side, np.full(len(side), 1.2), shape)) / 0.8
    return frame.astype(np.float32), main / SPACING_MM, side / SPACING_MM


def _box(centre, half: float = 6.0) -> tuple[float, float, float, float]:
    return (centre[0] - half, centre[1] - half, centre[0] + half, centre[1] + half)


def test_the_tree_position_grows_from_the_widest_lumen_along_the_vessels():
    frame, main, side = _tree()
    tree = vessel_tree(frame)
    along = [tree_position(frame, _box(main[int(f * (len(main) - 1))]), SPACING_MM, tree)
             for f in (0.05, 0.3, 0.6, 0.9)]
    fractions = [p.fraction for p in along]
    assert fractions == sorted(fractions) and fractions[0] < 0.15 and fractions[-1] > 0.75
    # Millimetres along the path: 0.3 to 0.9 of a 60 mm vessel is about 36 mm.
    assert along[3].distance_mm - along[1].distance_mm == pytest.approx(36.0, rel=0.15)
    # The branch's tip lies past the fork along the tree, though it is nearer the root in
    # the frame than the main vessel's end.
    tip = tree_position(frame, _box(side[-20]), SPACING_MM, tree)
    halfway = tree_position(frame, _box(main[len(main) // 2]), SPACING_MM, tree)
    assert tip.distance_mm > halfway.distance_mm + 12
    # The same answer without the traced tree at hand.
    assert tree_position(frame, _box(side[-20]), SPACING_MM) == tip


def test_the_box_offset_from_the_root_and_the_trees_spread_follow_the_frame():
    """Which way the box lies from the root (x right, y down, over the extent), and the
    tree's centre and area, the same for every box of the frame."""
    frame, main, side = _tree()
    tree = vessel_tree(frame)
    far = tree_position(frame, _box(main[int(0.9 * (len(main) - 1))]), SPACING_MM, tree)
    # The main vessel runs 20 degrees below the x axis from its widest end (y grows down).
    assert far.root_dx > 0.7 and 0.15 < far.root_dy / far.root_dx < 0.6
    branch = tree_position(frame, _box(side[-20]), SPACING_MM, tree)
    assert branch.root_dy > far.root_dy  # the side branch heads down the frame at 85 degrees
    assert (branch.spread_dx, branch.spread_dy, branch.area) == (
        far.spread_dx, far.spread_dy, far.area)
    assert 0.2 < far.spread_dx < 0.7 and far.spread_dy > 0 and 0 < far.area < 0.5
    flipped = vessel_tree(frame[:, ::-1].copy())
    assert flipped.spread[0] == pytest.approx(-tree.spread[0], abs=0.05)
    context = view_context({"angle_lao_deg": 30.0, "angle_cranial_deg": -20.0,
                            "frame_width": frame.shape[1], "frame_height": frame.shape[0],
                            **dict(zip(("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"),
                                       _box(side[-20]), strict=True)), **branch.columns()})
    assert context[VIEWS_END:].tolist() == pytest.approx(
        [branch.root_dx, branch.root_dy, branch.spread_dx, branch.spread_dy, branch.area])


def test_a_frame_without_vessels_has_no_tree_position_and_the_context_says_so():
    flat = np.full((120, 120), 0.8, dtype=np.float32)
    assert vessel_tree(flat) is None
    position = tree_position(flat, (10, 10, 30, 30), 0.2)
    assert not position.found and math.isnan(position.distance_mm)
    row = {"angle_lao_deg": 30.0, "angle_cranial_deg": -20.0, "frame_width": 120,
           "frame_height": 120, "bbox_x0": 10, "bbox_y0": 10, "bbox_x1": 30, "bbox_y1": 30}
    without = view_context({**row, "tree_distance_mm": position.distance_mm,
                            "tree_fraction": position.fraction})
    share, mm, flag = without[TREE]
    assert len(without) == CONTEXT_DIM and flag == 1.0 and share == 0.0
    assert math.isnan(mm) and np.isfinite(np.delete(without[:VIEWS_END], VIEW_END + 1)).all()
    assert np.isnan(without[VIEWS_END:]).all()  # no offset from a root, no tree to spread
    assert np.array_equal(without, view_context(row), equal_nan=True)  # an older index
    within = view_context({**row, "tree_distance_mm": 42.0, "tree_fraction": 0.5})
    assert within[TREE].tolist() == pytest.approx([0.5, 0.42, 0.0])
    # A share without millimetres (COCO, no calibration) is not "at the root": NaN mm.
    share_only = view_context({**row, "tree_distance_mm": math.nan, "tree_fraction": 0.5})
    assert share_only[TREE][0] == 0.5 and math.isnan(share_only[TREE][1])
    assert share_only[TREE][2] == 0.0


def test_the_context_says_how_far_the_view_is_from_each_vessels_standard_views():
    """A linear read cannot carve the view table's regions out of raw angles; the distance to
    each vessel's nearest standard view gives it them (RCA, LAD, LCX, in degrees / 100)."""
    from angiotune.taxonomies.views import load_views

    row = {"frame_width": 100, "frame_height": 100, "bbox_x0": 10, "bbox_y0": 10,
           "bbox_x1": 30, "bbox_y1": 30}
    for vessel in ("RCA", "LAD", "LCX"):
        view = load_views().of(vessel)[0]
        distances = view_context({**row, "angle_lao_deg": view.lao_deg,
                                  "angle_cranial_deg": view.cranial_deg})[TREE_END:VIEWS_END]
        assert distances[("RCA", "LAD", "LCX").index(vessel)] == 0.0
        assert (distances >= 0).all() and np.isfinite(distances).all()
    no_angles = view_context({**row, "angle_lao_deg": None, "angle_cranial_deg": None})
    assert np.isnan(no_angles[TREE_END:VIEWS_END]).all() and no_angles[2] == 1.0


def test_the_segment_read_learns_from_the_tree_and_the_reference_diameter():
    """Proximal, mid and distal thirds of a tapering vessel: told apart by the tree position
    and the reference diameter, with the view context no help; unknown inputs are neutral."""
    rng = np.random.default_rng(0)
    n = 90
    labels = np.repeat([0, 1, 2], n // 3)
    inputs = rng.normal(size=(n, SEGMENT_READ_DIM))
    inputs[:, VIEW_END] = (labels + rng.uniform(0.1, 0.9, n)) / 3  # tree share
    inputs[:, -1] = 3.6 - 0.8 * labels + rng.normal(0, 0.15, n)  # reference diameter, mm
    inputs[::7, -1] = np.nan  # the read could not measure these
    fit = fit_segment_read(inputs, labels, classes=4)  # class 3 never seen
    assert fit is not None
    heads = LesionHeads(HeadSettings(classes=("12", "13", "14", "15"), feature_dim=10))
    heads.set_segment_read(fit)
    context = torch.zeros(n, CONTEXT_DIM)
    context[:, :TREE_END] = torch.as_tensor(inputs[:, :TREE_END])
    context[:, VIEWS_END:] = torch.as_tensor(inputs[:, TREE_END:-1])  # the frame's tree
    logits = heads.read_segment(context, torch.as_tensor(inputs[:, -1], dtype=torch.float32))
    assert (logits.argmax(1).numpy() == labels).mean() > 0.9
    assert torch.isfinite(logits).all()
    # Chosen by held-out lesions: a light decay where the inputs tell the classes apart, the
    # heaviest (near the class prior: the majority) where they are noise.
    folds = np.arange(n) % 3
    assert float(fit_segment_read(inputs, labels, 4, folds)["decay"]) < 1.0
    noise = fit_segment_read(inputs, rng.choice(3, size=n, p=[0.7, 0.15, 0.15]), 4, folds)
    assert float(noise["decay"]) == max(SEGMENT_READ_DECAYS)
    assert fit_segment_read(inputs[:5], labels[:5], classes=4) is None  # too few lesions
    assert fit_segment_read(inputs, np.zeros(n, dtype=int), classes=4) is None  # one class
    assert fit_segment_read(inputs, np.full(n, -1), classes=4) is None  # none in the classes


def test_the_vessel_read_follows_the_standard_views_where_raw_angles_cannot(tmp_path, caplog):
    """Lesions filmed near their vessel's standard views: the vessel read (the view, the box and
    the distances to the standard views) tells the vessels apart, is answered in evaluation
    only, travels with the heads, and heads saved before it (format 3) have none."""
    from safetensors.torch import load_file, save_file

    from angiotune.model.heads import vessel_read_inputs
    from angiotune.names import ADAPTER_VESSELS
    from angiotune.taxonomies.views import load_views

    rng = np.random.default_rng(0)
    contexts, labels = [], []
    for label, vessel in enumerate(ADAPTER_VESSELS):
        for view in load_views().of(vessel):
            for _ in range(12):
                lao, cranial = np.array([view.lao_deg, view.cranial_deg]) + rng.normal(0, 4, 2)
                contexts.append(view_context({
                    "angle_lao_deg": lao, "angle_cranial_deg": cranial, "frame_width": 100,
                    "frame_height": 100, "bbox_x0": 40, "bbox_y0": 40, "bbox_x1": 60,
                    "bbox_y1": 60}))
                labels.append(label)
    context, labels = torch.as_tensor(np.stack(contexts)), np.array(labels)
    folds = np.arange(len(labels)) % 3
    fit = fit_segment_read(vessel_read_inputs(context).numpy(), labels, 3, folds)
    heads = LesionHeads(HeadSettings(classes=("1", "13"), feature_dim=10))
    heads.set_vessel_read(fit)
    n = len(labels)
    features, spacing = torch.randn(n, 10), torch.full((n,), 0.1)
    assert "vessel_logits" not in heads.train()(features, context, spacing)
    answer = heads.eval()(features, context, spacing)["vessel_logits"]
    assert (answer.argmax(1).numpy() == labels).mean() > 0.9
    no_angles = context.clone()
    no_angles[:5, :2], no_angles[:5, 2], no_angles[:5, TREE_END:] = 0.0, 1.0, math.nan
    unsure = heads(features, no_angles, spacing)["vessel_logits"]
    assert torch.isnan(unsure[:5]).all() and torch.isfinite(unsure[5:]).all()  # no angles, no say
    save_heads(heads, tmp_path)
    torch.testing.assert_close(load_heads(tmp_path)(features, context, spacing)["vessel_logits"],
                               answer)
    state = {k: v for k, v in load_file(tmp_path / "heads.safetensors").items()
             if not k.startswith("vessel_")}
    save_file(state, tmp_path / "heads.safetensors")
    assert "vessel_logits" not in load_heads(tmp_path)(features, context, spacing)
    # Heads remember the standard views their distances were measured to, and say so when the
    # table has changed since.
    with caplog.at_level(logging.WARNING, logger="angiotune.model.heads"):
        load_heads(tmp_path)
    assert "other standard views" not in caplog.text
    record = json.loads((tmp_path / "heads.json").read_text())
    assert [view[1] for view in record["standard_views"]].count("LAD") >= 1
    record["standard_views"][0][2] += 5.0
    (tmp_path / "heads.json").write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING, logger="angiotune.model.heads"):
        load_heads(tmp_path)
    assert "other standard views" in caplog.text
    # A stage-3 trial (one vessel) keeps the vessel read its heads started from.
    from angiotune.train.calibration import ReadoutCollector

    assert ReadoutCollector(heads)._vessel_fit(np.zeros((30, 40), np.float32)) is None
    # Heads from a newer angiotune say so instead of failing on a shape.
    record = json.loads((tmp_path / "heads.json").read_text())
    (tmp_path / "heads.json").write_text(json.dumps({**record, "format": 99}))
    with pytest.raises(ConfigError, match="newer angiotune"):
        load_heads(tmp_path)


def test_fitted_heads_answer_with_the_read_in_evaluation_only_and_keep_it_when_saved(tmp_path,
                                                                                    caplog):
    from safetensors.torch import load_file, save_file

    heads = LesionHeads(HeadSettings(classes=("1", "2"), feature_dim=10))
    features, context = torch.randn(3, 10), torch.randn(3, CONTEXT_DIM)
    spacing = torch.full((3,), 0.1)
    weight = np.zeros((2, SEGMENT_READ_DIM))
    weight[1, -1] = 5.0  # a wider reference diameter: class "2"
    heads.set_segment_read({"weight": weight, "bias": np.zeros(2),
                            "mean": np.zeros(SEGMENT_READ_DIM),
                            "scale": np.ones(SEGMENT_READ_DIM)})
    heads.train()
    own = heads(features, context, spacing)["segment_logits"]
    assert own.requires_grad  # training learns the head's own logits, not the read's
    heads.eval()
    read = heads(features, context, spacing)["segment_logits"]
    rvd = heads(features, context, spacing)["rvd_mm"]
    torch.testing.assert_close(read[:, 1] - read[:, 0], 5.0 * rvd)
    save_heads(heads, tmp_path)
    again = load_heads(tmp_path)
    torch.testing.assert_close(again(features, context, spacing)["segment_logits"], read)
    # Formats 3-5: a segment read without the frame's tree (the view, the box, the tree, the
    # reference diameter) loads widened, the frame's tree at zero weight: the same answer.
    state = load_file(tmp_path / "heads.safetensors")
    old_columns = [*range(TREE_END), SEGMENT_READ_DIM - 1]
    state["segment_weight"] = state["segment_weight"][:, old_columns].contiguous()
    for part in ("mean", "scale"):
        state[f"segment_{part}"] = state[f"segment_{part}"][old_columns].contiguous()
    save_file(state, tmp_path / "heads.safetensors")
    with caplog.at_level(logging.WARNING, logger="angiotune.model.heads"):
        older = load_heads(tmp_path)
    assert not caplog.text and bool(older.segment_fitted)
    assert older.segment_weight.shape == (2, SEGMENT_READ_DIM)
    torch.testing.assert_close(older(features, context, spacing)["segment_logits"], read)
    # Heads saved before the segment read (format 2, six context numbers) still load.
    state = load_file(tmp_path / "heads.safetensors")
    state = {k: v for k, v in state.items() if not k.startswith("segment_")
             or k.startswith("segment.")}
    state["context.weight"] = state["context.weight"][:, :6].contiguous()
    save_file(state, tmp_path / "heads.safetensors")
    record = json.loads((tmp_path / "heads.json").read_text())
    del record["context_dim"]
    (tmp_path / "heads.json").write_text(json.dumps(record))
    old = load_heads(tmp_path)
    assert old.settings.context_dim == 6 and not bool(old.segment_fitted)
    assert old(features, context, spacing)["segment_logits"].shape == (3, 2)


def test_the_segment_is_named_among_the_lesions_vessel():
    classes = ("1", "2", "11", "12", "13", "18", "28")
    logits = torch.tensor([[5.0, 0, 0, 1, 2, 0, 0.5]] * 4)
    restricted = restrict_to_vessel(logits, classes, "CASS", ["LAD", "LM", None, "RAMUS"])
    picked = [classes[i] for i in restricted.argmax(1).tolist()]
    # LAD and its left main: the best LAD-group code; unknown: all; the ramus goes with LCX.
    assert picked == ["13", "13", "1", "28"]
    assert torch.isinf(restricted[0, 0]) and torch.isfinite(restricted[2]).all()


def test_the_trivial_segment_is_the_majority_of_the_lesions_vessel():
    train = pd.DataFrame({
        "vessel": ["RCA", "RCA", "RCA", "LAD", "LAD", "LM", "LCX"],
        "segment": ["2", "2", "1", "13", "13", "11", ""],
        "diameter_stenosis_pct": [50.0] * 7, "mld_mm": [1.0] * 7, "rvd_mm": [3.0] * 7})
    test = pd.DataFrame({"sample_id": ["a", "b", "c", "d"],
                         "vessel": ["RCA", "LM", "LCX", "UNKNOWN"],
                         "segment": ["1", "11", "19", ""],
                         "diameter_stenosis_pct": [40.0] * 4, "mld_mm": [1.0] * 4,
                         "rvd_mm": [3.0] * 4})
    predicted = trivial_predictions(test, train)["segment_pred"].tolist()
    # The LM votes with the LAD group; the LCX's only lesion has no segment, so its lesions
    # and an unknown vessel's get the majority over all vessels (a tie: pandas' first mode).
    assert predicted[:2] == ["2", "13"]
    assert predicted[2] == predicted[3] == pd.Series(["2", "2", "1", "13", "13", "11"]).mode()[0]


def test_the_index_stores_each_lesions_tree_position(phantom_index):
    from angiotune.data.index import TREE_COLUMNS, read_index

    rows = read_index(phantom_index.out)
    fraction, distance = rows["tree_fraction"], rows["tree_distance_mm"]
    assert set(TREE_COLUMNS) <= set(rows.columns)
    assert fraction.notna().mean() > 0.9  # every phantom frame shows its tree
    assert fraction.dropna().between(0, 1.5).all() and (distance.dropna() >= 0).all()


def test_a_coco_import_stores_the_tree_share_without_millimetres(tmp_path, monkeypatch):
    """A COCO set (ARCADE) has no pixel spacing: the share along the tree, no mm."""
    from PIL import Image

    from angiotune.data.coco import CocoSettings, CocoSource, build_coco_index
    from angiotune.data.index import read_index
    from tests.test_coco import ARCADE_CATEGORIES

    frame, main, _ = _tree()
    (tmp_path / "images").mkdir()
    (tmp_path / "annotations").mkdir()
    Image.fromarray((frame.clip(0, 1) * 255).astype(np.uint8)).save(tmp_path / "images" / "1.png")
    height, width = frame.shape

    def square(centre) -> dict:
        x, y = (float(v) - 5 for v in centre)
        return {"segmentation": [[x, y, x + 10, y, x + 10, y + 10, x, y + 10]],
                "bbox": [x, y, 10, 10]}

    annotations = [{"id": i + 1, "image_id": 1, "category_id": 26, "iscrowd": 0,
                    **square(main[int(f * (len(main) - 1))])} for i, f in enumerate((0.1, 0.8))]
    (tmp_path / "annotations" / "labels.json").write_text(json.dumps({
        "images": [{"id": 1, "width": width, "height": height, "file_name": "1.png"}],
        "annotations": annotations, "categories": ARCADE_CATEGORIES}))
    out = tmp_path / "index.parquet"
    build_coco_index([CocoSource(tmp_path / "annotations" / "labels.json")], out,
                     CocoSettings(salt="test-salt"))
    rows = read_index(out).sort_values("row")
    assert rows["tree_distance_mm"].isna().all()
    near, far = rows["tree_fraction"].tolist()
    assert near < 0.3 < 0.6 < far
    # `index --no-vessel-tree` leaves the share out (a large import, fast), and the heads of such
    # an index read the view part of the context only.
    from angiotune.cli import main
    from angiotune.model.heads import OLD_CONTEXT_DIM
    from angiotune.search.api import context_dim_of

    untraced = tmp_path / "untraced.parquet"
    monkeypatch.setenv("ANGIOTUNE_SALT", "test-salt")
    assert main(["index", "--coco", str(tmp_path / "annotations" / "labels.json"),
                 "--out", str(untraced), "--no-vessel-tree"]) == 0
    assert read_index(untraced)["tree_fraction"].isna().all()
    assert context_dim_of(untraced) == OLD_CONTEXT_DIM


def test_frames_too_odd_to_trace_give_no_tree_and_no_error():
    for frame in (np.zeros((1, 1), np.float32), np.full((3, 200), 0.5, np.float32),
                  np.random.default_rng(0).random((40, 40)).astype(np.float32)):
        position = tree_position(frame, (0, 0, 1, 1), 0.2)
        assert position.found or math.isnan(position.fraction)


def test_heads_read_the_tree_only_from_an_index_that_traced_it(phantom_dir, phantom_index,
                                                               tmp_path):
    """Context columns that never vary in training keep untrained weights: heads trained on an
    index without the tree must not be shown one at inference."""
    from angiotune.data.ingest import IndexSettings, build_index
    from angiotune.model.heads import OLD_CONTEXT_DIM
    from angiotune.search.api import context_dim_of

    assert context_dim_of(phantom_index.out) == CONTEXT_DIM
    untraced = build_index(phantom_dir / "manifest.csv", tmp_path / "untraced.parquet",
                           IndexSettings(salt="test-salt", vessel_tree=False)).out
    assert context_dim_of(untraced) == OLD_CONTEXT_DIM
    # An index from before the frame's tree (its five columns absent): the trunk stops before
    # them, and predict still traces the tree for the part it read.
    import pyarrow.parquet as pq

    from angiotune.data.context import VIEWS_END
    from angiotune.data.index import TREE_COLUMNS

    table = pq.read_table(phantom_index.out)
    older = tmp_path / "older.parquet"
    pq.write_table(table.drop_columns(list(TREE_COLUMNS[2:])), older)
    assert context_dim_of(older) == VIEWS_END


def _left_injection_rows(informative: bool, n: int = 60) -> np.ndarray:
    """Collected rows (``train.calibration`` layout) of LAD and LCX lesions all filmed in an
    LAD view, as one left injection shows both: the box lies right of the root on the LAD and
    left of it on the LCX (``informative``), or anywhere (not)."""
    from angiotune.train.calibration import CLASS_ID, CONTEXT, FOLD

    rng = np.random.default_rng(1)
    rows = np.zeros((n, CONTEXT.stop), np.float32)
    for i in range(n):
        lcx = i % 3 == 0
        side = (-1.0 if lcx else 1.0) if informative else rng.choice([-1.0, 1.0])
        rows[i, CONTEXT] = view_context({
            "angle_lao_deg": rng.normal(0, 3), "angle_cranial_deg": 35 + rng.normal(0, 3),
            "frame_width": 100, "frame_height": 100, "bbox_x0": 40, "bbox_y0": 40,
            "bbox_x1": 60, "bbox_y1": 60, "tree_distance_mm": 40.0, "tree_fraction": 0.5,
            "tree_root_dx": side * rng.uniform(0.2, 0.6), "tree_root_dy": rng.uniform(0, 0.5),
            "tree_spread_dx": 0.2, "tree_spread_dy": 0.3, "tree_area": 0.1})
        rows[i, CLASS_ID] = 2 if lcx else 1  # classes ("2", "13", "19"): RCA, LAD, LCX
        rows[i, FOLD] = (i // 3) % 3
    return rows


def test_the_vessel_read_routes_only_where_it_named_the_vessels_better_than_the_view(
        tmp_path, caplog):
    """LCX lesions filmed in an LAD view: the view routes them wrong; the box's side of the
    root tells them, so the read earns the say. Where the frame tells nothing, it does not."""
    from safetensors.torch import load_file, save_file

    from angiotune.predict.routing import route_by_angles, second_opinion
    from angiotune.train.calibration import CONTEXT, ReadoutCollector

    heads = LesionHeads(HeadSettings(classes=("2", "13", "19"), feature_dim=10))
    collector = ReadoutCollector(heads)
    rows = _left_injection_rows(informative=True)
    fit, decides = collector._vessel_fit(rows)
    truth = np.where(np.arange(len(rows)) % 3 == 0, 2, 1)  # LCX, LAD as ADAPTER_VESSELS ids
    assert decides and np.mean(fit["held_out"] == truth) > 0.9
    assert not collector._vessel_fit(_left_injection_rows(informative=False))[1]
    heads.set_vessel_read(fit, decides)
    context = torch.as_tensor(rows[:, CONTEXT])
    n = len(rows)
    answer = heads.eval()(torch.randn(n, 10), context, torch.full((n,), 0.1))["vessel_logits"]
    assert (answer.argmax(1)[::3] == 2).all()  # every LCX lesion named LCX
    save_heads(heads, tmp_path)
    assert bool(load_heads(tmp_path).vessel_decides)
    # Routing: the view says LAD; the read that earned it moves the lesion, one that did not
    # only where the view is undecided.
    view = route_by_angles(0.0, 35.0)
    moved = second_opinion(view, "LCX", "the heads' vessel read", 0.9, {"LAD", "LCX"}, True)
    assert moved.vessel == "LCX" and "better than the view" in moved.reason
    kept = second_opinion(view, "LCX", "the heads' vessel read", 0.9, {"LAD", "LCX"}, False)
    assert kept.vessel == "LAD" and "the view decides" in kept.reason
    # A format-4 vessel read (fewer inputs) is set aside with a warning, not a shape error.
    state = load_file(tmp_path / "heads.safetensors")
    state["vessel_weight"] = state["vessel_weight"][:, :9].contiguous()
    for part in ("mean", "scale"):
        state[f"vessel_{part}"] = state[f"vessel_{part}"][:9].contiguous()
    save_file(state, tmp_path / "heads.safetensors")
    with caplog.at_level(logging.WARNING, logger="angiotune.model.heads"):
        old = load_heads(tmp_path)
    assert "vessel read of an older angiotune" in caplog.text
    assert not bool(old.vessel_fitted) and not bool(old.vessel_decides)
