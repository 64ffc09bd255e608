"""The best adapter per vessel, kept under ``results/best/<VESSEL>/``, and a general one.

``results/best/general/`` holds the stage-1/2 adapter that scored best over every validation
lesion, whatever its vessel: the one to use where no vessel is named (ARCADE's stenosis outlines,
an export without segment numbers, a view no vessel adapter covers).

An entry holds the adapter (as saved by ``angiotune.model.adapters``), ``manifest.json`` (metrics,
the zero-shot base beside them, the trial's configuration, the base model it needs, the
validation split it was scored on, checksums of its files) and a short model card. An entry is
replaced only by one that scores better on the same validation split; the replacement is written
beside it and renamed into place under a lock, so a reader never sees half an entry.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock

from angiotune import __version__
from angiotune.errors import AngiotuneError

MANIFEST = "manifest.json"
ADAPTER = "adapter"
VESSELS = ("RCA", "LAD", "LCX")
GENERAL = "general"
ENTRY_KEYS = (*VESSELS, GENERAL)


def registry_metric(select: str, key: str) -> str:
    """The validation metric an entry is compared on: dice/LAD for LAD, dice for general."""
    return select if key == GENERAL else f"{select}/{key}"


class RegistryError(AngiotuneError):
    """A missing or damaged registry entry."""


def best_dir(results: Path) -> Path:
    return Path(results) / "best"


@contextmanager
def _locked(results: Path):
    """An exclusive lock on the registry across processes (trials promote concurrently);
    ``filelock`` rather than ``fcntl`` so that it works on Windows too."""
    folder = best_dir(results)
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(folder / ".lock"):
        yield folder


def _checksums(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def read_entry(results: Path, vessel: str) -> dict | None:
    """The manifest of a vessel's entry, verified against its checksums; None when absent."""
    folder = best_dir(results) / vessel
    if not (folder / MANIFEST).exists():
        return None
    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    if _checksums(folder / ADAPTER) != manifest.get("checksums"):
        raise RegistryError(f"{folder}: adapter files do not match the manifest's checksums "
                            "(damaged or edited); rerun the search to replace the entry")
    manifest["path"] = str(folder.resolve())
    return manifest


def promote(results: Path, vessel: str, adapter: Path, record: dict) -> tuple[bool, str]:
    """Keep ``adapter`` as the vessel's best if it beats the entry there; says why or why not."""
    with _locked(results) as folder:
        current = read_entry(results, vessel)
        score, mode = record["score"], record["mode"]
        if current is not None:
            if current["validation_split"] != record["validation_split"]:
                return False, (f"kept the existing {vessel} adapter: it was scored on another "
                               "validation split, so the two cannot be compared")
            better = score > current["score"] if mode == "max" else score < current["score"]
            if not better:
                return False, (f"kept the existing {vessel} adapter ({record['metric']} "
                               f"{current['score']:.4f} vs {score:.4f})")
        staging = folder / f".{vessel}.staging-{uuid.uuid4().hex[:8]}"
        replaced = None if current is None else {
            key: current.get(key) for key in ("stage", "strategy", "score", "search", "trial_id")}
        try:
            shutil.copytree(adapter, staging / ADAPTER)
            manifest = {**record, "vessel": vessel, "angiotune_version": __version__,
                        "replaced": replaced,
                        "created": datetime.datetime.now(datetime.timezone.utc)
                        .isoformat(timespec="seconds"),
                        "checksums": _checksums(staging / ADAPTER)}
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True)
                                            + "\n")
            (staging / "README.md").write_text(model_card(manifest))
        except OSError as error:  # a full disk, most likely: the old entry stays as it was
            shutil.rmtree(staging, ignore_errors=True)
            raise RegistryError(f"could not write the new {vessel} entry in {folder} "
                                f"({error.strerror or error}); the existing entry is "
                                "unchanged") from None
        target = folder / vessel
        retired = folder / f".{vessel}.retired-{uuid.uuid4().hex[:8]}"
        if target.exists():
            target.rename(retired)
        staging.rename(target)
        shutil.rmtree(retired, ignore_errors=True)
        was = f" (was {current['score']:.4f})" if current else ""
        return True, f"new best {vessel} adapter: {record['metric']} {score:.4f}{was}"


