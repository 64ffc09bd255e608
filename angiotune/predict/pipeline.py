"""From a cine run to measured lesions: decode, choose the frame, route, segment, measure.

``predict`` takes a DICOM or NPY cine, a folder of them, or a lesion index (Parquet), and writes
one JSON and one overlay PNG per lesion. A file that cannot be read or a lesion that cannot be
measured is reported in the results and skipped; it does not stop a batch. Inputs are named in
the outputs by a salted key, never by their path (file names of exports often carry IDs).
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from angiotune.data.angles import format_primary, format_secondary
from angiotune.data.pseudonym import resolve_salt
from angiotune.data.readers import (
    CineHeader,
    finite_number,
    read_cine,
    read_frame,
    read_header,
)
from angiotune.errors import AngiotuneError, DataError
from angiotune.predict.frames import select_frame
from angiotune.predict.proposals import propose_boxes
from angiotune.predict.routing import Route, route_by_angles, second_opinion
from angiotune.predict.segment import Segmentation, segment_box
from angiotune.qca import QCAError, measure
from angiotune.registry.store import RegistryError, list_entries, load_best_model

log = logging.getLogger(__name__)
CINE_SUFFIXES = (".dcm", ".dicom", ".npy")
ADAPTER_ORDER = ("RCA", "LAD", "LCX")


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
    """The kept adapters per vessel, loaded on first use and then reused."""

    def __init__(self, results: Path, device: str = "auto") -> None:
        import torch

        self.results = Path(results)
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" \
            else device
        self.entries = {v: e for v, e in list_entries(self.results).items() if e is not None}
        self._models: dict[str, object] = {}
        if not self.entries:
            raise RegistryError(f"no adapter kept in {self.results / 'best'}; run "
                                "`angiotune search` first (or pass --results)")

    @property
    def available(self) -> set[str]:
        return set(self.entries)

    def get(self, vessel: str):
        if vessel not in self.entries:
            raise RegistryError(f"no {vessel} adapter kept in {self.results / 'best'} "
                                f"(kept: {', '.join(sorted(self.entries)) or 'none'})")
        if vessel not in self._models:
            self._models[vessel] = load_best_model(self.results, vessel).to(self.device)
        return self._models[vessel]


def predict(source: str | Path, out: str | Path, settings: PredictSettings = PredictSettings(),
            on_item: Callable[[int, int], None] | None = None) -> PredictSummary:
    """Predict every lesion of ``source`` (cine, folder of cines or index) into ``out``."""
    source, out = Path(source), Path(out)
    if not source.exists():
        raise DataError("no such file or folder", file=str(source))
    out.mkdir(parents=True, exist_ok=True)
    models = KeptModels(settings.results, settings.device)
    items = list(_items(source, settings))
    if not items:
        raise DataError(f"no DICOM or NPY cines ({', '.join(CINE_SUFFIXES)}) found",
                        file=str(source))
    summary = PredictSummary()
    salt = resolve_salt()
    for done, item in enumerate(items, start=1):
        key = item.get("sample_id") or input_key(str(item["path"].resolve()), salt)
        summary.inputs[key] = str(item["path"])
        try:
            for lesion in _predict_item(item, key, models, settings):
                if settings.overlays:
                    from angiotune.predict.report import write_overlay
                    lesion.paths.append(write_overlay(lesion, out / f"{lesion.key}.png"))
                lesion.paths.insert(0, _write_json(lesion.report, out / f"{lesion.key}.json"))
                summary.lesions.append(lesion)
        except AngiotuneError as error:
            log.info("angiotune: %s skipped (%s)", key, error)
            summary.failures.append({"input": key, "error": str(error).replace(
                str(item["path"]), key)})
        if on_item:
            on_item(done, len(items))
    _write_json({"lesions": [lesion.report for lesion in summary.lesions],
                 "failures": summary.failures}, out / "predictions.json")
    return summary


def predict_cine(path: str | Path, models: KeptModels, settings: PredictSettings,
                 key: str = "input") -> list[LesionPrediction]:
    """The lesions of one cine, measured but not written: for callers that keep the models
    loaded between cines (benchmarks, services)."""
    path = Path(path)
    kind = "npy" if path.suffix.lower() == ".npy" else "dicom"
    return _predict_item({"path": path, "kind": kind}, key, models, settings)


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
            if path.is_file() and path.suffix.lower() in CINE_SUFFIXES:
                yield {"path": path, "kind": "npy" if path.suffix.lower() == ".npy" else "dicom"}
    else:
        yield {"path": source, "kind": "npy" if source.suffix.lower() == ".npy" else "dicom"}


def _predict_item(item: dict, key: str, models: KeptModels,
                  settings: PredictSettings) -> list[LesionPrediction]:
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    path, row = item["path"], item.get("row")
    header = read_header(path)
    if row is not None:
        frame_index, frame_reason = int(row["frame_index"]), "the analysed frame in the index"
        angles = (finite_number(row.get("angle_lao_deg")),
                  finite_number(row.get("angle_cranial_deg")))
    else:
        frame_index, frame_reason = _choose_frame(path, header, settings.frame)
        angles = (header.lao_deg, header.cranial_deg)
    if settings.angles is not None:
        angles = settings.angles
    frame = read_frame(path, frame_index)
    spacing, spacing_source = _pixel_spacing(header, row, settings)
    timings["decode"] = _lap(clock)

    clock = time.perf_counter()
    route = (Route(settings.vessel, f"set by the user (--vessel {settings.vessel})")
             if settings.vessel else route_by_angles(*angles))
    boxes = _boxes(frame, row, settings)
    timings["route_and_propose"] = _lap(clock)

    context = {"input": {"key": key, "kind": item["kind"], "frame": frame_index,
                         "frames": header.frames, "frame_choice": frame_reason,
                         "frame_size": [header.width, header.height],
                         "pixel_spacing_mm": round(spacing, 5), "spacing_source": spacing_source,
                         "angles": _angles_text(angles)}}
    lesions = []
    for number, (box, box_source, proposal) in enumerate(boxes, start=1):
        lesion_key = f"{key}_lesion{number}"
        lesions.append(_predict_lesion(frame, box, box_source, proposal, route, angles, spacing,
                                       models, settings, lesion_key, dict(context),
                                       dict(timings), row))
    return lesions


def _predict_lesion(frame, box, box_source, proposal, route, angles, spacing, models,
                    settings, key, report, timings, row) -> LesionPrediction:
    clock = time.perf_counter()
    vessel = route.vessel or _fallback_vessel(models)
    if vessel not in models.available:
        raise RegistryError(f"the route chose {vessel} but no {vessel} adapter is kept "
                            f"(kept: {', '.join(sorted(models.available))}); pass --vessel")
    segmentation = segment_box(models.get(vessel), frame, box, spacing, angles)
    if not settings.vessel and segmentation.heads is not None:
        heads = segmentation.heads
        route = second_opinion(route, heads["vessel"], f"{heads['segment_name']} "
                               f"(CASS {heads['cass_segment']})", heads["vessel_probability"],
                               models.available)
        if route.vessel != vessel:
            vessel = route.vessel
            segmentation = segment_box(models.get(vessel), frame, box, spacing, angles)
    timings["segment"] = _lap(clock)

    clock = time.perf_counter()
    try:
        qca = measure(segmentation.mask, spacing, probability=segmentation.probability)
        qca_report = {**qca.measurements(), "notes": qca.notes}
    except QCAError as error:
        qca, qca_report = None, {"error": str(error)}
    timings["measure"] = _lap(clock)

    entry = models.entries[vessel]
    report.update({
        "what": _what(entry),
        "routing": route.as_dict(),
        "adapter": {"vessel": vessel, "stage": entry.get("stage", 1),
                    "strategy": entry.get("strategy"), "search": entry.get("search"),
                    "trial_id": entry.get("trial_id"), "validation_metric": entry.get("metric"),
                    "validation_score": round(float(entry["score"]), 4),
                    "base_model": entry.get("base_model"), "heads": bool(entry.get("heads"))},
        "box": [round(float(v), 1) for v in box], "box_source": box_source,
        "proposal": proposal,
        "segmentation": {"confidence": round(segmentation.confidence, 3),
                         "area_px": int(segmentation.mask.sum())},
        "qca": qca_report,
        "heads": segmentation.heads,
        "contours": None if qca is None else {k: v for k, v in qca.to_json().items()
                                              if k != "measurements" and k != "notes"},
        "timings_ms": timings,
    })
    if row is not None:
        report["core_lab"] = {
            "vessel": row.get("vessel"), "cass_segment": row.get("segment"),
            **{name: finite_number(row.get(column)) for name, column in (
                ("MLD_mm", "mld_mm"), ("diameter_stenosis_pct", "diameter_stenosis_pct"),
                ("interpolated_RVD_mm", "rvd_mm"), ("lesion_length_mm", "lesion_length_mm"))}}
    return LesionPrediction(key, report, frame, segmentation, qca)


def _choose_frame(path: Path, header: CineHeader, frame: int | None) -> tuple[int, str]:
    if frame is not None:
        if not 0 <= frame < header.frames:
            raise DataError(f"--frame {frame} is out of range: the cine has {header.frames} "
                            "frames", file=str(path), field="frame")
        return frame, "set by the user (--frame)"
    if header.frames == 1:
        return 0, "the only frame"
    index, reason, _ = select_frame(read_cine(path))
    return index, reason


def _pixel_spacing(header: CineHeader, row: dict | None,
                   settings: PredictSettings) -> tuple[float, str]:
    """mm per pixel at the vessel: user calibration first, then the index, then DICOM."""
    if settings.calibration_px_per_mm:
        return 1.0 / settings.calibration_px_per_mm, "calibration factor given by the user"
    if settings.pixel_spacing_mm:
        return float(settings.pixel_spacing_mm), "pixel spacing given by the user"
    if row is not None and finite_number(row.get("pixel_spacing_mm")):
        return float(row["pixel_spacing_mm"]), f"index ({row.get('spacing_source', 'row')})"
    if header.spacing_at_vessel_mm:
        return header.spacing_at_vessel_mm, ("DICOM ImagerPixelSpacing / magnification "
                                             f"({header.magnification:.3f})")
    if header.imager_pixel_spacing_mm:
        raise DataError("the DICOM gives ImagerPixelSpacing but no magnification "
                        "(DistanceSourceToDetector / DistanceSourceToPatient): the spacing at "
                        "the vessel is unknown; pass --calibration (catheter) or "
                        "--pixel-spacing", field="ImagerPixelSpacing")
    raise DataError("no pixel spacing: NPY cines carry none; pass --pixel-spacing MM or "
                    "--calibration PX_PER_MM", field="pixel_spacing")


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


def _fallback_vessel(models: KeptModels) -> str:
    """Without angles: an adapter with heads (the CASS head will route), else the only one."""
    with_heads = [v for v in ADAPTER_ORDER if models.entries.get(v, {}).get("heads")]
    if with_heads:
        return with_heads[0]
    if len(models.available) == 1:
        return next(iter(models.available))
    raise DataError("no positioner angles and no CASS head to route by; pass --vessel",
                    field="vessel")


def _what(entry: dict) -> str:
    if "phantom" in str(entry.get("data_note", "")).lower() or \
            str(entry.get("base_model", "")).startswith("embedded:"):
        return ("research output of a model adapted on synthetic phantoms with the embedded "
                "tiny SAM 3; not a clinical measurement")
    return "research output; not a clinical measurement"


def _angles_text(angles: tuple[float | None, float | None]) -> dict | None:
    lao, cranial = angles
    if lao is None or cranial is None:
        return None
    return {"primary": format_primary(lao), "secondary": format_secondary(cranial),
            "lao_deg": lao, "cranial_deg": cranial}


def _lap(start: float) -> float:
    return round(1000 * (time.perf_counter() - start), 1)


def _write_json(payload: dict, path: Path) -> Path:
    path.write_text(json.dumps(payload, indent=1, default=_plain) + "\n", encoding="utf-8")
    return path


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON: {type(value).__name__}")
