"""Synthetic angiography studies with exact truth, written as a core-lab export would be.

Each synthetic patient gets a coronary anatomy with one to three stenoses. Each vessel group with
a lesion is filmed in one of its standard views as a cine run (contrast filling, cardiac motion);
the analyst's frame is an end-diastolic, fully opacified one. As in a real study, a view is not
always its vessel's own (``shared_views``): a left injection shows the LAD and the LCX together,
so a patient's LAD and LCX lesions may share one run filmed in either's view, and a lesion may be
filmed in a neighbouring vessel's view (an LCX lesion in an LAD view, an RCA lesion in LAO
cranial). The export then holds the run as
multi-frame XA DICOM and as an NPY cine, and per lesion a mask of the analysed segment, contour
JSON with the measurements, and a CSV row. Like real exports it is untidy on purpose (``messy``):
free-text vessel names, angles left out of the CSV, RLE-compressed DICOM, masks saved at half
resolution, a duplicated row. Nothing here is clinical data.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from angiotune.data.angles import format_primary, format_secondary
from angiotune.data.phantoms.anatomy import CATHETER_RADIUS_MM, Lesion, build_tree, place_lesion
from angiotune.data.phantoms.render import (
    ProjectedSegment,
    View,
    background,
    contrast_path_mm,
    project_segments,
    render_frame,
    segment_mask,
)
from angiotune.data.phantoms.writer import (
    quantise,
    write_json,
    write_mask,
    write_npy_cine,
    write_xa_dicom,
)
from angiotune.errors import ConfigError
from angiotune.taxonomies import load_taxonomy
from angiotune.taxonomies.views import ADAPTER_VESSELS, load_views

# Lesions per CASS segment in one real core-lab export (748 lesions, 14 segments in use).
REAL_EXPORT_COUNTS = {"1": 42, "2": 126, "3": 28, "4": 38, "12": 87, "13": 192, "14": 19,
                      "15": 55, "16": 13, "18": 26, "19": 65, "20": 29, "21": 14, "28": 14}
# Standard views per vessel group as (LAO deg, cranial deg) in the stored convention, and which
# group films each vessel: the same table routes predictions (taxonomies/views.yaml).
STANDARD_VIEWS = {vessel: [(v.lao_deg, v.cranial_deg) for v in load_views().of(vessel)]
                  for vessel in ADAPTER_VESSELS}
VIEW_GROUP = load_views().adapter_for
# The views that also show a vessel group's lesions, though a standard view of another group:
# a left injection fills the LAD and the LCX alike; LAO cranial shows the RCA near the LAD's.
NEIGHBOUR_VIEWS = {"LCX": STANDARD_VIEWS["LAD"], "LAD": STANDARD_VIEWS["LCX"],
                   "RCA": [view for view in STANDARD_VIEWS["LAD"] if view[0] > 0 < view[1]]}
CSV_COLUMNS = ["patient_id", "vessel_pattern", "phase", "frame_index", "cass_segment",
               "primary_angle", "secondary_angle", "dicom_path", "cine_path", "medis_mask_path",
               "medis_contour_path"]
PHASES_PRE = ["INDEX BASELINE", "PRE"]
PHASES_POST = ["POST", "FINAL"]
FIELD_OF_VIEW_MM = 170.0
_SURNAMES = ["OKAFOR", "LINDQVIST", "MORALES", "TANAKA", "KOWALSKI", "NAKAMURA", "DUBOIS",
             "OYELARAN", "HALVORSEN", "ESPOSITO", "VARGA", "ABERNATHY"]
_GIVEN = ["AMARA", "BJORN", "CARMEN", "DAICHI", "EWA", "FUMIKO", "GASTON", "HALIMA", "INGRID",
          "JACOPO", "KATA", "LEOPOLD"]
_TEXT_NAMES = {"4": ["RPDA", "PDA"], "15": ["D1", "DIAG 1"], "16": ["D2", "DIAG 2"],
               "20": ["OM1", "OM 1"], "21": ["OM2", "OM 2"], "28": ["RAMUS", "RI"],
               "11": ["LM", "LEFT MAIN"]}
_POSITION_WORDS = {"proximal": ["PROX", "prox", "Proximal"], "mid": ["MID", "mid", "Mid"],
                   "distal": ["DIST", "dist", "Distal"]}


@dataclass(frozen=True)
class PhantomSettings:
    """What to generate. The defaults make a set small enough for CI."""

    lesions: int = 40
    size: int = 512
    frames: int = 6
    seed: int = 0
    messy: bool = True
    shared_views: float = 0.3  # chance a run is filmed in another vessel's view (module doc)

    def __post_init__(self) -> None:
        if self.lesions < 1:
            raise ConfigError("lesions must be at least 1")
        if not 0 <= self.shared_views <= 1:
            raise ConfigError("shared_views must be between 0 and 1")
        if not 128 <= self.size <= 2048:
            raise ConfigError("size must be between 128 and 2048 pixels")
        if not 1 <= self.frames <= 120:
            raise ConfigError("frames must be between 1 and 120")


@dataclass
class PhantomSummary:
    settings: PhantomSettings
    out: Path
    patients: int = 0
    runs: int = 0
    lesions_by_segment: dict[str, int] = field(default_factory=dict)
    manifests: list[str] = field(default_factory=list)

    @property
    def lesions(self) -> int:
        return sum(self.lesions_by_segment.values())


def allocate_segments(n: int) -> list[str]:
    """Segment codes for n lesions in the real export's proportions (largest remainder)."""
    total = sum(REAL_EXPORT_COUNTS.values())
    quotas = {code: n * count / total for code, count in REAL_EXPORT_COUNTS.items()}
    counts = {code: int(q) for code, q in quotas.items()}
    by_remainder = sorted(quotas, key=lambda c: quotas[c] - counts[c], reverse=True)
    for code in by_remainder[:n - sum(counts.values())]:
        counts[code] += 1
    return [code for code, count in counts.items() for _ in range(count)]


