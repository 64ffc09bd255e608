"""The ``angiotune`` command: thin wrappers over the Python API, one call per subcommand.

User errors (``AngiotuneError``) print one clear message and exit with status 2, no traceback.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from angiotune import jsonio
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
    evaluate, predict, export."""


@cli.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--lesions", default=40, show_default=True, help="Number of lesions (CSV rows).")
@click.option("--size", default=512, show_default=True, help="Frame side in pixels (1016 real).")
@click.option("--frames", default=6, show_default=True, help="Frames per cine run.")
@click.option("--seed", default=0, show_default=True)
@click.option("--shared-views", default=0.3, show_default=True,
              help="Chance that a patient's LAD and LCX lesions share one left injection, and "
              "that a run is filmed in a neighbouring vessel's view (0: each in its own).")
@click.option("--tidy", is_flag=True, help="No deliberate export mess (free-text vessel names, "
              "missing CSV angles, compressed DICOM, rescaled masks, a duplicate row).")
def phantoms(out_dir: Path, lesions: int, size: int, frames: int, seed: int,
             shared_views: float, tidy: bool) -> None:
    """Write synthetic angiography phantoms (DICOM + NPY, masks, contours, CSV) to OUT_DIR."""
    from angiotune.data.phantoms import PhantomSettings, generate_phantoms

    try:
        settings = PhantomSettings(lesions=lesions, size=size, frames=frames, seed=seed,
                                   messy=not tidy, shared_views=shared_views)
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
@click.argument("manifest", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Parquet index to write; the quarantine CSV goes beside it.")
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path),
              help="Folder the CSV's paths are relative to (default: the CSV's folder). "
                   "Paths outside it are refused.")
@click.option("--taxonomy", default="CASS", show_default=True,
              help="CASS, SYNTAX, or a taxonomy YAML file (CSV manifests).")
@click.option("--coco", "coco_files", multiple=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="A COCO annotation file instead of a CSV (repeatable); its images are split "
                   "by image with --fractions.")
@click.option("--coco-val", "coco_val", multiple=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="A COCO file whose every image goes to the validation split (repeatable).")
@click.option("--coco-test", "coco_test", multiple=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="A COCO file whose every image goes to the test split (repeatable).")
@click.option("--images", "images_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder the COCO file_names are relative to (default: images/ beside the "
                   "file's annotations/ folder, or the file's folder).")
@click.option("--categories", default="ARCADE", show_default=True,
              help="COCO category map: ARCADE, or a YAML file (name, taxonomy, categories).")
@click.option("--fractions", help="Train,val,test fractions for images split by image "
              "(default 0.7,0.15,0.15; 0.85,0.15,0 when a --coco-test file is given).")
@click.option("--strict", is_flag=True, help="Fail on the first bad row instead of quarantining.")
@click.option("--seed", "split_seed", default=0, show_default=True, help="Split seed.")
@click.option("--vessel-tree/--no-vessel-tree", default=True, show_default=True,
              help="Trace each frame's vessel tree for the segment head (most of the indexing "
                   "time); without it the heads name segments from the view and calibre.")
