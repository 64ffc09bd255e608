"""The search API: ``search()`` runs a space end to end; ``load_space`` validates a YAML file."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from angiotune.errors import AngiotuneError
from angiotune.search.space import SearchSpace, load_space

__all__ = ["SearchOutcome", "embedded_index", "load_space", "search", "zero_shot"]

EMBEDDED_PHANTOMS = dict(lesions=60, size=512, frames=6, seed=0)
EMBEDDED_SALT = "angiotune-embedded-phantoms"  # synthetic patients: nothing to protect
DATA_NOTE_PHANTOMS = ("angiotune's embedded synthetic phantoms (not clinical data) and the "
                      "embedded tiny SAM 3 model")


@dataclass
class SearchOutcome:
    name: str
    run_dir: Path
    trials: int
    errors: int
    zero_shot: dict[str, float]
    best: dict[str, dict] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)
    epochs_run: dict[str, int] = field(default_factory=dict)  # trial id -> last epoch


def embedded_index(results: Path) -> Path:
    """The embedded default data: phantoms generated once under results/, and their index."""
    from angiotune.data.ingest import IndexSettings, build_index
    from angiotune.data.phantoms import PhantomSettings, generate_phantoms

    folder = Path(results) / "embedded"
    index = folder / "index.parquet"
    if not index.exists():
        generate_phantoms(folder / "phantoms", PhantomSettings(**EMBEDDED_PHANTOMS))
        build_index(folder / "phantoms" / "manifest.csv", index,
                    IndexSettings(salt=EMBEDDED_SALT))
    return index


def zero_shot(index: Path, model_path: Path | None, image_size: int, prompt_mode: str = "box",
              batch_size: int = 16) -> dict[str, float]:
    """The base model's validation metrics before any adaptation (plain PyTorch, no Ray)."""
    from angiotune.data.stream import SampleSettings, load_rows, prepare_sample
    from angiotune.model.sam3 import load_base_model, load_prompt_tokenizer
    from angiotune.train.step import evaluate

    rows, root = load_rows(index, "val")
    settings = SampleSettings(image_size=image_size, augment=False)
    samples = [prepare_sample(row, root, settings) for row in rows.to_dict("records")]
    batches = [{name: np.stack([s[name] for s in samples[i:i + batch_size]]) for name in
                samples[0]} for i in range(0, len(samples), batch_size)]
    import torch

    tokenizer = load_prompt_tokenizer(model_path) if prompt_mode == "text_box" else None
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the full model is slow on CPU
    return evaluate(load_base_model(model_path, prompt_mode).to(device), batches, tokenizer)


def validation_fingerprint(index: Path) -> str:
    from angiotune.data.stream import load_rows

    rows, _ = load_rows(index, "val")
    return hashlib.sha256("\n".join(sorted(rows["sample_id"])).encode()).hexdigest()[:16]


def search(space: SearchSpace, *, data: Path | None = None, model: Path | None = None,
           name: str | None = None, results: Path = Path("results"), address: str | None = None,
           resume: bool = False, announce=None) -> SearchOutcome:
    """Run a search space end to end and keep the best adapter per vessel."""
    from angiotune.model.sam3 import image_size_of, load_base_model
    from angiotune.registry.store import VESSELS, promote
    from angiotune.search.run import SearchSettings, run_search

    mode = space.fixed.get("prompt_mode", "box")
    base = load_base_model(model, mode)  # fails fast on a bad --model, before Ray starts
    if image_size_of(base) != space.image_size and model is None:
        raise AngiotuneError(f"data.image_size {space.image_size} does not match the embedded "
                             f"model's {image_size_of(base)}")
    index = Path(data) if data else embedded_index(results)
    settings = SearchSettings(index=index, name=name or space.name, results=Path(results),
                              model_path=model, address=address, resume=resume,
                              announce=announce)
    baseline = zero_shot(index, model, space.image_size, mode)
    grid = run_search(space, settings)
    outcome = SearchOutcome(settings.name, settings.run_dir, len(grid), grid.num_errors,
                            baseline)
    outcome.epochs_run = {r.metrics.get("trial_id"): int(r.metrics.get("epoch", 0))
                          for r in grid if r.metrics}
    fingerprint = validation_fingerprint(index)
    for vessel in VESSELS:
        metric = space.metric.split("/")[0] + f"/{vessel}"
        candidate = _best_checkpoint(grid, metric, space.mode)
        if candidate is None:
            outcome.messages.append(f"{vessel}: no trial reported {metric}")
            continue
        row, config, trial_id = candidate
        record = {"metric": metric, "mode": space.mode, "score": float(row[metric]),
                  "metrics": {k: float(v) for k, v in row.items() if _is_metric(k, v)},
                  "zero_shot": {k: v for k, v in baseline.items()},
                  "config": config, "trial_id": trial_id, "epoch": int(row["epoch"]),
                  "search": settings.name, "index": str(index.resolve()),
                  "validation_split": fingerprint,
                  "prompt_mode": mode, "base_model": _base_id(model, mode),
                  "base_model_path": str(model) if model else None,
                  "data_note": DATA_NOTE_PHANTOMS if data is None else "user data"}
        _, message = promote(settings.results, vessel, Path(row["checkpoint_path"]) / "adapter",
                             record)
        outcome.messages.append(message)
        outcome.best[vessel] = record
    (settings.run_dir / "summary.json").write_text(json.dumps(
        {"trials": outcome.trials, "errors": outcome.errors, "zero_shot": baseline,
         "messages": outcome.messages}, indent=1))
    return outcome


def _base_id(model: Path | None, mode: str) -> str:
    from angiotune.model.sam3 import base_model_id

    return base_model_id(model, mode)


def _is_metric(key: str, value) -> bool:
    return (key.startswith(("dice", "iou", "n", "train_loss", "epoch"))
            and isinstance(value, (int, float, np.floating, np.integer)))


def _best_checkpoint(grid, metric: str, mode: str):
    """The best epoch of any trial on ``metric`` whose checkpoint still exists."""
    best = None
    for result in grid:
        history = result.metrics_dataframe
        if history is None or metric not in history or "checkpoint_path" not in history:
            continue
        for _, row in history.dropna(subset=[metric, "checkpoint_path"]).iterrows():
            if not (Path(row["checkpoint_path"]) / "adapter").exists():
                continue
            score = float(row[metric])
            if best is None or (score > best[0] if mode == "max" else score < best[0]):
                config = {k: v for k, v in (result.config or {}).items()}
                best = (score, row, config, result.metrics.get("trial_id"))
    return None if best is None else best[1:]
