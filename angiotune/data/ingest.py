"""Core-lab CSV -> validated Parquet lesion index, with bad rows quarantined, never lost.

Each CSV row is checked against the files it names (the cine header and the analysed frame, the
mask, the contour JSON when there is one). A row that cannot be trusted goes to the quarantine file
with its line number, field, file and reason; cosmetic faults (unreadable vessel text, a mask saved
at another uniform scale, angles only in the DICOM) are repaired with a warning. Raw patient IDs
are turned into salted keys on read and never written. Rows are numbered as lines of the CSV file
(the header is line 1), as an editor shows them.

Stage 1 (segmentation) needs only the frame, the mask and the segment number, so the contour JSON
and the QCA measurements are optional: measurements come from the contour JSON, from CSV columns
of the same names, or not at all (NaN in the index; ``missing_measurements`` tells a stage-2
search which are absent). The index's schema and its Parquet I/O are ``angiotune.data.index``.
The accepted CSV and contour JSON are described in
docs/contour_schema.md.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from angiotune.data import angles
from angiotune.data.free_text import normalise_phase, parse_vessel_text
from angiotune.data.index import (
    BOX_COLUMNS,
    TREE_COLUMNS,
    quarantine_path_for,
    records_frame,
    with_splits,
    write_index,
)
from angiotune.data.pseudonym import patient_key, resolve_salt, salt_fingerprint
from angiotune.data.readers import (
    CineHeader,
    check_complete,
    cine_format,
    read_contour,
    read_frame,
    read_header,
    read_mask,
)
from angiotune.data.splits import assign_splits
from angiotune.errors import DataError
from angiotune.qca.tree import tree_columns
from angiotune.taxonomies import Taxonomy, load_taxonomy

# What segmentation needs: who, which frame, which segment, its mask (and a cine column below).
REQUIRED_COLUMNS = ("patient_id", "frame_index", "cass_segment", "medis_mask_path")
SOURCE_COLUMNS = ("dicom_path", "cine_path")
OPTIONAL_COLUMNS = ("vessel_pattern", "phase", "primary_angle", "secondary_angle",
                    "medis_contour_path", "pixel_spacing_mm")
# QCA measurements: the contour JSON's key (also the CSV column, in any case) -> index column.
MEASUREMENTS = {"MLD_mm": "mld_mm", "diameter_stenosis_pct": "diameter_stenosis_pct",
                "interpolated_RVD_mm": "rvd_mm", "lesion_length_mm": "lesion_length_mm",
                "proximal_normal_diameter_mm": "proximal_diameter_mm",
                "distal_normal_diameter_mm": "distal_diameter_mm"}
REQUIRED_MEASUREMENTS = ("MLD_mm", "diameter_stenosis_pct", "interpolated_RVD_mm")  # all or none
KNOWN_COLUMNS = {*REQUIRED_COLUMNS, *SOURCE_COLUMNS, *OPTIONAL_COLUMNS,
                 *(name.lower() for name in MEASUREMENTS)}
ANGLE_CONVENTION = ("angle_lao_deg: LAO positive, RAO negative (DICOM PositionerPrimaryAngle); "
                    "angle_cranial_deg: cranial positive, caudal negative")
# The same value in the CSV and the contour JSON, both rounded by an export: (relative, absolute).
AGREEMENT_MM = (0.02, 0.05)
AGREEMENT_PCT = (0.0, 1.0)
ANGLE_AGREEMENT_DEG = 2.0
CENTERLINE_COVERAGE = 0.8


@dataclass(frozen=True)
class IndexSettings:
    """How to build an index. ``data_root`` defaults to the manifest's folder."""

    data_root: Path | None = None
    taxonomy: str = "CASS"
    salt: str | None = None
    strict: bool = False
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    split_seed: int = 0
    stenosis_tolerance_pct: float = 5.0  # allowed |DS - 100 (1 - MLD / RVD)|
    # Trace each frame's vessel tree for the heads' segment read (about 0.1 s a lesion); off,
    # the tree columns stay empty and the heads see the tree as missing.
    vessel_tree: bool = True


