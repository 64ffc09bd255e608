"""What importing costs, and the private Ray API the search leans on.

Tune's trial actors and the CLI import the search modules; they must not load the training stack
(torch, transformers, peft) to validate a space or unpickle a trial. Each check runs in a fresh
interpreter, since this test session has imported everything already.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _printed_in_fresh_python(code: str) -> Any:
    """The Python literal that ``code`` prints last, run in a new interpreter."""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return ast.literal_eval(done.stdout.strip().splitlines()[-1])


def test_search_modules_import_without_the_training_stack():
    loaded = _printed_in_fresh_python(
        "import angiotune.search.space, angiotune.search.trial, angiotune.search.run, "
        "angiotune.search.distill; "
        "import sys; "
        "print(sorted(m for m in ('torch','transformers','peft') if m in sys.modules))")
    assert loaded == [], f"importing the search modules loaded {loaded}"


def test_names_import_only_the_standard_library():
    loaded = _printed_in_fresh_python(
        "import sys; before = set(sys.modules); import angiotune.names; "
        "print(sorted({m.split('.')[0] for m in set(sys.modules) - before} "
        "- set(sys.stdlib_module_names)))")
    assert loaded == ["angiotune"], f"angiotune.names imported {loaded}"


def _one_float(trial) -> None:
    trial.suggest_float("x", 0.0, 1.0)


@pytest.mark.slow
def test_ray_optuna_search_keeps_the_private_state_the_searcher_uses():
    """``PrunedAwareOptunaSearch`` (angiotune.search.run) reads Ray's ``OptunaSearch`` private
    state: Ray has no public hook to tell Optuna a trial was pruned. This fails, naming what is
    gone, on the first Ray (or Optuna) without it; pyproject.toml pins Ray to the tested minor."""
    import optuna
    import ray
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    searcher = OptunaSearch(space=_one_float, metric="dice", mode="max")  # in-memory study
    searcher.suggest("t")
    ot_trials = getattr(searcher, "_ot_trials", None)
    trial = ot_trials.get("t") if isinstance(ot_trials, dict) else None
    study = getattr(searcher, "_ot_study", None)
    storage = getattr(study, "_storage", None)
    present = {
        "OptunaSearch._metric (the metric's name)": getattr(searcher, "_metric", None) == "dice",
        "OptunaSearch._ot_trials (Tune trial id -> optuna.Trial)":
            isinstance(trial, optuna.Trial),
        "OptunaSearch._ot_study (an optuna.Study)": isinstance(study, optuna.Study),
        "OptunaSearch._ot_study._storage (with get_trial)":
            callable(getattr(storage, "get_trial", None)),
        "optuna.Trial._trial_id (an int)": isinstance(getattr(trial, "_trial_id", None), int),
    }
    missing = [name for name, ok in present.items() if not ok]
    assert not missing, (
        f"Ray {ray.__version__} / Optuna {optuna.__version__}: {missing} changed or went; "
        "angiotune.search.run.PrunedAwareOptunaSearch uses them. Rework it (through public "
        "hooks if Ray has them now) before widening the Ray pin in pyproject.toml")


def test_the_main_api_is_importable_from_the_package_with_docstrings():
    """search, best, evaluate, predict, index and phantoms from ``import angiotune``, each the
    function the CLI runs, each documented; the package itself stays light until one is used."""
    import inspect
    import subprocess
    import sys

    import angiotune
    from angiotune.data.ingest import build_index
    from angiotune.errors import AngiotuneError
    from angiotune.predict.pipeline import predict

    assert set(angiotune.__all__) == set(angiotune._API)
    for name in angiotune.__all__:
        assert inspect.getdoc(getattr(angiotune, name)), name
    assert angiotune.index is build_index and angiotune.predict.predict is predict
    # search and predict are subpackages too: callable, and still packages.
    import angiotune.search.space as space  # the import form a same-named function would break

    assert callable(angiotune.search) and angiotune.search.load_space is space.load_space
    with pytest.raises(AngiotuneError, match="no such file"):
        angiotune.predict("missing.dcm", "out")
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        _ = angiotune.nothing
    loaded = subprocess.run([sys.executable, "-c", "import angiotune, sys; print('torch' in "
                             "sys.modules)"], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "False"
