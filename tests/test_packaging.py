"""What a wheel carries: pyproject.toml lists packages and data by hand (search_spaces/ is
mapped into the package), so a new subpackage or data folder must be added there too. The wheel
itself is built, installed and run by .ci/wheel_smoke.sh."""

from fnmatch import fnmatch
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setuptools_config() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"][
        "setuptools"]


def _folder(package: str, config: dict) -> Path:
    return ROOT / config.get("package-dir", {}).get(package, package.replace(".", "/"))


def test_every_package_is_listed(setuptools_config):
    found = {".".join(p.parent.relative_to(ROOT).parts)
             for p in (ROOT / "angiotune").rglob("__init__.py")}
    assert set(setuptools_config["packages"]) == found | {"angiotune.search_spaces"}


def test_every_data_file_is_package_data(setuptools_config):
    patterns = [(_folder(package, setuptools_config), pattern)
                for package, globs in setuptools_config["package-data"].items()
                for pattern in globs]
    data = [p for folder in (ROOT / "angiotune", ROOT / "search_spaces")
            for p in folder.rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts]
    assert any(p.parent.name == "embedded_concept" for p in data)
    missing = [p.relative_to(ROOT).as_posix() for p in data
               if not any(p.is_relative_to(folder)
                          and fnmatch(p.relative_to(folder).as_posix(), pattern)
                          for folder, pattern in patterns)]
    assert missing == []