@dataclass(frozen=True)
class Problem:
    """One quarantined row or one warning: where it is and what is wrong."""

    row: int
    field: str
    file: str
    reason: str


@dataclass
class IndexSummary:
    manifest: Path
    out: Path
    quarantine_path: Path
    rows_read: int
    index: pd.DataFrame
    quarantined: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    unit: str = "patient"  # what the splits group by: patient (CSV) or image (COCO)


class _Rejected(Exception):
    def __init__(self, field_name: str, reason: str, file: str = "") -> None:
        super().__init__(reason)
        self.field, self.reason, self.file = field_name, reason, file


def build_index(manifest: str | Path, out: str | Path, settings: IndexSettings = IndexSettings(),
                on_row: Callable[[int, int], None] | None = None) -> IndexSummary:
    """Validate ``manifest`` and write the Parquet index to ``out`` and its quarantine beside it."""
    manifest, out = Path(manifest), Path(out)
    rows, notes = read_manifest(manifest)
    root = (settings.data_root or manifest.parent).resolve()
    parser = _RowParser(root, load_taxonomy(settings.taxonomy), resolve_salt(settings.salt),
                        settings)
    records: list[dict] = []
    quarantined: list[Problem] = []
    warnings: list[Problem] = []
    seen: dict[tuple, int] = {}
    for done, (line, raw) in enumerate(rows, start=1):
        try:
            record, row_warnings = parser.parse(line, raw)
            duplicate_of = seen.setdefault(_identity(record), line)
            if duplicate_of != line:
                raise _Rejected("row", f"duplicate of row {duplicate_of} (same patient, cine, "
                                       "frame and segment)")
        except Exception as error:  # noqa: BLE001 - one odd row must never stop the whole index
            rejected = error if isinstance(error, _Rejected) else _Rejected(
                "row", f"unexpected {type(error).__name__}: {error}")
            # A problem in the CSV's own cells names the CSV.
            problem = Problem(line, rejected.field, _redact(rejected.file or manifest.name, raw),
                              _redact(rejected.reason, raw))
            if settings.strict:
                raise DataError(problem.reason, file=str(manifest), row=line,
                                field=problem.field) from None
            quarantined.append(problem)
        else:
            records.append(record)
            warnings += row_warnings
        if on_row:
            on_row(done, len(rows))
    index = _to_frame(records, settings)
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_parquet(index, out, manifest, root, parser, settings)
    quarantine_path = quarantine_path_for(out)
    pd.DataFrame([vars(p) for p in quarantined], columns=["row", "field", "file", "reason"]) \
        .to_csv(quarantine_path, index=False)
    return IndexSummary(manifest, out, quarantine_path, len(rows), index, quarantined, warnings,
                       notes)


BINARY_MAGIC = (b"PK\x03\x04", b"%PDF", b"\x89PNG", b"\xd0\xcf\x11\xe0", b"\x1f\x8b", b"PAR1")


