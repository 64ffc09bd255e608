"""COCO in: ARCADE-style files the tests write, every kind of bad annotation, and real ARCADE
frames from the shared folder."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from angiotune.cli import main
from angiotune.data.coco import (
    CocoSettings,
    CocoSource,
    build_coco_index,
    decode_rle,
    self_intersects,
)
from angiotune.data.index import index_metadata, read_index
from angiotune.data.readers import read_frame, read_header, read_mask
from angiotune.data.stream import SampleSettings, load_rows, prepare_sample
from angiotune.errors import ConfigError, DataError
from angiotune.taxonomies import load_category_map

TEST_SALT = "test-salt"

SIZE = 64
ARCADE_CATEGORIES = [{"id": 10, "name": "9a"}, {"id": 20, "name": "2"},
                     {"id": 26, "name": "stenosis"}, {"id": 30, "name": "plaque"}]


def _square(x0: float, y0: float, side: float) -> list[float]:
    return [x0, y0, x0 + side, y0, x0 + side, y0 + side, x0, y0 + side]


def _rle_string(counts: list[int]) -> str:
    """COCO's compressed RLE, written from its definition (the inverse of the reader's)."""
    text = []
    for i, count in enumerate(counts):
        value = count - counts[i - 2] if i > 2 else count
        more = True
        while more:
            chunk = value & 0x1F
            value >>= 5
            more = not ((value == 0 and not chunk & 0x10) or (value == -1 and chunk & 0x10))
            text.append(chr(chunk + (0x20 if more else 0) + 48))
    return "".join(text)


def _counts(mask: np.ndarray) -> list[int]:
    flat = mask.T.reshape(-1).astype(np.int8)  # column-major, as COCO's RLE runs
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [2]])))
    runs = np.diff(np.concatenate([[0], changes]))
    return [int(r) for r in runs] if flat[0] == 0 else [0, *(int(r) for r in runs)]


def write_coco(folder: Path, annotations: list[dict], images: int = 3, seed: int = 0) -> Path:
    """A COCO file in ARCADE's layout (annotations/ beside images/) with ``images`` frames."""
    (folder / "images").mkdir(parents=True)
    (folder / "annotations").mkdir()
    rng = np.random.default_rng(seed)
    entries = []
    for number in range(1, images + 1):
        pixels = (rng.random((SIZE, SIZE)) * 120 + 100).astype(np.uint8)
        Image.fromarray(pixels).save(folder / "images" / f"{number}.png")
        entries.append({"id": number, "width": SIZE, "height": SIZE, "file_name": f"{number}.png"})
    path = folder / "annotations" / "labels.json"
    path.write_text(json.dumps({"images": entries, "annotations": annotations,
                                "categories": ARCADE_CATEGORIES}))
    return path


def annotation(number: int, image_id: int = 1, category_id: int = 26, **fields) -> dict:
    return {"id": number, "image_id": image_id, "category_id": category_id, "iscrowd": 0,
            "segmentation": [_square(10, 10, 8)], "bbox": [10, 10, 8, 8], **fields}


