"""The search API: ``search()`` runs a space end to end and keeps the best adapter per vessel."""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from angiotune import jsonio
from angiotune.errors import AngiotuneError
from angiotune.model.adapters import strategy_of
from angiotune.model.heads import has_heads
from angiotune.search.space import SearchSpace
from angiotune.search.trial import with_checkpoint_paths

# 200 lesions: enough validation and test lesions per vessel for the heads' metrics to mean
# something; 3 frames a run keeps generation near two minutes on two cores.
EMBEDDED_PHANTOMS = dict(lesions=200, size=512, frames=3, seed=0, shared_views=0.3)
EMBEDDED_SALT = "angiotune-embedded-phantoms"  # synthetic patients: nothing to protect
PHANTOM_DATA = "angiotune's synthetic phantoms (not clinical data)"
EMBEDDED_MODEL = "the embedded tiny SAM 3 model"


def data_note(index: Path, model: Path | None) -> str:
    """What a search ran on, in words, for its records and report. Phantoms are recognised by
    the record their generator leaves beside them, whoever built the index from them."""
    import pyarrow.parquet as pq

    from angiotune.data.index import index_metadata

    root = Path(index_metadata(pq.read_schema(index), Path(index))["data_root"])
    data = PHANTOM_DATA if (root / "phantoms.json").is_file() else "user data"
    return f"{data} and {EMBEDDED_MODEL if model is None else 'the SAM 3 weights given'}"


@dataclass
class SearchOutcome:
    name: str
    run_dir: Path
    trials: int
    errors: int
    zero_shot: dict[str, float]
    zero_shot_reused: bool = False  # from an earlier search's identical baseline
    best: dict[str, dict] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)
    epochs_run: dict[str, int] = field(default_factory=dict)  # trial id -> last epoch
    pareto: list[dict] = field(default_factory=list)  # multi-objective: the non-dominated trials
    failed: list[dict] = field(default_factory=list)  # trials that diverged or ran out of memory


def embedded_index(results: Path) -> Path:
    """The embedded default data: phantoms generated once under results/, and their index."""
    import shutil

    import pyarrow.parquet as pq

    from angiotune.data.index import TREE_COLUMNS
    from angiotune.data.ingest import IndexSettings, build_index
    from angiotune.data.phantoms import PhantomSettings, generate_phantoms

    folder = Path(results) / "embedded"
    index = folder / "index.parquet"
    made_with = folder / "settings.json"
    wanted = json.dumps(EMBEDDED_PHANTOMS, sort_keys=True)
    same = made_with.exists() and made_with.read_text() == wanted
    if same and index.exists() and set(TREE_COLUMNS) <= set(pq.read_schema(index).names):
        return index
    if not same:  # absent, or made by an angiotune whose embedded default differed
        shutil.rmtree(folder, ignore_errors=True)
        generate_phantoms(folder / "phantoms", PhantomSettings(**EMBEDDED_PHANTOMS))
    # else: an index from before its tree-position columns: indexed anew, same phantoms.
    build_index(folder / "phantoms" / "manifest.csv", index, IndexSettings(salt=EMBEDDED_SALT))
    made_with.write_text(wanted)
    return index


def zero_shot(index: Path, model_path: Path | None, image_size: int, prompt_mode: str = "box",
              batch_size: int = 16, crop_context: float | None = None) -> dict[str, float]:
    """The base model's validation metrics before any adaptation (plain PyTorch, no Ray), on
    the crop the trials see (``crop_context``; None: the default)."""
    import torch

    from angiotune.data.stream import SampleSettings, load_rows, sample_batches
    from angiotune.model.sam3 import load_base_model, load_prompt_tokenizer
    from angiotune.train.step import evaluate

    rows, root = load_rows(index, "val")
    samples = SampleSettings(image_size=image_size, augment=False,
                             **({} if crop_context is None else {"context": crop_context}))
    batches = sample_batches(rows, root, samples, batch_size)

    tokenizer = load_prompt_tokenizer(model_path) if prompt_mode == "text_box" else None
    # A Ray task given no GPU sees none (CUDA_VISIBLE_DEVICES is emptied for it).
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return evaluate(load_base_model(model_path, prompt_mode).to(device), batches, tokenizer)


