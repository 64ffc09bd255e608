"""COCO annotations (ARCADE, and what SAM fine-tuning projects export) -> the Parquet lesion index.

One index row per annotation: its polygons or RLE become a mask PNG written beside the index,
its image a cine of one frame, its category a segment through a category map (ARCADE's is
built in). COCO carries no patients and no calibration, so rows are grouped by image for the
splits (frames of one patient may fall in different splits: give a dataset's own train, val and
test files as such to keep its split), and the millimetre fields are absent (NaN). An annotation
that cannot be trusted is quarantined with its id, the field and the reason, as a bad CSV row is;
the quarantine's ``row`` column holds the annotation id.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from skimage.draw import polygon as draw_polygon

from angiotune.data.index import quarantine_path_for, records_frame, with_splits, write_index
from angiotune.data.ingest import IndexSummary, Problem
from angiotune.data.pseudonym import patient_key, resolve_salt, salt_fingerprint
from angiotune.data.readers import cine_format, read_frame, read_header, read_json_object
from angiotune.data.splits import SPLITS, assign_splits
from angiotune.data.transforms import box_iou
from angiotune.errors import DataError
from angiotune.qca.tree import TreePosition, VesselTree, vessel_tree
from angiotune.taxonomies import UNKNOWN_VESSEL, CategoryMap, load_category_map

DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)
FRACTIONS_WITH_TEST_FILE = (0.85, 0.15, 0.0)  # the test split comes from its own file
EDGE_TOLERANCE_PX = 1.0  # annotation tools round outlines onto the image's border
TREES_KEPT = 4  # images whose vessel tree is kept while their annotations are read
BOX_AGREEMENT_IOU = 0.5  # a bbox this far from its outline belongs to another annotation
SPLIT_NOTE = ("split by image: COCO files carry no patient ids, so frames of one patient may "
              "fall in different splits; files given with a split keep every image there")


@dataclass(frozen=True)
class CocoSource:
    """One COCO annotation file. ``split``: put every image of it there (a dataset's own
    train/val/test files); None: split its images by the fractions. ``images``: the folder its
    ``file_name``s are relative to (default: ``images/`` beside its ``annotations/`` folder, or
    its own folder)."""

    annotations: Path
    split: str | None = None
    images: Path | None = None


@dataclass(frozen=True)
class CocoSettings:
    categories: str = "ARCADE"  # a built-in category map or a YAML file
    salt: str | None = None
    strict: bool = False
    split_fractions: tuple[float, float, float] | None = None  # None: see default_fractions
    split_seed: int = 0
    # Trace each image's vessel tree for the heads' segment read (most of an import's time);
    # off, the tree columns stay empty and the heads see the tree as missing.
    vessel_tree: bool = True


def default_fractions(sources: list[CocoSource]) -> tuple[float, float, float]:
    """Train/val/test for the images given without a split: no test share when a file is the
    test split already, all to training when files are the val and test splits."""
    given = {source.split for source in sources}
    if {"val", "test"} <= given:
        return (1.0, 0.0, 0.0)
    if "test" in given:
        return FRACTIONS_WITH_TEST_FILE
    return DEFAULT_FRACTIONS


class _Rejected(Exception):
    def __init__(self, field_name: str, reason: str) -> None:
        super().__init__(reason)
        self.field, self.reason = field_name, reason


def build_coco_index(sources: list[CocoSource], out: str | Path,
                     settings: CocoSettings = CocoSettings(),
                     on_row: Callable[[int, int], None] | None = None) -> IndexSummary:
    """Validate the COCO files and write the index to ``out``, its masks to ``<out>.masks/`` and
    its quarantine beside it."""
    if not sources:
        raise DataError("no COCO annotation file given")
    for source in sources:
        if source.split is not None and source.split not in SPLITS:
            raise DataError(f"split {source.split!r} is not one of {', '.join(SPLITS)}",
                            file=str(source.annotations))
    paths = [Path(source.annotations).resolve() for source in sources]
    if len(set(paths)) < len(paths):
        twice = next(path for path in paths if paths.count(path) > 1)
        raise DataError("the same COCO file is given twice (once per split at most)",
                        file=str(twice))
    out = Path(out)
    categories = load_category_map(settings.categories)
    salt = resolve_salt(settings.salt)
    labels = _labels(paths)
    loaded = [_load_file(source, label) for source, label in zip(sources, labels, strict=True)]
    root = _common_root([folder for _, folder, _ in loaded])
    # Masks are written beside the index under a temporary name and swapped in at the end, so
    # that a failure midway leaves the previous index and its masks as they were.
    masks = out.with_name(out.stem + ".masks")
    building = out.with_name(out.stem + ".masks.partial")
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    total = sum(len(payload["annotations"]) for payload, _, _ in loaded)
    records, fixed_splits, quarantined, warnings = [], [], [], []
    done = 0
    for source, (payload, images_dir, file_label) in zip(sources, loaded, strict=True):
        reader = _FileReader(payload, images_dir, file_label, root, (building, masks),
                             categories, salt, settings.vessel_tree)
        for position, annotation in enumerate(payload["annotations"], start=1):
            done += 1
            number = _annotation_id(annotation, position)
            try:
                record, annotation_warnings = reader.parse(annotation, number)
            except Exception as error:  # noqa: BLE001 - one odd annotation must not stop the rest
                rejected = error if isinstance(error, _Rejected) else _Rejected(
                    "annotation", f"unexpected {type(error).__name__}: {error}")
                if settings.strict:
                    raise DataError(rejected.reason, file=str(source.annotations), row=number,
                                    field=rejected.field) from None
                quarantined.append(Problem(number, rejected.field, file_label, rejected.reason))
            else:
                records.append(record)
                fixed_splits.append(source.split)
                warnings += annotation_warnings
            if on_row:
                on_row(done, total)
    records, fixed_splits, leaked = _without_held_out_copies(records, fixed_splits, building)
    quarantined += leaked
    fractions = settings.split_fractions or default_fractions(sources)
    index = with_splits(records_frame(records),
                        _splits(records, fixed_splits, fractions, settings.split_seed))
    shutil.rmtree(masks, ignore_errors=True)  # ours alone (named after the index)
    building.rename(masks)
    write_index(index, out, {
        "source": "coco", "taxonomy": categories.taxonomy.name,
        "category_map": categories.name, "data_root": str(root),
        "manifest": ", ".join(labels),
        "annotation_files": [{"file": label, "split": source.split or "by image"}
                             for source, (_, _, label) in zip(sources, loaded, strict=True)],
        "salt_fingerprint": salt_fingerprint(salt), "split_unit": "image",
        "split_note": SPLIT_NOTE, "split_fractions": list(fractions),
        "split_seed": settings.split_seed, "calibration": "none (COCO carries no pixel spacing)",
        "masks": masks.name})
    quarantine_path = quarantine_path_for(out)
    pd.DataFrame([vars(p) for p in quarantined], columns=["row", "field", "file", "reason"]) \
        .to_csv(quarantine_path, index=False)
    notes = [f"{SPLIT_NOTE}.", "no calibration: the millimetre fields are absent; evaluate and "
             "predict report pixel-only results"]
    return IndexSummary(sources[0].annotations, out, quarantine_path, total, index,
                       quarantined, warnings, notes, unit="image")


HELD_OUT = {None: -1, "train": 0, "val": 1, "test": 2}  # None: split by image


def _without_held_out_copies(records: list[dict], fixed: list[str | None], masks: Path):
    """An image (byte for byte) in several files goes where its most held-out file puts it.
    A copy in a training or by-image file of a val or test frame is quarantined: that frame must
    not be trained or selected on (two ARCADE frames are one: stenosis_train's 218.png is
    stenosis_val's 58.png). A by-image copy of a training file's frame trains with it."""
    strictest: dict[str, tuple[int, dict, str | None]] = {}
    for record, split in zip(records, fixed, strict=True):
        if HELD_OUT[split] > strictest.get(record["patient_key"], (-2, {}, None))[0]:
            strictest[record["patient_key"]] = (HELD_OUT[split], record, split)
    kept, kept_splits, leaked = [], [], []
    for record, split in zip(records, fixed, strict=True):
        rank, holder, holder_split = strictest[record["patient_key"]]
        if split is None and holder_split == "train":
            split = "train"
        elif HELD_OUT[split] < rank:
            leaked.append(Problem(record["row"], "file_name", record["source_file"],
                                  f"the same frame, byte for byte, as {holder['image_path']} "
                                  f"of {holder['source_file']} in the {holder_split} split: "
                                  "left out so that the held-out split stays unseen"))
            (masks / f"{record['sample_id']}.png").unlink(missing_ok=True)
            continue
        kept.append(record)
        kept_splits.append(split)
    return kept, kept_splits, leaked


def _splits(records: list[dict], fixed: list[str | None],
            fractions: tuple[float, float, float], seed: int) -> list[str]:
    """Each row's split: its file's, or by image (the image key stands in for the patient)."""
    free = [i for i, split in enumerate(fixed) if split is None]
    chosen = assign_splits([records[i]["patient_key"] for i in free],
                           [records[i]["vessel"] for i in free], fractions, seed)
    splits = list(fixed)
    for i, split in zip(free, chosen, strict=True):
        splits[i] = split
    return [str(split) for split in splits]


def _labels(paths: list[Path]) -> list[str]:
    """How each annotation file is named in messages and ids: its path from the folder all of
    them share (just its name when it is alone)."""
    if len(paths) == 1:
        return [paths[0].name]
    try:
        common = Path(os.path.commonpath([str(path.parent) for path in paths]))
    except ValueError:  # different drives
        return [path.as_posix() for path in paths]
    return [path.relative_to(common).as_posix() for path in paths]


def _common_root(folders: list[Path]) -> Path:
    try:
        return Path(os.path.commonpath([str(folder) for folder in folders]))
    except ValueError:
        raise DataError("the COCO files' image folders are on different drives; copy them onto "
                        "one", file=", ".join(str(folder) for folder in folders)) from None


def _load_file(source: CocoSource, label: str) -> tuple[dict, Path, str]:
    """The file's JSON, the folder its images are in, and its name for messages."""
    path = Path(source.annotations)
    if not path.is_file():
        raise DataError("no such COCO annotation file", file=str(path))
    payload = read_json_object(path)
    for key in ("images", "annotations", "categories"):
        if not isinstance(payload.get(key), list):
            raise DataError(f"not a COCO annotation file: no '{key}' list", file=str(path),
                            field=key)
    images = Path(source.images) if source.images is not None else _images_folder(path, payload)
    if not images.is_dir():
        raise DataError("no such image folder", file=str(images))
    return payload, images.resolve(), label


def _images_folder(path: Path, payload: dict) -> Path:
    """Where the ``file_name``s are: ``images/`` beside ``annotations/`` (ARCADE, COCO's own
    layout), ``images/`` inside the file's folder, or the file's folder."""
    first = next((str(image.get("file_name", "")) for image in payload["images"]
                  if isinstance(image, dict)), "")
    candidates = [path.parent.parent / "images", path.parent / "images", path.parent]
    for folder in candidates:
        if first and (folder / first).is_file():
            return folder
    return next((folder for folder in candidates if folder.is_dir()), path.parent)


def _annotation_id(annotation, position: int) -> int:
    """The annotation's id for the quarantine's ``row``; its 1-based position in the file's
    ``annotations`` when the id is not an integer (the reason then quotes the id as given)."""
    value = annotation.get("id") if isinstance(annotation, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else position


def _id(value) -> int | str | None:
    """A COCO id as given: integers, or strings, which some exporters write."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return None
    return value


class _FileReader:
    """Turns the annotations of one COCO file into index records, or rejects them."""

    def __init__(self, payload: dict, images_dir: Path, label: str, root: Path,
                 masks: tuple[Path, Path], categories: CategoryMap, salt: str,
                 trace_trees: bool = True) -> None:
        self.images_dir, self.label, self.root = images_dir, label, root
        self.trace_trees = trace_trees
        self.masks_written, self.masks_final = masks  # written to the first, indexed as the second
        self.categories, self.salt = categories, salt
        self.category_names: dict[int | str, str | None] = {}  # None: the category has no name
        for category in payload["categories"]:
            number = _id(category.get("id")) if isinstance(category, dict) else None
            if number is not None:
                name = category.get("name")
                self.category_names.setdefault(number, str(name).strip() if name else None)
        self.images: dict[int | str, dict | str] = {}  # id -> entry, or why it cannot be used
        for image in payload["images"]:
            number = _id(image.get("id")) if isinstance(image, dict) else None
            if number is None:
                continue
            previous = self.images.get(number)
            if previous is not None and previous != image:
                self.images[number] = (f"image_id {number!r} is listed twice in images with "
                                       "different files")
            else:
                self.images[number] = image
        self.frames: dict[int | str, tuple | str] = {}  # id -> (path, header, key) or why not
        self.seen_ids: set[int | str] = set()
        self.outlines: dict[tuple[int | str, str], int] = {}
        self.trees: dict[int | str, VesselTree | None] = {}  # the last TREES_KEPT images'

    def parse(self, annotation, number: int) -> tuple[dict, list[Problem]]:
        """``number``: the annotation's id, or its position in the file when the id is no
        integer; the quarantine's and the index's ``row``."""
        if not isinstance(annotation, dict):
            raise _Rejected("annotation", "not a JSON object")
        given_id = _id(annotation.get("id"))
        if given_id is None:
            raise _Rejected("id", f"missing or unusable annotation id {annotation.get('id')!r} "
                                  f"(annotation {number} of the file)")
        if given_id in self.seen_ids:
            raise _Rejected("id", f"duplicate annotation id {given_id!r} (the first is kept)")
        self.seen_ids.add(given_id)
        warnings: list[Problem] = []
        segment = self._segment(annotation)
        if annotation.get("iscrowd") in (1, True):
            raise _Rejected("iscrowd", "crowd annotation (a group of objects, not one lesion): "
                                       "not supported")
        image_id = _id(annotation.get("image_id"))
        relative, header, key = self._image(image_id, annotation.get("image_id"))
        height, width = header.height, header.width
        given = _given_box(annotation.get("bbox"), width, height)
        mask = _mask(annotation.get("segmentation"), height, width)
        digest = hashlib.sha256(np.packbits(mask).tobytes()).hexdigest()
        first = self.outlines.setdefault((image_id, digest), number)
        if first != number:
            raise _Rejected("segmentation", f"the same outline on the same image as annotation "
                                            f"{first} (a duplicate)")
        ys, xs = np.nonzero(mask)
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        if given is not None and box_iou(given, box) < BOX_AGREEMENT_IOU:
            warnings.append(Problem(number, "bbox", self.label, f"bbox {list(given)} disagrees "
                                    f"with the outline's extent {list(box)}; the index uses the "
                                    "outline's"))
        identity = f"{key}|{relative}|{self.label}|{number}"
        sample_id = hashlib.sha256(identity.encode()).hexdigest()[:16]
        mask_name = f"{sample_id}.png"
        Image.fromarray(mask.astype(np.uint8) * 255).save(self.masks_written / mask_name,
                                                           optimize=True)
        nan = math.nan
        position = self._tree_position(image_id, box)
        record = {
            "sample_id": sample_id, "patient_key": key, "row": number,
            "vessel": segment.vessel if segment else UNKNOWN_VESSEL,
            "vessel_source": "category" if segment else "none",
            "segment": segment.code if segment else "",
            "segment_name": segment.name if segment else "coronary",
            "segment_position": segment.position if segment else "",
            "taxonomy": self.categories.taxonomy.name, "phase": "UNKNOWN",
            "frame_index": 0, "frames": 1, "frame_height": height, "frame_width": width,
            "image_path": relative, "image_format": cine_format(self.images_dir / relative),
            "transfer_syntax": header.transfer_syntax,
            "mask_path": _relative(self.masks_final / mask_name, self.root), "contour_path": "",
            "pixel_spacing_mm": nan, "spacing_source": "none",
            "bbox_x0": box[0], "bbox_y0": box[1], "bbox_x1": box[2], "bbox_y1": box[3],
            "mask_area_px": int(mask.sum()), **position.columns(),
            "mld_mm": nan, "diameter_stenosis_pct": nan, "rvd_mm": nan, "lesion_length_mm": nan,
            "proximal_diameter_mm": nan, "distal_diameter_mm": nan, "mld_x": nan, "mld_y": nan,
            "angle_lao_deg": nan, "angle_cranial_deg": nan, "angle_source": "none",
            "warnings": "; ".join(f"{w.field}: {w.reason}" for w in warnings),
            "source_file": self.label,  # for messages only: not an index column
        }
        return record, warnings

    def _segment(self, annotation: dict):
        category_id = _id(annotation.get("category_id"))
        if category_id not in self.category_names:
            raise _Rejected("category_id", f"category_id {annotation.get('category_id')!r} is "
                                           "not in the file's categories")
        name = self.category_names[category_id]
        if name is None:
            raise _Rejected("category_id", f"category {category_id!r} has no name in the file's "
                                           "categories (the category map reads names)")
        known, segment = self.categories.lookup(name)
        if not known:
            raise _Rejected("category_id", f"category {name!r} is not in the "
                            f"{self.categories.name} category map; give a map with "
                            "--categories FILE")
        return segment

    def _image(self, image_id: int | str | None, as_given) -> tuple[str, object, str]:
        """The image's path relative to the data root, its header and its key; read once."""
        entry = self.images.get(image_id) if image_id is not None else None
        if entry is None:
            raise _Rejected("image_id", f"image_id {as_given!r} is not in the file's images")
        if isinstance(entry, str):
            raise _Rejected("image_id", entry)
        if image_id not in self.frames:
            self.frames[image_id] = self._read_image(entry)
        frame = self.frames[image_id]
        if isinstance(frame, str):
            raise _Rejected("file_name", frame)
        return frame

    def _tree_position(self, image_id, box) -> TreePosition:
        """The box's place on its image's vessel tree (no spacing: the share only). Traced
        once per image; the last few are kept, as a file's annotations come image by image."""
        if not self.trace_trees:
            return TreePosition()
        if image_id not in self.trees:
            relative = self.frames[image_id][0]
            self.trees[image_id] = vessel_tree(read_frame(self.root / relative, 0))
            while len(self.trees) > TREES_KEPT:
                self.trees.pop(next(iter(self.trees)))
        tree = self.trees[image_id]
        return tree.position(box, None) if tree is not None else TreePosition()

    def _read_image(self, entry: dict) -> tuple[str, object, str] | str:
        name = str(entry.get("file_name") or "")
        if not name:
            return f"image {entry['id']} has no file_name"
        path = (self.images_dir / name).resolve()
        if not path.is_relative_to(self.images_dir):
            return f"image file {name} is outside the image folder {self.images_dir}"
        if not path.is_file():
            return f"missing image file {name} (looked in {self.images_dir})"
        try:
            header = read_header(path)
            read_frame(path, 0)
        except DataError as error:
            return f"unreadable image {name}: {error.message}"
        declared = (entry.get("width"), entry.get("height"))
        if all(isinstance(v, int) for v in declared) and declared != (header.width,
                                                                      header.height):
            return (f"image {name} is {header.width}x{header.height} but the file's images "
                    f"say {declared[0]}x{declared[1]}")
        # The image stands in for the patient. Keyed by its bytes, not its name: stable when the
        # data moves or other files are indexed with it, and a frame copied into two files of a
        # dataset is one image to the splits.
        key = patient_key(hashlib.sha256(path.read_bytes()).hexdigest(), self.salt)
        return _relative(path, self.root), header, key


def _relative(path: Path, root: Path) -> str:
    """``path`` as the index stores it: relative to the data root (``..`` allowed: the masks
    live beside the index), absolute where no relative path exists (another drive)."""
    try:
        return Path(os.path.relpath(path, root)).as_posix()
    except ValueError:
        return path.as_posix()


def _given_box(bbox, width: int, height: int) -> tuple[float, float, float, float] | None:
    """COCO's x, y, w, h as x0, y0, x1, y1; None when absent; rejected when unusable."""
    if bbox is None:
        return None
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        raise _Rejected("bbox", f"bbox {bbox!r} is not four numbers x, y, w, h") from None
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        raise _Rejected("bbox", f"bbox {bbox!r} has no area or is not finite")
    tolerance = EDGE_TOLERANCE_PX
    if x < -tolerance or y < -tolerance or x + w > width + tolerance or \
            y + h > height + tolerance:
        raise _Rejected("bbox", f"bbox {[round(v, 2) for v in (x, y, w, h)]} is outside the "
                                f"{width}x{height} image")
    return x, y, x + w, y + h


def _mask(segmentation, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons, or RLE compressed or not) as a boolean mask."""
    if isinstance(segmentation, dict):
        mask = decode_rle(segmentation, height, width)
    elif isinstance(segmentation, list) and segmentation:
        mask = np.zeros((height, width), dtype=bool)
        for polygon in segmentation:
            points = _polygon(polygon, width, height)
            # COCO outlines are in pixel-edge coordinates: a pixel is in when its centre is.
            # (PIL's fill also takes every pixel the outline touches: 7 % more area on ARCADE's
            # thin vessel outlines; this keeps the pixel count within 0.2 % of the polygon's.)
            rows, cols = draw_polygon(points[:, 1] - 0.5, points[:, 0] - 0.5, (height, width))
            mask[rows, cols] = True
    else:
        raise _Rejected("segmentation", "no segmentation (a box alone is not a lesion outline)")
    if not mask.any():
        raise _Rejected("segmentation", "degenerate outline: it covers no pixel")
    return mask


def _polygon(polygon, width: int, height: int) -> np.ndarray:
    try:
        points = np.asarray(polygon, dtype=float)
    except (TypeError, ValueError):
        raise _Rejected("segmentation", "a polygon is not a list of numbers") from None
    if points.ndim == 2 and points.shape[1] == 2:  # [[x, y], ...], as some exporters write
        points = points.reshape(-1)
    if points.ndim != 1 or len(points) % 2:
        raise _Rejected("segmentation", "a polygon is not a flat list of x, y pairs")
    points = points.reshape(-1, 2)
    if not np.isfinite(points).all():
        raise _Rejected("segmentation", "a polygon has non-finite coordinates")
    if len(np.unique(points, axis=0)) < 3 or abs(_shoelace(points)) < 1e-6:
        raise _Rejected("segmentation", f"degenerate polygon ({len(points)} points enclosing "
                                        "no area)")
    tolerance = EDGE_TOLERANCE_PX
    if (points < -tolerance).any() or (points[:, 0] > width + tolerance).any() or \
            (points[:, 1] > height + tolerance).any():
        raise _Rejected("segmentation", f"polygon outside the {width}x{height} image")
    if self_intersects(points):
        raise _Rejected("segmentation", "self-intersecting polygon (its filled area is "
                                        "ambiguous)")
    return points


def _shoelace(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def self_intersects(points: np.ndarray, chunk: int = 512) -> bool:
    """Whether two non-adjacent edges of the closed polygon cross (touching ends do not
    count); vectorised over edge pairs in chunks, so long outlines stay cheap in memory."""
    count = len(points)
    if count < 4:
        return False
    start, direction = points, np.roll(points, -1, axis=0) - points

    def cross(u, v):
        return u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0]

    j = np.arange(count)
    for first in range(0, count, chunk):
        i = np.arange(first, min(first + chunk, count))
        d_i, d_j = direction[i][:, None], direction[None]
        offset = start[None] - start[i][:, None]
        denom = cross(d_i, d_j)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = cross(offset, d_j) / denom
            u = cross(offset, d_i) / denom
        eps = 1e-9
        crossing = (denom != 0) & (t > eps) & (t < 1 - eps) & (u > eps) & (u < 1 - eps)
        gap = np.abs(i[:, None] - j[None])
        crossing &= (gap > 1) & (gap < count - 1)
        if crossing.any():
            return True
    return False


def decode_rle(rle: dict, height: int, width: int) -> np.ndarray:
    """COCO RLE (``counts`` as a list, or COCO's compressed string) -> mask. Runs alternate
    background/foreground in column-major order, starting with background."""
    size = rle.get("size")
    if not (isinstance(size, list) and len(size) == 2 and list(size) == [height, width]):
        raise _Rejected("segmentation", f"RLE size {size!r} is not the image's "
                                        f"[{height}, {width}]")
    counts = rle.get("counts")
    if isinstance(counts, str):
        counts = _uncompress_counts(counts)
    if not isinstance(counts, list) or not all(isinstance(c, int) and c >= 0 for c in counts):
        raise _Rejected("segmentation", "RLE counts are neither a list of non-negative "
                                        "integers nor a compressed string")
    if sum(counts) != height * width:
        raise _Rejected("segmentation", f"RLE counts cover {sum(counts)} pixels, the image "
                                        f"has {height * width}")
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, counts)
    return flat.reshape(width, height).T.copy()


def _uncompress_counts(text: str) -> list[int]:
    """COCO's compressed RLE string: 5-bit groups in characters from 48 ('0'), with a
    continuation bit and sign, and each count after the second stored as a difference from the
    count two before it."""
    counts: list[int] = []
    position = 0
    while position < len(text):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(text):
                raise _Rejected("segmentation", "truncated compressed RLE")
            code = ord(text[position]) - 48
            if not 0 <= code < 64:
                raise _Rejected("segmentation", "compressed RLE holds an invalid character")
            value |= (code & 0x1F) << (5 * shift)
            more = bool(code & 0x20)
            position += 1
            shift += 1
            if not more and code & 0x10:
                value |= -1 << (5 * shift)
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts
