"""``run_search``: Ray Tune with Optuna (TPE) and ASHA over the trials, then the registry.

A trial of one worker trains in its own process; a trial of several is a small driver that starts
a ``TorchTrainer`` (the Ray 2.60 pattern: a trainer cannot be handed to the Tuner directly), both
on the trial's Ray Data streams (``angiotune.search.trial``). The Optuna study lives
in an SQLite storage under the run's folder, so ``optuna-dashboard`` can open it, and a search
killed midway is resumed with ``resume=True``.
"""

from __future__ import annotations

import math
import os
import pickle
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from angiotune import jsonio
from angiotune.errors import AngiotuneError
from angiotune.names import FAULT_DIR_ENV
from angiotune.search.space import SearchSpace

RESULTS_DIR = Path("results")
TUNE_DIR = "tune"  # the Tune run inside a search's folder: a folder per trial, by name


@dataclass(frozen=True)
class SearchSettings:
    index: Path
    name: str
    results: Path = RESULTS_DIR
    model_path: Path | None = None
    address: str | None = None
    resume: bool = False
    announce: Callable[[str], None] | None = None  # where to say the dashboard's address
    # What every trial needs from the data and registry (head classes, init adapter folders).
    trial_constants: dict = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return (self.results / "searches" / self.name).resolve()


