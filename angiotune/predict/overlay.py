"""The overlay picture of one measured lesion, laid out as QCA software shows it.

Top left: the whole frame with the box. Top right: the lesion enlarged, with the model's mask
outline (orange), the lumen edges QCA found on it (yellow), the centerline (cyan; green along the
healthy reference segments), the MLD (red) and the lesion's ends (green). Bottom: the numbers,
the adapter and why it was chosen, and the diameter function along the segment with its
interpolated reference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

PANEL = 512
FOOTER = 250
EDGE, CENTRE, MLD, ENDS, BOX, REFERENCE, MASK = ("#ffd400", "#00d7ff", "#ff3030", "#30e060",
                                                 "#ff9a00", "#30e060", "#ff7a00")


def write_overlay(lesion, path: Path) -> Path:
    """Draw ``lesion`` (a ``LesionPrediction``) to ``path`` as PNG."""
    draw_overlay(lesion).save(path)
    return path


def draw_overlay(lesion) -> Image.Image:
    """The overlay picture of ``lesion`` (also the pixels of its DICOM Secondary Capture)."""
    report, frame, qca = lesion.report, lesion.frame, lesion.qca
    canvas = Image.new("RGB", (2 * PANEL + 24, PANEL + FOOTER), "#101010")
    draw = ImageDraw.Draw(canvas)
    font = _font(14)
    box = np.asarray(report["box"], dtype=float)

    overview, scale = _grey(frame, (0, 0, frame.shape[1], frame.shape[0]))
    canvas.paste(overview, (0, 0))
    draw.rectangle(list(box * scale), outline=BOX, width=2)
    _label(draw, (6, 4), f"frame {report['input']['frame']}  "
           f"{_angles(report['input']['angles'])}", font)

    region = _zoom_region(box, frame.shape)
    zoomed, zoom = _grey(frame, region)
    origin = np.array([PANEL + 24, 0])
    canvas.paste(zoomed, tuple(origin))

    def to_zoom(points):
        return [tuple(origin + (np.asarray(p) - region[:2] + 0.5) * zoom) for p in points]

    if lesion.segmentation is not None:
        mask = lesion.segmentation.mask
        outline = np.argwhere(mask & ~ndimage.binary_erosion(mask))[:, ::-1]
        half = max(zoom / 4, 1.0)
        for x, y in to_zoom(outline):
            draw.rectangle([x - half, y - half, x + half, y + half], fill=MASK)
    if qca is not None:
        draw.line(to_zoom(qca.left_edge_px), fill=EDGE, width=2)
        draw.line(to_zoom(qca.right_edge_px), fill=EDGE, width=2)
        draw.line(to_zoom(qca.centerline_px), fill=CENTRE, width=1)
        for start, end in _runs(qca.healthy):
            draw.line(to_zoom(qca.centerline_px[start:end]), fill=REFERENCE, width=3)
        for index, colour in ((qca.lesion_start, ENDS), (qca.lesion_end, ENDS),
                              (qca.mld_index, MLD)):
            draw.line(to_zoom([qca.left_edge_px[index], qca.right_edge_px[index]]),
                      fill=colour, width=3)
        tip = to_zoom([qca.left_edge_px[qca.mld_index]])[0]
        _label(draw, (tip[0] + 6, tip[1] - 8), "MLD", font, MLD)
    else:
        _label(draw, tuple(origin + 8), "not measurable: " + report["qca"]["error"], font, MLD)

    _label(draw, tuple(origin + [6, 4]), "orange: model mask  yellow: QCA edges  green: reference "
           "segments  red: MLD", font)
    _footer_text(draw, report, (8, PANEL + 8), font)
    if qca is not None:
        _diameter_plot(draw, qca, (PANEL + 24, PANEL + 12, 2 * PANEL + 14, PANEL + FOOTER - 14),
                       font, report.get("units", "mm"))
    return canvas


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow before 10.1: one fixed bitmap size
        return ImageFont.load_default()


def _grey(frame: np.ndarray, region) -> tuple[Image.Image, float]:
    """The region (x0, y0, x1, y1) of the frame as a PANEL-wide picture, and its scale."""
    x0, y0, x1, y1 = (int(round(v)) for v in region)
    crop = frame[max(y0, 0):y1, max(x0, 0):x1]
    low, high = np.percentile(crop, [1, 99.5])
    grey = np.clip((crop - low) / max(high - low, 1e-6), 0, 1)
    scale = PANEL / max(x1 - x0, y1 - y0)
    image = Image.fromarray((grey * 255).astype(np.uint8)).convert("RGB")
    return image.resize((int(round(image.width * scale)), int(round(image.height * scale))),
                        Image.BILINEAR), scale


def _zoom_region(box: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A square around the box with a quarter of margin, inside the frame."""
    side = 1.25 * max(box[2] - box[0], box[3] - box[1], 24)
    side = min(side, min(shape))
    centre = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
    side = float(round(side))
    low = np.round(np.clip(centre - side / 2, 0, [shape[1] - side, shape[0] - side]))
    return np.array([low[0], low[1], low[0] + side, low[1] + side])  # whole pixels: the crop


