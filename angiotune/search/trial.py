"""One Tune trial: the training loop on the trial's Ray Data streams.

A trial of one worker runs the loop in its own process; a trial of several starts a Ray Train
worker group (DDP) and drives it. The datasets are built inside the trial, so none is pinned in
the Tune driver's object store for the whole search. A Train run's name comes from the trial id
(no timestamp), so a retried or restored trial resumes from its own last checkpoint.

Tune's trial actors import this module to unpickle ``run_trial``; importing it loads no torch,
transformers or peft (``tests/test_imports.py``). The functions that train import what they need
when they run: a trial loads the training stack to build its configuration and train.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pandas as pd

from angiotune.errors import ConfigError
from angiotune.search.space import SearchSpace


def trial_resources(space: SearchSpace) -> dict:
    """What Tune reserves for a trial: the worker itself when the trial trains in its own
    process, else a small share for the driver of a worker group that reserves its own."""
    if not space.trains_in_trial:
        return {"cpu": 0.25}
    gpus = space.gpus_per_worker
    return {"cpu": space.cpus_per_worker, **({"gpu": gpus} if gpus else {})}


def trial_cpus(space: SearchSpace) -> float:
    """The CPUs one trial holds: its own, plus its Train worker group's when it has one."""
    held = trial_resources(space)["cpu"]
    if not space.trains_in_trial:
        held += space.workers * space.cpus_per_worker
    return held


