"""Sizes a space leaves to ``auto``, filled in from the model and the cluster.

One space file serves the embedded tiny model on two CPU cores and the full SAM 3 on GPUs: what
it searches is the experiment, how big each trial is belongs to the model and the machine.

- image size: the model's own (its RoPE tables are built for that grid; no other size runs);
- GPUs per worker: one when the cluster has GPUs, else none;
- trials at once: one per GPU (each trial's workers), or ``CPU_TRIALS`` without GPUs, fewer
  where the CPUs would leave Ray Data nothing to decode with (``search.trial``);
- batch size: 8 for small inputs (up to ``SMALL_INPUT`` px), else 2 on a GPU (where bf16 and
  gradient checkpointing are on by default: the size a 24 GB RTX 3090 is meant to hold at
  1008 px) and 1 on CPU (batch 2 of a 1008 px model took over 18 GB of memory).

A space or ``--set`` that names a size wins; an image size other than the model's is refused
before Ray starts.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from angiotune.errors import ConfigError
from angiotune.search.space import SearchSpace

CPU_TRIALS = 2
SMALL_INPUT = 256
SMALL_BATCH, GPU_BATCH, CPU_BATCH = 8, 2, 1


def check_image_size(space: SearchSpace, model_size: int, model: Path | None) -> None:
    """Refuse a space that fixes an image size the model cannot take."""
    if space.image_size is not None and space.image_size != model_size:
        what = "the embedded model" if model is None else f"the model in {model}"
        raise ConfigError(f"data.image_size {space.image_size} does not match {what}, which "
                          f"takes {model_size} px only (its position tables are built for that "
                          "grid); remove data.image_size or set it to auto")


def auto_batch_size(image_size: int, on_gpu: bool) -> int:
    if image_size <= SMALL_INPUT:
        return SMALL_BATCH
    return GPU_BATCH if on_gpu else CPU_BATCH


def fit_space(space: SearchSpace, model_size: int, cluster_gpus: float) -> SearchSpace:
    """The space with every ``auto`` size decided for this model and cluster."""
    gpus = space.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if cluster_gpus >= 1 else 0.0
    per_trial = gpus * space.workers
    if per_trial > cluster_gpus:
        raise ConfigError(f"resources: a trial needs {per_trial:g} GPU(s) "
                          f"({space.workers} worker(s) x {gpus:g}) but the Ray cluster has "
                          f"{cluster_gpus:g}; lower resources.gpus_per_worker or workers")
    at_once = space.max_concurrent
    if at_once is None:
        at_once = max(1, int(cluster_gpus // per_trial)) if per_trial else CPU_TRIALS
    batch = space.batch_size or auto_batch_size(model_size, gpus > 0)
    return replace(space, image_size=model_size, gpus_per_worker=gpus, max_concurrent=at_once,
                   batch_size=batch)


def describe(space: SearchSpace) -> str:
    """One line on the sizes a search runs with, for the user to see what ``auto`` chose."""
    where = (f"{space.gpus_per_worker:g} GPU(s) per worker" if space.gpus_per_worker
             else "CPU only")
    return (f"Sizes: {space.image_size} px, batch {space.batch_size}, {where}, up to "
            f"{space.max_concurrent} trial(s) at once")
