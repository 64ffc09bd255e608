"""From a cine run to measured lesions: decode, choose the frame, route, segment, measure.

``predict`` takes a DICOM or NPY cine, a folder of them, or a lesion index (Parquet), and writes
one JSON and one overlay PNG per lesion. A file that cannot be read or a lesion that cannot be
measured is reported in the results and skipped; it does not stop a batch. Inputs are named in
the outputs by a salted key, never by their path (file names of exports often carry IDs).
"""

from __future__ import annotations

import hmac
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from angiotune import jsonio
from angiotune.data.angles import format_primary, format_secondary
from angiotune.data.pseudonym import resolve_salt
from angiotune.data.readers import (
    IMAGE_SUFFIXES,
    CineHeader,
    cine_format,
    finite_number,
    read_cine,
    read_frame,
    read_header,
)
from angiotune.errors import AngiotuneError, ConfigError, DataError
from angiotune.export import DICOM_IDENTITIES, PREDICTION_FORMATS, prediction_writers
from angiotune.names import ADAPTER_VESSELS, GENERAL
from angiotune.predict.frames import select_frame
from angiotune.predict.proposals import propose_boxes
from angiotune.predict.routing import Route, route_by_angles, second_opinion
from angiotune.predict.segment import Segmentation, segment_box, segment_boxes
from angiotune.qca import QCAError, measure
from angiotune.qca.pixels import PIXEL_ONLY_NOTE, in_pixels
from angiotune.registry.store import (
    ADAPTER,
    RegistryError,
    base_path_of,
    list_entries,
    load_best_model,
    with_adapter_parts,
)
from angiotune.taxonomies.views import load_views

log = logging.getLogger(__name__)
# Cine runs, and single frames such as ARCADE's PNGs (a cine of one frame).
CINE_SUFFIXES = (".dcm", ".dicom", ".npy", *sorted(IMAGE_SUFFIXES))
# Registry keys in the order a fallback tries them: the general adapter covers every vessel.
ADAPTER_ORDER = (GENERAL, *ADAPTER_VESSELS)
COORDINATES = ("x, y in frame pixels; boxes are pixel edges, x0 <= x < x1 (pixel column c spans "
               "c to c + 1); points (centerline, edges, MLD position) are pixel centres, pixel "
               "(row r, column c) at (c, r)")


@dataclass(frozen=True)
class PredictSettings:
    """What the user fixed; everything left None is worked out from the input."""

    results: Path = Path("results")
    vessel: str | None = None
    frame: int | None = None
    box: tuple[float, float, float, float] | None = None
    pixel_spacing_mm: float | None = None
    calibration_px_per_mm: float | None = None
    angles: tuple[float, float] | None = None  # (LAO, cranial) in DICOM's convention
    max_proposals: int = 3
    overlays: bool = True
    device: str = "auto"  # "auto": the GPU when there is one
    model: Path | None = None  # the base folder, when it has moved since the search
    # Standard exports written beside the JSON (angiotune.export): "coco", "dicom".
    exports: tuple[str, ...] = ()
    dicom_identity: str = "pseudonym"  # or "keep": the source's patient and study identifiers
    student: bool = False  # segment with the distilled students (`angiotune distill`)

    def __post_init__(self) -> None:
        """Checked here, not only in the CLI: through the API a negative calibration would
        otherwise become a negative pixel spacing, and every millimetre a wrong one."""
        for name, flag in (("pixel_spacing_mm", "--pixel-spacing"),
                           ("calibration_px_per_mm", "--calibration")):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} ({flag}) must be a positive number, got {value}")
        if self.frame is not None and self.frame < 0:
            raise ConfigError(f"frame must be 0 or more, got {self.frame}")
        if self.box is not None:
            x0, y0, x1, y1 = (float(v) for v in self.box)
            if not all(map(math.isfinite, (x0, y0, x1, y1))) or x1 <= x0 or y1 <= y0:
                raise ConfigError(f"box must be x0,y0,x1,y1 with x1 > x0 and y1 > y0, got "
                                  f"{self.box}")
        if self.angles is not None and (len(self.angles) != 2 or
                                        not all(math.isfinite(a) for a in self.angles)):
            raise ConfigError(f"angles must be (LAO, cranial) in degrees, got {self.angles}")
        if self.max_proposals < 1:
            raise ConfigError(f"max_proposals must be at least 1, got {self.max_proposals}")
        if self.vessel is not None and self.vessel not in (*ADAPTER_VESSELS, GENERAL):
            raise ConfigError(f"vessel must be one of {(*ADAPTER_VESSELS, GENERAL)}, got "
                              f"{self.vessel!r}")
        if isinstance(self.exports, str) or set(self.exports) - set(PREDICTION_FORMATS):
            raise ConfigError(f"exports must be a tuple of {PREDICTION_FORMATS}, got "
                              f"{self.exports!r}")
        object.__setattr__(self, "exports", tuple(dict.fromkeys(self.exports)))
        if self.dicom_identity not in DICOM_IDENTITIES:
            raise ConfigError(f"dicom_identity must be one of {DICOM_IDENTITIES}, got "
                              f"{self.dicom_identity!r}")