def index(manifest: Path | None, out_path: Path, data_root: Path | None, taxonomy: str,
          coco_files: tuple[Path, ...], coco_val: tuple[Path, ...],
          coco_test: tuple[Path, ...], images_dir: Path | None, categories: str,
          fractions: str | None, strict: bool, split_seed: int, vessel_tree: bool) -> None:
    """Validate a core-lab CSV MANIFEST (or COCO files: --coco) into a Parquet lesion index.

    A CSV is split by patient; patient IDs become salted keys (salt from ANGIOTUNE_SALT or
    ~/.angiotune/salt). COCO files carry no patients and no calibration: they are split by
    image, and the millimetre fields stay empty.
    """
    coco = [*((p, None) for p in coco_files), *((p, "val") for p in coco_val),
            *((p, "test") for p in coco_test)]
    if bool(manifest) == bool(coco):
        raise AngiotuneError("give either a CSV MANIFEST or COCO files (--coco, --coco-val, "
                             "--coco-test), not both or neither")
    if coco and data_root:
        raise AngiotuneError("--data-root is for CSV manifests; COCO images are found beside "
                             "their file, or give --images DIR")
    if manifest and images_dir:
        raise AngiotuneError("--images is for COCO files; a CSV's paths are relative to its "
                             "folder or --data-root")
    if manifest and categories.upper() != "ARCADE":
        raise AngiotuneError("--categories maps COCO categories; a CSV names its segments in "
                             "--taxonomy")
    if coco and taxonomy.upper() != "CASS":
        raise AngiotuneError("--taxonomy is for CSV manifests; a COCO file's segments follow "
                             "its category map (--categories), which names the taxonomy")
    split_fractions = _fractions(fractions) if fractions else None
    with _progress() as progress:
        task = progress.add_task("checking rows" if manifest else "checking annotations",
                                 total=None)

        def advance(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        if manifest:
            from angiotune.data.ingest import IndexSettings, build_index

            settings = IndexSettings(data_root=data_root, taxonomy=taxonomy, strict=strict,
                                     split_seed=split_seed, vessel_tree=vessel_tree,
                                     **({"split_fractions": split_fractions}
                                        if split_fractions else {}))
            report = build_index(manifest, out_path, settings, on_row=advance)
        else:
            from angiotune.data.coco import CocoSettings, CocoSource, build_coco_index

            sources = [CocoSource(path, split, images_dir) for path, split in coco]
            report = build_coco_index(sources, out_path, CocoSettings(
                categories=categories, strict=strict, split_fractions=split_fractions,
                split_seed=split_seed, vessel_tree=vessel_tree), on_row=advance)
    for note in report.notes:
        console.print(f"[yellow]note:[/] {note}")
    _print_index_summary(report)


def _fractions(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or any(v < 0 for v in values) or abs(sum(values) - 1) > 1e-6:
        raise AngiotuneError(f"--fractions {text!r}: give three non-negative numbers that sum "
                             "to 1, e.g. 0.85,0.15,0")
    return values  # type: ignore[return-value]


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
    read = "rows" if report.unit == "patient" else "annotations"
    out.print(f"{read} read {report.rows_read}, indexed {len(frame)} "
              f"({frame['patient_key'].nunique()} {report.unit}s), quarantined "
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
                   "data.batch_size=2, resources.gpus_per_worker=1, fixed.rank=8; trackers: "
                   "callbacks.mlflow={}, callbacks.wandb.mode=offline. Repeatable.")
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
    out.print(f"Zero-shot base on validation: Dice {zero:.3f}"
              + (" (an earlier search's, on the same lesions, weights and sizes)"
                 if outcome.zero_shot_reused else ""))
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


def _entry_key(_ctx, _param, value: str | None) -> str | None:
    """RCA/LAD/LCX in capitals, ``general`` as the registry spells it."""
    if value is None:
        return None
    return "general" if value.lower() == "general" else value.upper()


@cli.command()
@click.option("--vessel", type=click.Choice(["RCA", "LAD", "LCX", "general"],
                                            case_sensitive=False), callback=_entry_key,
              help="A vessel's adapter, or general: the best over every vessel (the one "
                   "data without vessels, such as ARCADE stenosis, keeps).")
@click.option("--all", "show_all", is_flag=True, help="A table of every entry.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--results", type=click.Path(file_okay=False, path_type=Path),
              default=Path("results"), show_default=True)
def best(vessel: str | None, show_all: bool, as_json: bool, results: Path) -> None:
    """Show the kept adapter for a vessel (or --all)."""

    from angiotune.registry.store import list_entries, read_entry

    if not vessel and not show_all:
        raise AngiotuneError("give --vessel RCA|LAD|LCX|general or --all")
    entries = list_entries(results) if show_all else {vessel: read_entry(results, vessel)}
    if as_json:
        out.print_json(jsonio.dumps(entries if show_all else entries[vessel]))
        return
    if not show_all and entries[vessel] is None:
        raise AngiotuneError(f"no {vessel} adapter kept in {results}/best; run "
                             "`angiotune search` first")
    _print_best_table(results, entries)


def _iou_key(entry: dict) -> str:
    """The IoU beside an entry's registry metric: iou/LAD for dice/LAD, iou for dice."""
    _, slash, group = entry["metric"].partition("/")
    return f"iou{slash}{group}"


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
                      f"{metrics.get(_iou_key(entry), nan):.3f}",
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
        _print_student(results, vessel)


def _print_student(results: Path, vessel: str) -> None:
    """The distilled student kept beside a vessel's adapter, when there is one."""
    from angiotune.registry.store import RegistryError
    from angiotune.registry.students import read_student

    try:
        student = read_student(results, vessel)
    except RegistryError as error:  # one damaged student must not hide the other entries
        out.print(f"  student: [bold red]damaged[/] ({error})", soft_wrap=True)
        return
    if student is None:
        return
    test, encoder = student.get("test", {}), student.get("encoder", {})
    stale = (" [bold red](stale: its teacher has since been replaced; distil again)[/]"
             if student["stale"] else "")
    out.print(f"  student: {encoder.get('blocks')} blocks x {encoder.get('hidden_size')} at "
              f"{encoder.get('image_size')} px, test Dice {_share(test.get('dice'))} (teacher "
              f"{_share(test.get('teacher_dice'))}), agreement {_share(test.get('agreement'))}"
              f"{stale}", soft_wrap=True)


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
@click.option("--vessel", type=click.Choice(["RCA", "LAD", "LCX", "general"],
                                            case_sensitive=False), callback=_entry_key,
              help="One registry entry: a vessel's, or general (scored on every test lesion). "
                   "Default: every kept adapter.")
@click.option("--results", type=click.Path(file_okay=False, path_type=Path),
              default=Path("results"), show_default=True)
@click.option("--model", type=click.Path(path_type=Path),
              help="The SAM 3 folder the adapters were trained on, when it has moved since the "
                   "search (checked by its weights, not its path).")
@click.option("--max-proposals", default=3, show_default=True, type=click.IntRange(min=1),
              help="Lesion proposals per test frame for the detection score.")
@click.option("--match-iou", type=click.FloatRange(0, 1, min_open=True),
              help="Box IoU at which a proposal matches an annotated lesion (default 0.25).")
@click.option("--data", type=click.Path(dir_okay=False, path_type=Path),
              help="Score on this index's test split instead of the one each adapter was "
                   "searched on (transfer, e.g. phantom-trained adapters on ARCADE).")
def evaluate(vessel: str | None, results: Path, model: Path | None, max_proposals: int,
             match_iou: float | None, data: Path | None) -> None:
    """Score the kept adapters on the held-out test split, beside zero-shot and trivial
    baselines, per vessel and per CASS segment; and how well the model-free lesion proposals
    find the annotated lesions of the test frames."""
    from angiotune.evaluation.detection import (
        ARCADE_NOTE,
        DETECTION_COLUMNS,
        detection_cell,
        evaluate_detection,
    )
    from angiotune.evaluation.test_split import (
        COLUMNS,
        evaluate_kept,
        format_cell,
        model_label,
        output_name,
    )
    from angiotune.predict.detection import DEFAULT_IOU_THRESHOLD, RULE
    from angiotune.registry.store import list_entries

    match_iou = DEFAULT_IOU_THRESHOLD if match_iou is None else match_iou
    with _progress() as progress:
        progress.add_task("scoring the test split", total=None)
        frame = evaluate_kept(results, vessel, model=model, data=data)
        progress.add_task("proposing lesions on the test frames", total=None)
        detection = evaluate_detection(results, vessel, max_proposals, match_iou, data)
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
    for note in frame.attrs.get("notes", []):
        out.print(f"note: {note}", soft_wrap=True, highlight=False)
    out.print(f"Written to {results / 'evaluation' / output_name('test_metrics', vessel, data)}"
              ".csv (and .md, .json)")
    found = Table(title="Lesion detection on the test frames: model-free proposals against the "
                  "annotated boxes (no adapter involved)")
    for column in ("index", "vessels", *DETECTION_COLUMNS):
        found.add_column(column, no_wrap=True, justify="left" if column in
                         ("index", "vessels") else "right")
    for row in detection.to_dict("records"):
        found.add_row(str(row["index"]), str(row["vessels"]),
                      *(detection_cell(row[c], c) for c in DETECTION_COLUMNS))
    out.print(found)
    out.print(f"Matching: {RULE.format(threshold=match_iou)}.", soft_wrap=True, highlight=False)
    out.print(ARCADE_NOTE, soft_wrap=True, highlight=False)
    out.print(f"Written to {results / 'evaluation' / output_name('detection', vessel, data)}"
              ".json (and .md)")
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


def _kept_adapters_options(command):
    """--results and --model, for the commands that load kept adapters."""
    command = click.option(
        "--model", type=click.Path(path_type=Path),
        help="The SAM 3 folder the adapters were trained on, when it has moved since the "
             "search (checked by its weights, not its path).")(command)
    return click.option("--results", type=click.Path(file_okay=False, path_type=Path),
                        default=Path("results"), show_default=True,
                        help="Where the kept adapters are.")(command)


@cli.command()
@click.option("--space", "space_file", default="distill.yaml", show_default=True,
              help="Distillation space YAML (stage: distill; a path, or a file name in "
                   "search_spaces/).")
@click.option("--vessel", "vessels", multiple=True,
              type=click.Choice(["RCA", "LAD", "LCX", "general"], case_sensitive=False),
              help="Distil this kept model (repeatable; default: every kept box-prompt model).")
@_kept_adapters_options
@click.option("--name", help="Run name (default: the space's name).")
@click.option("--address", help="Join an existing Ray cluster (e.g. 127.0.0.1:6379 or auto).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run of the same name.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override the space, validated like the file: samples=12, epochs=20, "
                   "fixed.frames_per_cine=8. Repeatable.")
def distill(space_file: str, vessels: tuple[str, ...], results: Path, model: Path | None,
            name: str | None, address: str | None, resume: bool,
            overrides: tuple[str, ...]) -> None:
    """Distil each kept model into a smaller student (Ray Tune + Optuna + ASHA), kept beside
    its teacher; `angiotune predict --student` uses it."""
    from dataclasses import replace

    from angiotune.search import load_space
    from angiotune.search.distill import distill as run

    space = load_space(space_file, overrides)
    if vessels:
        space = replace(space, vessels=tuple(_entry_key(None, None, v) for v in vessels))
    out.print(f"Distillation {name or space.name}: {space.samples} student trials of "
              f"{space.epochs} epochs per kept model in {results}/best")
    outcome = run(space, results=results, model=model, name=name, resume=resume,
                  address=address, announce=out.print)
    for message in outcome.messages:
        out.print(message)
    table = Table(title="Students (Dice on the test split's analysed frames; ms per lesion on "
                        "an RTX 3090 at full size, estimated from FLOPs)")
    for column in ("model", "encoder", "val Dice", "test Dice", "teacher test Dice",
                   "agreement", "ms student", "ms teacher"):
        table.add_column(column, no_wrap=True)
    for key, record in outcome.students.items():
        encoder, test = record["encoder"], record["test"]
        ms = record["full_size_ms_per_lesion_rtx3090"]
        table.add_row(key, f"{encoder['blocks']}x{encoder['hidden_size']} @ "
                      f"{encoder['image_size']}px", _share(record["validation"].get("dice")),
                      _share(test.get("dice")), _share(test.get("teacher_dice")),
                      _share(test.get("agreement")), _cell(ms["student"]), _cell(ms["teacher"]))
    out.print(table)
    if outcome.students:
        note = next(iter(outcome.students.values())).get("data_note")
        if note:
            out.print(f"Data: {note}.", soft_wrap=True)


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
@click.option("--vessel", type=click.Choice(["RCA", "LAD", "LCX", "general"],
                                            case_sensitive=False), callback=_entry_key,
              help="Use this vessel's adapter, or the general one (default: chosen from the "
                   "view angles).")
@click.option("--angles", callback=_angles_option, help="View angles when the file has none "
              "or they are wrong, labelled: 'LAO 45, CRANIAL 20', 'RAO 30, CAUDAL 25'.")
@click.option("--pixel-spacing", type=float, help="mm per pixel at the vessel (overrides "
              "the DICOM header). Without any spacing, lesions are measured in pixels.")
@click.option("--calibration", type=float, help="Catheter calibration in pixels per mm "
              "(overrides everything else).")
@click.option("--max-proposals", default=3, show_default=True, type=click.IntRange(min=1),
              help="Lesions to propose per cine when no box is given.")
@click.option("--no-overlay", is_flag=True, help="JSON only.")
@click.option("--device", default="auto", show_default=True,
              help="cpu, cuda, cuda:1, ...; auto takes the GPU when there is one.")
@_kept_adapters_options
@click.option("--export", "exports", multiple=True, type=click.Choice(["coco", "dicom"]),
              help="Also write a standard export into OUT: coco (a COCO dataset CVAT and "
                   "FiftyOne open, in coco/) or dicom (overlay Secondary Capture and "
                   "measurement Structured Report for a PACS, in dicom/). Repeatable.")
@click.option("--dicom-identity", type=click.Choice(["pseudonym", "keep"]), default="pseudonym",
              show_default=True, help="Patient and study of the DICOM export: a pseudonym, or "
              "the source DICOM's own identifiers (the PACS files the results into its study).")
@click.option("--student", is_flag=True, help="Segment with the distilled students "
              "(`angiotune distill`) instead of the adapters: faster, no measurement heads.")
def predict(source: Path, out_dir: Path, box, frame: int | None, vessel: str | None, angles,
            pixel_spacing: float | None, calibration: float | None, max_proposals: int,
            no_overlay: bool, device: str, results: Path, model: Path | None,
            exports: tuple[str, ...], dicom_identity: str, student: bool) -> None:
    """Segment and measure the lesions of SOURCE: a DICOM or NPY cine, a folder of them, or a
    lesion index (Parquet), with the kept adapter of the vessel in view."""
    from angiotune.predict import PredictSettings
    from angiotune.predict import predict as run_predict

    if dicom_identity != "pseudonym" and "dicom" not in exports:
        raise AngiotuneError("--dicom-identity applies to --export dicom, which was not asked "
                             "for")
    settings = PredictSettings(results=results, vessel=vessel,
                               frame=frame, box=box, angles=angles,
                               pixel_spacing_mm=pixel_spacing,
                               calibration_px_per_mm=calibration, max_proposals=max_proposals,
                               overlays=not no_overlay, device=device, model=model,
                               exports=exports, dicom_identity=dicom_identity,
                               student=student)
    with _progress() as progress:
        task = progress.add_task("predicting", total=None)
        summary = run_predict(source, out_dir, settings, on_item=lambda done, total:
                              progress.update(task, completed=done, total=total))
    table = Table(title=f"Lesions measured (QCA from the mask; heads beside it; mm where "
                  f"calibrated, else px) in {out_dir}")
    for column in ("lesion", "adapter", "box", "MLD", "RVD", "DS %", "length", "heads DS %",
                   "heads MLD"):
        table.add_column(column, no_wrap=True)

    def size(value, unit: str) -> str:
        return "-" if value is None else f"{_cell(value)} {unit}"

    for lesion in summary.lesions:
        report, heads = lesion.report, lesion.report.get("heads") or {}
        qca, unit = report["qca"], report.get("units", "mm")
        table.add_row(lesion.key, report["adapter"]["vessel"], report["box_source"].split()[0],
                      size(qca.get(f"MLD_{unit}"), unit),
                      size(qca.get(f"interpolated_RVD_{unit}"), unit),
                      _cell(qca.get("diameter_stenosis_pct")),
                      size(qca.get(f"lesion_length_{unit}"), unit),
                      _cell(heads.get("diameter_stenosis_pct")),
                      size(heads.get(f"MLD_{unit}"), unit))
    if summary.lesions:
        out.print(table)
    uncalibrated = {lesion.report["input"]["key"]: lesion.report["input"]["calibration"]
                    for lesion in summary.lesions if lesion.report.get("units") == "px"}
    for key, why in uncalibrated.items():
        out.print(f"{key}: {why}", soft_wrap=True, highlight=False)
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
    opens = {"coco": ("coco/", "a COCO dataset for CVAT or FiftyOne"),
             "dicom": ("dicom/", f"Secondary Captures and Structured Reports for a PACS, "
                                 f"{dicom_identity} identity")}
    for name in settings.exports:
        folder, what = opens[name]
        out.print(f"Export {name}: {out_dir / folder} ({what})", soft_wrap=True)
    if summary.lesions:
        what = summary.lesions[0].report["what"]
        out.print(what[0].upper() + what[1:] + ".")
    else:
        raise AngiotuneError("no lesion could be measured (see the messages above)")


@cli.group()
def export() -> None:
    """Standard exports of the kept models (predictions: angiotune predict --export)."""


@export.command("model")
@click.option("--vessel", required=True, type=click.Choice(["RCA", "LAD", "LCX", "general"],
                                                           case_sensitive=False),
              callback=_entry_key, help="The registry entry to export.")
@click.option("--out", "out_dir", required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="A new (or empty) folder for the Hugging Face model.")
@_kept_adapters_options
@click.option("--hub-id", default="facebook/sam3", show_default=True,
              help="The hub name of the SAM 3 base, for the card's base_model (not used for "
                   "the embedded tiny model, which is on no hub).")
def export_model_command(vessel: str, out_dir: Path, results: Path, model: Path | None,
                         hub_id: str) -> None:
    """Merge the kept adapter of a vessel into its base and write a Hugging Face folder that
    transformers loads without peft, with a model card."""
    from angiotune.export.model import PARTS, export_model

    with _progress() as progress:
        progress.add_task("merging and saving", total=None)
        done = export_model(vessel, out_dir, results, model, hub_id)
    how = "LoRA merged into the weights" if done.merged else \
        f"{done.strategy} weights saved as trained"
    out.print(f"Wrote {done.folder}: {done.model_class} ({how}), processor and README.md model "
              "card; load it with transformers' "
              f"{done.model_class}.from_pretrained, no peft needed.", soft_wrap=True)
    if done.parts:
        out.print(f"angiotune's own modules, not part of the transformers model "
                  f"({', '.join(done.parts)}), are in {done.folder / PARTS}.", soft_wrap=True)
    if not done.tested:
        out.print("No held-out test scores in the card: run `angiotune evaluate` first to "
                  "have them there.")


def _share(value) -> str:
    """A Dice or agreement, to three places: differences of 0.01 matter."""
    return "-" if value is None else f"{value:.3f}"


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