@pytest.fixture()
def messy_coco(tmp_path: Path) -> Path:
    ring = np.zeros((SIZE, SIZE), dtype=bool)
    ring[20:30, 5:25] = True
    return write_coco(tmp_path / "coco", [
        annotation(1),                                                   # stenosis
        annotation(2, image_id=2, category_id=10, bbox=None,
                   segmentation=[_square(30, 30, 10), _square(5, 40, 4)]),  # 9a, two parts
        annotation(3, image_id=2, bbox=None,
                   segmentation={"size": [SIZE, SIZE], "counts": _counts(ring)}),
        annotation(4, image_id=3, bbox=[5, 20, 20, 10],
                   segmentation={"size": [SIZE, SIZE], "counts": _rle_string(_counts(ring))}),
        annotation(5, segmentation=[[5, 5, 10, 10, 15, 15]]),          # collinear: no area
        annotation(6, segmentation=[[5, 5, 25, 15, 25, 5, 5, 10]]),    # a bow tie
        annotation(7, bbox=[50, 50, 30, 30]),                          # box off the image
        annotation(8, image_id=9),                                     # no such image
        annotation(9, category_id=30),                                 # not in the map
        annotation(1, image_id=3),                                     # duplicate id
        annotation(11, iscrowd=1),                                     # crowd
        annotation(12, segmentation=[_square(10, 10, 8)]),             # same outline as 1
        annotation(13, segmentation=[_square(50, 50, 30)]),            # polygon off the image
        annotation(14, segmentation=[]),                               # box only
        annotation(15, image_id=3, segmentation=[_square(40, 10, 8)],
                   bbox=[0, 40, 10, 10]),                              # box of another outline
    ])


def test_every_annotation_is_indexed_or_quarantined_with_its_reason(messy_coco: Path,
                                                                   tmp_path: Path) -> None:
    out = tmp_path / "index.parquet"
    report = build_coco_index([CocoSource(messy_coco)], out, CocoSettings(salt=TEST_SALT))
    assert report.rows_read == 15
    assert sorted(report.index["row"]) == [1, 2, 3, 4, 15]
    reasons = {p.row: (p.field, p.reason) for p in report.quarantined}
    assert set(reasons) == {5, 6, 7, 8, 9, 1, 11, 12, 13, 14}
    expect = {5: ("segmentation", "degenerate polygon"), 6: ("segmentation", "self-intersecting"),
              7: ("bbox", "outside the 64x64 image"), 8: ("image_id", "not in the file's images"),
              9: ("category_id", "'plaque' is not in the ARCADE category map"),
              1: ("id", "duplicate annotation id 1"), 11: ("iscrowd", "crowd"),
              12: ("segmentation", "same outline on the same image as annotation 1"),
              13: ("segmentation", "polygon outside"), 14: ("segmentation", "no segmentation")}
    for number, (field_name, words) in expect.items():
        assert reasons[number][0] == field_name and words in reasons[number][1], reasons[number]
    quarantine = pd.read_csv(report.quarantine_path)
    assert len(quarantine) == 10 and set(quarantine["file"]) == {"labels.json"}
    # The box that disagrees with its outline is kept (the outline decides) with a warning.
    assert [w.row for w in report.warnings] == [15] and report.warnings[0].field == "bbox"


def test_rows_carry_segment_vessel_mask_and_no_millimetres(messy_coco: Path,
                                                         tmp_path: Path) -> None:
    out = tmp_path / "index.parquet"
    build_coco_index([CocoSource(messy_coco)], out, CocoSettings(salt=TEST_SALT))
    index = read_index(out).set_index("row")
    assert (index.loc[1, "vessel"], index.loc[1, "segment"]) == ("UNKNOWN", "")
    assert (index.loc[2, "vessel"], index.loc[2, "segment"], index.loc[2, "taxonomy"]) == \
        ("LAD", "9a", "SYNTAX")
    for column in ("pixel_spacing_mm", "mld_mm", "diameter_stenosis_pct", "rvd_mm"):
        assert index[column].isna().all()
    assert set(index["spacing_source"]) == {"none"} and set(index["image_format"]) == {"png"}
    metadata = index_metadata(__import__("pyarrow.parquet").parquet.read_schema(out), out)
    assert metadata["split_unit"] == "image" and "no patient ids" in metadata["split_note"]
    rows, root = load_rows(out)
    rows = rows.set_index("row", drop=False)
    # Polygon: pixel centres inside the outline (8 x 8); two parts are one mask.
    assert read_mask(root / rows.loc[1, "mask_path"]).sum() == 64
    assert read_mask(root / rows.loc[2, "mask_path"]).sum() == 100 + 16
    assert (rows.loc[1, ["bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"]].tolist()
            == [10, 10, 18, 18])
    # Both RLE forms decode to the same ring, column-major as COCO writes it.
    ring = np.zeros((SIZE, SIZE), dtype=bool)
    ring[20:30, 5:25] = True
    for number in (3, 4):
        assert np.array_equal(read_mask(root / rows.loc[number, "mask_path"]), ring)
    # The frame is a one-frame cine, and a sample is ready for training.
    header = read_header(root / rows.loc[1, "image_path"])
    assert (header.frames, header.height, header.width) == (1, SIZE, SIZE)
    assert read_frame(root / rows.loc[1, "image_path"], 0).min() >= 0
    sample = prepare_sample(rows.loc[1].to_dict(), root, SampleSettings(image_size=32,
                                                                        augment=False))
    assert sample["mask"].sum() > 0 and math.isnan(float(sample["pixel_spacing_mm"]))
    assert "raw" not in json.dumps(metadata)