STAGE_NAMES = {1: "stage 1 lesion LoRA", 2: "stage 2 multi-task", 3: "stage 3 vessel LoRA"}


def model_card(manifest: dict) -> str:
    config = manifest.get("config", {})
    zero = manifest.get("zero_shot", {})
    heads = ("; heads for CASS segment, % diameter stenosis, MLD and reference diameter (mm)"
             if manifest.get("heads") else "")
    scope = ("every vessel (general)" if manifest["vessel"] == GENERAL
             else manifest["vessel"])
    return f"""# angiotune adapter: {scope} lesion segmentation

- Task: segment the analysed coronary segment inside a box prompt (SAM 3 tracker){heads}.
- Stage: {STAGE_NAMES.get(manifest.get('stage', 1))}
- Data: {manifest.get('data_note', 'see the index named below')}
- Index: {manifest.get('index')}
- Base model: {manifest.get('base_model')}
  (from {manifest.get('base_model_path') or 'the embedded model'})
- Strategy: {manifest.get('strategy', config.get('strategy'))}, rank {config.get('rank')},
  targets {config.get('targets')}, lr {config.get('lr')}, init {config.get('init', 'none')}
- Validation {manifest['metric']}: {manifest['score']:.4f}
  (zero-shot base: {zero.get(manifest['metric'], float('nan')):.4f})
- Search: {manifest.get('search')}, trial {manifest.get('trial_id')}, epoch {manifest.get('epoch')}

Validation scores are on the validation split used for selection; held-out test scores come from
`angiotune evaluate`. Results on phantoms test the software; they are not clinical results.
"""


def list_entries(results: Path) -> dict[str, dict | None]:
    """Every registry key (the vessels, then ``general``) -> its entry or None."""
    return {key: read_entry(results, key) for key in ENTRY_KEYS}


def load_best_model(results: Path, vessel: str, model: Path | None = None):
    """The ready model for a vessel: its base with the kept adapter applied, wrapped with its
    heads in a ``LesionModel`` in box mode (the concept model as it is in text_box mode).

    ``model`` is the base's folder when it has moved since the search; the adapter checks the
    weights by content, so any copy of the same checkpoint will do.
    """
    entry = read_entry(results, vessel)
    if entry is None:
        raise RegistryError(f"no adapter kept for {vessel} in {best_dir(results)}; run "
                            "`angiotune search` first")
    return load_ready_model(Path(entry["path"]) / ADAPTER, base_path_of(entry, model),
                            entry.get("prompt_mode", "box"))


def base_path_of(entry: dict, model: Path | None = None) -> str | None:
    """The base folder to load for an entry: the one given, else where the search found it."""
    return str(model) if model is not None else entry.get("base_model_path")


def load_ready_model(folder: Path, base_model_path: str | None, mode: str = "box"):
    """An adapter folder (kept, or a trial's checkpoint) applied to its base, ready to run."""
    from angiotune.model.adapters import crop_context_of, load_adapter
    from angiotune.model.heads import has_heads, load_heads
    from angiotune.model.lesion import LesionModel
    from angiotune.model.refine import has_refiner, load_refiner
    from angiotune.model.sam3 import base_model_id, load_base_model

    model = load_adapter(load_base_model(base_model_path, mode), folder,
                         base_id=base_model_id(base_model_path, mode))
    if mode != "box":
        return model
    return LesionModel(model, load_heads(folder) if has_heads(folder) else None,
                       crop_context_of(folder),
                       load_refiner(folder) if has_refiner(folder) else None).eval()
