"""Helpers shared by the index tests (``test_ingest.py``) and the fuzz corpus
(``test_fuzz.py``): private damaged copies of the phantom export, CSV edits, and indexing a
copy the way the session's fixtures index the original."""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from angiotune.data.ingest import IndexSettings, IndexSummary, build_index

TEST_SALT = "test-salt"  # the salt conftest builds the session indexes with


def corrupt_copy(phantom_dir: Path, tmp_path: Path, layout: str = "dicom") -> Path:
    """A private copy of the phantom export to damage, with the runs of one ``layout`` only
    (``"dicom"`` for manifest.csv, ``"npy"`` for manifest_npy.csv) to keep the copy small."""
    skip = {"dicom": "cines", "npy": "dicom"}[layout]
    return Path(shutil.copytree(phantom_dir, tmp_path / "data",
                                ignore=lambda folder, names: [skip] if skip in names else []))


def read_csv_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def write_csv_rows(path: Path, fieldnames: list[str], rows: list[dict[str, str]], *,
                   delimiter: str = ",", encoding: str = "utf-8") -> None:
    with open(path, "w", newline="", encoding=encoding) as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames, delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)


def edit_row(manifest: Path, line: int, **cells: str) -> dict[str, str]:
    """Change cells of the row on CSV line ``line`` (the header is line 1); returns the row."""
    fieldnames, rows = read_csv_rows(manifest)
    rows[line - 2].update(cells)
    write_csv_rows(manifest, fieldnames, rows)
    return rows[line - 2]


def row_at(manifest: Path, line: int) -> dict[str, str]:
    return read_csv_rows(manifest)[1][line - 2]


def edit_contour(path: Path, change: Callable[[dict], None]) -> None:
    contour = json.loads(path.read_text(encoding="utf-8"))
    change(contour)
    path.write_text(json.dumps(contour), encoding="utf-8")


def save_mask(path: Path, mask: np.ndarray) -> None:
    if path.suffix == ".npy":
        np.save(path, mask.astype(np.uint8))
    else:
        Image.fromarray(mask.astype(np.uint8) * 255).save(path)


def index(data: Path, tmp_path: Path, manifest: str = "manifest.csv", **settings) -> IndexSummary:
    """These tests check validation and quarantine: the vessel-tree trace (tested with the
    session's index and in test_segment_read) is left off unless asked for, to keep them fast."""
    settings = {"vessel_tree": False, **settings}
    return build_index(data / manifest, tmp_path / "out" / "index.parquet",
                       IndexSettings(salt=TEST_SALT, **settings))


def solo_line(manifest_rows: list[dict], baseline: IndexSummary,
              want: Callable[[dict, pd.Series], bool] = lambda row, record: True) -> int:
    """A CSV line whose run, mask and contour no other row uses (so damage hits it alone)."""
    runs = Counter(row["dicom_path"] for row in manifest_rows)
    by_line = baseline.index.set_index("row")
    for position, row in enumerate(manifest_rows):
        line = position + 2
        if runs[row["dicom_path"]] == 1 and line in by_line.index and want(row, by_line.loc[line]):
            return line
    raise AssertionError("the phantom set has no row of the kind this test needs")