def test_splits_are_by_image_deterministic_and_files_keep_their_split(tmp_path: Path) -> None:
    many = [annotation(n, image_id=1 + n % 6, segmentation=[_square(2 + 3 * (n // 6), 2, 2)])
            for n in range(1, 37)]
    train_file = write_coco(tmp_path / "train", many, images=6)
    test_file = write_coco(tmp_path / "test", [annotation(1), annotation(2, image_id=2)], seed=1)
    sources = [CocoSource(train_file), CocoSource(test_file, split="test")]
    first = build_coco_index(sources, tmp_path / "a.parquet", CocoSettings(salt=TEST_SALT)).index
    again = build_coco_index(sources, tmp_path / "b.parquet", CocoSettings(salt=TEST_SALT)).index
    assert list(first["split"]) == list(again["split"])
    from_test = first["image_path"].str.startswith("test/")
    assert set(first.loc[from_test, "split"]) == {"test"}
    # With a test file, the other images go to train and val only, and an image is never split.
    assert set(first.loc[~from_test, "split"]) == {"train", "val"}
    assert first.groupby("image_path")["split"].nunique().max() == 1
    # Same file names in two folders are two images (an image is keyed by its bytes).
    assert first.loc[from_test, "patient_key"].nunique() == 2
    assert not set(first.loc[from_test, "patient_key"]) & set(first.loc[~from_test,
                                                                        "patient_key"])


def test_a_copy_of_a_held_out_frame_in_the_training_file_is_left_out(tmp_path: Path) -> None:
    """ARCADE has one: a training frame byte for byte identical to a validation frame."""
    train_file = write_coco(tmp_path / "train", [annotation(1), annotation(2, image_id=2)])
    test_file = write_coco(tmp_path / "test", [annotation(7, image_id=3)], seed=1)
    copy = tmp_path / "test" / "images" / "3.png"
    (tmp_path / "train" / "images" / "2.png").write_bytes(copy.read_bytes())
    report = build_coco_index([CocoSource(train_file), CocoSource(test_file, split="test")],
                              tmp_path / "i.parquet", CocoSettings(salt=TEST_SALT))
    [leak] = report.quarantined
    assert (leak.row, leak.field, leak.file) == (2, "file_name", "train/annotations/labels.json")
    assert "test/images/3.png of test/annotations/labels.json in the test split" in leak.reason
    assert sorted(report.index["row"]) == [1, 7]
    assert len(list((tmp_path / "i.masks").glob("*.png"))) == 2  # no orphan mask


def test_missing_and_unreadable_images_quarantine_their_annotations(tmp_path: Path) -> None:
    path = write_coco(tmp_path / "coco", [annotation(1), annotation(2, image_id=2),
                                          annotation(3, image_id=3)])
    (tmp_path / "coco" / "images" / "2.png").unlink()
    (tmp_path / "coco" / "images" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    report = build_coco_index([CocoSource(path)], tmp_path / "i.parquet",
                              CocoSettings(salt=TEST_SALT))
    reasons = {p.row: p.reason for p in report.quarantined}
    assert "missing image file 2.png" in reasons[2]
    assert "unreadable image 3.png" in reasons[3]
    assert list(report.index["row"]) == [1]


def test_self_intersection_and_rle_decoding_edge_cases() -> None:
    assert self_intersects(np.array([[0, 0], [10, 10], [10, 0], [0, 10]], float))
    assert not self_intersects(np.array([[0, 0], [10, 0], [10, 10], [0, 10]], float))
    # A long outline (checked in chunks) that crosses itself once, far apart in order.
    t = np.linspace(0, 2 * np.pi, 2999, endpoint=False)
    loop = np.stack([np.cos(t), np.sin(2 * t)], axis=1) * 100 + 200  # a figure eight
    assert self_intersects(loop, chunk=256)
    mask = decode_rle({"size": [2, 3], "counts": [1, 2, 3]}, 2, 3)
    assert mask.tolist() == [[False, True, False], [True, False, False]]
    with pytest.raises(Exception, match="cover 5 pixels"):
        decode_rle({"size": [2, 3], "counts": [1, 4]}, 2, 3)


def test_category_maps_are_validated(tmp_path: Path) -> None:
    arcade = load_category_map("ARCADE")
    assert {code for code in ("9a", "12b", "16c") if arcade.lookup(code)[1]} == \
        {"9a", "12b", "16c"}
    assert arcade.lookup("16c")[1].vessel == "RCA" and arcade.lookup("stenosis") == (True, None)
    bad = tmp_path / "map.yaml"
    bad.write_text("name: x\ntaxonomy: CASS\ncategories: {lesion: '99'}\n")
    with pytest.raises(ConfigError, match="categories.lesion: '99' is not a segment of the CASS"):
        load_category_map(str(bad))
    good = tmp_path / "own.yaml"
    good.write_text("name: own\ntaxonomy: CASS\ncategories: {prox_lad: 12, plaque: null}\n")
    own = load_category_map(str(good))
    assert own.lookup("prox_lad")[1].vessel == "LAD" and own.lookup("plaque") == (True, None)


def test_cli_indexes_coco_and_refuses_mixed_inputs(messy_coco: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli.parquet"
    assert main(["index", "--coco", str(messy_coco), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "annotations read 15, indexed 5" in printed.out and "split by image" in printed.err
    assert main(["index", str(messy_coco), "--coco", str(messy_coco), "--out", str(out)]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["index", "--coco", str(tmp_path / "nope.json"), "--out", str(out)]) == 2
    assert "no such COCO annotation file" in capsys.readouterr().err
    not_coco = tmp_path / "x.json"
    not_coco.write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match="no 'annotations' list"):
        build_coco_index([CocoSource(not_coco)], out)


def shared_arcade() -> Path | None:
    """The shared ARCADE copy: beside the project root, or where ANGIOTUNE_SHARED_DATA says."""
    candidates = [Path(os.environ.get("ANGIOTUNE_SHARED_DATA", "")) / "arcade",
                  Path(__file__).resolve().parents[2] / "shared" / "data" / "arcade",
                  Path("/work/shared/data/arcade")]
    return next((c for c in candidates if (c / "stenosis_val").is_dir()), None)


@pytest.mark.skipif(shared_arcade() is None, reason="the shared ARCADE folder is not on this "
                    "machine (../shared/data/arcade)")
@pytest.mark.slow
def test_real_arcade_frames_index_with_every_annotation_accounted_for(tmp_path: Path) -> None:
    """A handful of the real frames, through a COCO file cut from the real one."""
    arcade = shared_arcade()
    for folder, name in (("stenosis_val", "sten_val.json"), ("syntax_val", "seg_val.json")):
        real = json.loads((arcade / folder / "annotations" / name).read_text())
        images = real["images"][:5]
        ids = {image["id"] for image in images}
        cut = dict(real, images=images,
                   annotations=[a for a in real["annotations"] if a["image_id"] in ids])
        path = tmp_path / f"{folder}.json"
        path.write_text(json.dumps(cut))
        out = tmp_path / f"{folder}.parquet"
        report = build_coco_index([CocoSource(path, images=arcade / folder / "images")], out,
                                  CocoSettings(salt=TEST_SALT))
        assert len(report.index) + len(report.quarantined) == len(cut["annotations"])
        rows, root = load_rows(out)
        assert set(rows["frame_height"]) == {512}
        if folder == "stenosis_val":
            assert set(rows["vessel"]) == {"UNKNOWN"}
        else:
            assert set(rows["vessel"]) <= {"RCA", "LAD", "LCX", "LM", "RAMUS"}
        # The outline's pixel count is the polygon's area (COCO's own 'area'): unbiased, and
        # within the quantisation of a small outline's border.
        areas = {a["id"]: a["area"] for a in cut["annotations"]}
        ratio = rows["mask_area_px"] / rows["row"].map(areas)
        assert abs(ratio.median() - 1) < 0.02 and ratio.between(0.9, 1.1).all(), ratio.describe()
        # Contrast-filled lumen is dark: each outline is darker than the band around it (the
        # mask lies on the frame as drawn, not transposed or shifted).
        from scipy import ndimage

        for row in rows.to_dict("records"):
            frame = read_frame(root / row["image_path"], 0)
            mask = read_mask(root / row["mask_path"])
            band = ndimage.binary_dilation(mask, iterations=6) & ~mask
            assert frame[mask].mean() < frame[band].mean()


def test_stage_two_on_segment_labels_without_calibration(tmp_path: Path) -> None:
    """ARCADE's SYNTAX file: the segment head can train (its classes are SYNTAX codes), and a
    space whose heads need millimetres is refused in one line naming the field."""
    from angiotune.errors import AngiotuneError
    from angiotune.search import load_space
    from angiotune.search.api import stage_constants

    labels = [annotation(n, image_id=1 + n % 6, category_id=(10, 20)[n % 2], bbox=None,
                         segmentation=[_square(2 + 3 * (n // 6), 2 + 20 * (n % 2), 2)])
              for n in range(1, 37)]
    out = tmp_path / "syntax.parquet"
    build_coco_index([CocoSource(write_coco(tmp_path / "coco", labels, images=6))], out,
                     CocoSettings(salt=TEST_SALT, split_fractions=(0.5, 0.5, 0.0)))
    segment_only = load_space("stage2_segment.yaml", ["params.init.choices=[none]"])
    constants = stage_constants(segment_only, out, tmp_path, tmp_path, resume=False)
    assert constants["classes"] == ["2", "9a"]
    with pytest.raises(AngiotuneError) as refused:
        stage_constants(load_space("stage2_multitask.yaml"), out, tmp_path, tmp_path,
                        resume=False)
    message = str(refused.value)
    assert "need mld_mm, which the index lacks" in message and "\n" not in message
    # Stenosis outlines name no segment: no class to learn, refused before Ray starts.
    outlines = [annotation(n, image_id=1 + n % 6, bbox=None,
                           segmentation=[_square(2 + 3 * (n // 6), 2, 2)]) for n in range(1, 13)]
    stenosis = tmp_path / "stenosis.parquet"
    build_coco_index([CocoSource(write_coco(tmp_path / "sten", outlines, images=6))], stenosis,
                     CocoSettings(salt=TEST_SALT, split_fractions=(0.5, 0.5, 0.0)))
    with pytest.raises(AngiotuneError, match="at least two named segments; the index has 0"):
        stage_constants(segment_only, stenosis, tmp_path, tmp_path, resume=False)


def test_what_exporters_vary_is_accepted_and_what_is_ambiguous_is_refused(tmp_path: Path
                                                                          ) -> None:
    """String ids, [[x, y], ...] polygons; a nameless category; the same file twice."""
    path = write_coco(tmp_path / "coco", [
        annotation("a1", image_id=1, bbox=None),
        annotation("a2", image_id=2, bbox=None,
                   segmentation=[[[5, 5], [15, 5], [15, 15], [5, 15]]]),
        annotation(3, image_id=3, category_id=40),
        annotation(4, image_id=3, segmentation=[_square(30, 30, 5)], bbox=None, id=[4])])
    payload = json.loads(path.read_text())
    for image in payload["images"]:
        image["id"] = str(image["id"])
    for item in payload["annotations"]:
        item["image_id"] = str(item["image_id"])
    payload["categories"].append({"id": 40})
    path.write_text(json.dumps(payload))
    report = build_coco_index([CocoSource(path)], tmp_path / "i.parquet",
                              CocoSettings(salt=TEST_SALT))
    assert len(report.index) == 2
    assert sorted(report.index["mask_area_px"]) == [64, 100]
    reasons = {p.row: p.reason for p in report.quarantined}
    assert "category 40 has no name" in reasons[3]
    assert "unusable annotation id [4] (annotation 4 of the file)" in reasons[4]
    with pytest.raises(DataError, match="the same COCO file is given twice"):
        build_coco_index([CocoSource(path), CocoSource(path, split="test")],
                         tmp_path / "j.parquet", CocoSettings(salt=TEST_SALT))


def test_split_files_and_by_image_copies(tmp_path: Path) -> None:
    """Val and test files given: the rest all trains. A by-image copy of a training file's
    frame trains with it (never lands in val or test)."""
    train = write_coco(tmp_path / "a", [annotation(1)], images=1, seed=5)
    loose = write_coco(tmp_path / "b", [annotation(n, image_id=n, bbox=None) for n in (1, 2, 3)],
                       seed=6)
    (tmp_path / "b" / "images" / "1.png").write_bytes(
        (tmp_path / "a" / "images" / "1.png").read_bytes())
    val = write_coco(tmp_path / "v", [annotation(1)], images=1, seed=7)
    test = write_coco(tmp_path / "t", [annotation(1)], images=1, seed=8)
    index = build_coco_index(
        [CocoSource(train, split="train"), CocoSource(loose), CocoSource(val, split="val"),
         CocoSource(test, split="test")], tmp_path / "i.parquet",
        CocoSettings(salt=TEST_SALT, split_fractions=(0.0, 0.0, 1.0))).index
    copy = index[index["image_path"] == "b/images/1.png"]
    assert list(copy["split"]) == ["train"]  # the fractions would have sent it to test
    assert set(index.loc[index["image_path"].str.startswith("b/"), "split"]) == {"train",
                                                                                  "test"}
    defaults = build_coco_index([CocoSource(loose), CocoSource(val, split="val"),
                                 CocoSource(test, split="test")], tmp_path / "k.parquet",
                                CocoSettings(salt=TEST_SALT)).index
    assert list(defaults.sort_values("image_path")["split"]) == ["train"] * 3 + ["test", "val"]


def test_a_failed_rebuild_keeps_the_previous_index_and_its_masks(messy_coco: Path,
                                                                 tmp_path: Path) -> None:
    out = tmp_path / "index.parquet"
    build_coco_index([CocoSource(messy_coco)], out, CocoSettings(salt=TEST_SALT))
    before = sorted(p.name for p in (tmp_path / "index.masks").iterdir())
    with pytest.raises(DataError):
        build_coco_index([CocoSource(messy_coco)], out, CocoSettings(salt=TEST_SALT,
                                                                     strict=True))
    assert sorted(p.name for p in (tmp_path / "index.masks").iterdir()) == before
    rows, root = load_rows(out)
    assert all((root / path).is_file() for path in rows["mask_path"])
