"""Shared fixtures: one small phantom export per session and its Parquet index.

The phantom set is generated once (a few seconds) and treated as read-only; a test that needs to
damage it copies it first (see ``corrupt_copy`` in ``ingest_helpers.py``).
"""

from __future__ import annotations

import csv
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# Keep the user's home untouched: the pseudonym salt file (written when no salt is given) and any
# other per-user state go to a throwaway folder. Set before angiotune is imported anywhere.
os.environ.setdefault("ANGIOTUNE_HOME", tempfile.mkdtemp(prefix="angiotune-test-home-"))

from angiotune.data.ingest import IndexSettings, IndexSummary, build_index  # noqa: E402
from angiotune.data.phantoms import PhantomSettings, PhantomSummary, generate_phantoms  # noqa: E402

TEST_SALT = "test-salt"
PHANTOM_SETTINGS = PhantomSettings(lesions=16, size=256, frames=4, seed=3)


@pytest.fixture(scope="session")
def phantom_summary(tmp_path_factory: pytest.TempPathFactory) -> PhantomSummary:
    """The generation summary of the session's phantom export."""
    return generate_phantoms(tmp_path_factory.mktemp("phantoms"), PHANTOM_SETTINGS)


@pytest.fixture(scope="session")
def phantom_dir(phantom_summary: PhantomSummary) -> Path:
    """Folder of the session's phantom export (DICOM and NPY runs, masks, contours, 2 CSVs)."""
    return phantom_summary.out


@pytest.fixture(scope="session")
def index_settings() -> IndexSettings:
    return IndexSettings(salt=TEST_SALT)


@pytest.fixture(scope="session")
def phantom_index(phantom_dir: Path, index_settings: IndexSettings,
                  tmp_path_factory: pytest.TempPathFactory) -> IndexSummary:
    """Index of the DICOM layout (``manifest.csv``)."""
    out = tmp_path_factory.mktemp("index") / "lesions.parquet"
    return build_index(phantom_dir / "manifest.csv", out, index_settings)


@pytest.fixture(scope="session")
def phantom_index_npy(phantom_dir: Path, index_settings: IndexSettings,
                      tmp_path_factory: pytest.TempPathFactory) -> IndexSummary:
    """Index of the NPY layout (``manifest_npy.csv``) of the same export."""
    out = tmp_path_factory.mktemp("index_npy") / "lesions.parquet"
    return build_index(phantom_dir / "manifest_npy.csv", out, index_settings)


@pytest.fixture(scope="session")
def manifest_rows(phantom_dir: Path) -> list[dict[str, str]]:
    """The DICOM-layout CSV rows as written; row i is CSV line i + 2 (the header is line 1)."""
    with open(phantom_dir / "manifest.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="session")
def patient_identities(phantom_dir: Path, manifest_rows: list[dict[str, str]]) -> set[str]:
    """Every identifying string the phantom export holds: IDs, names and their parts, birth
    dates, the institution. None of them may appear in anything angiotune writes."""
    import pydicom

    raw = {row["patient_id"] for row in manifest_rows}
    for row in manifest_rows:
        ds = pydicom.dcmread(phantom_dir / row["dicom_path"], stop_before_pixels=True)
        raw |= {str(ds.PatientID), str(ds.PatientName), *str(ds.PatientName).split("^"),
                str(ds.PatientBirthDate), str(ds.get("InstitutionName", ""))}
    return {secret for secret in raw if secret}


@pytest.fixture(scope="session")
def phi_scan(patient_identities: set[str]) -> Callable[[list[Path]], list[Path]]:
    """Scan every file under the given folders for the phantoms' patient identities; returns
    the files scanned (a caller asserts the scan saw what it meant to), fails on a leak.

    In text, any identity as a whole word; in binary files (pictures, weights, Parquet pages)
    only those long enough not to turn up by chance in compressed bytes (a 3-letter given name
    does, about once per few megabytes)."""
    words = [re.compile(rf"\b{re.escape(s)}\b") for s in patient_identities]
    long_ones = [s.encode() for s in patient_identities if len(s) >= 6]

    def scan(roots: list[Path]) -> list[Path]:
        files = [p for root in roots for p in Path(root).rglob("*")
                 if p.is_file() and not p.is_symlink()]
        for path in files:
            try:
                blob = path.read_bytes()
            except OSError:  # a Ray temp file removed while scanning
                continue
            try:
                text = blob.decode("utf-8")
            except UnicodeDecodeError:
                leaked = [s for s in long_ones if s in blob]
            else:
                leaked = [w.pattern for w in words if w.search(text)]
            assert not leaked, f"{path} holds {leaked}"
        return files

    return scan


# --- Ray -------------------------------------------------------------------------------------
# Tests that use Ray are marked ``@pytest.mark.ray``, and ``slow`` too: the fast tier
# (-m "not slow") never starts Ray. None of the data tests above needs it.


@dataclass(frozen=True)
class LocalRay:
    """The session's local Ray, as ``local_ray`` started it."""

    temp_dir: Path  # where it writes its logs (the PHI scans read them)
    dashboard: str  # the dashboard's address, as start_ray gave it


@pytest.fixture(scope="session")
def local_ray() -> Iterator[LocalRay]:
    """One real local Ray for the whole session (start-up costs seconds; tests share it),
    started the way ``angiotune search`` starts one.

    Four logical CPUs on the two cores, as the Ray 2.60 notes advise: fractional data tasks
    and whole-CPU workers then fit side by side without the tests depending on core count.
    """
    import ray

    from angiotune.search.run import start_ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must be short
    context = start_ray(num_cpus=4, _temp_dir=temp_dir)  # as `angiotune search` starts it
    yield LocalRay(Path(temp_dir), context.dashboard_url)
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_cluster(local_ray: LocalRay):
    """The ``ray`` module, connected to the session's local Ray."""
    import ray

    return ray


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The fast tier (-m "not slow") never starts Ray: a test that asks for the session's Ray
    is marked ``ray`` and ``slow`` even where its file forgot to say so."""
    for item in items:
        if {"ray_cluster", "local_ray"} & set(getattr(item, "fixturenames", ())):
            for name in ("ray", "slow"):
                if item.get_closest_marker(name) is None:
                    item.add_marker(getattr(pytest.mark, name))