@dataclass
class LesionPrediction:
    """Everything said about one lesion; ``report`` is what the JSON holds."""

    key: str
    report: dict
    frame: np.ndarray | None = None
    segmentation: Segmentation | None = None
    qca: object | None = None
    paths: list[Path] = field(default_factory=list)


@dataclass
class PredictSummary:
    lesions: list[LesionPrediction] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    inputs: dict[str, str] = field(default_factory=dict)  # key -> input, for the terminal only


class KeptModels:
    """The kept adapters per registry key (the vessels and ``general``), loaded on first use
    and then reused. LoRA adapters of one base share it: the base is loaded once and each
    key's adapter is a named peft adapter on it, switched to when that key is asked for
    (``share_base=False``: one base per adapter, as before; ``benchmarks/inference_latency.py``
    measures both). With ``student``, each key's distilled student segments instead of its
    adapter, and only keys with a student whose teacher is still the kept one are available."""

    def __init__(self, results: Path, device: str = "auto", model_path: Path | None = None,
                 share_base: bool = True, student: bool = False) -> None:
        self.results = Path(results)
        self.model_path = model_path
        self.device = resolve_device(device)
        self.share_base = share_base
        self._shared: dict[str | None, object] = {}  # base folder -> peft model carrying LoRAs
        kept = {v: e for v, e in list_entries(self.results).items() if e is not None}
        # Concept-model (text_box) adapters segment "things like this", not "inside this box".
        self.entries = {v: e for v, e in kept.items() if e.get("prompt_mode", "box") == "box"}
        self.skipped = sorted(set(kept) - set(self.entries))
        self._models: dict[str, object] = {}
        self.students: dict[str, dict] = {}
        if student:
            self._keep_students()
        if not self.entries:
            skipped = (f" ({', '.join(self.skipped)} kept as text_box adapters, which predict "
                       "does not use)" if self.skipped else "")
            raise RegistryError(f"no box-prompted adapter kept in {self.results / 'best'}"
                                f"{skipped}; run `angiotune search` first (or pass --results)")

    def _keep_students(self) -> None:
        from angiotune.registry.students import read_student

        found, damaged = {}, []
        for vessel in self.entries:
            try:
                found[vessel] = read_student(self.results, vessel)
            except RegistryError as error:  # one damaged entry must not stop the others
                log.warning("angiotune: %s", error)
                damaged.append(vessel)
        self.students = {v: e for v, e in found.items() if e is not None and not e["stale"]}
        stale = sorted(v for v, e in found.items() if e is not None and e["stale"])
        if not self.students:
            why = (f" (the {', '.join(stale)} student(s) learned from teachers that have since "
                   "been replaced)" if stale else "")
            why += f" (damaged: {', '.join(damaged)}; distil again)" if damaged else ""
            raise RegistryError(f"no distilled student kept in {self.results / 'best'}{why}; "
                                "run `angiotune distill` first, or predict without --student")
        self.entries = {v: e for v, e in self.entries.items() if v in self.students}

    @property
    def available(self) -> set[str]:
        return set(self.entries)

    def get(self, vessel: str):
        if vessel not in self.entries:
            raise RegistryError(f"no {vessel} adapter kept in {self.results / 'best'} "
                                f"(kept: {', '.join(sorted(self.entries)) or 'none'})")
        if vessel not in self._models:
            self._models[vessel] = self._load(vessel).to(self.device)
        model = self._models[vessel]
        if vessel in (getattr(model.segmenter, "peft_config", None) or {}):
            model.segmenter.set_adapter(vessel)  # a shared base: this key's LoRA runs
        return model

    def _load(self, vessel: str):
        from angiotune.model.adapters import add_adapter, load_adapter, strategy_of
        from angiotune.model.sam3 import base_model_id, load_base_model

        if self.students:
            from angiotune.registry.students import load_kept_student

            return load_kept_student(self.results, vessel)
        entry = self.entries[vessel]
        folder = Path(entry["path"]) / ADAPTER
        lora = strategy_of(folder) == "lora"
        if not (self.share_base and lora):
            return load_best_model(self.results, vessel, self.model_path)
        base_path = base_path_of(entry, self.model_path)
        base_id = base_model_id(base_path)
        shared = self._shared.get(base_path)
        if shared is None:
            shared = load_adapter(load_base_model(base_path), folder, base_id=base_id,
                                  name=vessel).to(self.device)
            self._shared[base_path] = shared
        else:
            add_adapter(shared, folder, vessel, base_id)
            shared.to(self.device)
        return with_adapter_parts(shared, folder)