def validation_vessels(index: Path) -> set[str]:
    from angiotune.data.stream import load_rows

    rows, _ = load_rows(index, "val")
    return set(rows["vessel"].astype(str))


def validation_fingerprint(index: Path) -> str:
    from angiotune.data.stream import load_rows

    rows, _ = load_rows(index, "val")
    return hashlib.sha256("\n".join(sorted(rows["sample_id"])).encode()).hexdigest()[:16]


def search(space: SearchSpace, *, data: Path | None = None, model: Path | None = None,
           name: str | None = None, results: Path = Path("results"), address: str | None = None,
           resume: bool = False, announce=None,
           keep_below_zero_shot: bool = False) -> SearchOutcome:
    """Run a search space end to end and keep the best adapter per vessel.

    An adapter that does not beat the zero-shot base on its vessel's validation lesions is not
    kept (using no adapter would be better), unless ``keep_below_zero_shot``: then it is kept
    marked ``below_zero_shot``, which ``best`` and ``predict`` show.

    Everything a user can get wrong (paths, sizes, a checkpoint that does not fill the model) is
    refused before Ray starts. The driver holds no weights while trials run: the checkpoint is
    checked on the CPU and freed, and the zero-shot baseline runs where trials run.
    """
    from angiotune.model.sam3 import base_model_id, image_size_of, model_config
    from angiotune.names import GENERAL
    from angiotune.registry.store import RegistryError, promote, registry_metric
    from angiotune.search.run import SearchSettings, check_writable, ensure_ray, run_search
    from angiotune.search.sizing import check_image_size, describe, fit_space

    # Trials run in folders of their own: every path must be absolute before they start.
    results = Path(results).resolve()
    model = Path(model).resolve() if model is not None else None
    check_writable(results)  # before the phantoms, the model or Ray
    mode = space.fixed.get("prompt_mode", "box")
    model_size = image_size_of(model_config(model, mode))
    check_image_size(space, model_size, model)
    check_weights(model, mode)
    base_id = base_model_id(model, mode)
    index = Path(data).resolve() if data else embedded_index(results)
    name = name or space.name
    run_dir = (results / "searches" / name).resolve()
    if not resume and (run_dir / "tune").exists():
        raise AngiotuneError(f"a search named {name!r} already exists in {run_dir}; use "
                             "--resume to continue it or another --name")
    constants = {**stage_constants(space, index, results, run_dir, resume), "base_id": base_id}
    settings = SearchSettings(index=index, name=name, results=results,
                              model_path=model, address=address, resume=resume,
                              announce=announce, trial_constants=constants)
    cluster = ensure_ray(settings)
    space = fit_space(space, model_size, cluster.get("GPU", 0.0))
    if announce:
        announce(describe(space))
    baseline, reused = cached_zero_shot(space, index, model, mode, base_id, results)
    grid = run_search(space, settings)
    outcome = SearchOutcome(settings.name, settings.run_dir, len(grid), grid.num_errors,
                            baseline)
    outcome.zero_shot_reused = reused
    outcome.epochs_run = {r.metrics.get("trial_id"): int(r.metrics.get("epoch", 0))
                          for r in grid if r.metrics}
    outcome.failed = [{"trial_id": r.metrics.get("trial_id"), "reason": r.metrics["failed"],
                       "params": {k: v for k, v in (r.config or {}).items()}}
                      for r in grid if r.metrics and r.metrics.get("failed")]
    if space.multi_objective:
        outcome.pareto = pareto_front(space, settings.run_dir)
    fingerprint = validation_fingerprint(index)
    validated = {GENERAL, *validation_vessels(index)}
    note = data_note(index, model)
    for vessel in registry_keys(space):
        metric = registry_metric(space.select, vessel)
        candidate = best_checkpoint(grid, metric, "max")
        if candidate is None:
            if vessel in validated:  # else the data names no such vessel: nothing to say
                outcome.messages.append(f"{vessel}: no trial reported {metric}")
            continue
        row, config, trial_id = candidate
        adapter = Path(row["checkpoint_path"]) / "adapter"
        record = {"metric": metric, "mode": "max", "score": float(row[metric]),
                  "stage": space.stage, "strategy": strategy_of(adapter),
                  "heads": has_heads(adapter),
                  "metrics": {k: float(v) for k, v in row.items() if _is_metric(k, v)},
                  "zero_shot": {k: v for k, v in baseline.items()},
                  "config": config, "trial_id": trial_id, "epoch": int(row["epoch"]),
                  "search": settings.name, "index": str(index),
                  "validation_split": fingerprint,
                  "prompt_mode": mode, "base_model": base_id,
                  "base_model_path": str(model) if model else None,
                  "data_note": note}
        outcome.best[vessel] = {**record, "adapter": str(adapter)}
        refusal = below_zero_shot(record, baseline)
        if refusal and not keep_below_zero_shot:
            outcome.messages.append(f"{vessel}: not kept: {refusal}; its checkpoint stays in "
                                    f"{adapter}")
            continue
        if refusal:
            record["below_zero_shot"] = True
        try:
            _, message = promote(settings.results, vessel, adapter, record)
        except RegistryError as error:  # the trials' checkpoints stay in the run folder
            message = f"{vessel}: {error}"
        outcome.messages.append(message)
    (settings.run_dir / "summary.json").write_text(jsonio.dumps(
        {"trials": outcome.trials, "errors": outcome.errors, "failed": outcome.failed,
         "zero_shot": baseline,
         "messages": outcome.messages, "pareto": outcome.pareto,
         "best_validation": {v: r["metrics"] for v, r in outcome.best.items()},
         # What `angiotune report` needs to redraw the best masks without the registry.
         "index": str(index), "base_model_path": str(model) if model else None,
         "prompt_mode": mode, "data_note": note,
         "best": {v: {k: r[k] for k in ("metric", "score", "trial_id", "epoch", "adapter")}
                  for v, r in outcome.best.items()}}, indent=1))
    return outcome


