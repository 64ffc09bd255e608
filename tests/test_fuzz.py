"""Fuzz corpus for the index: the phantom export damaged in many distinct ways.

Each kind damages one private copy of the export: one row's files or cells, or the whole CSV.
What must follow, for every kind:

- a damaged row is quarantined with a reason that names its CSV line, the field and the file,
  or, where the damage still leaves a readable lesion (a flipped pixel byte, a unicode path),
  indexed like any other row;
- a damaged CSV stops `angiotune index` with one line naming the file (and the row and field
  where there is one), exit status 2, no traceback;
- every row the damage did not touch is indexed as before: no good row is ever lost.

The figures in the README's reliability section come from this corpus (run it with ``-s``).
"""

from __future__ import annotations

import io
import json
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from ingest_helpers import (
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
from pydicom.filewriter import write_file_meta_info

from angiotune.cli import main
from angiotune.errors import DataError

QUARANTINE, KEPT, FILE_ERROR, ACCEPTED = "quarantine", "kept", "file error", "accepted"


@dataclass(frozen=True)
class Kind:
    name: str
    damage: Callable[[Path, int], None]  # (copy of the export, target CSV line)
    expect: str
    field: str | None = None  # the field a quarantine or error must name, when it is certain
    warns: bool = False  # kept rows: the repair must be written in the row's warnings


def _dicom(data: Path, line: int) -> Path:
    return data / row_at(data / "manifest.csv", line)["dicom_path"]


def _mask(data: Path, line: int) -> Path:
    return data / row_at(data / "manifest.csv", line)["medis_mask_path"]


def _contour(data: Path, line: int) -> Path:
    return data / row_at(data / "manifest.csv", line)["medis_contour_path"]


def _rewrite(path: Path, change: Callable[[bytearray], bytes | bytearray]) -> None:
    path.write_bytes(bytes(change(bytearray(path.read_bytes()))))


def _scramble_text(text: bytes) -> Callable[[bytearray], bytearray]:
    """Overwrite the bytes of a header value with other letters (the value's length, so the
    file's structure stays whole)."""
    def change(blob: bytearray) -> bytearray:
        start = bytes(blob).index(text)
        rng = random.Random(0)
        blob[start:start + len(text)] = bytes(rng.choice(b"QWXZJK") for _ in text)
        return blob
    return change


def _scramble(start: float, end: float, count: int) -> Callable[[bytearray], bytearray]:
    def change(blob: bytearray) -> bytearray:
        rng = random.Random(len(blob))
        low, high = int(len(blob) * start), int(len(blob) * end)
        for position in rng.sample(range(max(low, 132), high), count):
            blob[position] = rng.randrange(256)
        return blob
    return change


def _header_edit(**elements) -> Callable[[Path, int], None]:
    def damage(data: Path, line: int) -> None:
        path = _dicom(data, line)
        dataset = pydicom.dcmread(path)
        for keyword, value in elements.items():
            setattr(dataset, keyword, value)
        dataset.save_as(path, enforce_file_format=False)
    return damage


def _declare_syntax(uid: str) -> Callable[[Path, int], None]:
    """Rewrite only the file meta group, so the body stays encoded as it was: the file then
    claims a transfer syntax its bytes do not follow (pydicom itself refuses to write that)."""
    def damage(data: Path, line: int) -> None:
        path = _dicom(data, line)
        blob = path.read_bytes()
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        body = blob[132 + 12 + int(meta.FileMetaInformationGroupLength):]
        meta.TransferSyntaxUID = uid
        buffer = io.BytesIO()
        write_file_meta_info(pydicom.filebase.DicomFileLike(buffer), meta)
        path.write_bytes(blob[:132] + buffer.getvalue() + body)
    return damage


def _measurement(key: str, value) -> Callable[[Path, int], None]:
    def damage(data: Path, line: int) -> None:
        edit_contour(_contour(data, line), lambda c: c["measurements"].__setitem__(key, value))
    return damage


def _cells(**cells: str) -> Callable[[Path, int], None]:
    def damage(data: Path, line: int) -> None:
        edit_row(data / "manifest.csv", line, **cells)
    return damage


def _swap_mask(data: Path, line: int) -> None:
    _, rows = read_csv_rows(data / "manifest.csv")
    mine = rows[line - 2]["medis_mask_path"]
    other = next(r["medis_mask_path"] for r in rows if r["dicom_path"] != rows[line - 2]
                 ["dicom_path"] and r["medis_mask_path"] != mine)
    shutil.copyfile(data / other, data / mine)


def _move_dicom(name: str) -> Callable[[Path, int], None]:
    def damage(data: Path, line: int) -> None:
        source = _dicom(data, line)
        target = data / "dicom" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        source.rename(target)
        edit_row(data / "manifest.csv", line, dicom_path=str(target.relative_to(data)))
    return damage


def _duplicate_row(data: Path, line: int) -> None:
    fieldnames, rows = read_csv_rows(data / "manifest.csv")
    rows.insert(line - 1, dict(rows[line - 2]))  # the copy becomes line + 1
    write_csv_rows(data / "manifest.csv", fieldnames, rows)


def _edit_line(change: Callable[[str], str]) -> Callable[[Path, int], None]:
    def damage(data: Path, line: int) -> None:
        lines = (data / "manifest.csv").read_text(encoding="utf-8").splitlines()
        lines[line - 1] = change(lines[line - 1])
        (data / "manifest.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return damage


def _whole_csv(write: Callable[[Path, list[str], list[dict]], None]) -> Callable[[Path, int],
                                                                               None]:
    def damage(data: Path, line: int) -> None:
        fieldnames, rows = read_csv_rows(data / "manifest.csv")
        write(data / "manifest.csv", fieldnames, rows)
    return damage


def _drop_column(path: Path, fieldnames: list[str], rows: list[dict]) -> None:
    write_csv_rows(path, [f for f in fieldnames if f != "frame_index"],
                   [{k: v for k, v in r.items() if k != "frame_index"} for r in rows])


LONG_FOLDERS = "/".join(["d" * 200] * 5)  # 1000 characters of folders, each within the limit

KINDS = [
    # DICOM bytes
    Kind("DICOM header text scrambled", lambda d, n: _rewrite(_dicom(d, n), _scramble_text(
        pydicom.dcmread(_dicom(d, n), stop_before_pixels=True).InstitutionName.encode())),
         KEPT),  # a value nothing reads: still a valid lesion
    Kind("DICOM magic overwritten", lambda d, n: _rewrite(
        _dicom(d, n), lambda b: b[:128] + b"XXXX" + b[132:]), QUARANTINE, "dicom_path"),
    Kind("DICOM pixel bytes flipped", lambda d, n: _rewrite(_dicom(d, n), _scramble(
        0.5, 1.0, 64)), KEPT),  # raw pixels: nothing can tell a flipped byte
    Kind("DICOM truncated to half", lambda d, n: _rewrite(
        _dicom(d, n), lambda b: b[:len(b) // 2]), QUARANTINE, "PixelData"),
    Kind("DICOM truncated to 100 bytes", lambda d, n: _rewrite(_dicom(d, n), lambda b: b[:100]),
         QUARANTINE, "dicom_path"),
    Kind("DICOM file empty", lambda d, n: _dicom(d, n).write_bytes(b""), QUARANTINE,
         "dicom_path"),
    Kind("DICOM file missing", lambda d, n: _dicom(d, n).unlink(), QUARANTINE, "dicom_path"),
    Kind("DICOM is a PNG", lambda d, n: shutil.copyfile(_mask(d, n), _dicom(d, n)), QUARANTINE,
         "dicom_path"),
    Kind("wrong transfer syntax: JPEG declared, raw pixels",
         _declare_syntax(pydicom.uid.JPEGBaseline8Bit), QUARANTINE),
    Kind("wrong transfer syntax: big endian declared",
         _declare_syntax(pydicom.uid.ExplicitVRBigEndian), QUARANTINE),
    Kind("NumberOfFrames larger than the pixel data", _header_edit(NumberOfFrames=400),
         QUARANTINE, "PixelData"),
    Kind("Rows disagree with the pixel data", _header_edit(Rows=100), QUARANTINE),
    # masks
    Kind("mask swapped with another lesion's", _swap_mask, QUARANTINE),
    Kind("mask empty", lambda d, n: save_mask(_mask(d, n), np.zeros((256, 256), bool)), QUARANTINE),
    Kind("mask missing", lambda d, n: _mask(d, n).unlink(), QUARANTINE, "medis_mask_path"),
    Kind("mask truncated", lambda d, n: _rewrite(_mask(d, n), lambda b: b[:40]), QUARANTINE,
         "medis_mask_path"),
    Kind("mask of another shape", lambda d, n: save_mask(_mask(d, n), np.ones((37, 53), bool)),
         QUARANTINE),
    # contour JSON and measurements
    Kind("contour JSON truncated", lambda d, n: _rewrite(_contour(d, n), lambda b: b[:30]),
         QUARANTINE, "medis_contour_path"),
    Kind("contour JSON is a list", lambda d, n: _contour(d, n).write_text("[1, 2]"),
         QUARANTINE, "medis_contour_path"),
    Kind("MLD is NaN", _measurement("MLD_mm", float("nan")), QUARANTINE),
    Kind("MLD negative", _measurement("MLD_mm", -1.2), QUARANTINE),
    Kind("MLD as text", _measurement("MLD_mm", "one point two"), QUARANTINE),
    Kind("stenosis over 100 %", _measurement("diameter_stenosis_pct", 140.0), QUARANTINE),
    Kind("MLD larger than the reference", _measurement("MLD_mm", 9.0), QUARANTINE),
    Kind("calibration negative", lambda d, n: edit_contour(
        _contour(d, n), lambda c: c["calibration"].__setitem__("scale_factor", -2.0)), KEPT,
         warns=True),
    # CSV cells
    Kind("angle as text", _cells(primary_angle="left-ish"), KEPT, warns=True),
    Kind("angle of 720 degrees", _cells(primary_angle="720"), KEPT, warns=True),
    Kind("frame index out of range", _cells(frame_index="99"), QUARANTINE, "frame_index"),
    Kind("frame index as text", _cells(frame_index="two"), QUARANTINE, "frame_index"),
    Kind("frame index negative", _cells(frame_index="-1"), QUARANTINE, "frame_index"),
    Kind("segment outside the taxonomy", _cells(cass_segment="99"), QUARANTINE, "cass_segment"),
    Kind("segment as text", _cells(cass_segment="mid LAD"), QUARANTINE, "cass_segment"),
    Kind("patient ID empty", _cells(patient_id=""), QUARANTINE, "patient_id"),
    Kind("vessel text contradicts the segment", _cells(vessel_pattern="RCA prox"), QUARANTINE),
    # paths
    Kind("path escapes the data root", _cells(dicom_path="../../etc/passwd"), QUARANTINE,
         "dicom_path"),
    Kind("absolute path", _cells(dicom_path="/etc/hostname"), QUARANTINE, "dicom_path"),
    Kind("mask path escapes the data root", _cells(medis_mask_path="../x.png"), QUARANTINE,
         "medis_mask_path"),
    Kind("NUL byte in a path", _cells(dicom_path="dicom/a\x00b.dcm"), QUARANTINE, "dicom_path"),
    Kind("path longer than the system allows", _cells(dicom_path="d/" * 2100 + "x.dcm"),
         QUARANTINE, "dicom_path"),
    Kind("unicode path", _move_dicom("Ωμέγα é 中文/lésion.dcm"), KEPT),
    Kind("very long path", _move_dicom(f"{LONG_FOLDERS}/run.dcm"), KEPT),
    # rows
    Kind("duplicate row", _duplicate_row, QUARANTINE, "row"),
    Kind("row with extra cells", _edit_line(lambda text: text + ",extra,cells"), QUARANTINE,
         "row"),
    Kind("row with too few cells", _edit_line(lambda text: text.rsplit(",", 3)[0]), QUARANTINE),
    # whole CSV
    Kind("empty CSV", lambda d, n: (d / "manifest.csv").write_bytes(b""), FILE_ERROR),
    Kind("CSV with a header only", lambda d, n: (d / "manifest.csv").write_text(
        (d / "manifest.csv").read_text().splitlines()[0] + "\n"), FILE_ERROR),
    Kind("binary file as CSV", lambda d, n: (d / "manifest.csv").write_bytes(
        b"PK\x03\x04" + bytes(range(256))), FILE_ERROR),
    Kind("CSV without a required column", _whole_csv(_drop_column), FILE_ERROR, "frame_index"),
    Kind("CSV is a folder", lambda d, n: ((d / "manifest.csv").unlink(),
                                          (d / "manifest.csv").mkdir()), FILE_ERROR),
    Kind("CSV with ';' as delimiter", _whole_csv(
        lambda p, f, r: write_csv_rows(p, f, r, delimiter=";")), ACCEPTED),
    Kind("CSV in Windows-1252", _whole_csv(
        lambda p, f, r: write_csv_rows(p, f, r, encoding="cp1252")), ACCEPTED),
    Kind("CSV in UTF-16", _whole_csv(
        lambda p, f, r: write_csv_rows(p, f, r, encoding="utf-16")), ACCEPTED),
]


def _check(kind: Kind, data: Path, line: int, baseline, tmp_path: Path, capsys) -> str:
    """Index the damaged copy; returns the outcome, or raises AssertionError saying why not."""
    good = set(baseline.index["row"]) - {line}
    if kind.expect in (FILE_ERROR, ACCEPTED) and kind.name.startswith(("CSV", "empty",
                                                                    "binary")):
        capsys.readouterr()
        status = main(["index", str(data / "manifest.csv"), "--out", str(tmp_path / "i.parquet")])
        said = capsys.readouterr().err
        assert "Traceback" not in said, said
        if status == 2:
            assert kind.expect == FILE_ERROR, said
            assert "manifest.csv" in said.replace("\n", ""), said
            assert kind.field is None or kind.field in said, said
            return "refused with a message"
        assert status == 0 and kind.expect == ACCEPTED, (status, said)
        report = index(data, tmp_path / "again")
        assert set(report.index["row"]) >= good
        return "indexed every row"
    try:
        report = index(data, tmp_path)
    except DataError as error:  # a row-level fault must never stop the whole index
        raise AssertionError(f"the whole index stopped: {error}") from None
    if kind.name == "duplicate row":
        line, good = line + 1, good | {line}  # the copy is the one refused
        good = {r + 1 if r > line - 1 else r for r in good}
    lost = good - set(report.index["row"])
    assert not lost, f"good rows lost: {sorted(lost)}"
    mine = [p for p in report.quarantined if p.row == line]
    if not mine:
        assert kind.expect == KEPT, "damaged row indexed as if it were good"
        kept = report.index[report.index["row"] == line]
        assert len(kept) == 1
        assert not kind.warns or kept.iloc[0]["warnings"], "repaired without a warning"
        return "indexed (still a valid lesion)"
    assert kind.expect == QUARANTINE, f"quarantined: {mine}"
    problem = mine[0]
    assert problem.field and problem.file and problem.reason, problem
    assert kind.field is None or problem.field == kind.field, problem
    return "quarantined with file, row and field"


@pytest.mark.slow  # 52 damaged copies of the export, each indexed: several seconds
def test_fuzz_corpus(phantom_dir, phantom_index, manifest_rows, tmp_path, capsys):
    line = solo_line(manifest_rows, phantom_index,
                     lambda row, rec: rec["transfer_syntax"] == "Explicit VR Little Endian"
                     and rec["vessel"] == "LAD")
    outcomes: dict[str, str] = {}
    failures: dict[str, str] = {}
    for number, kind in enumerate(KINDS):
        work = tmp_path / f"kind{number}"
        data = corrupt_copy(phantom_dir, work)
        kind.damage(data, line)
        try:
            outcomes[kind.name] = _check(kind, data, line, phantom_index, work, capsys)
        except AssertionError as error:
            failures[kind.name] = str(error).splitlines()[0][:300]
        except Exception as error:  # noqa: BLE001 - a crash is what this corpus hunts
            failures[kind.name] = f"crashed: {type(error).__name__}: {error}"[:300]
        shutil.rmtree(work, ignore_errors=True)
    summary = {outcome: sum(1 for o in outcomes.values() if o == outcome)
               for outcome in sorted(set(outcomes.values()))}
    with capsys.disabled():
        print(f"\nfuzz corpus: {len(KINDS)} kinds; " + json.dumps(summary)
              + f"; failed {len(failures)}")
    assert not failures, "\n".join(f"{name}: {why}" for name, why in failures.items())
    assert len(KINDS) >= 30 and len({k.name for k in KINDS}) == len(KINDS)
