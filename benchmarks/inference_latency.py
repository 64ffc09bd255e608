"""Milliseconds per frame for the whole predict path: decode, choose the frame, route, segment,
measure; the overlay apart. With the kept adapters of ``--results`` (the embedded model unless
the search used a real checkpoint), on CPU or the GPU; optionally the full-size SAM 3 tracker
configuration (random weights: timing only) on the same path. Where `angiotune distill` kept a
student, its segment step is timed beside its teacher's for 1, 3 and 5 lesions on a frame,
and with --full-size a student of the same shape made from the full-size tracker beside it.

    python benchmarks/inference_latency.py [--results results] [--runs 10] [--device cpu]
        [--full-size] [--full-size-runs 1]

The cines are the index's DICOM runs (the lesion box from the index, as a user's --box).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from angiotune.data.readers import read_frame
from angiotune.data.stream import load_rows
from angiotune.predict import KeptModels, PredictSettings, predict_cine
from angiotune.predict.overlay import write_overlay
from angiotune.predict.segment import segment_box, segment_boxes
from angiotune.qca import QCAError, measure
from angiotune.registry.store import list_entries


def time_predict(rows, root: Path, models: KeptModels, runs: int, frame_given: bool,
                 device: str) -> dict[str, float]:
    """Median and p90 ms per frame over ``runs`` cines, with the stage breakdown."""
    totals, stages = [], {}
    for row in rows[:runs]:
        settings = PredictSettings(results=models.results, device=device, box=tuple(
            float(row[f"bbox_{k}"]) for k in ("x0", "y0", "x1", "y1")),
            frame=int(row["frame_index"]) if frame_given else None)
        _sync(device)
        start = time.perf_counter()
        [lesion] = predict_cine(root / row["image_path"], models, settings).lesions
        _sync(device)
        totals.append(1000 * (time.perf_counter() - start))
        for stage, ms in lesion.report["timings_ms"].items():
            stages.setdefault(stage, []).append(ms)
    return {"median ms": statistics.median(totals), "p90 ms": float(np.percentile(totals, 90)),
            **{f"{stage} ms": statistics.median(v) for stage, v in stages.items()}}


def time_overlay(rows, root: Path, models: KeptModels, device: str, out: Path) -> float:
    row = rows[0]
    settings = PredictSettings(results=models.results, device=device, frame=int(
        row["frame_index"]), box=tuple(float(row[f"bbox_{k}"]) for k in ("x0", "y0", "x1", "y1")))
    [lesion] = predict_cine(root / row["image_path"], models, settings).lesions
    start = time.perf_counter()
    write_overlay(lesion, out / "overlay.png")
    return 1000 * (time.perf_counter() - start)


def time_full_size(rows, root: Path, device: str, runs: int,
                   shape=None) -> dict[str, float]:
    """The same segment + measure step with the full SAM 3 tracker (1008 px, random weights),
    or with a student of ``shape`` (``angiotune.model.student``) made from it."""
    from transformers import Sam3TrackerConfig, Sam3TrackerModel

    from angiotune.model.lesion import LesionModel
    from angiotune.model.student import student_config

    config = Sam3TrackerConfig()
    if shape is not None:
        config = student_config(config, shape)
    model = LesionModel(Sam3TrackerModel(config)).eval().to(device)
    row = rows[0]
    frame = read_frame(root / row["image_path"], int(row["frame_index"]))
    box = np.array([row[f"bbox_{k}"] for k in ("x0", "y0", "x1", "y1")], dtype=float)
    segment_box(model, frame, box, float(row["pixel_spacing_mm"]))  # warm-up
    times = []
    for _ in range(runs):
        _sync(device)
        start = time.perf_counter()
        result = segment_box(model, frame, box, float(row["pixel_spacing_mm"]))
        # Random weights: the mask may be nothing to measure; the time is what counts.
        with contextlib.suppress(QCAError):
            measure(result.mask, float(row["pixel_spacing_mm"]), probability=result.probability)
        _sync(device)
        times.append(1000 * (time.perf_counter() - start))
    return {"median ms": statistics.median(times), "runs": runs,
            "parameters (M)": sum(p.numel() for p in model.parameters()) / 1e6}


def time_lesions_per_frame(rows, root: Path, model, device: str, runs: int,
                           counts: tuple[int, ...] = (1, 3, 5)) -> dict[int, dict[str, float]]:
    """The segment step of a frame with 1, 3 and 5 lesions: one model pass per lesion against
    one pass for the frame's boxes together (``segment_boxes``, what predict does). The boxes
    are the index's lesion boxes, moved onto the first frame."""
    row = rows[0]
    frame = read_frame(root / row["image_path"], int(row["frame_index"]))
    boxes = [np.array([r[f"bbox_{k}"] for k in ("x0", "y0", "x1", "y1")], dtype=float)
             for r in rows[:max(counts)]]
    spacing = float(row["pixel_spacing_mm"])
    figures = {}
    for count in counts:
        chosen = boxes[:count]

        def one_by_one(chosen=chosen) -> None:
            for box in chosen:
                segment_box(model, frame, box, spacing)

        def together(chosen=chosen) -> None:
            segment_boxes(model, frame, chosen, spacing)

        times = {}
        for label, function in (("one pass per lesion", one_by_one),
                                ("one pass per frame", together)):
            function()  # warm-up
            taken = []
            for _ in range(runs):  # interleaved would favour neither; the same frame each run
                _sync(device)
                start = time.perf_counter()
                function()
                _sync(device)
                taken.append(1000 * (time.perf_counter() - start))
            times[label] = statistics.median(taken)
        figures[count] = times
    return figures