def predict(source: str | Path, out: str | Path, settings: PredictSettings = PredictSettings(),
            on_item: Callable[[int, int], None] | None = None) -> PredictSummary:
    """Predict every lesion of ``source`` (cine, folder of cines or index) into ``out``."""
    source, out = Path(source), Path(out)
    if not source.exists():
        raise DataError("no such file or folder", file=str(source))
    models = KeptModels(settings.results, settings.device, settings.model,
                        student=settings.student)
    items = list(_items(source, settings))
    if not items:
        raise DataError(f"no DICOM, NPY or image cines ({', '.join(CINE_SUFFIXES)}) found",
                        file=str(source))
    out.mkdir(parents=True, exist_ok=True)  # not before: a user error leaves no empty folder
    summary = PredictSummary()
    salt = resolve_salt()
    writers = prediction_writers(out, settings.exports, settings.dicom_identity, salt)
    try:
        for done, item in enumerate(items, start=1):
            key = item.get("sample_id") or input_key(str(item["path"].resolve()), salt)
            summary.inputs[key] = str(item["path"])
            try:
                lesions, failures = _predict_item(item, key, models, settings)
            except Exception as error:  # noqa: BLE001 - one bad input must not stop a batch
                lesions, failures = [], [{"error": describe(error)}]
            for lesion in lesions:
                _write_outputs(lesion, out, settings, failures)
                _export(lesion, item, writers, failures)
                summary.lesions.append(lesion)
            for failure in failures:
                failure = {"input": key, **failure}
                failure["error"] = _without_path(failure["error"], item["path"], key)
                log.info("angiotune: %s skipped (%s)", key, failure["error"])
                summary.failures.append(failure)
            if on_item:
                on_item(done, len(items))
    finally:  # what was measured is kept, even when the batch is interrupted
        for name, writer in writers.items():
            try:
                writer.close()
            except Exception as error:  # noqa: BLE001 - the JSON below must still be written
                summary.failures.append({"input": f"the {name} export",
                                         "error": f"not finished: {describe(error)}"})
        _write_json({"lesions": [lesion.report for lesion in summary.lesions],
                     "failures": summary.failures}, out / "predictions.json")
    return summary


def _write_outputs(lesion: LesionPrediction, out: Path, settings: PredictSettings,
                   failures: list[dict]) -> None:
    lesion.paths.append(_write_json(lesion.report, out / f"{lesion.key}.json"))
    if settings.overlays:
        from angiotune.predict.overlay import write_overlay

        try:
            lesion.paths.append(write_overlay(lesion, out / f"{lesion.key}.png"))
        except Exception as error:  # noqa: BLE001 - the numbers stand without the picture
            failures.append({"lesion": lesion.key, "error": f"overlay not drawn: "
                                                           f"{describe(error)}"})


def _export(lesion: LesionPrediction, item: dict, writers: dict,
            failures: list[dict]) -> None:
    """The lesion in each standard export asked for; a failed one is reported, not fatal."""
    for name, writer in writers.items():
        try:
            lesion.paths.extend(writer.add(lesion, item["path"], item.get("row")))
        except Exception as error:  # noqa: BLE001 - the JSON and overlay stand without it
            failures.append({"lesion": lesion.key, "error": f"{name} export not written: "
                                                           f"{describe(error)}"})


