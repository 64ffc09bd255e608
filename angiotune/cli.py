"""The ``angiotune`` command: thin wrappers over the Python API, one call per subcommand.

User errors (``AngiotuneError``) print one clear message and exit with status 2, no traceback.
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from angiotune.errors import AngiotuneError

# Wide enough for the tables when output goes to a file or a pipe (rich assumes 80 there).
console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
out = Console(width=None if sys.stdout.isatty() else 160)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="angiotune")
def cli() -> None:
    """Fine-tune SAM 3 on coronary angiography lesions: phantoms, index, search, best,
    evaluate, predict."""


@cli.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--lesions", default=40, show_default=True, help="Number of lesions (CSV rows).")
@click.option("--size", default=512, show_default=True, help="Frame side in pixels (1016 real).")
@click.option("--frames", default=6, show_default=True, help="Frames per cine run.")
@click.option("--seed", default=0, show_default=True)
@click.option("--tidy", is_flag=True, help="No deliberate export mess (free-text vessel names, "
              "missing CSV angles, compressed DICOM, rescaled masks, a duplicate row).")
def phantoms(out_dir: Path, lesions: int, size: int, frames: int, seed: int, tidy: bool) -> None:
    """Write synthetic angiography phantoms (DICOM + NPY, masks, contours, CSV) to OUT_DIR."""
    from angiotune.data.phantoms import PhantomSettings, generate_phantoms

    try:
        settings = PhantomSettings(lesions=lesions, size=size, frames=frames, seed=seed,
                                   messy=not tidy)
    except ValueError as error:
        raise AngiotuneError(str(error)) from None
    with _progress() as progress:
        task = progress.add_task("rendering cine runs", total=None)
        summary = generate_phantoms(out_dir, settings, on_run=lambda done, total:
                                    progress.update(task, completed=done, total=total))
    out.print(f"Wrote {summary.lesions} lesions of {summary.patients} synthetic patients "
              f"({summary.runs} cine runs, {size}x{size} px, {frames} frames) to {out_dir}")
    out.print(f"Manifests: {', '.join(str(out_dir / m) for m in summary.manifests)}")
    out.print("These are phantoms with exact truth for testing; they are not clinical data.")


@cli.command()
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Parquet index to write; the quarantine CSV goes beside it.")
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path),
              help="Folder the CSV's paths are relative to (default: the CSV's folder). "
                   "Paths outside it are refused.")
@click.option("--taxonomy", default="CASS", show_default=True,
              help="CASS, SYNTAX, or a taxonomy YAML file.")
@click.option("--strict", is_flag=True, help="Fail on the first bad row instead of quarantining.")
@click.option("--seed", "split_seed", default=0, show_default=True, help="Split seed.")
def index(manifest: Path, out_path: Path, data_root: Path | None, taxonomy: str, strict: bool,
          split_seed: int) -> None:
    """Validate a core-lab CSV MANIFEST into a Parquet lesion index with patient-level splits.

    Patient IDs become salted keys (salt from ANGIOTUNE_SALT or ~/.angiotune/salt).
    """
    from angiotune.data.ingest import IndexSettings, build_index

    settings = IndexSettings(data_root=data_root, taxonomy=taxonomy, strict=strict,
                             split_seed=split_seed)
    with _progress() as progress:
        task = progress.add_task("checking rows", total=None)
        report = build_index(manifest, out_path, settings, on_row=lambda done, total:
                             progress.update(task, completed=done, total=total))
    for note in report.notes:
        console.print(f"[yellow]note:[/] {note}")
    _print_index_summary(report)


def _print_index_summary(report) -> None:
    frame = report.index
    table = Table(title=f"Lesion index {report.out}")
    table.add_column("vessel")
    for split in ("train", "val", "test"):
        table.add_column(split, justify="right")
    table.add_column("all", justify="right")
    for vessel, group in frame.groupby("vessel"):
        counts = group["split"].value_counts()
        table.add_row(vessel, *(str(counts.get(s, 0)) for s in ("train", "val", "test")),
                      str(len(group)))
    out.print(table)
    out.print(f"rows read {report.rows_read}, indexed {len(frame)} "
              f"({frame['patient_key'].nunique()} patients), quarantined "
              f"{len(report.quarantined)}, warnings {len(report.warnings)}")
    if report.quarantined:
        reasons = Counter(f"{p.field}: {p.reason.split(' (')[0]}" for p in report.quarantined)
        quarantine = Table(title=f"Quarantined rows (details in {report.quarantine_path})")
        quarantine.add_column("rows", justify="right")
        quarantine.add_column("field: reason")
        for reason, count in reasons.most_common():
            quarantine.add_row(str(count), reason)
        out.print(quarantine)
    for warning in report.warnings[:10]:
        console.print(f"[yellow]warning:[/] row {warning.row} {warning.field}: {warning.reason}")
    if len(report.warnings) > 10:
        console.print(f"[yellow]… {len(report.warnings) - 10} more warnings in the index's "
                      "'warnings' column[/]")


@cli.command()
@click.option("--space", "space_file", required=True,
              help="Search space YAML (a path, or a file name in search_spaces/).")
@click.option("--data", type=click.Path(dir_okay=False, path_type=Path),
              help="Lesion index (Parquet). Default: the embedded phantoms.")
@click.option("--model", type=click.Path(path_type=Path),
              help="Local SAM 3 folder (Hugging Face layout). Default: the embedded tiny model.")
@click.option("--name", help="Search name (default: the space's name).")
@click.option("--results", type=click.Path(file_okay=False, path_type=Path),
              default=Path("results"), show_default=True)
@click.option("--address", help="Join an existing Ray cluster (e.g. 127.0.0.1:6379 or auto).")
@click.option("--resume", is_flag=True, help="Continue an interrupted search of the same name.")
@click.option("--keep-below-zero-shot", is_flag=True,
              help="Keep a vessel's best adapter even when it does not beat the zero-shot base "
                   "(marked so in best and predict); by default it is not kept.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override the space, validated like the file: samples=40, epochs=10, "
                   "data.batch_size=2, resources.gpus_per_worker=1, fixed.rank=8. Repeatable.")
def search(space_file: str, data: Path | None, model: Path | None, name: str | None,
           results: Path, address: str | None, resume: bool, keep_below_zero_shot: bool,
           overrides: tuple[str, ...]) -> None:
    """Search adapter hyperparameters with Ray Tune + Optuna + ASHA; keep the best per vessel."""
    from angiotune.search import load_space
    from angiotune.search import search as run

    space = load_space(space_file, overrides)
    what = ("embedded synthetic phantoms and the embedded tiny SAM 3 model (a demonstration, "
            "not a clinical result)" if data is None and model is None else
            f"index {data or 'embedded phantoms'}, model {model or 'embedded tiny SAM 3'}")
    out.print(f"Search {name or space.name}: {space.samples} trials of {space.epochs} epochs on "
              f"{what}")
    outcome = run(space, data=data, model=model, name=name, results=results, address=address,
                  resume=resume, announce=out.print,
                  keep_below_zero_shot=keep_below_zero_shot)
    out.print(f"{outcome.trials} trials ({outcome.errors} errors, {len(outcome.failed)} failed); "
              f"Optuna study: sqlite:///{outcome.run_dir / 'optuna.db'} (optuna-dashboard can "
              "open it)")
    for failure in outcome.failed:
        out.print(f"trial {failure['trial_id']} failed: {failure['reason']}", soft_wrap=True)
    zero = outcome.zero_shot.get("dice", float("nan"))
    out.print(f"Zero-shot base on validation: Dice {zero:.3f}")
    if outcome.pareto:
        _print_pareto(outcome.pareto, outcome.run_dir / "pareto.json")
    for message in outcome.messages:
        out.print(message)
    _print_best_table(results)
    out.print(f"Plots of this search: angiotune report {outcome.name}"
              + ("" if results == Path("results") else f" --results {results}"))


def _print_pareto(front: list[dict], path: Path) -> None:
    metrics = [key for key in front[0] if key not in ("trial", "params")]
    table = Table(title=f"Pareto front (validation; also in {path})")
    for column in ("trial", *metrics, "parameters"):
        table.add_column(column)
    for point in front:
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in point["params"].items())
        table.add_row(str(point["trial"]), *(f"{point[m]:.3f}" for m in metrics), params)
    out.print(table)


@cli.command()
@click.option("--vessel", type=click.Choice(["RCA", "LAD", "LCX"], case_sensitive=False))
@click.option("--all", "show_all", is_flag=True, help="A table of every vessel.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--results", type=click.Path(file_okay=False, path_type=Path),
              default=Path("results"), show_default=True)
def best(vessel: str | None, show_all: bool, as_json: bool, results: Path) -> None:
    """Show the kept adapter for a vessel (or --all)."""
    import json

    from angiotune.registry.store import list_entries, read_entry

    if not vessel and not show_all:
        raise AngiotuneError("give --vessel RCA|LAD|LCX or --all")
    entries = list_entries(results) if show_all else {vessel.upper():
                                                      read_entry(results, vessel.upper())}
    if as_json:
        out.print_json(json.dumps(entries if show_all else entries[vessel.upper()]))
        return
    if not show_all and entries[vessel.upper()] is None:
        raise AngiotuneError(f"no adapter kept for {vessel.upper()} in {results}/best; run "
                             "`angiotune search` first")
    _print_best_table(results, entries)


def _print_best_table(results: Path, entries: dict | None = None) -> None:
    from angiotune.registry.store import STAGE_NAMES, list_entries

    entries = entries if entries is not None else list_entries(results)
    table = Table(title=f"Best adapters in {results}/best (score: the registry's metric, "
                  "e.g. dice/LAD, on the validation split)")
    for column in ("vessel", "stage", "strategy", "score", "zero-shot", "IoU", "heads", "prompt",
                   "rank", "targets", "lr", "trial"):
        table.add_column(column, no_wrap=True)
    nan = float("nan")
    for vessel, entry in entries.items():
        if entry is None:
            table.add_row(vessel, *["-"] * 11)
            continue
        config, metrics = entry["config"], entry["metrics"]
        table.add_row(vessel, str(entry.get("stage", 1)),
                      str(entry.get("strategy", config.get("strategy"))), f"{entry['score']:.3f}",
                      f"{entry['zero_shot'].get(entry['metric'], nan):.3f}",
                      f"{metrics.get(f'iou/{vessel}', nan):.3f}",
                      "yes" if entry.get("heads") else "no",
                      str(entry.get("prompt_mode", "box")), str(config.get("rank", "-")),
                      str(config.get("targets", "-")), f"{config.get('lr', nan):.2g}",
                      str(entry.get("trial_id")))
    out.print(table)
    for vessel, entry in entries.items():
        if entry is None:
            continue
        stage = STAGE_NAMES.get(entry.get("stage", 1), "stage ?")
        zero = entry["zero_shot"].get(entry["metric"], nan)
        line = (f"{vessel}: {stage} ({entry.get('strategy', '-')}) won with {entry['metric']} "
                f"{entry['score']:.3f}, {entry['score'] - zero:+.3f} over the zero-shot base")
        if entry.get("below_zero_shot"):
            line += " [bold red](below the zero-shot base: kept with --keep-below-zero-shot)[/]"
        replaced = entry.get("replaced")
        if replaced:
            line += (f", {entry['score'] - replaced['score']:+.3f} over the "
                     f"{STAGE_NAMES.get(replaced.get('stage') or 1)} adapter it replaced")
        out.print(line + f"; {entry['path']}", soft_wrap=True)


@cli.command()
@click.argument("name")
@click.option("--results", type=click.Path(file_okay=False, path_type=Path),
              default=Path("results"), show_default=True)
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the page (default: the search's folder, report.html).")
def report(name: str, results: Path, out_path: Path | None) -> None:
    """Write one HTML page about search NAME: optimisation history, parameter importances,
    parallel coordinates, learning curves, a per-vessel leaderboard and the best masks."""
    from angiotune.report import write_report

    with _progress() as progress:
        progress.add_task("drawing the report", total=None)
        path = write_report(results, name, out_path)
    out.print(f"Report written to {path} (self-contained: open it in any browser)")


@cli.command()
@click.option("--vessel", type=click.Choice(["RCA", "LAD", "LCX"], case_sensitive=False),
              help="One vessel (default: every kept adapter).")
@click.option("--results", type=click.Path(file_okay=False, path_type=Path),
              default=Path("results"), show_default=True)
@click.option("--model", type=click.Path(path_type=Path),
              help="The SAM 3 folder the adapters were trained on, when it has moved since the "
                   "search (checked by its weights, not its path).")
def evaluate(vessel: str | None, results: Path, model: Path | None) -> None:
    """Score the kept adapters on the held-out test split, beside zero-shot and trivial
    baselines, per vessel and per CASS segment."""
    from angiotune.registry.evaluate import COLUMNS, evaluate_kept, format_cell, model_label
    from angiotune.registry.store import list_entries

    vessel = vessel.upper() if vessel else None
    with _progress() as progress:
        progress.add_task("scoring the test split", total=None)
        frame = evaluate_kept(results, vessel, model=model)
    table = Table(title="Test split (never used for selection)")
    for column in ("vessel", "segment", "model", *COLUMNS):
        table.add_column(column, no_wrap=True, justify="left" if column in
                         ("vessel", "segment", "model") else "right")
    previous = None
    for row in frame.to_dict("records"):
        if previous is not None and (row["vessel"], row["segment"]) != previous:
            table.add_section()
        previous = (row["vessel"], row["segment"])
        table.add_row(row["vessel"], row["segment"], model_label(row),
                      *(format_cell(row[c], c) for c in COLUMNS))
    out.print(table)
    name = f"test_metrics{'_' + vessel if vessel else ''}"
    out.print(f"Written to {results / 'evaluation' / name}.csv (and .md, .json)")
    notes = {e.get("data_note") for e in list_entries(results).values() if e}
    if any(note and "phantoms" in note for note in notes):
        out.print("These are scores on synthetic phantoms with the embedded tiny model: they "
                  "test the software, not clinical accuracy.")


def _box_option(_ctx, _param, value: str | None):
    if value is None:
        return None
    try:
        box = tuple(float(v) for v in value.split(","))
    except ValueError:
        box = ()
    if len(box) != 4:
        raise click.BadParameter(f"expected x0,y0,x1,y1 in frame pixels, got {value!r}")
    return box


def _angles_option(_ctx, _param, value: str | None):
    """"RAO 30, CAUDAL 25" -> (-30.0, -25.0): labelled, so no sign convention to get wrong."""
    if value is None:
        return None
    from angiotune.data.angles import parse_primary, parse_secondary

    parts = [p.strip() for p in value.split(",")]
    angles = (parse_primary(parts[0]), parse_secondary(parts[1])) if len(parts) == 2 else None
    if angles is None or None in angles:
        raise click.BadParameter(f"expected e.g. 'LAO 45, CRANIAL 20' or 'RAO 30, CAUDAL 25', "
                                 f"got {value!r}")
    return angles


@cli.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("predictions"), show_default=True,
              help="Folder for one JSON and one overlay PNG per lesion.")
@click.option("--box", callback=_box_option, help="Lesion box x0,y0,x1,y1 in frame pixels "
              "(default: proposals where the segmented vessel narrows).")
@click.option("--frame", type=int, help="Frame to analyse (default: the frame with the most "
              "contrast in the arteries).")
@click.option("--vessel", type=click.Choice(["RCA", "LAD", "LCX"], case_sensitive=False),
              help="Use this vessel's adapter (default: chosen from the view angles).")
@click.option("--angles", callback=_angles_option, help="View angles when the file has none "
              "or they are wrong, labelled: 'LAO 45, CRANIAL 20', 'RAO 30, CAUDAL 25'.")
@click.option("--pixel-spacing", type=float, help="mm per pixel at the vessel (overrides "
              "the DICOM header).")
@click.option("--calibration", type=float, help="Catheter calibration in pixels per mm "
              "(overrides everything else).")
@click.option("--max-proposals", default=3, show_default=True, type=click.IntRange(min=1),
              help="Lesions to propose per cine when no box is given.")
@click.option("--no-overlay", is_flag=True, help="JSON only.")
@click.option("--device", default="auto", show_default=True,
              help="cpu, cuda, cuda:1, ...; auto takes the GPU when there is one.")
@click.option("--results", type=click.Path(file_okay=False, path_type=Path),
              default=Path("results"), show_default=True, help="Where the kept adapters are.")
@click.option("--model", type=click.Path(path_type=Path),
              help="The SAM 3 folder the adapters were trained on, when it has moved since the "
                   "search (checked by its weights, not its path).")
def predict(source: Path, out_dir: Path, box, frame: int | None, vessel: str | None, angles,
            pixel_spacing: float | None, calibration: float | None, max_proposals: int,
            no_overlay: bool, device: str, results: Path, model: Path | None) -> None:
    """Segment and measure the lesions of SOURCE: a DICOM or NPY cine, a folder of them, or a
    lesion index (Parquet), with the kept adapter of the vessel in view."""
    from angiotune.predict import PredictSettings
    from angiotune.predict import predict as run_predict

    for name, value in (("--pixel-spacing", pixel_spacing), ("--calibration", calibration)):
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise AngiotuneError(f"{name} must be a positive number, got {value}")
    settings = PredictSettings(results=results, vessel=vessel.upper() if vessel else None,
                               frame=frame, box=box, angles=angles,
                               pixel_spacing_mm=pixel_spacing,
                               calibration_px_per_mm=calibration, max_proposals=max_proposals,
                               overlays=not no_overlay, device=device, model=model)
    with _progress() as progress:
        task = progress.add_task("predicting", total=None)
        summary = run_predict(source, out_dir, settings, on_item=lambda done, total:
                              progress.update(task, completed=done, total=total))
    table = Table(title=f"Lesions measured (QCA from the mask; heads beside it) in {out_dir}")
    for column in ("lesion", "vessel", "box", "MLD mm", "RVD mm", "DS %", "length mm",
                   "heads DS %", "heads MLD mm"):
        table.add_column(column, no_wrap=True)
    for lesion in summary.lesions:
        report, heads = lesion.report, lesion.report.get("heads") or {}
        qca = report["qca"]
        table.add_row(lesion.key, report["adapter"]["vessel"], report["box_source"].split()[0],
                      *(_cell(qca.get(k)) for k in ("MLD_mm", "interpolated_RVD_mm",
                                                    "diameter_stenosis_pct", "lesion_length_mm")),
                      _cell(heads.get("diameter_stenosis_pct")), _cell(heads.get("MLD_mm")))
    if summary.lesions:
        out.print(table)
    for key, given in summary.inputs.items():  # the terminal only: paths may carry IDs
        out.print(f"{key} = {given}", soft_wrap=True, highlight=False)
    if len(summary.lesions) <= 3:
        for lesion in summary.lesions:
            out.print(f"{lesion.key}: {lesion.report['routing']['reason']}", soft_wrap=True)
    for failure in summary.failures:
        console.print(f"[yellow]skipped[/] {failure['input']}: {failure['error']}",
                      highlight=False)
    below = sorted({lesion.report["adapter"]["vessel"] for lesion in summary.lesions
                    if lesion.report["adapter"].get("below_zero_shot")})
    if below:
        console.print(f"[bold red]warning:[/] the {', '.join(below)} adapter(s) scored below the "
                      "zero-shot base in validation (kept with --keep-below-zero-shot)")
    if summary.lesions:
        what = summary.lesions[0].report["what"]
        out.print(what[0].upper() + what[1:] + ".")
    else:
        raise AngiotuneError("no lesion could be measured (see the messages above)")


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"


def main(argv: list[str] | None = None) -> int:
    try:
        cli.main(args=argv, standalone_mode=False, prog_name="angiotune")
    except AngiotuneError as error:
        console.print(f"[bold red]error:[/] {error}", highlight=False)
        return 2
    except click.exceptions.Abort:
        console.print("aborted")
        return 130
    except click.ClickException as error:
        error.show()
        return error.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