def time_loading(results: Path, device: str) -> dict[str, dict[str, float]]:
    """Every kept adapter loaded, one base per adapter against one base they share: seconds to
    load them all, and the megabytes of parameters held (each tensor counted once)."""
    figures = {}
    for label, share in (("one base per adapter", False), ("one shared base", True)):
        start = time.perf_counter()
        models = KeptModels(results, device, share_base=share)
        loaded = [models.get(key) for key in sorted(models.available)]
        seconds = time.perf_counter() - start
        tensors = {p.data_ptr(): p.numel() * p.element_size()
                   for model in loaded for p in model.parameters()}
        figures[label] = {"load s": seconds, "parameters MB": sum(tensors.values()) / 2**20,
                          "adapters": len(loaded)}
    return figures


@contextlib.contextmanager
def heads_without_qca_read(models: KeptModels):
    """The loaded models' heads answer on their own (``angiotune.model.heads``) meanwhile."""
    saved = {}
    for vessel, model in models._models.items():
        if model.heads is not None:
            saved[vessel] = model.heads.calibrated.clone()
            model.heads.calibrated.zero_()
    try:
        yield
    finally:
        for vessel, flags in saved.items():
            models._models[vessel].heads.calibrated.copy_(flags)


def kept_student(results: Path, vessel: str):
    """The vessel's distilled student and its shape, or None when none is kept fresh."""
    from angiotune.model.student import StudentShape, load_student, read_student_record
    from angiotune.registry.students import STUDENT, read_student

    entry = read_student(results, vessel)
    if entry is None or entry["stale"]:
        return None
    folder = Path(entry["path"]) / STUDENT
    return load_student(folder), StudentShape(**read_student_record(folder)["shape"])


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--full-size", action="store_true")
    parser.add_argument("--full-size-runs", type=int, default=1)
    args = parser.parse_args()
    entries = {v: e for v, e in list_entries(args.results).items() if e is not None}
    if not entries:
        raise SystemExit(f"no kept adapters in {args.results}: run `angiotune search` first "
                         "(the embedded default needs no data)")
    rows, root = load_rows(Path(next(iter(entries.values()))["index"]))
    rows = [r for r in rows.to_dict("records") if r["image_format"] == "dicom"]
    for label, figures in time_loading(args.results, args.device).items():
        print(f"{label}: " + ", ".join(f"{k} {v:.2f}" for k, v in figures.items()))
    models = KeptModels(args.results, args.device)
    print(f"device {args.device} ({torch.get_num_threads()} threads), kept adapters "
          f"{', '.join(entries)}, {min(args.runs, len(rows))} cines of "
          f"{rows[0]['frames']} frames at {rows[0]['frame_width']} px")
    time_predict(rows, root, models, 2, True, args.device)  # warm-up: load the models
    for label, frame_given in (("--frame given", True), ("frame chosen automatically", False)):
        figures = time_predict(rows, root, models, args.runs, frame_given, args.device)
        print(f"{label}: " + ", ".join(f"{k} {v:.1f}" for k, v in figures.items()))
    apart = KeptModels(args.results, args.device, share_base=False)
    time_predict(rows, root, apart, 2, True, args.device)  # warm-up
    figures = time_predict(rows, root, apart, args.runs, True, args.device)
    print("--frame given, one base per adapter (no adapter switching): "
          + ", ".join(f"{k} {v:.1f}" for k, v in figures.items()))
    with heads_without_qca_read(models):  # what the heads' QCA read costs, side by side
        figures = time_predict(rows, root, models, args.runs, True, args.device)
    print("--frame given, heads answering alone (no QCA read): "
          + ", ".join(f"{k} {v:.1f}" for k, v in figures.items()))
    vessel = next(v for v in ("LAD", "general", "RCA", "LCX") if v in models.available)
    teacher = time_lesions_per_frame(rows, root, models.get(vessel), args.device, args.runs)
    for count, times in teacher.items():
        apart, together = times["one pass per lesion"], times["one pass per frame"]
        print(f"segment step, {count} lesion(s) on a frame ({vessel} adapter): one pass per "
              f"lesion {apart:.1f} ms, one pass per frame {together:.1f} ms "
              f"({apart / together:.2f}x)")
    student = kept_student(args.results, vessel)
    if student is not None:
        timed = time_lesions_per_frame(rows, root, student[0].to(args.device), args.device,
                                       args.runs)
        with heads_without_qca_read(models):  # the student has no heads: the model alone
            bare = time_lesions_per_frame(rows, root, models.get(vessel), args.device,
                                          args.runs)
        for count, times in timed.items():
            mine, theirs = times["one pass per frame"], teacher[count]["one pass per frame"]
            alone = bare[count]["one pass per frame"]
            print(f"segment step, {count} lesion(s) on a frame, one pass per frame: {vessel} "
                  f"student {mine:.1f} ms, its teacher {theirs:.1f} ms ({theirs / mine:.2f}x), "
                  f"the teacher without its heads' QCA read {alone:.1f} ms "
                  f"({alone / mine:.2f}x)")
    with tempfile.TemporaryDirectory() as scratch:
        print(f"overlay PNG: {time_overlay(rows, root, models, args.device, Path(scratch)):.1f} "
              "ms (not in the per-frame figures)")
    if args.full_size:
        figures = time_full_size(rows, root, args.device, args.full_size_runs)
        print("full-size SAM 3 tracker, segment + measure: " +
              ", ".join(f"{k} {v:.1f}" for k, v in figures.items()))
        if student is not None:
            shape = student[1]
            small = time_full_size(rows, root, args.device, args.full_size_runs, shape)
            print(f"a student of the {vessel} student's shape made from it ({shape}), segment + "
                  "measure: " + ", ".join(f"{k} {v:.1f}" for k, v in small.items())
                  + f" ({figures['median ms'] / small['median ms']:.2f}x)")


if __name__ == "__main__":
    main()