def registry_keys(space: SearchSpace) -> tuple[str, ...]:
    """The registry entries a search competes for: each vessel on its own validation lesions,
    and (stages 1 and 2) the general entry on all of them, which is the only one data without
    vessels (ARCADE stenosis) can fill. Stage 3's specialists compete for their vessel only."""
    from angiotune.names import ADAPTER_VESSELS as VESSELS
    from angiotune.names import GENERAL

    if space.stage == 3:
        return space.vessels
    return (*VESSELS, GENERAL)


def below_zero_shot(record: dict, baseline: dict[str, float]) -> str | None:
    """Why an adapter is no better than using none: its validation score does not beat the
    zero-shot base's on the same metric (None when it does, or the base has no such score)."""
    metric, zero = record["metric"], baseline.get(record["metric"])
    if zero is None or not math.isfinite(zero) or record["score"] > zero:
        return None
    return (f"the best trial's {metric} {record['score']:.4f} does not beat the zero-shot "
            f"base's {zero:.4f} (the base alone would do better)")


def check_weights(model: Path | None, mode: str) -> None:
    """Load the checkpoint once on the CPU, so that one the model's classes cannot fill is
    refused before Ray starts (``load_base_model`` raises), then free it."""
    import gc

    from angiotune.model.sam3 import load_base_model

    base = load_base_model(model, mode)
    del base
    gc.collect()