def describe(error: Exception) -> str:
    """A user error as it is; anything else with its type, as a bug to report."""
    if isinstance(error, AngiotuneError):
        return str(error)
    return f"unexpected {type(error).__name__}: {error} (please report this)"


def _without_path(text: str, path: Path, key: str) -> str:
    for form in (str(path), str(path.resolve()), path.name):
        text = text.replace(form, key)
    return text


def predict_cine(path: str | Path, models: KeptModels, settings: PredictSettings,
                 key: str = "input") -> PredictSummary:
    """The lesions of one cine, measured but not written: for callers that keep the models
    loaded between cines (benchmarks, services). A lesion that fails is in ``failures``."""
    path = Path(path)
    kind = "npy" if path.suffix.lower() == ".npy" else "dicom"
    lesions, failures = _predict_item({"path": path, "kind": kind}, key, models, settings)
    return PredictSummary(lesions, failures, {key: str(path)})


def resolve_device(name: str) -> str:
    """"auto" -> the GPU when there is one; a named device is checked before any work starts."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise AngiotuneError(f"unknown device {name!r} (cpu, cuda, cuda:1, auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AngiotuneError(f"--device {name}: no CUDA GPU is visible here")
    return name


def input_key(text: str, salt: str) -> str:
    """A stable pseudonymous name for an input (its path may hold patient IDs)."""
    return "I" + hmac.new(salt.encode(), text.encode(), "sha256").hexdigest()[:12]


def _items(source: Path, settings: PredictSettings) -> Iterator[dict]:
    if source.suffix.lower() == ".parquet":
        from angiotune.data.stream import load_rows

        rows, root = load_rows(source)
        for row in rows.to_dict("records"):
            yield {"path": root / row["image_path"], "kind": "index", "row": row,
                   "sample_id": row["sample_id"]}
    elif source.is_dir():
        for path in sorted(source.rglob("*")):
            if path.is_file() and (path.suffix.lower() in CINE_SUFFIXES or _has_dicom_preamble(
                    path)):
                yield {"path": path, "kind": cine_format(path)}
    else:
        yield {"path": source, "kind": cine_format(source)}


def _has_dicom_preamble(path: Path) -> bool:
    """Exports often name DICOM files without an extension: the "DICM" marker tells."""
    if path.suffix:
        return False
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _predict_item(item: dict, key: str, models: KeptModels,
                  settings: PredictSettings) -> tuple[list[LesionPrediction], list[dict]]:
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    path, row = item["path"], item.get("row")
    header = read_header(path)
    if row is not None:
        frame_index, frame_reason = int(row["frame_index"]), "the analysed frame in the index"
        frame = None
        if settings.frame is not None:
            frame_reason += " (--frame applies to cines, not to index rows)"
        angles = (finite_number(row.get("angle_lao_deg")),
                  finite_number(row.get("angle_cranial_deg")))
    else:
        frame_index, frame_reason, frame = _choose_frame(path, header, settings.frame)
        angles = (header.lao_deg, header.cranial_deg)
    if settings.angles is not None:
        angles = settings.angles
    if frame is None:
        frame = read_frame(path, frame_index)
    spacing, spacing_source = _pixel_spacing(header, row, settings)
    calibration = {} if spacing is not None else {
        "calibration": f"{PIXEL_ONLY_NOTE} ({spacing_source})"}
    timings["decode"] = _lap(clock)

    clock = time.perf_counter()
    route = (Route(settings.vessel, f"set by the user (--vessel {settings.vessel})")
             if settings.vessel else route_by_angles(*angles))
    boxes = _boxes(frame, row, settings)
    timings["route_and_propose"] = _lap(clock)

    # "px": no calibration, so lengths are in frame pixels and named so (*_px, not *_mm).
    context = {"units": "mm" if spacing is not None else "px",
               "input": {"key": key, "kind": item["kind"], "frame": frame_index,
                         "frames": header.frames, "frame_choice": frame_reason,
                         "frame_size": [header.width, header.height],
                         "pixel_spacing_mm": None if spacing is None else round(spacing, 5),
                         "spacing_source": "none" if spacing is None else spacing_source,
                         **calibration, "angles": _angles_text(angles)}}
    keys = [f"{key}_lesion{number}" for number in range(1, len(boxes) + 1)]
    try:
        route, fallback = _start_route(route, models, settings)
    except Exception as error:  # noqa: BLE001 - said for each lesion, as the batch goes on
        return [], [{"lesion": k, "error": describe(error)} for k in keys]
    # Without a calibration everything is measured in frame pixels (1 "mm" per pixel), then
    # renamed to _px, so that no pixel count is reported as millimetres.
    scale = 1.0 if spacing is None else spacing
    clock = time.perf_counter()
    try:  # every lesion of the frame in one pass of the model
        first = segment_boxes(models.get(route.vessel), frame, [b for b, _, _ in boxes], scale,
                              angles, route.vessel, spacing is not None)
    except Exception:  # noqa: BLE001 - then each alone, so that one bad box fails alone
        first = [None] * len(boxes)
    timings["segment"] = _lap(clock) / len(boxes)
    lesions, failures = [], []
    for lesion_key, (box, box_source, proposal), segmentation in zip(keys, boxes, first,
                                                                    strict=True):
        try:
            lesions.append(_predict_lesion(frame, box, box_source, proposal, route, fallback,
                                           segmentation, angles, scale, spacing, models,
                                           settings, lesion_key, dict(context), dict(timings),
                                           row))
        except Exception as error:  # noqa: BLE001 - one lesion must not take the others along
            failures.append({"lesion": lesion_key, "error": describe(error)})
    return lesions, failures


def _predict_lesion(frame, box, box_source, proposal, route: Route, fallback: bool,
                    segmentation: Segmentation | None, angles, scale: float, spacing, models,
                    settings, key, report, timings, row) -> LesionPrediction:
    """One lesion, from its segmentation by the starting route's adapter (None: segment it
    here): a CASS head may move it to another vessel's adapter; then QCA and the report."""
    clock = time.perf_counter()
    vessel = route.vessel
    if segmentation is None:
        segmentation = segment_box(models.get(vessel), frame, box, scale, angles, vessel,
                                   spacing is not None)
    if not settings.vessel and segmentation.heads is not None:
        heads = segmentation.heads
        route = second_opinion(route, heads["vessel"], heads["vessel_vote"],
                               heads["vessel_probability"], models.available,
                               heads["vessel_decides"])
        if (fallback and route.vessel == vessel != GENERAL and GENERAL in models.available
                and not _head_confirms(heads, vessel)):
            route = Route(GENERAL, f"{route.reason}; the head did not settle the vessel, so the "
                          "general adapter (chosen over every vessel) was used", route.view,
                          route.ambiguous, route.alternative)
        if route.vessel != vessel:
            vessel = route.vessel
            segmentation = segment_box(models.get(vessel), frame, box, scale, angles, vessel,
                                       spacing is not None)
    timings["segment"] = round(timings["segment"] + _lap(clock), 2)

    clock = time.perf_counter()
    # Edges from the frame (core-lab style), the model's mask giving the segment; the mask's
    # own edges are reported beside, as the model alone would measure the lesion.
    try:
        qca = measure(segmentation.mask, scale, probability=segmentation.probability,
                      frame=frame, box=box)
        qca_report = {**qca.measurements(), "notes": qca.notes}
    except QCAError as error:
        qca, qca_report = None, {"error": str(error)}
    try:
        mask_only = measure(segmentation.mask, scale, probability=segmentation.probability)
        mask_only_report = {**mask_only.measurements(), "notes": mask_only.notes}
    except QCAError as error:
        mask_only_report = {"error": str(error)}
    timings["measure"] = _lap(clock)
    contours = None if qca is None else {k: v for k, v in qca.to_json().items()
                                         if k != "measurements" and k != "notes"}
    heads = segmentation.heads
    if spacing is None:
        qca_report, contours, heads = in_pixels(qca_report), in_pixels(contours), in_pixels(heads)
        mask_only_report = in_pixels(mask_only_report)

    entry = models.entries[vessel]
    report.update({
        "what": _what(entry),
        "coordinates": COORDINATES,
        "routing": route.as_dict(),
        "adapter": {"vessel": vessel, "stage": entry.get("stage", 1),
                    "strategy": entry.get("strategy"), "search": entry.get("search"),
                    "trial_id": entry.get("trial_id"), "validation_metric": entry.get("metric"),
                    "validation_score": round(float(entry["score"]), 4),
                    "base_model": entry.get("base_model"),
                    "heads": bool(entry.get("heads")) and vessel not in models.students,
                    # Kept with --keep-below-zero-shot: the base alone scored better.
                    "below_zero_shot": bool(entry.get("below_zero_shot")),
                    "student": _student_report(models.students.get(vessel))},
        "box": [round(float(v), 1) for v in box], "box_source": box_source,
        "proposal": proposal,
        "segmentation": {"confidence": round(segmentation.confidence, 3),
                         "area_px": int(segmentation.mask.sum())},
        "qca": qca_report,
        "qca_mask_only": mask_only_report,
        "heads": heads,
        "contours": contours,
        "timings_ms": timings,
    })
    if row is not None:
        report["core_lab"] = {
            "vessel": row.get("vessel"), "cass_segment": row.get("segment"),
            **{name: finite_number(row.get(column)) for name, column in (
                ("MLD_mm", "mld_mm"), ("diameter_stenosis_pct", "diameter_stenosis_pct"),
                ("interpolated_RVD_mm", "rvd_mm"), ("lesion_length_mm", "lesion_length_mm"))}}
    return LesionPrediction(key, report, frame, segmentation, qca)