def _footer_text(draw: ImageDraw.ImageDraw, report: dict, at: tuple[int, int], font) -> None:
    q, adapter, heads = report["qca"], report["adapter"], report.get("heads")
    u = report.get("units", "mm")  # "px" without a calibration: the keys say so too
    lines = [f"{adapter['vessel']} adapter (stage {adapter['stage']}, {adapter['strategy']}, "
             f"validation {adapter['validation_metric']} {adapter['validation_score']:.3f})"]
    lines += _wrapped("why: " + report["routing"]["reason"], 74)
    if "error" in q:
        lines.append("QCA: " + q["error"])
    else:
        lines.append(f"QCA   MLD {q[f'MLD_{u}']:.2f} {u}   RVD {q[f'interpolated_RVD_{u}']:.2f} "
                     f"{u}   DS {q['diameter_stenosis_pct']:.0f} %   length "
                     f"{q[f'lesion_length_{u}']:.1f} {u}")
    if heads:
        lines.append(f"heads MLD {heads[f'MLD_{u}']:.2f} {u}   RVD {heads[f'RVD_{u}']:.2f} {u}   "
                     f"DS {heads['diameter_stenosis_pct']:.0f} %   "
                     f"{heads['segment_name']} (p {heads['probability']:.2f})")
    if u == "px":
        lines += _wrapped(report["input"]["calibration"], 74)
    else:
        lines.append(f"{report['input']['pixel_spacing_mm']:.4f} mm/px from "
                     f"{report['input']['spacing_source']}")
    lines += _wrapped(report["what"], 74)
    x, y = at
    for line in lines[:12]:
        draw.text((x, y), line, fill="#e8e8e8", font=font)
        y += 19


def _diameter_plot(draw: ImageDraw.ImageDraw, qca, area, font, unit: str = "mm") -> None:
    """Diameter and reference along the segment; ``unit`` is "px" when measured uncalibrated
    (the QCA's "mm" arrays then hold pixels)."""
    x0, y0, x1, y1 = area
    s, d, ref = qca.arclength_mm, qca.diameter_mm, qca.reference_mm
    top = max(float(d.max()), float(ref.max())) * 1.1

    def xy(si, di):
        return (x0 + 40 + (x1 - x0 - 48) * si / max(float(s[-1]), 1e-6),
                y1 - 20 - (y1 - y0 - 30) * di / top)

    draw.rectangle([xy(s[qca.lesion_start], top)[0], y0, xy(s[qca.lesion_end], 0)[0], y1 - 20],
                   fill="#1d2b1d")
    draw.line([xy(0, 0), xy(s[-1], 0)], fill="#808080")
    draw.line([xy(0, 0), xy(0, top)], fill="#808080")
    draw.line([xy(a, b) for a, b in zip(s, ref, strict=True)], fill=REFERENCE, width=1)
    draw.line([xy(a, b) for a, b in zip(s, d, strict=True)], fill="#f0f0f0", width=2)
    mx, my = xy(s[qca.mld_index], d[qca.mld_index])
    draw.ellipse([mx - 4, my - 4, mx + 4, my + 4], fill=MLD)
    _label(draw, (x0, y0), f"diameter ({unit}) along the segment; green: reference", font)
    _label(draw, (x0 + 4, xy(0, top * 0.9)[1]), f"{top * 0.9:.1f}", font, "#a0a0a0")
    _label(draw, (x1 - 60, y1 - 18), f"{s[-1]:.1f} {unit}", font, "#a0a0a0")


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of each run of True, end exclusive."""
    edges = np.diff(np.concatenate([[0], flags.astype(int), [0]]))
    return list(zip(np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0], strict=True))


def _label(draw, at, text: str, font, colour: str = "#e8e8e8") -> None:
    draw.text(at, text, fill=colour, font=font, stroke_width=2, stroke_fill="#000000")


def _angles(angles: dict | None) -> str:
    return "angles unknown" if not angles else f"{angles['primary']} {angles['secondary']}"


def _wrapped(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + ([line] if line else [])
