"""Shared fixtures: one small phantom export per session and its Parquet index.

The phantom set is generated once (a few seconds) and treated as read-only; a test that needs to
damage it copies it first (see ``corrupt_copy`` in ``test_ingest.py``).
"""

from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path

import pytest

# Keep the user's home untouched: the pseudonym salt file (written when no salt is given) and any
# other per-user state go to a throwaway folder. Set before angiotune is imported anywhere.
os.environ.setdefault("ANGIOTUNE_HOME", tempfile.mkdtemp(prefix="angiotune-test-home-"))

from angiotune.data.ingest import IndexReport, IndexSettings, build_index  # noqa: E402
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
                  tmp_path_factory: pytest.TempPathFactory) -> IndexReport:
    """Index of the DICOM layout (``manifest.csv``)."""
    out = tmp_path_factory.mktemp("index") / "lesions.parquet"
    return build_index(phantom_dir / "manifest.csv", out, index_settings)


@pytest.fixture(scope="session")
def phantom_index_npy(phantom_dir: Path, index_settings: IndexSettings,
                      tmp_path_factory: pytest.TempPathFactory) -> IndexReport:
    """Index of the NPY layout (``manifest_npy.csv``) of the same export."""
    out = tmp_path_factory.mktemp("index_npy") / "lesions.parquet"
    return build_index(phantom_dir / "manifest_npy.csv", out, index_settings)


@pytest.fixture(scope="session")
def manifest_rows(phantom_dir: Path) -> list[dict[str, str]]:
    """The DICOM-layout CSV rows as written; row i is CSV line i + 2 (the header is line 1)."""
    with open(phantom_dir / "manifest.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


# --- Ray -----------------------------------------------------------------------------------
# The session-scoped local Ray fixture (tests marked ``@pytest.mark.ray``) goes here; none of the
# data tests above needs Ray, so they never start it.


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


RAY_TEMP_DIRS: list[str] = []  # where the session's Ray writes its logs, for the PHI scan
RAY_DASHBOARD: list[str] = []  # the session's dashboard address, as start_ray gave it


@pytest.fixture(scope="session")
def ray_cluster():
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
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    RAY_TEMP_DIRS.append(temp_dir)
    context = start_ray(num_cpus=4, _temp_dir=temp_dir)  # as `angiotune search` starts it
    RAY_DASHBOARD.append(context.dashboard_url)
    yield ray
    ray.shutdown()
