"""Faults a test injects into one trial of a real search: an out-of-memory error, a NaN loss,
or the trial's process killed once it holds a checkpoint to restart from.

They wrap the step and the backend from outside, so the training loop itself has no fault
branches. Never active unless the search was started with ``ANGIOTUNE_FAULT_DIR`` set.
"""

from __future__ import annotations

import math
import os
import signal
from collections.abc import Callable
from pathlib import Path

from angiotune.names import FAULT_DIR_ENV

FAULT_KINDS = ("oom", "nan", "kill")


def claim_injected_fault(fault_dir: str | None) -> str | None:
    """The fault for this trial to suffer, or None.

    Each trial's first worker takes (deletes) the first file in ``fault_dir``, in name order,
    whose name ends in ``oom``, ``nan`` or ``kill`` (``1-oom``, ``2-nan``, ``3-kill``): only
    one worker can delete a file, so the claim is atomic.
    """
    if not fault_dir:
        return None
    for path in sorted(Path(fault_dir).glob("*")):
        kind = path.name.rsplit("-", 1)[-1]
        if kind not in FAULT_KINDS:
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        return kind
    return None


def with_step_fault(step: Callable[..., dict], kind: str | None) -> Callable[..., dict]:
    """``step`` that raises an out-of-memory error as torch raises it (``oom``) or returns a
    NaN loss (``nan``); unchanged for any other kind."""
    if kind not in ("oom", "nan"):
        return step

    def faulty(*args, **kwargs) -> dict:
        if kind == "oom":
            import torch

            raise torch.OutOfMemoryError(f"injected through {FAULT_DIR_ENV}")
        return {**step(*args, **kwargs), "loss": math.nan}

    return faulty


class KilledAfterCheckpoint:
    """A backend whose process is SIGKILLed once its first checkpoint is safely held (a kill
    before that would restart the trial from nothing, not resume it)."""

    def __init__(self, backend) -> None:
        self._backend = backend

    def __getattr__(self, name: str):
        return getattr(self._backend, name)

    def report(self, metrics: dict, folder: Path | None = None) -> None:
        self._backend.report(metrics, folder)
        if folder is not None:
            self._backend.wait_for_checkpoints()
            # Windows has no SIGKILL; os.kill with SIGTERM there is TerminateProcess, as abrupt.
            os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))
