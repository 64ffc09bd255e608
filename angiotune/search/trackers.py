"""Experiment trackers: a space's ``callbacks`` section as Ray Tune logger callbacks.

::

    callbacks:
      mlflow: {tracking_uri: mlflow.db, experiment: lora_rank}  # settings optional
      wandb: {project: angiotune, mode: offline, entity: my-team}

Both work without a network or a server. MLflow: a path names an SQLite database (relative
paths under the search's folder, ``results/searches/<name>/``; default ``mlflow.db``), as MLflow
3.13+ refuses its old plain-folder store (``./mlruns``) unless ``MLFLOW_ALLOW_FILE_STORE=true``; a
URI with a scheme (``http://host:5000``, ``sqlite:///...``) is passed on as given. The
experiment defaults to the search's name. W&B defaults to ``mode: offline``: runs are written
under ``<search folder>/wandb`` and leave the machine only when someone runs ``wandb sync``;
the project defaults to ``angiotune``, the group is the search's name.

What they record, and why no patient's name or ID is in it: each trial is one run named after
the trial (``t-<id>``). Its parameters are Tune's trial config, which holds the searched and
fixed hyperparameters only (and the vessel, in stage 3): the index path, the model and every
other constant reach trials through ``tune.with_parameters``, outside the config. Its metrics
are the numbers a trial reports per epoch (Dice/IoU overall and per vessel, lesion counts,
training loss, timings), aggregates over the validation split; both callbacks drop strings (a
failure's reason, checkpoint paths). W&B also records the machine (host name, Ray's node IP,
system load, the trial's folder); MLflow no user name. A machine that must send nothing at
all also sets ``MLFLOW_DISABLE_TELEMETRY=true`` and ``WANDB_ERROR_REPORTING=false`` (the
libraries' own usage and error reports). TensorBoard files are written as before: Tune adds
its own loggers beside these.

On ``--resume``, Tune restores the callbacks the search started with (they are saved with it).
The packages are imported only here, when a search builds its callbacks: loading a space does
not import them (``tests/test_trackers.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from angiotune.errors import ConfigError

if TYPE_CHECKING:
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.air.integrations.wandb import WandbLoggerCallback
    from ray.tune import Callback

Announce = Callable[[str], None] | None

MLFLOW_DB = "mlflow.db"  # the default store, in the search's folder
WANDB_PROJECT = "angiotune"


def is_uri(text: str) -> bool:
    """Whether ``text`` has a scheme (``http://``, ``sqlite:///``); a Windows drive letter
    (``C:\\``) is a path."""
    return len(urlsplit(text).scheme) > 1


def mlflow_uri(text: str, run_dir: Path) -> str:
    """An MLflow tracking URI: a URI as given, a path as its SQLite database's URI."""
    if is_uri(text):
        return text
    return f"sqlite:///{(run_dir / text).resolve().as_posix()}"


def logger_callbacks(callbacks: dict[str, dict[str, str]], run_dir: Path, name: str,
                     announce: Announce = None) -> list[Callback]:
    """Ray Tune logger callbacks for a space's (validated) ``callbacks`` section of the search
    ``name`` in ``run_dir``; ``announce`` is told where each writes and how to look."""
    built: list[Callback] = []
    if "mlflow" in callbacks:
        built.append(_mlflow(callbacks["mlflow"], run_dir, name, announce))
    if "wandb" in callbacks:
        built.append(_wandb(callbacks["wandb"], run_dir, name, announce))
    return built


def _mlflow(settings: dict[str, str], run_dir: Path, name: str,
            announce: Announce) -> MLflowLoggerCallback:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    uri = mlflow_uri(settings.get("tracking_uri", MLFLOW_DB), run_dir)
    try:
        # Opens (or creates) the store now: a refused one fails here, not in Tune's loop. A
        # server is not contacted yet.
        MlflowClient(tracking_uri=uri)
    except MlflowException as error:
        raise ConfigError(f"callbacks.mlflow.tracking_uri: {uri}: {error.message}") from None
    experiment = settings.get("experiment", name)
    if announce:
        announce(f"MLflow: experiment {experiment!r} in {uri} (pip install mlflow; mlflow ui "
                 f"--backend-store-uri {uri})")
    return MLflowLoggerCallback(tracking_uri=uri, experiment_name=experiment,
                                tags={"search": name})


def _wandb(settings: dict[str, str], run_dir: Path, name: str,
           announce: Announce) -> WandbLoggerCallback:
    from ray.air.integrations.wandb import WandbLoggerCallback

    class WandbCallback(WandbLoggerCallback):
        """Ray 2.60's setup asks for an API key unless the WANDB_MODE variable says offline;
        the mode it hands to ``wandb.init`` should count too. Its setup does nothing else that
        a project and group given here leave to do."""

        def setup(self, *args, **kwargs) -> None:
            if self.kwargs.get("mode") != "offline":
                super().setup(*args, **kwargs)

    mode = settings.get("mode", "offline")
    project = settings.get("project", WANDB_PROJECT)
    # dir: wandb writes its folder there, not in each trial's working folder.
    callback = WandbCallback(project=project, group=name, mode=mode, dir=str(run_dir),
                             **({"entity": settings["entity"]} if "entity" in settings else {}))
    try:
        callback.setup()  # online: a missing login fails here, not in Tune's loop
    except ValueError as error:
        raise ConfigError(f"callbacks.wandb.mode: {mode}: {error} (or use mode: offline)"
                          ) from None
    if announce:
        folder = run_dir / "wandb"
        where = (f"offline in {folder} (look: wandb leet {folder}; upload: wandb sync "
                 f"{folder}/offline-run-*)" if mode == "offline" else "online")
        announce(f"W&B: project {project!r}, group {name!r}, {where}")
    return callback