def _choose_frame(path: Path, header: CineHeader,
                  frame: int | None) -> tuple[int, str, np.ndarray | None]:
    """The frame to analyse, why, and its pixels when choosing it decoded the whole run."""
    if frame is not None:
        if not 0 <= frame < header.frames:
            raise DataError(f"--frame {frame} is out of range: the cine has {header.frames} "
                            "frames", file=str(path), field="frame")
        return frame, "set by the user (--frame)", None
    if header.frames == 1:
        return 0, "the only frame", None
    cine = read_cine(path)
    index, reason, _ = select_frame(cine)
    return index, reason, cine[index]


def _pixel_spacing(header: CineHeader, row: dict | None,
                   settings: PredictSettings) -> tuple[float | None, str]:
    """mm per pixel at the vessel and where it came from: user calibration first, then the
    index, then DICOM. None (and why) when nothing says: the lesion is then measured in pixels,
    which is all an uncalibrated input (NPY, a COCO frame, DICOM without magnification) allows."""
    if settings.calibration_px_per_mm:
        return 1.0 / settings.calibration_px_per_mm, "calibration factor given by the user"
    if settings.pixel_spacing_mm:
        return float(settings.pixel_spacing_mm), "pixel spacing given by the user"
    if row is not None and finite_number(row.get("pixel_spacing_mm")):
        return float(row["pixel_spacing_mm"]), f"index ({row.get('spacing_source', 'row')})"
    spacing = header.vessel_spacing()
    if spacing is not None:
        return spacing
    ask = "pass --pixel-spacing MM or --calibration PX_PER_MM for mm"
    if header.imager_pixel_spacing_mm:
        return None, ("the DICOM gives ImagerPixelSpacing but no usable magnification "
                      "(DistanceSourceToDetector / DistanceSourceToPatient), so the spacing at "
                      f"the vessel is unknown; {ask} (--calibration from the catheter)")
    if row is not None:
        return None, f"the index has no pixel spacing for this lesion; {ask}"
    return None, f"the file carries no pixel spacing; {ask}"


