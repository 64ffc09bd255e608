"""``angiotune distill``: a Tune search per kept model for a student that runs in a fraction of
its time, kept in the registry beside its teacher.

For each registry entry (``vessels`` in the space, default every kept box-prompt model) the
teacher runs once, in a Ray task on a trial's resources, over the chosen frames of its own
index's cines (``angiotune.train.distill.teacher_targets``); Tune with Optuna and ASHA then
searches the student's shape and loss on those targets, each trial training one student in its
own process. The best student by validation Dice (or agreement, as the space says) is scored on
the test split beside its teacher and kept as ``<KEY>.student`` (``registry.students``).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from angiotune import jsonio
from angiotune.errors import AngiotuneError
from angiotune.search.space import DISTILL, SearchSpace

STATE_FILE = "distill_state.pt"
STUDENT_DIR = "student"
TEACHER_FILE = "teacher.json"  # which kept model the targets came from
# Per lesion on an RTX 3090 (the plan's goal), estimated from the student's FLOPs as made from
# the user's own teacher: with the full-size SAM 3 it bites, with the embedded model it cannot.
DEFAULT_BUDGET_MS = 50.0


@dataclass
class DistillOutcome:
    name: str
    run_dir: Path
    students: dict[str, dict] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)


def distill(space: SearchSpace, results: str | Path = "results", model: Path | None = None,
            name: str | None = None, resume: bool = False, address: str | None = None,
            announce=None) -> DistillOutcome:
    """Distil every kept model the space names; returns what was kept and why."""
    from angiotune.model.sam3 import image_size_of, model_config
    from angiotune.registry.students import promote_student
    from angiotune.search.run import SearchSettings, check_writable, ensure_ray
    from angiotune.search.sizing import SMALL_BATCH, fit_space

    if space.stage != DISTILL:
        raise AngiotuneError(f"space {space.name!r} is a stage-{space.stage} space; "
                             "`angiotune distill` takes a space with stage: distill "
                             "(search_spaces/distill.yaml)")
    results = Path(results).resolve()
    check_writable(results)
    name = name or space.name
    run_dir = (results / "distills" / name).resolve()
    if not resume and run_dir.exists() and any(run_dir.iterdir()):
        raise AngiotuneError(f"a distillation named {name!r} already exists in {run_dir}; use "
                             "--resume to continue it or another --name")
    model = Path(model).resolve() if model is not None else None
    teachers, messages = _teachers(space, results, model)
    settings = SearchSettings(index=Path("."), name=name, results=results, address=address,
                              announce=announce)
    cluster = ensure_ray(settings)
    # Sized as a search is (GPUs per trial, trials at once); the batch is 8 unless the space
    # says otherwise: a student's inputs are small.
    first = next(iter(teachers.values()))
    space = fit_space(replace(space, batch_size=space.batch_size or SMALL_BATCH),
                      image_size_of(model_config(first["base"], "box")), cluster.get("GPU", 0.0))
    outcome = DistillOutcome(name, run_dir, messages=messages)
    for offset, (key, entry) in enumerate(teachers.items()):
        base = entry["base"]
        targets = _targets(space, entry, key, base, run_dir / "targets" / key, results, resume)
        outcome.messages.extend(_left_out(key, targets))
        grid = _search(space, key, offset, run_dir, targets, entry, base, resume)
        outcome.messages.extend(
            f"{key}: trial {r.metrics.get('trial_id')} failed: {r.metrics['failed']}"
            for r in grid if r.metrics and r.metrics.get("failed"))
        best = _best_student(grid, space.metric)
        if best is None:
            outcome.messages.append(f"{key}: no student trial finished")
            continue
        row, config, trial_id = best
        folder = Path(row["checkpoint_path"]) / STUDENT_DIR
        from angiotune.search.api import on_trial_resources  # imports torch

        tests = on_trial_resources(space, _test_scores, str(targets), str(folder))
        record = _record(space, entry, base, row, config, trial_id, tests, name, folder)
        outcome.students[key] = {**record, "student": str(folder)}
        _, message = promote_student(results, key, folder, record)
        outcome.messages.append(message)
    (run_dir / "summary.json").write_text(jsonio.dumps(
        {"students": outcome.students, "messages": outcome.messages}, indent=1))
    return outcome


def _teachers(space: SearchSpace, results: Path,
              model: Path | None) -> tuple[dict[str, dict], list[str]]:
    """The registry entries to distil (key -> manifest, with ``base``: the base folder to
    load, or None for the embedded model), refused before Ray starts when there are none, or
    when the base they need is not at hand."""
    from angiotune.model.sam3 import base_model_id
    from angiotune.names import ADAPTER_VESSELS, GENERAL
    from angiotune.registry.store import read_entry
    from angiotune.search.api import check_weights

    wanted = space.vessels or (*ADAPTER_VESSELS, GENERAL)
    teachers, messages, base_ids = {}, [], {}
    for key in wanted:
        entry = read_entry(results, key)
        if entry is None:
            if space.vessels:
                raise AngiotuneError(f"no model kept for {key} in {results / 'best'}: run "
                                     "`angiotune search` first, or leave it out of vessels")
            continue
        if entry.get("prompt_mode", "box") != "box":
            messages.append(f"{key}: not distilled: the student is a box-prompted tracker, and "
                            "this entry is a text_box concept model")
            continue
        if not Path(entry.get("index") or "").is_file():
            raise AngiotuneError(f"{key}: the index its model was searched on, "
                                 f"{entry.get('index')}, is gone; distillation reads its "
                                 "training cines and splits")
        missing = _missing_splits(entry["index"], key)
        if missing:
            why = (f"{key}: its index {entry['index']} has no {' or '.join(missing)} lesions "
                   f"of {key} to score a student on")
            if space.vessels:
                raise AngiotuneError(why + "; leave it out of vessels")
            messages.append(why + ": not distilled")
            continue
        base = str(model) if model is not None else entry.get("base_model_path")
        if base not in base_ids:  # the weights checked once per base, by their content
            check_weights(None if base is None else Path(base), "box")
            base_ids[base] = base_model_id(base)
        if base_ids[base] != entry.get("base_model", base_ids[base]):
            raise AngiotuneError(f"{key}: its model was trained on {entry['base_model']}, not "
                                 f"on the weights in {base or 'the embedded model'}; pass the "
                                 "SAM 3 folder it was searched on with --model")
        teachers[key] = {**entry, "base": base}
    if not teachers:
        raise AngiotuneError(f"no kept box-prompt model to distil in {results / 'best'}; run "
                             "`angiotune search --space lora_rank.yaml` first")
    return teachers, messages


def _missing_splits(index: str, key: str) -> list[str]:
    from angiotune.data.stream import load_rows
    from angiotune.names import GENERAL

    rows, _ = load_rows(index)
    if key != GENERAL:
        rows = rows[rows["vessel"] == key]
    return [split for split in ("val", "test") if not (rows["split"] == split).any()]


def _targets(space: SearchSpace, entry: dict, key: str, base: str | None, folder: Path,
             results: Path, resume: bool) -> Path:
    import shutil

    from angiotune.registry.store import ADAPTER
    from angiotune.train.distill import TARGETS_FILE

    teacher = {"teacher_entry": Path(entry["path"]).name,
               "frames_per_cine": int(space.fixed.get("frames_per_cine", 4))}
    record = folder / TEACHER_FILE
    if resume and (folder / TARGETS_FILE).exists() and record.exists():
        if json.loads(record.read_text(encoding="utf-8")) != teacher:
            raise AngiotuneError(f"{key}: the kept model or frames_per_cine changed since this "
                                 "run started, so its students learned from other targets; "
                                 "start a new run (another --name) instead of --resume")
        return folder
    # The trials start from a copy: the registry may drop the teacher's folder meanwhile.
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(Path(entry["path"]) / ADAPTER, folder / "teacher")
    cache = str((results / "cache" / "frames").resolve())
    from angiotune.search.api import on_trial_resources  # imports torch

    on_trial_resources(space, _teacher_pass, str(folder / "teacher"), entry["index"], key,
                       base, str(folder), teacher["frames_per_cine"], cache, space.batch_size)
    record.write_text(json.dumps(teacher), encoding="utf-8")
    return folder


def _left_out(key: str, targets: Path) -> list[str]:
    """The lesions the teacher pass could not read, named by pseudonymous sample id."""
    from angiotune.train.distill import DistillTargets

    skipped = DistillTargets(targets).meta.get("skipped", [])
    return [f"{key}: lesion {s['sample_id']} left out of distillation ({s['reason']})"
            for s in skipped]


def _device(gpus: float):
    import torch

    return torch.device("cuda", 0) if gpus and torch.cuda.is_available() else torch.device("cpu")


def _teacher_pass(adapter: str, index: str, key: str, base: str | None, folder: str,
                  frames: int, cache: str, batch_size: int) -> None:
    """The teacher over its lesions' frames (a Ray task: ``on_trial_resources``)."""
    import ray

    from angiotune.data.stream import load_rows
    from angiotune.names import GENERAL
    from angiotune.registry.store import load_ready_model
    from angiotune.train.distill import teacher_targets

    teacher = load_ready_model(Path(adapter), base)
    teacher.to(_device(len(ray.get_gpu_ids())))
    rows, root = load_rows(index)
    if key != GENERAL:  # learns from every training cine; scored on its vessel's lesions
        rows = rows[(rows["split"] == "train") | (rows["vessel"] == key)].reset_index(drop=True)
    teacher_targets(teacher, rows, root, Path(folder), frames, cache, batch_size)


