"""The report page: one HTML file with everything inlined (plotly.js, PNGs), so it opens from
a laptop, a mail attachment or a cluster's shared disk without a server or internet."""

from __future__ import annotations

import base64
import datetime
import html
import logging
from pathlib import Path

import pandas as pd

from angiotune.registry.store import registry_metric
from angiotune.report.figures import Figure, leaderboard, learning_curves, study_figures
from angiotune.report.overlays import COLOURS, best_mask_overlays
from angiotune.report.records import SearchRecord, read_search

log = logging.getLogger(__name__)
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
.why, .meta { color: #555; } .missing { color: #a33; font-style: italic; }
.note { background: #fff4d6; border-left: 4px solid #e0a800; padding: 0.6em 1em; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.92em; }
th, td { border-bottom: 1px solid #e3e3e3; padding: 0.25em 0.7em; text-align: right; }
th:first-child, td:first-child { text-align: left; } tr.kept td { font-weight: 600; }
tr.baseline td { color: #777; } figure { margin: 0.8em 0; }
figcaption { color: #444; font-size: 0.9em; } .key span { padding: 0 0.6em; font-weight: 600; }
"""


def write_report(results: Path, name: str, out: Path | None = None,
                 overlays_per_vessel: int = 3) -> Path:
    """Write ``results/searches/NAME/report.html`` (or ``out``) and return its path."""
    record = read_search(Path(results), name)
    out = Path(out) if out else record.run_dir / "report.html"
    from plotly.offline import get_plotlyjs

    parts = [_header(record), _plots([*study_figures(record), learning_curves(record)]),
             _leaderboards(record), _overlays(record, overlays_per_vessel)]
    page = ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>angiotune report: {html.escape(name)}</title><style>{STYLE}</style>"
            f"<script>{get_plotlyjs()}</script></head><body>" + "".join(parts)
            + "</body></html>")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out


def _header(record: SearchRecord) -> str:
    summary = record.summary
    note = summary.get("data_note") or "unknown data"
    warning = ("<p class='note'>Run on angiotune's synthetic phantoms: these figures test the "
               "software, not clinical accuracy.</p>" if "phantoms" in note else "")
    zero = summary.get("zero_shot", {})
    baseline = ", ".join(f"{k} {v:.3f}" for k, v in zero.items()
                         if k.split("/")[0] in ("dice", "iou") and "/" not in k)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"<h1>Search <code>{html.escape(record.name)}</code></h1>"
            f"<p class='meta'>Report written {when}. Data: {html.escape(note)}. "
            f"{summary.get('trials', '?')} trials, {summary.get('errors', 0)} errored, "
            f"{len(summary.get('failed', []))} diverged or out of memory. Objective: "
            f"{html.escape(' and '.join(record.objectives))} "
            f"({html.escape(str(record.space.get('mode', 'max')))}). Zero-shot base on the "
            f"validation split: {html.escape(baseline or 'not recorded')}.</p>{warning}")


def _plots(figures: list[Figure]) -> str:
    chunks = []
    for figure in figures:
        chunks.append(f"<section class='plot' id='{figure.key}'><h2>{figure.title}</h2>"
                      f"<p class='why'>{html.escape(figure.why)}</p>")
        if figure.figure is None:
            chunks.append(f"<p class='missing'>Not drawn: {html.escape(figure.missing)}.</p>")
        else:
            chunks.append(figure.figure.to_html(full_html=False, include_plotlyjs=False,
                                                config={"displaylogo": False}))
        chunks.append("</section>")
    return "".join(chunks)


def _leaderboards(record: SearchRecord) -> str:
    boards = leaderboard(record)
    chunks = [f"<section id='leaderboard'><h2>Leaderboard per vessel</h2><p class='why'>Trials "
              f"ranked by their best epoch's validation {record.select} on each vessel's "
              "lesions; the kept one in bold, the zero-shot base below. A trial saves only "
              "its two best epochs by the search's objective, and the registry keeps the best "
              "saved one, so a discarded epoch can rank above it.</p>"]
    if not boards:
        chunks.append("<p class='missing'>Not drawn: no trial reported a per-vessel "
                      f"{html.escape(record.select)}.</p>")
    kept = record.summary.get("best", {})
    zero = record.summary.get("zero_shot", {})
    for vessel, table in boards.items():
        metric = registry_metric(record.select, vessel)
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table.columns)
        body = []
        for row in table.to_dict("records"):
            chosen = kept.get(vessel, {})
            is_kept = (row["trial_id"] == chosen.get("trial_id")
                       and int(row["epoch"]) == int(chosen.get("epoch", -1)))
            cells = "".join(f"<td>{_cell(v)}</td>" for v in row.values())
            body.append(f"<tr class='{'kept' if is_kept else ''}'>{cells}</tr>")
        if metric in zero:
            blank = "<td></td>" * (len(table.columns) - 3)
            body.append(f"<tr class='baseline'><td>zero-shot base</td><td></td>"
                        f"<td>{_cell(zero[metric])}</td>{blank}</tr>")
        chunks.append(f"<h3>{vessel}</h3><table><thead><tr>{head}</tr></thead>"
                      f"<tbody>{''.join(body)}</tbody></table>")
    return "".join(chunks) + "</section>"


def _overlays(record: SearchRecord, count: int) -> str:
    key = "".join(f"<span style='color: rgb{colour}'>{name}</span>"
                  for name, colour in COLOURS.items())
    chunks = ["<section id='overlays'><h2>Masks on validation lesions</h2><p class='why'>The "
              "model's input crop with the analysed segment (truth), the search's best adapter "
              f"for that vessel and the zero-shot base.</p><p class='key'>{key}</p>"]
    if "best" not in record.summary:
        chunks.append("<p class='missing'>Not drawn: this search was run by an older angiotune "
                      "whose summary does not name its best checkpoints.</p>")
    for vessel in record.summary.get("best", {}):
        overlays = best_mask_overlays(record, vessel, count)
        chunks.append(f"<h3>{vessel}</h3>")
        if isinstance(overlays, str):
            chunks.append(f"<p class='missing'>Not drawn: {html.escape(overlays)}.</p>")
            continue
        for item in overlays:
            data = base64.b64encode(item.png).decode("ascii")
            caption = (f"lesion {item.sample_id}, segment {item.segment}: Dice adapter "
                       f"{item.dice_adapter:.3f}, zero-shot {item.dice_zero_shot:.3f}")
            chunks.append(f"<figure><img src='data:image/png;base64,{data}' "
                          f"alt='{html.escape(caption)}'><figcaption>{html.escape(caption)}"
                          "</figcaption></figure>")
    return "".join(chunks) + "</section>"


def _cell(value) -> str:
    if value is None or pd.isna(value):
        return ""
    return f"{value:.4g}" if isinstance(value, float) else html.escape(str(value))
