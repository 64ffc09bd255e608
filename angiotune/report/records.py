"""What a finished search left on disk, read back for the report: its space, summary, every
trial's epoch history (Tune's ``result.json``) and its Optuna study."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from angiotune.errors import AngiotuneError


@dataclass
class SearchRecord:
    name: str
    run_dir: Path
    space: dict
    summary: dict
    history: pd.DataFrame  # one row per trial and epoch; config keys prefixed "config/"

    @property
    def objectives(self) -> list[str]:
        metric = self.space["metric"]
        return list(metric) if isinstance(metric, (list, tuple)) else [metric]

    @property
    def select(self) -> str:
        """The metric the registry keeps adapters by, per vessel (``dice`` -> ``dice/LAD``)."""
        return self.space.get("select", "dice")

    def studies(self) -> list:
        """The search's Optuna studies: one, or one per vessel in stage 3 (``NAME-LAD``)."""
        import optuna

        storage = f"sqlite:///{self.run_dir / 'optuna.db'}"
        names = sorted(s.study_name for s in optuna.get_all_study_summaries(storage))
        return [optuna.load_study(study_name=name, storage=storage) for name in names]


def read_search(results: Path, name: str) -> SearchRecord:
    """The record of search ``name`` under ``results``; a clear error when it is not there."""
    searches = Path(results) / "searches"
    run_dir = searches / name
    if not (run_dir / "summary.json").exists():
        known = sorted(p.name for p in searches.glob("*") if (p / "summary.json").exists())
        hint = f"finished searches there: {', '.join(known)}" if known else "none finished there"
        raise AngiotuneError(f"no finished search named {name!r} in {searches} ({hint})")
    if not (run_dir / "optuna.db").exists():
        raise AngiotuneError(f"{run_dir}: optuna.db is missing, so the study cannot be drawn")
    space = json.loads((run_dir / "space.json").read_text(encoding="utf-8"))
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    return SearchRecord(name, run_dir, space, summary, trial_history(run_dir / "tune"))


def trial_history(tune_dir: Path) -> pd.DataFrame:
    """Every reported epoch of every trial. A restarted trial reports some epochs twice; the
    last report of an epoch is the one that counts."""
    from angiotune.search.trial import with_checkpoint_paths

    trials = []
    for path in sorted(tune_dir.glob("*/result.json")):
        rows = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            result = json.loads(line)
            config = {f"config/{k}": v for k, v in (result.pop("config", None) or {}).items()}
            rows.append({**result, **config})
        if rows:
            trials.append(with_checkpoint_paths(pd.DataFrame(rows), path.parent))
    if not trials:
        return pd.DataFrame(columns=["trial_id", "epoch"])
    frame = pd.concat(trials, ignore_index=True)
    return (frame.drop_duplicates(["trial_id", "epoch"], keep="last")
            .sort_values(["trial_id", "epoch"]).reset_index(drop=True))