def read_manifest(path: Path) -> tuple[list[tuple[int, dict[str, str]]], list[str]]:
    """Rows of a core-lab CSV as (line number, {column: text}), with notes on what was assumed."""
    if not path.exists():
        raise DataError("no such manifest file", file=str(path))
    data = path.read_bytes()
    notes = []
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        data = data.decode("utf-16").encode("utf-8")
        notes.append(f"{path.name} is UTF-16; read it as such")
    # Binary: a known container's magic, or NULs beyond a stray one in a damaged cell.
    if data.startswith(BINARY_MAGIC) or data[:4096].count(b"\x00") > 4:
        raise DataError("binary content, not a CSV text file", file=str(path))
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        try:
            text = data.decode("cp1252")
        except UnicodeDecodeError:
            raise DataError(f"not UTF-8 text (byte {error.start}); save the CSV as UTF-8",
                            file=str(path)) from None
        notes.append(f"{path.name} is not UTF-8; read it as Windows-1252")
    header_line = text.split("\n", 1)[0]
    if not header_line.strip():
        raise DataError("empty CSV: no header row", file=str(path))
    delimiter = max(",;\t", key=header_line.count)
    if delimiter != ",":
        notes.append(f"{path.name} uses {delimiter!r} as its delimiter")
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    reader.fieldnames = [name.strip().lower() for name in reader.fieldnames or []]
    missing = [c for c in REQUIRED_COLUMNS if c not in reader.fieldnames]
    if missing:
        raise DataError(f"missing column(s) {', '.join(missing)}; found "
                        f"{', '.join(reader.fieldnames) or 'none'}", file=str(path), row=1,
                        field=missing[0])
    if not any(c in reader.fieldnames for c in SOURCE_COLUMNS):
        raise DataError("needs a dicom_path or a cine_path column", file=str(path), row=1,
                        field="dicom_path")
    unknown = [c for c in reader.fieldnames if c not in KNOWN_COLUMNS]
    if unknown:
        notes.append(f"ignored column(s) not copied to the index: {', '.join(unknown)}")
    rows = []
    for raw in reader:
        extra = raw.pop(None, None)
        cells = {name: (value or "").strip() for name, value in raw.items()}
        rows.append((reader.line_num, cells | {"__extra__": bool(extra)}))
    if not rows:
        raise DataError("the CSV has a header but no data rows", file=str(path))
    return rows, notes


def _identity(record: dict) -> tuple:
    return record["patient_key"], record["image_path"], record["frame_index"], record["segment"]