def concurrent_trials(space: SearchSpace, cluster_cpus: float) -> int:
    """How many trials may run at once: no more than the space asks for, and few enough to
    leave Ray Data a decoding task's CPUs. Trials that hold every CPU wait forever for their
    data, and Ray 2.60 does not say so."""
    from angiotune.data.stream import DATA_TASK_CPUS

    per_trial = trial_cpus(space)
    fit = int((cluster_cpus - DATA_TASK_CPUS) // per_trial)
    if fit < 1:
        raise ConfigError(f"a trial needs {per_trial:g} CPUs and its data tasks "
                          f"{DATA_TASK_CPUS:g} more, but the Ray cluster has {cluster_cpus:g}: "
                          "lower resources.cpus_per_worker or workers")
    return min(space.max_concurrent, fit)


def stream_plan(space: SearchSpace, cluster_cpus: float, at_once: int) -> dict:
    """How the trials' Ray Data streams decode, from the CPUs the trials leave: with two or
    more spare CPUs a decoding task gets a whole one and Ray Data keeps no per-operator reserve
    (which idled half the decoders, ``benchmarks/data_throughput.py``); with fewer, as on two
    cores where the step needs one, half a CPU per task and the reserve, which fed a search
    faster there (``benchmarks/README.md``)."""
    from angiotune.data.stream import DATA_TASK_CPUS

    spare = cluster_cpus - at_once * trial_cpus(space)
    if spare >= 2:
        return {"data_task_cpus": 1.0, "data_reserve": False}
    return {"data_task_cpus": DATA_TASK_CPUS, "data_reserve": True}


def with_checkpoint_paths(history: pd.DataFrame, trial_dir: Path) -> pd.DataFrame:
    """A trial's epoch history with ``checkpoint_path`` for every checkpointed epoch: Train
    runs report it, trials that train in their own process leave Tune's ``checkpoint_dir_name``
    inside their own trial folder."""
    history = history.copy()
    if "checkpoint_path" not in history:
        history["checkpoint_path"] = None
    if "checkpoint_dir_name" in history:
        in_trial = history["checkpoint_path"].isna() & history["checkpoint_dir_name"].notna()
        history.loc[in_trial, "checkpoint_path"] = [
            str(Path(trial_dir) / name) for name in history.loc[in_trial, "checkpoint_dir_name"]]
    return history


def run_trial(config: dict, constants: dict) -> None:
    from angiotune.data.stream import (
        DATA_TASK_CPUS,
        SampleSettings,
        TrialStream,
        lesion_dataset,
        load_rows,
    )
    from angiotune.train.config import TrialConfig

    settings = {**constants, **config}
    trial = TrialConfig.from_flat(settings)  # checked here, once, before any data is read
    # With the embedding cache the encoder must see pixels it has seen before: a bank of
    # augmented views per lesion (augment_views), or only the box prompt augmented.
    samples = SampleSettings(image_size=int(settings["image_size"]), seed=trial.run.seed,
                             context=trial.adapter.crop_context,
                             augment_pixels=(trial.run.embedding_cache is None
                                             or trial.run.augment_views > 0),
                             augment_views=trial.run.augment_views,
                             frame_cache=settings.get("frame_cache"))
    datasets = {}
    for split in ("train", "val"):
        rows, root = load_rows(settings["index"], split)
        if settings.get("vessel"):  # stage 3: this trial's vessel only
            rows = rows[rows["vessel"] == settings["vessel"]].reset_index(drop=True)
        make = partial(lesion_dataset, rows, split, settings=samples, data_root=root,
                       cpus_per_task=float(settings.get("data_task_cpus", DATA_TASK_CPUS)),
                       reserve_per_operator=bool(settings.get("data_reserve", True)))
        # Training in the trial's own process streams all its epochs at once; a Ray Train
        # worker group splits a fresh stream per epoch among its ranks.
        one_stream = (split == "train" and settings["in_trial"]
                      and settings.get("stream", "trial") == "trial")
        datasets[split] = TrialStream(make, trial.run.epochs) if one_stream else make()
    use_gpu = float(settings["gpus_per_worker"]) > 0
    if settings["in_trial"]:
        from angiotune.train.loop import TuneTrialBackend, run_training

        # A search started before its constants named the Tune folder has none: only the
        # injected kill fault needs it.
        tune_dir = settings.get("tune_dir")
        try:
            if isinstance(datasets["train"], TrialStream):
                datasets["train"].start(trial.run.batch_size)  # decodes while the model loads
            run_training(trial, TuneTrialBackend(datasets, use_gpu,
                                                 tune_dir and Path(tune_dir)))
        finally:  # also when Tune stops the trial (SystemExit in its report)
            if isinstance(datasets["train"], TrialStream):
                datasets["train"].close()
        return
    _fit_worker_group(settings, datasets, use_gpu)


def _fit_worker_group(settings: dict, datasets: dict, use_gpu: bool) -> None:
    from ray import tune
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    resources = {"CPU": float(settings["cpus_per_worker"])}
    if use_gpu:
        resources["GPU"] = float(settings["gpus_per_worker"])
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config=settings,
        scaling_config=ScalingConfig(num_workers=int(settings["workers"]), use_gpu=use_gpu,
                                     resources_per_worker=resources),
        torch_config=torch_config(use_gpu),
        datasets=datasets,
        # Every rank evaluates the whole validation split: a split one makes rank-0-only
        # evaluation hang at the next epoch (Ray 2.60).
        dataset_config=DataConfig(datasets_to_split=["train"]),
        run_config=RunConfig(
            name=f"trial-{tune.get_context().get_trial_id()}",
            storage_path=settings["storage"],
            callbacks=[TuneReportCallback()],
            # Keep the two best epochs by the search metric; the registry only takes
            # checkpoints that still exist.
            checkpoint_config=CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=settings["metric"],
                checkpoint_score_order=settings["mode"]),
            failure_config=FailureConfig(max_failures=int(settings["max_failures"]))),
    )
    result = trainer.fit()
    # A trial restored after its Train run had already finished reports nothing in fit(); Tune
    # then sees a final result without the metric and fails the search. Repeating the last
    # metrics is harmless otherwise (same epoch, same checkpoint).
    if result.metrics:
        final = dict(result.metrics)
        if result.checkpoint is not None:
            final["checkpoint_path"] = result.checkpoint.path
        tune.report(final)


def torch_config(use_gpu: bool):
    """gloo for GPU workers where torch has no NCCL (Windows); otherwise None, Ray's default:
    NCCL on GPUs, gloo on CPUs. Checked in the trial's own process: Ray runs on a single node
    on Windows, so the workers have the same torch build."""
    import torch.distributed as dist
    from ray.train.torch import TorchConfig

    return TorchConfig(backend="gloo") if use_gpu and not dist.is_nccl_available() else None


def _train_worker(config: dict) -> None:
    """What each Ray Train worker runs: the training loop, imported in the worker itself."""
    from angiotune.train.loop import train_loop_per_worker

    train_loop_per_worker(config)