def startup_trials(samples: int) -> int:
    """Random trials before TPE models the results. Optuna's default, 10, leaves a search of 8
    trials entirely random; a third of the budget (3 to 10) lets TPE act on small searches."""
    return min(10, max(3, samples // 3))


def _optuna_search(space: SearchSpace, run_dir: Path, study_name: str | None = None,
                   seed_offset: int = 0):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    class PrunedAwareOptunaSearch(OptunaSearch):
        """Tells Optuna that trials ASHA stopped early were pruned, not complete: TPE would
        otherwise treat their early scores as final (seen on Ray 2.60).

        Ray has no public hook for this, so it uses OptunaSearch's private ``_ot_trials``,
        ``_ot_study`` (and its ``_storage``) and ``_metric``: pyproject.toml pins Ray to the
        tested minor version, and tests/test_imports.py fails, naming them, when they go."""

        def _already_told(self, trial_id) -> bool:
            """After a hard kill, Tune may rerun a trial whose end Optuna already stored:
            telling it again would fail the search, and it must not count twice."""
            ot_trial = self._ot_trials.get(trial_id)
            if ot_trial is None:
                return False
            stored = self._ot_study._storage.get_trial(ot_trial._trial_id)
            return stored.state.is_finished()

        def suggest(self, trial_id):
            """Reuse an Optuna trial that was asked for just before a hard kill but never ran
            (Tune's last saved state predates it), instead of leaving it RUNNING forever."""
            if trial_id not in self._ot_trials:
                mapped = {t._trial_id for t in self._ot_trials.values()}
                for stored in self._ot_study.get_trials(
                        deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
                    if stored._trial_id not in mapped:
                        self._ot_trials[trial_id] = optuna.Trial(self._ot_study,
                                                                 stored._trial_id)
                        break
            return super().suggest(trial_id)

        def on_trial_result(self, trial_id, result):
            if not self._already_told(trial_id) and not result.get("failed"):
                super().on_trial_result(trial_id, result)

        def on_trial_complete(self, trial_id, result=None, error=False):
            if self._already_told(trial_id):
                self._ot_trials.pop(trial_id, None)
                return
            if result and result.get("failed") and trial_id in self._ot_trials:
                # A trial that diverged or ran out of memory: FAIL, with the reason kept.
                ot_trial = self._ot_trials.pop(trial_id)
                ot_trial.set_user_attr("failure", str(result["failed"]))
                self._ot_study.tell(ot_trial, state=optuna.trial.TrialState.FAIL)
                return
            ot_trial = self._ot_trials.get(trial_id)
            epochs = (result or {}).get("epoch", space.epochs)
            if (ot_trial is None or error or result is None or epochs >= space.epochs
                    or space.multi_objective):
                return super().on_trial_complete(trial_id, result, error)
            value = result.get(self._metric)
            if value is not None:
                ot_trial.report(value, int(epochs))
            self._ot_study.tell(ot_trial, state=optuna.trial.TrialState.PRUNED)
            self._ot_trials.pop(trial_id)

    storage = study_storage(run_dir / "optuna.db")
    metric, mode = ((list(space.metric), list(space.mode)) if space.multi_objective
                    else (space.metric, space.mode))
    seed = space.seed + seed_offset
    sampler = (optuna.samplers.RandomSampler(seed=seed) if space.sampler == "random"
               else optuna.samplers.TPESampler(seed=seed,
                                               n_startup_trials=startup_trials(space.samples)))
    return PrunedAwareOptunaSearch(
        space=space.define_by_run, metric=metric, mode=mode, sampler=sampler, storage=storage,
        study_name=study_name or space.name)


def study_storage(path: Path, attempts: int = 5):
    """The run's Optuna storage (SQLite). Creating its tables races with anyone who opens the
    file meanwhile (optuna-dashboard, ``optuna.load_study``): SQLite then fails the creator
    with "table already exists" or a UNIQUE constraint, which would end the search at its
    start. The tables are whole once either side has made them, so open it again."""
    import time

    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    for attempt in range(1, attempts + 1):
        try:
            return optuna.storages.RDBStorage(f"sqlite:///{path}")
        except SQLAlchemyError:
            if attempt == attempts:
                raise
            time.sleep(0.2 * attempt)


def _per_vessel_search(space: SearchSpace, run_dir: Path):
    """Stage 3: one Optuna study per vessel (``<name>-<VESSEL>``), multiplexed into one Tune
    run so that every vessel's trials share the cluster."""
    from ray.tune.search import Searcher

    class PerVesselSearch(Searcher):
        def __init__(self) -> None:
            super().__init__(metric=space.metric, mode=space.mode)
            # Own seeds, so that the vessels' first trials are not all the same point.
            self.studies = {vessel: _optuna_search(space, run_dir, f"{space.name}-{vessel}", i)
                            for i, vessel in enumerate(space.vessels)}
            self.vessel_of: dict[str, str] = {}

        def set_search_properties(self, metric, mode, config, **spec) -> bool:
            return True  # each study has its own

        def suggest(self, trial_id):
            vessel = self.vessel_of.get(trial_id)
            if vessel is None:
                started = {v: sum(1 for t in self.vessel_of.values() if t == v)
                           for v in space.vessels}
                vessel = min(space.vessels, key=lambda v: started[v])
                if started[vessel] >= space.samples:
                    return Searcher.FINISHED
                self.vessel_of[trial_id] = vessel
            config = self.studies[vessel].suggest(trial_id)
            return None if config is None else {**config, "vessel": vessel}

        def on_trial_result(self, trial_id, result):
            self.studies[self.vessel_of[trial_id]].on_trial_result(trial_id, result)

        def on_trial_complete(self, trial_id, result=None, error=False):
            self.studies[self.vessel_of[trial_id]].on_trial_complete(trial_id, result, error)

        def save(self, checkpoint_path: str) -> None:
            state = {"vessel_of": self.vessel_of,
                     "studies": {v: s.__dict__.copy() for v, s in self.studies.items()}}
            with open(checkpoint_path, "wb") as handle:
                pickle.dump(state, handle)

        def restore(self, checkpoint_path: str) -> None:
            with open(checkpoint_path, "rb") as handle:
                state = pickle.load(handle)  # noqa: S301 - Tune's own checkpoint of this run
            self.vessel_of = state["vessel_of"]
            for vessel, values in state["studies"].items():
                self.studies[vessel].__dict__.update(values)

    return PerVesselSearch()


def run_search(space: SearchSpace, settings: SearchSettings):
    """Run (or resume) a search; returns the Tune ResultGrid."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from angiotune.search.trackers import logger_callbacks
    from angiotune.search.trial import (
        concurrent_trials,
        run_trial,
        stream_plan,
        trial_resources,
    )

    run_dir = settings.run_dir
    check_writable(run_dir)
    ensure_ray(settings)
    cluster_cpus = ray.cluster_resources().get("CPU", 0.0)
    at_once = concurrent_trials(space, cluster_cpus)
    constants = {"epochs": space.epochs, "index": str(Path(settings.index).resolve()),
                 "model_path": str(settings.model_path) if settings.model_path else None,
                 "image_size": space.image_size, "batch_size": space.batch_size,
                 "workers": space.workers, "in_trial": space.trains_in_trial,
                 "cpus_per_worker": space.cpus_per_worker,
                 "gpus_per_worker": space.gpus_per_worker, "seed": space.seed,
                 "max_failures": space.retries,
                 "storage": str(run_dir / "train"), "tune_dir": str(run_dir / TUNE_DIR),
                 "metric": _first(space.metric),
                 "metrics": list(space.metric) if space.multi_objective else [space.metric],
                 "fault_dir": os.environ.get(FAULT_DIR_ENV),
                 "mode": _first(space.mode), "objective": space.objective,
                 "validate_at": space.validation_epochs(),
                 "stream": space.stream,
                 **stream_plan(space, cluster_cpus, at_once), **settings.trial_constants}
    (run_dir / "space.json").write_text(jsonio.dumps(asdict(space), indent=1))
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, constants=constants),
        trial_resources(space))
    tuner_path = run_dir / TUNE_DIR
    # Built on resume too, to check the store and say where to look; Tune restores its own.
    trackers = logger_callbacks(space.callbacks, run_dir, settings.name, settings.announce)
    if settings.resume:
        if not tune.Tuner.can_restore(str(tuner_path)):
            raise AngiotuneError(f"nothing to resume at {tuner_path}: no search named "
                                 f"{settings.name!r} was started there")
        tuner = tune.Tuner.restore(str(tuner_path), trainable=trainable,
                                   resume_unfinished=True, resume_errored=False)
    else:
        if tuner_path.exists():
            raise AngiotuneError(f"a search named {settings.name!r} already exists in "
                                 f"{run_dir}; use --resume to continue it or another --name")
        scheduler = ASHAScheduler(time_attr="epoch", max_t=space.epochs,
                                  grace_period=space.grace_period,
                                  reduction_factor=space.reduction_factor,
                                  stop_last_trials=False) if space.asha else None
        searcher = (_per_vessel_search(space, run_dir) if space.stage == 3
                    else _optuna_search(space, run_dir))
        if at_once < space.max_concurrent and settings.announce:
            settings.announce(f"{at_once} trial(s) at a time, not {space.max_concurrent}: that "
                              "leaves Ray Data CPUs to decode samples with")
        single = not space.multi_objective
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                        metric=space.metric if single else None,
                                        mode=space.mode if single else None,
                                        num_samples=space.samples * max(len(space.vessels), 1),
                                        max_concurrent_trials=at_once,
                                        # A trial that trains in its own process then starts
                                        # in a process that has the training stack imported.
                                        reuse_actors=space.trains_in_trial,
                                        trial_name_creator=short_trial_name,
                                        trial_dirname_creator=short_trial_name),
            run_config=tune.RunConfig(name=TUNE_DIR, storage_path=str(run_dir),
                                      # MLflow, W&B; Tune adds TensorBoard, CSV and JSON.
                                      callbacks=trackers,
                                      failure_config=tune.FailureConfig(
                                          max_failures=space.retries),
                                      # Trials that train in their own process: keep each
                                      # one's two best epochs, as Train does for its runs.
                                      checkpoint_config=tune.CheckpointConfig(
                                          num_to_keep=2,
                                          checkpoint_score_attribute=_first(space.metric),
                                          checkpoint_score_order=_first(space.mode)),
                                      verbose=1))
    return tuner.fit()


def short_trial_name(trial) -> str:
    """``t-<trial id>`` for a trial's name and folder. Tune's default folder name (trainable,
    every parameter, a date) is about 170 characters: with a checkpoint under it and a user's
    folder in front it passes Windows' 260-character path limit. Trial ids are unique within
    a search, and a restored search keeps its trials' folders."""
    return f"t-{trial.trial_id}"


def ensure_ray(settings: SearchSettings) -> dict:
    """Ray started (or joined) once per search; returns the cluster's resources."""
    import ray

    if not ray.is_initialized():
        context = start_ray(settings.address)
        if settings.announce and context.dashboard_url:
            settings.announce(f"Ray dashboard: http://{context.dashboard_url} (over SSH: "
                              "ssh -L 8265:127.0.0.1:8265 HOST, then open it locally)")
    return ray.cluster_resources()


def _first(value):
    """The metric (or mode) checkpoints are ranked by: the first of a multi-objective list."""
    return value[0] if isinstance(value, tuple) else value


def start_ray(address: str | None = None, **local_options):
    """Join a cluster, or start a local Ray whose dashboard is on and bound to 127.0.0.1
    (``local_options`` go to ``ray.init`` for a local start, e.g. ``num_cpus``).

    The dashboard must stay on: when ASHA stops a trial, Ray frees that trial's worker group
    through the dashboard's State API, and without it the next trial waits forever (Ray 2.60).
    """
    import ray

    if address:
        if "RAY_AUTH_MODE" not in os.environ and _auth_token_available():
            # A cluster started by `ray start` asks for its token (on by default in Ray 2.60);
            # a client in token mode also joins a cluster that has authentication off.
            os.environ["RAY_AUTH_MODE"] = "token"
        return ray.init(address=address, log_to_driver=False)
    # Read by the raylet a local start launches (ignored when ray.init joins a running cluster
    # through RAY_ADDRESS or `ray start`, where _system_config would be refused).
    os.environ.setdefault("RAY_num_workers_soft_limit", str(idle_workers_kept(
        local_options.get("num_cpus") or _available_cpus())))
    return ray.init(dashboard_host="127.0.0.1", include_dashboard=True, log_to_driver=False,
                    **local_options)


def _available_cpus() -> float:
    """The CPUs Ray itself counts here (container quotas included)."""
    from ray._private.utils import get_num_cpus

    return get_num_cpus()


def idle_workers_kept(cpus: float) -> int:
    """How many idle worker processes a local Ray keeps. Ray's default is one per CPU and it
    ends the rest a second after they go idle, but a search runs its trials' processes and up
    to ``cpus / DATA_TASK_CPUS`` decoding tasks at once: every trial's stream then waited 1-6 s
    for new decoding processes to start and import their libraries (``benchmarks/README.md``).
    Kept, an idle one costs its memory (about 0.1-0.5 GB) and nothing else."""
    from angiotune.data.stream import DATA_TASK_CPUS

    return math.ceil(cpus / DATA_TASK_CPUS + cpus)


def _auth_token_available() -> bool:
    token_file = os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token"
    return bool(os.environ.get("RAY_AUTH_TOKEN")) or Path(token_file).is_file()


def check_writable(folder: Path) -> None:
    """Refuse a results folder that cannot be created, written or has no room, before any
    work starts: a search that runs for days must not fail at its first checkpoint."""
    probe = folder / ".write-probe"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"0" * 1024)
        probe.unlink()
    except OSError as error:
        raise AngiotuneError(f"results folder {folder} cannot be written ({error.strerror}); "
                             "free space or choose another --results") from None
    if shutil.disk_usage(folder).free < 200 * 2**20:  # os.statvfs does not exist on Windows
        raise AngiotuneError(f"results folder {folder} has under 200 MB free")