def _boxes(frame: np.ndarray, row: dict | None, settings: PredictSettings):
    """(box, where it came from, proposal details) for every lesion to measure."""
    if settings.box is not None:
        _check_box(settings.box, frame.shape)
        return [(np.asarray(settings.box, dtype=float), "given (--box)", None)]
    if row is not None:
        box = np.array([row[f"bbox_{k}"] for k in ("x0", "y0", "x1", "y1")], dtype=float)
        return [(box, "index (the analysed segment's box)", None)]
    proposals = propose_boxes(frame, settings.max_proposals)
    if not proposals:
        raise DataError("no narrowing found along the segmented vessels; pass --box x0,y0,x1,y1",
                        field="box")
    height, width = frame.shape
    return [(np.clip(np.asarray(p.box), 0, [width, height, width, height]),
             "proposal (a narrowing along the segmented vessel)", p.as_dict())
            for p in proposals]


def _check_box(box, shape: tuple[int, int]) -> None:
    x0, y0, x1, y1 = box
    height, width = shape
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise DataError(f"box {list(box)} is not inside the {width}x{height} frame with "
                        "x0 < x1 and y0 < y1", field="box")


def _start_route(route: Route, models: KeptModels,
                 settings: PredictSettings) -> tuple[Route, bool]:
    """The adapter to segment with first, and whether it is a fallback (the CASS head may then
    move it): the route's vessel when kept, else ``general`` when kept, else a fallback."""
    if route.vessel is None:  # no angles: start from a fallback and let a CASS head decide
        fallback, why = _fallback_vessel(models)
        return Route(fallback, f"{route.reason}; started from the {fallback} adapter ({why})",
                     ambiguous=True), True
    if route.vessel in models.available:
        return route, False
    if not settings.vessel and GENERAL in models.available:
        return Route(GENERAL, f"{route.reason}; no {route.vessel} adapter is kept, so the "
                     "general adapter (chosen over every vessel) was used", route.view,
                     route.ambiguous, route.alternative), False
    raise RegistryError(f"the route chose {route.vessel} but no {route.vessel} adapter is kept "
                        f"(kept: {', '.join(sorted(models.available))}); pass --vessel")