def generate_phantoms(out: str | Path, settings: PhantomSettings = PhantomSettings(),
                      on_run: Callable[[int, int], None] | None = None) -> PhantomSummary:
    """Write a phantom export to ``out``: DICOM and NPY runs, masks, contours and two CSVs."""
    out = Path(out)
    for folder in ("dicom", "cines", "masks", "contours"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(settings.seed)
    codes = [str(c) for c in rng.permutation(allocate_segments(settings.lesions))]
    patients = _group_into_patients(codes, rng)
    summary = PhantomSummary(settings, out)
    rows: list[dict] = []
    filming = [_film(codes, settings, index) for index, codes in enumerate(patients)]
    total_runs = sum(len(runs) for runs in filming)
    for patient_index, patient_codes in enumerate(patients):
        rows += _patient(out, settings, patient_index, patient_codes, filming[patient_index],
                         summary, on_run, total_runs)
    if settings.messy and len(rows) > 3:
        rows.append(dict(rows[len(rows) // 2]))  # a duplicated row, as exports have
    _write_manifests(out, rows, summary)
    write_json(out / "phantoms.json", {
        "what": "synthetic coronary angiography phantoms generated by angiotune; not clinical "
                "data", "settings": asdict(settings), "patients": summary.patients,
        "runs": summary.runs, "lesions": summary.lesions,
        "lesions_by_segment": summary.lesions_by_segment, "manifests": summary.manifests})
    return summary


def _vessel(code: str) -> str:
    return load_taxonomy("CASS").segments[code].vessel


def _group_into_patients(codes: list[str], rng: np.random.Generator) -> list[list[str]]:
    patients: list[list[str]] = []
    queue = list(codes)
    while queue:
        wanted = int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15]))
        patient: list[str] = []
        for code in list(queue):
            if len(patient) == wanted:
                break
            if code not in patient:
                patient.append(code)
                queue.remove(code)
        patients.append(patient)
    return patients


@dataclass(frozen=True)
class Filming:
    """One run of a patient: its lesions, the views it may be filmed in and the injection."""

    name: str
    codes: list[str]
    views: list[tuple[float, float]]
    side: str  # "left" or "right": which coronary tree the injection fills


def _film(codes: list[str], settings: PhantomSettings, index: int) -> list[Filming]:
    """The runs of one patient: one per vessel group in its own standard views, except that,
    at ``shared_views`` odds, a patient's LAD and LCX lesions share a left injection filmed in
    either's view, and a run is filmed in a neighbouring group's view (``NEIGHBOUR_VIEWS``).
    Its own random stream: the rest of the patient is drawn as without shared views."""
    chance = np.random.default_rng([settings.seed, 2, index]).random
    groups: dict[str, list[str]] = {}
    for code in codes:
        groups.setdefault(VIEW_GROUP[_vessel(code)], []).append(code)
    runs = [Filming(group, group_codes, STANDARD_VIEWS[group],
                    "right" if group == "RCA" else "left")
            for group, group_codes in groups.items()]
    if {"LAD", "LCX"} <= set(groups) and chance() < settings.shared_views:
        lad, lcx = groups["LAD"], groups["LCX"]
        by = "LAD" if chance() < 0.5 else "LCX"
        runs = [r for r in runs if r.side == "right"] + [
            Filming(f"{by}S", lad + lcx, STANDARD_VIEWS[by], "left")]
    # A run in a neighbour's view: its name says so ("X"), which keeps run ids unique.
    return [replace(run, name=f"{run.name}X", views=NEIGHBOUR_VIEWS[run.name])
            if run.name in NEIGHBOUR_VIEWS and chance() < settings.shared_views else run
            for run in runs]


def _patient(out: Path, settings: PhantomSettings, index: int, codes: list[str],
             runs: list[Filming], summary: PhantomSummary, on_run,
             total_runs: int) -> list[dict]:
    rng = np.random.default_rng([settings.seed, 1, index])
    identity = {
        "id": f"PHANTOM RISE {101 + index % 7}-{index + 1:04d}",
        "name": f"{_SURNAMES[index % len(_SURNAMES)]}^{_GIVEN[(index * 5) % len(_GIVEN)]}",
        "birth_date": f"19{40 + index % 45:02d}{1 + index % 12:02d}{1 + index % 27:02d}",
        "sex": "MF"[index % 2], "institution": "Phantom General Hospital",
        "study_date": f"2025{1 + index % 12:02d}{1 + index % 27:02d}",
    }
    tree = build_tree(rng)
    lesions: dict[str, tuple[Lesion, str]] = {}
    for code in codes:
        phase = str(rng.choice(PHASES_PRE + PHASES_POST, p=[0.35, 0.35, 0.15, 0.15]))
        stenosis = rng.uniform(15, 40) if phase in PHASES_POST else rng.uniform(35, 85)
        lesions[code] = (place_lesion(tree[code], stenosis, rng.uniform(6, 16), rng), phase)
    summary.patients += 1
    rows = []
    for run in runs:
        run_id = f"{settings.seed:x}{index:04x}{run.name}".upper()
        rows += _run(out, settings, rng, tree, {c: lesions[c] for c in run.codes}, run,
                     run_id, identity)
        summary.runs += 1
        for code in run.codes:
            summary.lesions_by_segment[code] = summary.lesions_by_segment.get(code, 0) + 1
        if on_run:
            on_run(summary.runs, total_runs)
    return rows


def _run(out: Path, settings: PhantomSettings, rng: np.random.Generator, tree: dict,
         lesions: dict[str, tuple[Lesion, str]], run: Filming, run_id: str,
         identity: dict[str, str]) -> list[dict]:
    lao, cranial = run.views[rng.integers(len(run.views))]
    size = settings.size
    view = View(lao_deg=round(lao + rng.uniform(-5, 5), 1),
                cranial_deg=round(cranial + rng.uniform(-5, 5), 1), size=size,
                imager_pixel_spacing_mm=FIELD_OF_VIEW_MM / size,
                source_to_detector_mm=round(rng.uniform(950, 1100), 1),
                source_to_patient_mm=round(rng.uniform(720, 780), 1))
    # Pan the table as an operator would: the lesions near the middle of the round field.
    analysed = np.vstack([tree[code].points[lesion.analysed_start:lesion.analysed_end + 1]
                          for code, (lesion, _) in lesions.items()])
    middle = view.project(analysed).mean(axis=0)
    view = replace(view, center_px=tuple(size / 2 + rng.uniform(-0.08, 0.08, 2) * size - middle))
    frames, analysed, fill, motion = _timeline(settings.frames, rng)
    anatomy = background(rng, size, view)
    segments = [s for s in tree.values() if s.tree == run.side]
    cine = np.empty((frames, size, size))
    for t in range(frames):
        projected = project_segments(segments, view, transform=motion(t))
        path = contrast_path_mm(projected, (size, size), view.px_per_mm)
        cine[t] = render_frame(anatomy, path, fill(t), view, rng)
    stored = quantise(cine)
    compress = settings.messy and rng.random() < 0.35
    frame_time = 1000.0 / 15
    write_xa_dicom(out / "dicom" / f"RUN_{run_id}.dcm", stored, view, patient=identity,
                   frame_time_ms=frame_time, uid_seed=run_id, compress=compress)
    write_npy_cine(out / "cines" / f"RUN_{run_id}.npy", stored)

    at_analysis = {p.code: p for p in project_segments(segments, view)}
    rows = []
    for code, (lesion, phase) in lesions.items():
        lesion_id = f"{run_id}S{code}"
        mask = segment_mask(at_analysis[code], lesion.analysed_start, lesion.analysed_end,
                            (size, size))
        half = settings.messy and rng.random() < 0.15
        suffix = ".npy" if settings.messy and rng.random() < 0.2 else ".png"
        write_mask(out / "masks" / f"LES_{lesion_id}{suffix}", mask[::2, ::2] if half else mask)
        write_json(out / "contours" / f"LES_{lesion_id}.json",
                   _contour(at_analysis[code], lesion, view))
        drop_angles = settings.messy and rng.random() < 0.1
        rows.append({
            "patient_id": identity["id"],
            "vessel_pattern": _vessel_text(code, phase, rng, settings.messy),
            "phase": phase, "frame_index": analysed, "cass_segment": int(code),
            "primary_angle": "" if drop_angles else -view.lao_deg + 0.0,  # CSV: RAO positive
            "secondary_angle": "" if drop_angles else view.cranial_deg,
            "dicom_path": f"dicom/RUN_{run_id}.dcm", "cine_path": f"cines/RUN_{run_id}.npy",
            "medis_mask_path": f"masks/LES_{lesion_id}{suffix}",
            "medis_contour_path": f"contours/LES_{lesion_id}.json",
        })
    return rows


def _timeline(frames: int, rng: np.random.Generator):
    """Contrast filling, the analysed (end-diastolic, filled) frame and cardiac motion."""
    if frames < 3:
        analysed, fill = frames - 1, (lambda t: 1.0)
    else:
        start, ramp = rng.uniform(0, 0.5), rng.uniform(1.2, 2.0)
        full = int(math.ceil(start + ramp))
        analysed = int(rng.integers(min(full, frames - 1), frames))
        fill = (lambda t: float(np.clip((t - start) / ramp, 0, 1)) ** 2)  # noqa: E731
    period = 60.0 / rng.uniform(60, 85) * 15  # frames per beat at 15 frames/s
    squeeze, breath = rng.uniform(0.05, 0.09), rng.uniform(0.5, 1.5)

    def motion(t: int):
        phase = 2 * np.pi * (t - analysed) / period
        scale = 1 - squeeze * (0.5 - 0.5 * np.cos(phase))
        shift = np.array([0.0, 0.0, breath * np.sin(0.25 * phase)])
        return lambda points: points * scale + shift

    return frames, analysed, fill, motion


def _contour(segment: ProjectedSegment, lesion: Lesion, view: View) -> dict:
    """Contour JSON as QCA software exports it, with the exact phantom truth."""
    a, b = lesion.analysed_start, lesion.analysed_end
    points, radius = segment.points_px, segment.radius_px
    step = max(1, int(round(1.0 / max(np.median(np.linalg.norm(np.diff(points, axis=0), axis=1)),
                                       1e-6))))
    keep = np.arange(a, b + 1, step)
    tangent = np.gradient(points, axis=0)[keep]
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True)
    normal = np.stack([tangent[:, 1], -tangent[:, 0]], axis=1)
    centre = points[keep]
    lesion_path = points[lesion.start_index:lesion.end_index + 1]
    projected_length = float(np.linalg.norm(np.diff(lesion_path, axis=0), axis=1).sum())

    def xy(p) -> list[float]:
        return [round(float(p[0]), 2), round(float(p[1]), 2)]

    return {
        "centerline": [xy(p) for p in centre],
        "left_edge": [xy(p) for p in centre + normal * radius[keep, None]],
        "right_edge": [xy(p) for p in centre - normal * radius[keep, None]],
        "measurements": {
            "MLD_mm": round(lesion.mld_mm, 4),
            "diameter_stenosis_pct": round(lesion.stenosis_pct, 3),
            "lesion_length_mm": round(projected_length / view.px_per_mm, 3),
            "interpolated_RVD_mm": round(lesion.reference_mm, 4),
            "proximal_normal_diameter_mm": round(lesion.proximal_mm, 4),
            "distal_normal_diameter_mm": round(lesion.distal_mm, 4),
            "MLD_position_px": xy(points[lesion.center_index]),
            "lesion_start_px": xy(points[lesion.start_index]),
            "lesion_end_px": xy(points[lesion.end_index]),
            "true_lesion_length_3d_mm": round(lesion.length_mm, 3),
        },
        "calibration": {"scale_factor": round(view.px_per_mm, 6),
                        "catheter_diameter_mm": 2 * CATHETER_RADIUS_MM},
        "view_angles": {"primary": format_primary(view.lao_deg),
                        "secondary": format_secondary(view.cranial_deg)},
    }


