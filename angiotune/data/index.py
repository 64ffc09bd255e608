"""The lesion index: its columns, and reading and writing it as Parquet with its metadata.

One schema for every way an index is made (a core-lab CSV, ``angiotune.data.ingest``; COCO,
``angiotune.data.coco``) and read (the data stream, the search, evaluation). A file without
angiotune's metadata, or of another schema version, is refused plainly rather than misread.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from angiotune import __version__
from angiotune.errors import DataError

SCHEMA_VERSION = 1
METADATA_KEY = b"angiotune"
# What the stage-2 heads read: the QCA targets, and mm per pixel to turn pixels into mm.
STAGE2_FIELDS = ("mld_mm", "diameter_stenosis_pct", "rvd_mm", "pixel_spacing_mm")

BOX_COLUMNS = ("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1")
# Where the box sits along the frame's vessel tree (``angiotune.qca.tree``); NaN where not
# computed (COCO imports, indexes older than the columns).
TREE_COLUMNS = ("tree_distance_mm", "tree_fraction", "tree_root_dx", "tree_root_dy",
                "tree_spread_dx", "tree_spread_dy", "tree_area")
INDEX_COLUMNS = ["sample_id", "patient_key", "split", "row", "vessel", "vessel_source", "segment",
            "segment_name", "segment_position", "taxonomy", "phase", "frame_index", "frames",
            "frame_height", "frame_width", "image_path", "image_format", "transfer_syntax",
            "mask_path", "contour_path", "pixel_spacing_mm", "spacing_source", *BOX_COLUMNS,
            *TREE_COLUMNS, "mask_area_px", "mld_mm", "diameter_stenosis_pct", "rvd_mm",
            "lesion_length_mm", "proximal_diameter_mm", "distal_diameter_mm", "mld_x", "mld_y",
            "angle_lao_deg", "angle_cranial_deg", "angle_source", "warnings"]


_INTEGER_COLUMNS = ("row", "frame_index", "frames", "frame_height", "frame_width", "bbox_x0",
                    "bbox_y0", "bbox_x1", "bbox_y1", "mask_area_px")
_FLOAT_COLUMNS = ("pixel_spacing_mm", "mld_mm", "diameter_stenosis_pct", "rvd_mm",
                  "lesion_length_mm", "proximal_diameter_mm", "distal_diameter_mm", "mld_x",
                  "mld_y", "angle_lao_deg", "angle_cranial_deg", *TREE_COLUMNS)


def records_frame(records: list[dict]) -> pd.DataFrame:
    """Index records as a typed frame without splits, so that even an index whose rows were all
    quarantined has the right schema."""
    frame = pd.DataFrame(records, columns=[c for c in INDEX_COLUMNS if c != "split"])
    return frame.astype({**{c: "int64" for c in _INTEGER_COLUMNS},
                         **{c: "float64" for c in _FLOAT_COLUMNS},
                         **{c: "str" for c in INDEX_COLUMNS if c not in _INTEGER_COLUMNS
                            and c not in _FLOAT_COLUMNS and c != "split"}})


def with_splits(frame: pd.DataFrame, splits: list[str]) -> pd.DataFrame:
    frame.insert(2, "split", pd.Series(splits, index=frame.index, dtype="str"))
    return frame


def quarantine_path_for(out: Path) -> Path:
    return out.with_name(out.stem + ".quarantine.csv")


def read_index(path: str | Path) -> pd.DataFrame:
    """Load an index written by ``build_index``; refuses other Parquet files plainly."""
    path = Path(path)
    if not path.exists():
        raise DataError("no such index file", file=str(path))
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise DataError(f"not a readable Parquet file ({error})", file=str(path)) from None
    metadata = index_metadata(table.schema, path)
    if metadata.get("schema_version") != SCHEMA_VERSION:
        raise DataError(f"index schema version {metadata.get('schema_version')} is not "
                        f"{SCHEMA_VERSION}: rebuild it with `angiotune index`", file=str(path))
    return table.to_pandas()


def missing_measurements(index: str | Path | pd.DataFrame,
                         split: str | None = None) -> list[str]:
    """The index columns stage-2 heads need that this index (or one ``split`` of it) cannot
    give them, in ``STAGE2_FIELDS`` order; empty when stage 2 can train.

    ``mld_mm``, ``diameter_stenosis_pct`` and ``rvd_mm`` count as missing when no row has a
    value: the heads' losses skip a lesion whose value is unknown, so a partly measured set
    still trains. ``pixel_spacing_mm`` counts as missing when any row lacks it: the diameter
    heads turn model pixels into mm with it, and one NaN in a batch makes the loss's gradients
    NaN. (Ingest never keeps a measured lesion without a spacing.)
    """
    frame = index if isinstance(index, pd.DataFrame) else read_index(index)
    if split is not None:
        frame = frame[frame["split"] == split]
    missing = []
    for column in STAGE2_FIELDS:
        known = pd.to_numeric(frame[column], errors="coerce").notna() if column in frame \
            else pd.Series(False, index=frame.index)
        if not known.any() or (column == "pixel_spacing_mm" and not known.all()):
            missing.append(column)
    return missing


def index_metadata(schema: pa.Schema, path: Path) -> dict:
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise DataError("not an angiotune index (no angiotune metadata); build one with "
                        "`angiotune index`", file=str(path))
    return json.loads(raw)


def write_index(index: pd.DataFrame, out: Path, metadata: dict) -> None:
    """Write ``index`` with its metadata (``data_root`` at least) in one rename, so that a
    reader never sees a half-written index."""
    table = pa.Table.from_pandas(index, preserve_index=False)
    metadata = {"schema_version": SCHEMA_VERSION, "angiotune_version": __version__, **metadata,
                "created": datetime.datetime.now(datetime.timezone.utc)
                .isoformat(timespec="seconds")}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                           METADATA_KEY: json.dumps(metadata).encode()})
    partial = out.with_name(out.name + ".partial")
    pq.write_table(table, partial)
    partial.replace(out)