def _test_scores(targets: str, student: str) -> dict[str, float]:
    """Student and teacher on the test split's targets (a Ray task)."""
    import ray

    from angiotune.model.sam3 import image_size_of
    from angiotune.model.student import load_student
    from angiotune.train.distill import DistillTargets, score

    device = _device(len(ray.get_gpu_ids()))
    model = load_student(Path(student)).to(device)
    return score(DistillTargets(Path(targets)), "test", model,
                 image_size_of(model.segmenter), device=device)


def _search(space: SearchSpace, key: str, offset: int, run_dir: Path, targets: Path,
            entry: dict, base: str | None, resume: bool):
    """One Tune run of student trials for one registry entry."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from angiotune.search.run import _optuna_search, short_trial_name
    from angiotune.search.trackers import logger_callbacks

    constants = {"targets": str(targets), "teacher": str(targets / "teacher"),
                 "base": base, "epochs": space.epochs, "seed": space.seed,
                 "batch_size": space.batch_size, "gpus": space.gpus_per_worker or 0.0,
                 "teacher_entry": Path(entry["path"]).name}
    resources = {"cpu": space.cpus_per_worker,
                 **({"gpu": space.gpus_per_worker} if space.gpus_per_worker else {})}
    trainable = tune.with_resources(tune.with_parameters(run_student_trial,
                                                         constants=constants), resources)
    path = run_dir / f"tune-{key}"
    if resume and tune.Tuner.can_restore(str(path)):
        return tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True,
                                  resume_errored=False).fit()
    scheduler = (ASHAScheduler(time_attr="epoch", max_t=space.epochs,
                               grace_period=space.grace_period,
                               reduction_factor=space.reduction_factor, stop_last_trials=False)
                 if space.asha else None)
    searcher = _optuna_search(space, run_dir, f"{space.name}-{key}", offset)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                    metric=space.metric, mode="max",
                                    num_samples=space.samples,
                                    max_concurrent_trials=space.max_concurrent,
                                    reuse_actors=True, trial_name_creator=short_trial_name,
                                    trial_dirname_creator=short_trial_name),
        run_config=tune.RunConfig(
            name=path.name, storage_path=str(run_dir),
            callbacks=logger_callbacks(space.callbacks, run_dir, f"{space.name}-{key}", None),
            failure_config=tune.FailureConfig(max_failures=space.retries),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2,
                                                    checkpoint_score_attribute=space.metric,
                                                    checkpoint_score_order="max"),
            verbose=1))
    return tuner.fit()


def run_student_trial(config: dict, constants: dict) -> None:
    """One student trial in Tune's trial process: build (or resume) the student and train it
    with ``angiotune.train.distill``, reporting each epoch with a checkpoint."""
    import torch
    from ray import tune

    from angiotune.model.lesion import LesionModel
    from angiotune.model.sam3 import model_config
    from angiotune.model.student import (
        StudentShape,
        build_student,
        frame_flops,
        load_student,
        merged_tracker,
        rtx3090_ms,
        save_student,
        student_config,
    )
    from angiotune.registry.store import load_ready_model
    from angiotune.train.distill import DistillSettings, DistillTargets, train_student

    settings = {**constants, **config}
    data = DistillTargets(Path(settings["targets"]))
    shape = StudentShape(*(float(settings.get(k, d)) for k, d in
                           (("width_ratio", 0.5), ("depth_ratio", 0.5), ("input_ratio", 1.0))))
    options = DistillSettings(
        **{k: type(getattr(DistillSettings, k))(settings[k])
           for k in ("temperature", "distill_weight", "feature_weight", "lr", "weight_decay",
                     "batch_size",
                     "seed") if k in settings})
    trial_id = tune.get_context().get_trial_id()
    budget = float(settings.get("max_ms_per_lesion", DEFAULT_BUDGET_MS))
    cost = rtx3090_ms(frame_flops(student_config(model_config(settings["base"], "box"), shape)))
    if cost > budget:  # Optuna is told FAIL with the reason, and learns to avoid the shape
        tune.report({"dice": 0.0, "agreement": 0.0, "epoch": int(settings["epochs"]),
                     "trial_id": trial_id,
                     "failed": f"this student would take {cost:.0f} ms per lesion on an RTX "
                               f"3090 (estimated from FLOPs), over max_ms_per_lesion "
                               f"{budget:g}"})
        return
    device = _device(settings["gpus"])
    record = {"crop_context": float(data.meta["crop_context"]), "shape": shape.__dict__,
              "teacher_entry": settings["teacher_entry"], "settings": options.__dict__}
    start, state = 0, None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            student = load_student(Path(folder) / STUDENT_DIR).train()
            saved = torch.load(Path(folder) / STATE_FILE, weights_only=True,
                               map_location="cpu")
        start, state = int(saved["epoch"]), saved["optimiser"]
    else:
        teacher = load_ready_model(Path(settings["teacher"]), settings["base"])
        student = LesionModel(build_student(merged_tracker(teacher), shape, options.seed), None,
                              teacher.crop_context)
        del teacher
    size = student.segmenter.config.vision_config.backbone_config.image_size

    def report(epoch: int, scores: dict, optimiser) -> None:
        with tempfile.TemporaryDirectory() as folder:
            save_student(student, Path(folder) / STUDENT_DIR, record)
            torch.save({"epoch": epoch, "optimiser": optimiser.state_dict()},
                       Path(folder) / STATE_FILE)
            tune.report({**scores, "epoch": epoch, "trial_id": trial_id},
                        checkpoint=tune.Checkpoint.from_directory(folder))

    train_student(student, data, options, int(settings["epochs"]), size, report, start, state,
                  device)


def _best_student(grid, metric: str):
    """The best epoch of any trial whose student checkpoint still exists."""
    from angiotune.search.api import best_checkpoint

    return best_checkpoint(grid, metric, "max", STUDENT_DIR)


def _record(space: SearchSpace, entry: dict, base: str | None, row, config: dict, trial_id,
            tests: dict, name: str, folder: Path) -> dict:
    """The student's manifest: its scores beside the teacher's, and what it costs per frame."""
    from transformers import Sam3TrackerConfig

    from angiotune.model.sam3 import model_config
    from angiotune.model.student import (
        MS_ASSUMPTION,
        StudentShape,
        encoder_summary,
        frame_flops,
        full_size_flops,
        read_student_record,
        rtx3090_ms,
    )

    student_config = Sam3TrackerConfig.from_pretrained(folder)
    teacher_config = model_config(base, "box")
    flops = {"teacher": frame_flops(teacher_config), "student": frame_flops(student_config)}
    shape = StudentShape(**read_student_record(folder)["shape"])
    at_full_size = {"teacher": full_size_flops(), "student": full_size_flops(shape)}
    return {
        "teacher_entry": Path(entry["path"]).name, "teacher_score": entry["score"],
        "teacher_trial_id": entry.get("trial_id"), "index": entry.get("index"),
        "validation_split": entry.get("validation_split"),
        # The registry compares students on validation Dice, whatever chose among the trials.
        "selected_on": space.metric, "metric": "dice", "mode": "max",
        "score": float(row["dice"]),
        "validation": {k: float(row[k]) for k in ("dice", "agreement", "agreement_all_frames",
                                                  "teacher_dice") if k in row},
        "test": tests, "config": config, "trial_id": trial_id, "epoch": int(row["epoch"]),
        "search": name, "encoder": encoder_summary(student_config),
        "teacher_encoder": encoder_summary(teacher_config),
        "flops_per_lesion": flops,
        "ms_per_lesion_rtx3090": {k: round(rtx3090_ms(v), 2) for k, v in flops.items()},
        # The same shape made from the full-size SAM 3: what it costs on the users' model.
        "full_size_flops_per_lesion": at_full_size,
        "full_size_ms_per_lesion_rtx3090": {k: round(rtx3090_ms(v), 1)
                                            for k, v in at_full_size.items()},
        "ms_assumption": MS_ASSUMPTION,
        "crop_context": read_student_record(folder)["crop_context"],
        "data_note": entry.get("data_note"),
    }