class _RowParser:
    """Turns one CSV row into one index record, or rejects it with the field to blame."""

    def __init__(self, root: Path, taxonomy: Taxonomy, salt: str,
                 settings: IndexSettings) -> None:
        self.root, self.taxonomy, self.salt, self.settings = root, taxonomy, salt, settings

    def parse(self, line: int, raw: dict) -> tuple[dict, list[Problem]]:
        warnings: list[Problem] = []

        def warn(field_name: str, message: str, file: str = "") -> None:
            warnings.append(Problem(line, field_name, file, message))

        if raw.get("__extra__"):
            raise _Rejected("row", "more cells than header columns (a stray delimiter?)")
        for name, value in raw.items():
            if isinstance(value, str) and "\x00" in value:
                raise _Rejected(name, "holds a NUL character (a damaged export?)")
        if not raw.get("patient_id"):
            raise _Rejected("patient_id", "empty patient_id")
        key = patient_key(raw["patient_id"], self.salt)
        segment = self.taxonomy.lookup(raw.get("cass_segment", ""))
        if segment is None:
            raise _Rejected("cass_segment", f"{raw.get('cass_segment')!r} is not a segment of the "
                                            f"{self.taxonomy.name} taxonomy")
        # Without a vessel_pattern column the segment number alone decides, without a warning.
        vessel_source = self._check_vessel_text(raw["vessel_pattern"], segment.vessel, warn) \
            if "vessel_pattern" in raw else "segment"
        phase = normalise_phase(raw.get("phase"))
        if phase == "UNKNOWN" and "phase" in raw:
            warn("phase", f"unrecognised phase {raw.get('phase')!r}; stored as UNKNOWN")
        frame_index = _integer(raw.get("frame_index"), "frame_index")

        image_field = "dicom_path" if raw.get("dicom_path") else "cine_path"
        if not raw.get(image_field):
            raise _Rejected("dicom_path", "neither dicom_path nor cine_path is given")
        image = self._existing(raw[image_field], image_field)
        header = self._call(read_header, image, image_field)
        if not 0 <= frame_index < header.frames:
            raise _Rejected("frame_index", f"frame {frame_index} out of range: the cine has "
                                           f"{header.frames} frames", raw[image_field])
        frame = self._call(read_frame, image, image_field, frame_index)
        self._call(check_complete, image, image_field, header)

        mask_path = self._existing(raw.get("medis_mask_path", ""), "medis_mask_path")
        mask = self._fit_mask(self._call(read_mask, mask_path, "medis_mask_path"), header,
                              raw["medis_mask_path"], warn)
        # The contour JSON is optional: stage 1 needs none, and measurements may be CSV columns.
        contour_file = raw.get("medis_contour_path", "")
        contour_path = self._existing(contour_file, "medis_contour_path") if contour_file \
            else None
        contour = self._call(read_contour, contour_path, "medis_contour_path") \
            if contour_path else {}
        measures = self._measurements(contour, contour_file, raw)
        if contour_path:
            self._check_mask_covers_centerline(mask, contour, raw["medis_mask_path"])
        spacing, spacing_source = self._spacing(contour, contour_file, header, raw, warn,
                                                needed=math.isfinite(measures["mld_mm"]))
        lao, cranial, angle_source = self._angles(raw, header, contour, warn)

        files = ((image_field, image), ("medis_mask_path", mask_path),
                 ("medis_contour_path", contour_path))
        stored_paths = {field_name: path.relative_to(self.root).as_posix()
                        for field_name, path in files if path is not None}
        for field_name, stored in stored_paths.items():
            if _redact(stored, raw) != stored:
                raise _Rejected(field_name, "the path contains the patient ID, which the index "
                                            "must not store; rename the file or folder (for "
                                            "example by study UID)", stored)
        ys, xs = np.nonzero(mask)
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        relative = stored_paths[image_field]
        record = {
            "sample_id": hashlib.sha256(f"{key}|{relative}|{frame_index}|{segment.code}"
                                        .encode()).hexdigest()[:16],
            "patient_key": key, "row": line,
            "vessel": segment.vessel, "vessel_source": vessel_source,
            "segment": segment.code, "segment_name": segment.name,
            "segment_position": segment.position, "taxonomy": self.taxonomy.name,
            "phase": phase, "frame_index": frame_index, "frames": header.frames,
            "frame_height": header.height, "frame_width": header.width,
            "image_path": relative, "image_format": cine_format(image),
            "transfer_syntax": header.transfer_syntax,
            "mask_path": stored_paths["medis_mask_path"],
            "contour_path": stored_paths.get("medis_contour_path", ""),
            "pixel_spacing_mm": spacing, "spacing_source": spacing_source,
            **dict(zip(BOX_COLUMNS, box, strict=True)),
            **(tree_columns(frame, box, spacing) if self.settings.vessel_tree
               else dict.fromkeys(TREE_COLUMNS, math.nan)),
            "mask_area_px": int(mask.sum()),
            **measures,
            "angle_lao_deg": lao, "angle_cranial_deg": cranial, "angle_source": angle_source,
            "warnings": "; ".join(f"{w.field}: {w.reason}" for w in warnings),
        }
        return record, warnings

    def _existing(self, text: str, field_name: str) -> Path:
        if not text:
            raise _Rejected(field_name, f"empty {field_name}")
        path = Path(text)
        try:
            resolved = (path if path.is_absolute() else self.root / path).resolve()
            if not resolved.is_relative_to(self.root):
                raise _Rejected(field_name, f"path is outside the data root {self.root}", text)
            if not resolved.is_file():
                raise _Rejected(field_name, "missing file", text)
        except OSError as error:  # e.g. longer than the file system allows
            raise _Rejected(field_name, f"unusable path ({error.strerror})", text[:200]) from None
        return resolved

    def _call(self, reader, path: Path, field_name: str, *args):
        try:
            return reader(path, *args)
        except DataError as error:
            raise _Rejected(error.field or field_name, error.message,
                            path.relative_to(self.root).as_posix()) from None

    def _check_vessel_text(self, text: str, vessel: str, warn) -> str:
        named = parse_vessel_text(text)
        if not named:
            warn("vessel_pattern", f"cannot read a vessel in {text!r}; using {vessel} from the "
                                   "segment number")
            return "segment"
        if named == {vessel} or (vessel == "LM" and named <= {"LM", "LAD", "LCX"}):
            return "text"
        raise _Rejected("vessel_pattern", f"{text!r} names {'/'.join(sorted(named))} but the "
                                          f"segment number says {vessel}")

    def _fit_mask(self, mask: np.ndarray, header: CineHeader, file: str, warn) -> np.ndarray:
        if mask.shape != (header.height, header.width):
            scale_y, scale_x = header.height / mask.shape[0], header.width / mask.shape[1]
            if not math.isclose(scale_y, scale_x, rel_tol=1e-9):
                raise _Rejected("medis_mask_path", f"mask {mask.shape[1]}x{mask.shape[0]} is not "
                                f"a uniform scale of the frame {header.width}x{header.height}",
                                file)
            resized = Image.fromarray(mask.astype(np.uint8) * 255).resize(
                (header.width, header.height), Image.Resampling.NEAREST)
            mask = np.asarray(resized) > 0
            warn("medis_mask_path", f"mask rescaled by {scale_x:g} to the frame size", file)
        if not mask.any():
            raise _Rejected("medis_mask_path", "empty mask (no foreground pixels)", file)
        return mask

    def _measurements(self, contour: dict, contour_file: str, raw: dict) -> dict:
        """QCA values from the contour JSON's ``measurements`` and/or the CSV's columns of the
        same names; NaN where neither gives one (a lesion for segmentation only).

        A value given in both must agree within rounding (``AGREEMENT_MM``: 2 % or 0.05 mm;
        ``AGREEMENT_PCT``: 1 point of % DS), else the row is quarantined: one of the two belongs
        to another analysis (a re-analysis, a swapped file), and nothing says which to train on.
        MLD, % DS and RVD come all three or none, so that they can be checked against each other.
        """
        in_json = contour.get("measurements")
        in_json = {} if in_json is None else in_json  # absent or null: none in the JSON
        if not isinstance(in_json, dict):
            raise _Rejected("measurements", "the contour JSON's 'measurements' is not an object",
                            contour_file)
        values: dict[str, float] = {}
        blame: dict[str, tuple[str, str]] = {}  # name -> (field, file) a problem is reported on
        for name in MEASUREMENTS:
            json_field = f"measurements.{name}"
            from_json = _measurement(in_json.get(name), name, json_field, contour_file)
            from_csv = _measurement(raw.get(name.lower()), name, name, "")
            if from_json is not None and from_csv is not None:
                rel, tol = AGREEMENT_PCT if name.endswith("_pct") else AGREEMENT_MM
                if not math.isclose(from_json, from_csv, rel_tol=rel, abs_tol=tol):
                    raise _Rejected(json_field, f"the CSV's {name} {from_csv:g} and the contour "
                                    f"JSON's {from_json:g} disagree; one of them is from "
                                    "another analysis", contour_file)
            if from_json is not None:
                values[name], blame[name] = from_json, (json_field, contour_file)
            elif from_csv is not None:
                values[name], blame[name] = from_csv, (name, "")
        given = [name for name in REQUIRED_MEASUREMENTS if name in values]
        if given and len(given) < len(REQUIRED_MEASUREMENTS):
            absent = next(name for name in REQUIRED_MEASUREMENTS if name not in values)
            field_name, file = (f"measurements.{absent}", contour_file) if in_json \
                else (absent, "")
            raise _Rejected(field_name, f"{' and '.join(given)} given but no {absent} (in the "
                            "CSV or the contour JSON): give all three of "
                            f"{', '.join(REQUIRED_MEASUREMENTS)}, or none to index the lesion "
                            "for segmentation only", file)
        if given:
            self._check_consistent(values, blame)
        mld_xy = in_json.get("MLD_position_px")
        if not isinstance(mld_xy, (list, tuple)) or len(mld_xy) != 2:
            mld_xy = [math.nan, math.nan]
        return {**{column: values.get(name, math.nan) for name, column in MEASUREMENTS.items()},
                "mld_x": _number_or_nan(mld_xy[0]), "mld_y": _number_or_nan(mld_xy[1])}

    def _check_consistent(self, values: dict[str, float],
                          blame: dict[str, tuple[str, str]]) -> None:
        """MLD below the reference, and % DS as MLD and RVD imply (within the tolerance)."""
        mld, ds, rvd = (values[n] for n in REQUIRED_MEASUREMENTS)
        if mld > rvd:
            field_name, file = blame["MLD_mm"]
            raise _Rejected(field_name, f"MLD {mld:g} mm exceeds the reference diameter "
                                        f"{rvd:g} mm", file)
        implied = 100.0 * (1.0 - mld / rvd)
        if ds >= 100 or abs(ds - implied) > self.settings.stenosis_tolerance_pct:
            field_name, file = blame["diameter_stenosis_pct"]
            raise _Rejected(field_name, f"{ds:g} % contradicts MLD {mld:g} mm and RVD {rvd:g} mm "
                            f"(which give {implied:.1f} %)", file)

    def _check_mask_covers_centerline(self, mask: np.ndarray, contour: dict, file: str) -> None:
        """A mask of another lesion (a swapped file) misses this lesion's centerline."""
        line = contour.get("centerline")
        try:
            points = np.asarray(line, dtype=float).reshape(-1, 2)
        except (TypeError, ValueError):
            return
        if len(points) == 0 or not np.isfinite(points).all():
            return
        cols = np.clip(np.round(points[:, 0]).astype(int), 0, mask.shape[1] - 1)
        rows = np.clip(np.round(points[:, 1]).astype(int), 0, mask.shape[0] - 1)
        near = mask | np.pad(mask, 1)[2:, 1:-1] | np.pad(mask, 1)[:-2, 1:-1] \
            | np.pad(mask, 1)[1:-1, 2:] | np.pad(mask, 1)[1:-1, :-2]
        coverage = near[rows, cols].mean()
        if coverage < CENTERLINE_COVERAGE:
            raise _Rejected("medis_mask_path", f"mask covers only {coverage:.0%} of the contour's "
                                               "centerline (a mask of another lesion?)", file)

    def _spacing(self, contour: dict, contour_file: str, header: CineHeader, raw: dict, warn,
                 *, needed: bool) -> tuple[float, str]:
        """mm per pixel at the vessel and its source: the contour's calibration factor (pixels
        per mm), else the CSV's ``pixel_spacing_mm``, else the image header. Only a lesion with
        measurements needs one (its diameters are learnt in mm); without, NaN and "none"."""
        calibration = contour.get("calibration")
        factor = _number(calibration.get("scale_factor")) if isinstance(calibration, dict) \
            else None
        from_json = 1.0 / factor if factor is not None and factor > 0 else None
        from_csv = _measurement(raw.get("pixel_spacing_mm"), "pixel_spacing_mm",
                                "pixel_spacing_mm", "")
        if from_json is not None and from_csv is not None and \
                not math.isclose(from_json, from_csv, rel_tol=AGREEMENT_MM[0]):
            raise _Rejected("calibration", f"the CSV's pixel_spacing_mm {from_csv:g} mm/px and "
                            f"the contour JSON's calibration.scale_factor {factor:g} px/mm "
                            f"({from_json:g} mm/px) disagree", contour_file)
        if from_json is not None:
            return from_json, "calibration"
        if from_csv is not None:
            return from_csv, "csv"
        spacing = header.vessel_spacing()
        if spacing is not None:
            if contour_file:  # a contour without its calibration is worth a word; none is not
                warn("calibration", f"no calibration factor; pixel spacing from the {spacing[1]}")
            return spacing[0], "dicom"
        if needed:
            raise _Rejected("calibration", "missing calibration: no calibration.scale_factor in "
                            "the contour JSON, no pixel_spacing_mm in the CSV and no pixel "
                            "spacing with source distances in the image file; the measurements "
                            "in mm need one", contour_file)
        return math.nan, "none"

    def _angles(self, raw: dict, header: CineHeader, contour: dict, warn):
        csv_lao = _csv_angle(raw.get("primary_angle", ""), primary=True)
        csv_cranial = _csv_angle(raw.get("secondary_angle", ""), primary=False)
        for name, text, value in (("primary_angle", raw.get("primary_angle"), csv_lao),
                                  ("secondary_angle", raw.get("secondary_angle"), csv_cranial)):
            limit = angles.MAX_PRIMARY_DEG if name == "primary_angle" else angles.MAX_SECONDARY_DEG
            if text and value is None:
                warn(name, f"unreadable angle {text!r}; looking in the DICOM and contour JSON")
            elif value is not None and not angles.valid_angle(value, limit):
                warn(name, f"angle {text} is beyond the C-arm's ±{limit:g}°; looking in the "
                           "DICOM and contour JSON")
        views = contour.get("view_angles") if isinstance(contour.get("view_angles"), dict) else {}
        sources = [("csv", csv_lao, csv_cranial), ("dicom", header.lao_deg, header.cranial_deg),
                   ("contour", angles.parse_primary(views.get("primary")),
                    angles.parse_secondary(views.get("secondary")))]
        usable = [(name, lao, cranial) for name, lao, cranial in sources
                  if angles.valid_angle(lao, angles.MAX_PRIMARY_DEG)
                  and angles.valid_angle(cranial, angles.MAX_SECONDARY_DEG)]
        if not usable:
            warn("primary_angle", "no view angles in the CSV, DICOM or contour JSON")
            return math.nan, math.nan, "none"
        name, lao, cranial = usable[0]
        for other, other_lao, other_cranial in usable[1:]:
            if abs(other_lao - lao) > ANGLE_AGREEMENT_DEG or \
                    abs(other_cranial - cranial) > ANGLE_AGREEMENT_DEG:
                warn("primary_angle", f"angles from {name} ({angles.format_primary(lao)}, "
                     f"{angles.format_secondary(cranial)}) differ from {other} "
                     f"({angles.format_primary(other_lao)}, "
                     f"{angles.format_secondary(other_cranial)}); kept {name}")
                break
        return lao, cranial, name