def on_trial_resources(space: SearchSpace, function, *args, exit_after: bool = True):
    """``function(*args)`` as a Ray task with one trial's CPUs and GPU. ``exit_after``: in a
    process that exits afterwards (no weights or CUDA memory stay behind); otherwise it goes
    back to Ray's pool with torch imported, for a trial to reuse. A user's error comes back as
    itself, its message, not Ray's traceback."""
    import ray

    task = ray.remote(max_calls=1 if exit_after else 0)(function).options(
        num_cpus=space.cpus_per_worker, num_gpus=space.gpus_per_worker or 0)
    try:
        return ray.get(task.remote(*args))
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, AngiotuneError):
            raise error.cause from None
        raise


def zero_shot_on_cluster(space: SearchSpace, index: Path, model: Path | None,
                         mode: str) -> dict[str, float]:
    """The zero-shot baseline where trials run (their GPU, when they have one): the driver
    keeps no weights or CUDA memory for the whole search. On CPUs the process stays in Ray's
    pool for the first trial (3-7 s less per search on two cores, side by side)."""
    crop = space.fixed.get("crop_context")  # a searched crop: the base on the default one
    return on_trial_resources(space, zero_shot, index, model, space.image_size, mode,
                              space.batch_size, None if crop is None else float(crop),
                              exit_after=bool(space.gpus_per_worker))


# The code a baseline's score goes through: reading, cropping, the model's forward and the
# metrics. Their bytes are part of its key, so an upgrade of angiotune never serves an old score.
ZERO_SHOT_SOURCES = ("data/readers.py", "data/transforms.py", "data/stream.py", "model/sam3.py",
                     "model/lesion.py", "train/step.py", "train/metrics.py", "search/api.py")