def _vessel_text(code: str, phase: str, rng: np.random.Generator, messy: bool) -> str:
    segment = load_taxonomy("CASS").segments[code]
    if code in _TEXT_NAMES:
        words = [str(rng.choice(_TEXT_NAMES[code]))]
    else:
        position = str(rng.choice(_POSITION_WORDS[segment.position])) if messy else \
            _POSITION_WORDS[segment.position][0]
        words = [position, segment.vessel]
        if messy and rng.random() < 0.3:
            words.reverse()
    text = (" " if not messy or rng.random() < 0.6 else "-").join(words)
    if messy and rng.random() < 0.2:
        text += f" {phase.split()[-1]}"
    if messy and rng.random() < 0.5:
        text = text.lower() if rng.random() < 0.5 else text.upper()
    if messy and rng.random() < 0.05:
        text = str(rng.choice(["LESION 1", "see report", ""]))  # unreadable: index falls back
    return text


def _write_manifests(out: Path, rows: list[dict], summary: PhantomSummary) -> None:
    """Two CSVs, column for column the same: one points at the DICOM runs, one at the NPY cines."""
    for name, drop in (("manifest.csv", "cine_path"), ("manifest_npy.csv", "dicom_path")):
        with open(out / name, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            for row in rows:
                writer.writerow({**row, drop: ""})
        summary.manifests.append(name)