def _csv_angle(text: str, *, primary: bool) -> float | None:
    """A CSV angle cell: a number in the CSV convention (RAO / cranial positive) or a label."""
    if not text:
        return None
    number = _number(text)
    if number is not None:
        return angles.lao_from_csv_primary(number) if primary else number
    return angles.parse_primary(text) if primary else angles.parse_secondary(text)


def _number(value) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _measurement(value, name: str, field_name: str, file: str) -> float | None:
    """One measurement as given (a JSON value or a CSV cell): None when absent (null or blank),
    else a positive finite number (% DS may be 0, not above 100) or the row is rejected."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    number = _number(value)
    if number is None or number < 0 or (number == 0 and name != "diameter_stenosis_pct"):
        raise _Rejected(field_name, f"{value!r} is not a positive finite number", file)
    if name == "diameter_stenosis_pct" and number > 100:
        raise _Rejected(field_name, f"{value!r} is outside 0..100 %", file)
    return number


def _redact(text: str, raw: dict) -> str:
    """``text`` with the row's raw patient ID (as typed, or with _ or - for spaces) removed."""
    patient = " ".join((raw.get("patient_id") or "").split())
    if len(patient) < 3:
        return text
    for variant in {patient, patient.replace(" ", "_"), patient.replace(" ", "-"),
                    patient.replace(" ", "")}:
        text = re.sub(re.escape(variant), "<patient>", text, flags=re.IGNORECASE)
    return text


def _number_or_nan(value) -> float:
    number = _number(value)
    return math.nan if number is None else number


def _integer(text: str | None, field_name: str) -> int:
    number = _number(text)
    if number is None or not number.is_integer() or number < 0:
        raise _Rejected(field_name, f"{text!r} is not a non-negative whole number")
    return int(number)


def _to_frame(records: list[dict], settings: IndexSettings) -> pd.DataFrame:
    frame = records_frame(records)
    return with_splits(frame, assign_splits(list(frame["patient_key"]), list(frame["vessel"]),
                                            settings.split_fractions, settings.split_seed))


def _write_parquet(index: pd.DataFrame, out: Path, manifest: Path, root: Path,
                   parser: _RowParser, settings: IndexSettings) -> None:
    write_index(index, out, {
        "taxonomy": parser.taxonomy.name, "angle_convention": ANGLE_CONVENTION,
        "data_root": str(root), "manifest": manifest.name,
        "salt_fingerprint": salt_fingerprint(parser.salt),
        "split_fractions": list(settings.split_fractions), "split_seed": settings.split_seed,
        "split_unit": "patient"})