def zero_shot_key(space: SearchSpace, index: Path, model: Path | None, base_id: str,
                  mode: str) -> str | None:
    """What the zero-shot baseline depends on: the base weights and the model folder's
    configuration, the validation lesions as indexed and their files (size and modification
    time), the input size, the prompt, the crop, the device kind, and the code and library
    versions that score it. None when a file cannot be looked at from here (the trials' own
    reading then reports it, naming the file). Stages 2 and 3 on the same data and weights ask
    the same question as stage 1 did; a full-size pass over every validation lesion is
    minutes."""
    import torch
    import transformers

    import angiotune
    from angiotune.data.stream import load_rows
    from angiotune.data.transforms import DEFAULT_CROP_CONTEXT

    rows, root = load_rows(index, "val")
    files = []
    try:
        for column in ("image_path", "mask_path"):
            for name in sorted(set(rows[column].astype(str))):
                stat = (root / name).stat()
                files.append(f"{(root / name).resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
        package = Path(angiotune.__file__).parent
        code = hashlib.sha256(b"".join((package / f).read_bytes() for f in ZERO_SHOT_SOURCES))
        if model is not None:  # configuration and tokenizer files: the weights have base_id
            for extra in sorted(Path(model).glob("*.json")):
                code.update(extra.name.encode() + extra.read_bytes())
    except OSError:
        return None
    crop = space.fixed.get("crop_context")
    identity = json.dumps({
        "code": code.hexdigest(), "torch": torch.__version__,
        "transformers": transformers.__version__, "base": base_id, "mode": mode,
        "image_size": space.image_size,
        "crop": float(DEFAULT_CROP_CONTEXT if crop is None else crop),
        "gpu": bool(space.gpus_per_worker),
        "rows": rows.sort_values("sample_id").to_json(orient="records", default_handler=str),
        "files": files}, sort_keys=True)
    return hashlib.sha256(identity.encode()).hexdigest()[:24]


def cached_zero_shot(space: SearchSpace, index: Path, model: Path | None, mode: str,
                     base_id: str, results: Path) -> tuple[dict[str, float], bool]:
    """The zero-shot baseline and whether it came from ``results/cache/zero_shot`` (computed
    by an earlier search of the same question) rather than a fresh pass."""
    key = zero_shot_key(space, index, model, base_id, mode)
    if key is None:
        return zero_shot_on_cluster(space, index, model, mode), False
    stored = results / "cache" / "zero_shot" / f"{key}.json"
    try:
        return {k: float(v) for k, v in json.loads(stored.read_text()).items()}, True
    except (OSError, ValueError, TypeError, AttributeError):  # absent or unreadable: again
        pass
    baseline = zero_shot_on_cluster(space, index, model, mode)
    stored.parent.mkdir(parents=True, exist_ok=True)
    partial = stored.with_suffix(f".{uuid.uuid4().hex}.tmp")
    partial.write_text(json.dumps(baseline, indent=1, sort_keys=True))
    partial.replace(stored)  # whole or absent, for searches (and hosts) sharing the folder
    return baseline, False


def segment_classes(index: Path) -> tuple[tuple[str, ...], list[int]]:
    """The heads' classes: the segment codes present in the index, in taxonomy order, and how
    many training lesions each has (for class weights)."""
    from angiotune.data.stream import load_rows

    rows, _ = load_rows(index)
    named = rows["segment"].astype(str).str.strip() != ""  # a lesion of no named segment
    rows = rows[named]  # trains no class (its target is "unknown", -1)
    classes = tuple(sorted(rows["segment"].astype(str).unique(), key=_code_order))
    counts = rows[rows["split"] == "train"]["segment"].astype(str).value_counts()
    return classes, [int(counts.get(code, 0)) for code in classes]


def context_dim_of(index: Path) -> int:
    """How much of the view context the heads' trunk reads: all of it when the index traced its
    frames' vessel trees, the part before the frame's tree when it is older than those columns,
    else the part before the tree (columns that never vary in training would meet values at
    inference that their untrained weights were never fitted to)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from angiotune.data.context import CONTEXT_DIM, VIEWS_END
    from angiotune.data.index import TREE_COLUMNS
    from angiotune.model.heads import OLD_CONTEXT_DIM

    names = set(pq.read_schema(index).names)

    def traced(column: str) -> bool:  # one column read, not the index
        return column in names and pc.any(pc.is_finite(
            pq.read_table(index, columns=[column]).column(column))).as_py()

    if not traced(TREE_COLUMNS[1]):  # the share of the tree
        return OLD_CONTEXT_DIM
    return CONTEXT_DIM if traced(TREE_COLUMNS[2]) else VIEWS_END  # the offset from the root


def index_taxonomy(index: Path) -> str:
    """The taxonomy the index's segment codes are in (CASS, SYNTAX or a file)."""
    import pyarrow.parquet as pq

    from angiotune.data.index import index_metadata

    return str(index_metadata(pq.read_schema(index), Path(index)).get("taxonomy", "CASS"))


def _code_order(code: str) -> tuple:
    digits = "".join(ch for ch in code if ch.isdigit())
    return (int(digits) if digits else 10**6, code)


def stage_constants(space: SearchSpace, index: Path, results: Path, run_dir: Path,
                    resume: bool) -> dict:
    """What trials of this stage need, resolved before Ray starts so that mistakes fail fast:
    the heads' classes, and copies of the kept adapters that ``init`` points to (a copy, so
    that promotions during or after the search cannot change a resumed trial's start)."""
    from angiotune.data.stream import load_rows

    # Decoded frames and masks, shared by every trial and search of this results folder.
    constants: dict = {"frame_cache": str((results / "cache" / "frames").resolve())}
    if space.fixed.get("embedding_cache"):  # shared by every trial and search of this results
        constants["cache_dir"] = str((results / "cache" / "embeddings").resolve())
    if space.heads:
        from angiotune.data.index import missing_measurements

        needed = space.measurements_needed()
        missing = [c for c in missing_measurements(index) if c in needed]
        if missing:
            raise AngiotuneError(f"{index}: the stage-2 heads of this space need {missing[0]}, "
                                 f"which the index lacks (missing: {', '.join(missing)}); index "
                                 "an export with measurements and calibration "
                                 "(docs/contour_schema.md), train the segment head alone "
                                 "(stage2_segment.yaml), or run a stage-1 space")
        classes, counts = segment_classes(index)
        if len(classes) < 2:
            raise AngiotuneError(f"{index}: the segment head needs lesions of at least two "
                                 f"named segments; the index has {len(classes)} "
                                 "(ARCADE's stenosis outlines name none): run a stage-1 space")
        constants.update(classes=list(classes), class_counts=counts,
                         taxonomy=index_taxonomy(index), context_dim=context_dim_of(index))
    rows, _ = load_rows(index)
    for vessel in space.vessels:
        for split in ("train", "val"):
            if not ((rows["vessel"] == vessel) & (rows["split"] == split)).any():
                raise AngiotuneError(f"{index}: no {split} lesions of {vessel}; remove it from "
                                     "the space's vessels")
    wanted = space.init_choices() - {"none"}
    if "vessel" in wanted:
        wanted = (wanted - {"vessel"}) | set(space.vessels)
    if wanted:
        constants["init_adapters"] = {key: str(_init_copy(key, results, run_dir, resume))
                                      for key in sorted(wanted)}
    return constants


def _init_copy(key: str, results: Path, run_dir: Path, resume: bool) -> Path:
    import shutil

    from angiotune.registry.store import ADAPTER, list_entries, read_entry

    target = run_dir / "init" / key
    if resume and target.exists():
        return target
    if key == "best":
        general = {v: e for v, e in list_entries(results).items()
                   if e is not None and e.get("stage", 1) != 3}
        if not general:
            raise AngiotuneError(f"init 'best' needs a kept stage-1 or stage-2 adapter in "
                                 f"{results}/best (stage-3 specialists saw one vessel only); "
                                 "run `angiotune search --space lora_rank.yaml` first, or use "
                                 "init: none")
        entry = max(general.values(), key=lambda e: e["metrics"].get("dice", 0.0))
    else:
        entry = read_entry(results, key)
        if entry is None:
            raise AngiotuneError(f"init {key!r} needs a kept {key} adapter in {results}/best; "
                                 "run a stage-1 search first, or use init: none")
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(Path(entry["path"]) / ADAPTER, target)
    return target


def pareto_front(space: SearchSpace, run_dir: Path) -> list[dict]:
    """The non-dominated trials of a multi-objective study, also written to pareto.json."""
    import optuna

    study = optuna.load_study(study_name=space.name,
                              storage=f"sqlite:///{run_dir / 'optuna.db'}")
    front = [{"trial": t.number, **dict(zip(space.metric, t.values, strict=True)),
              "params": t.params} for t in study.best_trials]
    (run_dir / "pareto.json").write_text(jsonio.dumps(front, indent=1))
    return front


def _is_metric(key: str, value) -> bool:
    from angiotune.names import METRIC_MODES

    return (key.split("/")[0] in {*METRIC_MODES, "n", "train_loss", "epoch"}
            and isinstance(value, (int, float, np.floating, np.integer)))


def best_checkpoint(grid, metric: str, mode: str, payload: str = "adapter"):
    """The best epoch of any trial on ``metric`` whose checkpoint (its ``payload`` folder: an
    adapter, or a student) still exists."""
    best = None
    for result in grid:
        history = result.metrics_dataframe
        if history is None or metric not in history:
            continue
        history = with_checkpoint_paths(history, Path(result.path))
        for _, row in history.dropna(subset=[metric, "checkpoint_path"]).iterrows():
            if not (Path(row["checkpoint_path"]) / payload).exists():
                continue
            score = float(row[metric])
            if best is None or (score > best[0] if mode == "max" else score < best[0]):
                config = {k: v for k, v in (result.config or {}).items()}
                best = (score, row, config, result.metrics.get("trial_id"))
    return None if best is None else best[1:]