def _fallback_vessel(models: KeptModels) -> tuple[str, str]:
    """Without angles: an adapter with heads (its CASS head can route; the general one first),
    else the general adapter, else the only one."""
    with_heads = [v for v in ADAPTER_ORDER if models.entries.get(v, {}).get("heads")
                  and v not in models.students]  # a student has no heads
    if with_heads:
        return with_heads[0], "it has a CASS head to route by"
    if GENERAL in models.available:
        return GENERAL, "no CASS head to route by; it was chosen over every vessel"
    if len(models.available) == 1:
        return next(iter(models.available)), "the only adapter kept"
    raise DataError("no positioner angles and no CASS head to route by; pass --vessel or "
                    "--angles", field="vessel")


def _head_confirms(heads: dict, vessel: str) -> bool:
    """Whether the CASS head names ``vessel`` as surely as it must to overrule a view."""
    views = load_views()
    return (views.adapter_for.get(heads["vessel"], heads["vessel"]) == vessel
            and heads["vessel_probability"] >= views.head_override_probability)


def _student_report(student: dict | None) -> dict | None:
    """The distilled student that segmented instead of the adapter (``--student``)."""
    if student is None:
        return None
    return {"teacher_entry": student["teacher_entry"], "encoder": student.get("encoder"),
            "test_dice": student.get("test", {}).get("dice"),
            "teacher_test_dice": student.get("test", {}).get("teacher_dice"),
            "test_agreement": student.get("test", {}).get("agreement"),
            "search": student.get("search"), "trial_id": student.get("trial_id")}


def _what(entry: dict) -> str:
    """What the adapter was trained on and from, each said only where it is true: phantoms
    with the full-size weights are still phantoms, and user data with the tiny model is still
    the tiny model."""
    phantoms = "phantom" in str(entry.get("data_note", "")).lower()
    embedded = str(entry.get("base_model", "")).startswith("embedded:")
    if not phantoms and not embedded:
        return "research output; not a clinical measurement"
    data = "synthetic phantoms" if phantoms else "the data given"
    model = "the embedded tiny SAM 3" if embedded else "the SAM 3 weights given"
    return f"research output of a model adapted on {data} with {model}; not a clinical measurement"


def _angles_text(angles: tuple[float | None, float | None]) -> dict | None:
    lao, cranial = angles
    if lao is None or cranial is None:
        return None
    return {"primary": format_primary(lao), "secondary": format_secondary(cranial),
            "lao_deg": lao, "cranial_deg": cranial}


def _lap(start: float) -> float:
    return round(1000 * (time.perf_counter() - start), 1)


def _write_json(payload: dict, path: Path) -> Path:
    """Strict JSON: a number that is not finite is written as null, not NaN."""
    path.write_text(jsonio.dumps(payload, indent=1) + "\n",
                    encoding="utf-8")
    return path
