"""The command line as a user runs it: real subprocesses, files on disk, no tracebacks."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from angiotune.cli import main


def run(*args: str, env_home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "ANGIOTUNE_HOME": str(env_home)}
    env.pop("ANGIOTUNE_SALT", None)
    return subprocess.run([sys.executable, "-m", "angiotune.cli", *args], capture_output=True,
                          text=True, env=env, timeout=300)


@pytest.mark.slow  # three real CLI processes end to end, phantoms generated
def test_phantoms_then_index(tmp_path):
    data, index = tmp_path / "phantoms", tmp_path / "out" / "index.parquet"
    made = run("phantoms", str(data), "--lesions", "6", "--size", "192", "--frames", "3",
               "--shared-views", "0.5", env_home=tmp_path / "home")
    assert made.returncode == 0, made.stderr
    assert "not clinical data" in made.stdout
    indexed = run("index", str(data / "manifest.csv"), "--out", str(index),
                  env_home=tmp_path / "home")
    assert indexed.returncode == 0, indexed.stderr
    assert "indexed" in indexed.stdout and "quarantined" in indexed.stdout
    strict = run("index", str(data / "manifest.csv"), "--out", str(tmp_path / "s.parquet"),
                 "--strict", env_home=tmp_path / "home")
    # The phantom export carries a duplicated row, as real ones do: strict mode names it.
    assert strict.returncode == 2 and "Traceback" not in strict.stderr
    assert "manifest.csv" in strict.stderr and "duplicate of row" in strict.stderr
    frame = pd.read_parquet(index)
    assert len(frame) >= 6 and pq.read_table(index).num_rows == len(frame)
    # The salt file was created privately in ANGIOTUNE_HOME, not in the output tree.
    salt = tmp_path / "home" / "salt"
    assert salt.exists() and (salt.stat().st_mode & 0o077) == 0
    raw_ids = set(pd.read_csv(data / "manifest.csv")["patient_id"])
    for path in index.parent.rglob("*"):
        blob = path.read_bytes()
        for raw in raw_ids:
            assert raw.encode() not in blob, f"{raw} leaked into {path}"


@pytest.mark.slow
def test_user_errors_have_no_traceback(tmp_path):
    missing = run("index", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "i.parquet"),
                  env_home=tmp_path)
    assert missing.returncode == 2
    assert "nope.csv" in missing.stderr and "Traceback" not in missing.stderr
    bad = tmp_path / "bad.csv"
    bad.write_text("patient_id,phase\nX,PRE\n")
    wrong_columns = run("index", str(bad), "--out", str(tmp_path / "i.parquet"),
                        env_home=tmp_path)
    assert wrong_columns.returncode == 2
    assert "missing column" in wrong_columns.stderr and "Traceback" not in wrong_columns.stderr
    too_small = run("phantoms", str(tmp_path / "p"), "--size", "8", env_home=tmp_path)
    assert too_small.returncode == 2 and "size" in too_small.stderr
    odds = run("phantoms", str(tmp_path / "p"), "--shared-views", "2", env_home=tmp_path)
    assert odds.returncode == 2 and "shared_views" in odds.stderr
    assert "Traceback" not in odds.stderr


def test_an_unwritable_results_folder_is_refused_before_anything_starts(tmp_path, capsys):
    blocker = tmp_path / "results-is-a-file"
    blocker.write_text("")
    assert main(["search", "--space", "lora_rank.yaml", "--results", str(blocker / "r")]) == 2
    assert "cannot be written" in capsys.readouterr().err
    assert not (blocker.parent / "r").exists()
