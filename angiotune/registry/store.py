"""The best adapter per vessel, under ``results/best/``, and a general one.

The ``general`` entry holds the stage-1/2 adapter that scored best over every validation
lesion, whatever its vessel: the one to use where no vessel is named (ARCADE's stenosis outlines,
an export without segment numbers, a view no vessel adapter covers).

An entry holds the adapter (as saved by ``angiotune.model.adapters``), ``manifest.json`` (metrics,
the zero-shot base beside them, the trial's configuration, the base model it needs, the
validation split it was scored on, checksums of its files) and a short model card. An entry is
replaced only by one that scores better on the same validation split.

Layout: each entry is a folder of its own, ``best/versions/<KEY>-<UTC time>-<id>/``, never
changed once written, and ``best/<KEY>.json`` names the current one. A promotion writes the new
folder, flushes it to disk, then replaces the pointer file with ``os.replace`` (atomic on POSIX
and on Windows, where a folder cannot be renamed over a folder), all under a lock. A reader takes
no lock: at every instant the pointer names a complete entry, the old one or the new one, and a
kill at any point leaves one of the two (and at most a folder nothing names, which the next swap
removes). A registry written before pointers existed (``best/<KEY>/manifest.json``) is read as
it is; its next promotion moves it to this layout.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock

from angiotune import __version__, jsonio
from angiotune.errors import AngiotuneError
from angiotune.names import ADAPTER_VESSELS, GENERAL

MANIFEST = "manifest.json"
ADAPTER = "adapter"
PAYLOADS = (ADAPTER, "student")  # what an entry's model folder may be called
VERSIONS = "versions"
ENTRY_KEYS = (*ADAPTER_VESSELS, GENERAL)  # one registry entry each


def registry_metric(select: str, key: str) -> str:
    """The validation metric an entry is compared on: dice/LAD for LAD, dice for general."""
    return select if key == GENERAL else f"{select}/{key}"


class RegistryError(AngiotuneError):
    """A missing or damaged registry entry."""


def best_dir(results: Path) -> Path:
    return Path(results) / "best"


@contextmanager
def _locked(results: Path) -> Iterator[Path]:
    """An exclusive lock on the registry across processes (trials promote concurrently);
    ``filelock`` rather than ``fcntl`` so that it works on Windows too."""
    folder = best_dir(results)
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(folder / ".lock"):
        yield folder


def _checksums(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _pointer(folder: Path, key: str) -> Path:
    return folder / f"{key}.json"


def entry_dir(results: Path, key: str) -> Path | None:
    """The folder of a key's current entry: the one ``best/<KEY>.json`` names, else a folder of
    the layout before pointers (``best/<KEY>/``); None when there is neither."""
    folder = best_dir(results)
    try:
        return folder / json.loads(_pointer(folder, key).read_text(encoding="utf-8"))["entry"]
    except FileNotFoundError:
        legacy = folder / key
        return legacy if (legacy / MANIFEST).exists() else None
    except (ValueError, KeyError, TypeError):
        raise RegistryError(f"{_pointer(folder, key)} is damaged (edited by hand?); restore it "
                            f"or delete it to start the {key} entry afresh") from None


def _verified(folder: Path) -> dict:
    """An entry's manifest, with its path, once its adapter files match their checksums."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise RegistryError(f"{folder}: unreadable entry ({error}); rerun the search to replace "
                            "it") from None
    payload = manifest.get("payload", ADAPTER)
    if payload not in PAYLOADS:
        raise RegistryError(f"{folder}: the manifest names {payload!r} as its model folder, "
                            f"not one of {PAYLOADS} (edited?); rerun the search to replace it")
    if _checksums(folder / payload) != manifest.get("checksums"):
        raise RegistryError(f"{folder}: model files do not match the manifest's checksums "
                            "(damaged or edited); rerun the search to replace the entry")
    manifest["path"] = str(folder.resolve())
    return manifest


def read_entry(results: Path, vessel: str) -> dict | None:
    """The manifest of a vessel's entry, verified against its checksums; None when absent.

    Takes no lock. When the entry it read fails because promotions removed it meanwhile (each
    keeps only the current entry and the one before it), it reads the one the pointer names now.
    """
    folder = entry_dir(results, vessel)
    while folder is not None:
        try:
            return _verified(folder)
        except RegistryError:
            now = entry_dir(results, vessel)
            if now == folder:
                raise
            folder = now
    return None


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's list of names, to the disk, so that after a power cut the
    pointer never names an entry whose files were still in memory. POSIX flushes through a
    read-only handle (an adapter copied read-only stays so); Windows needs a writable one and
    cannot open a folder (NTFS journals names itself)."""
    windows = os.name == "nt"
    if windows and path.is_dir():
        return
    handle = os.open(path, os.O_RDWR if windows else os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _write_version(version: Path, adapter: Path, manifest: dict, card) -> None:
    """A complete entry in a new folder, on disk before anything names it."""
    payload = manifest.get("payload", ADAPTER)
    shutil.copytree(adapter, version / payload)
    manifest = {**manifest, "checksums": _checksums(version / payload)}
    (version / MANIFEST).write_text(jsonio.dumps(manifest, indent=1, sort_keys=True) + "\n",
                                    encoding="utf-8")
    (version / "README.md").write_text(card(manifest), encoding="utf-8")
    for path in [*version.rglob("*"), version, version.parent]:
        _fsync(path)


def _replace(source: Path, target: Path) -> None:
    """``os.replace``, tried again for a moment: Windows refuses it while a reader has
    ``target`` open (for microseconds)."""
    for wait in (0.01, 0.05, 0.2, 1.0):
        try:
            os.replace(source, target)
            return
        except PermissionError:
            time.sleep(wait)
    os.replace(source, target)


def _switch(folder: Path, key: str, version: Path) -> None:
    """Point ``key`` at ``version`` in one step: the new pointer is written and flushed beside
    the old one, then replaces it; a kill before the replace leaves the old pointer whole."""
    temporary = folder / f".{key}.json.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(temporary, "w", encoding="utf-8") as file:
            json.dump({"entry": version.relative_to(folder).as_posix()}, file)
            file.flush()
            os.fsync(file.fileno())
        _replace(temporary, _pointer(folder, key))
    finally:
        temporary.unlink(missing_ok=True)


def _collect(folder: Path, key: str, keep: set[Path | None]) -> None:
    """Remove what a key's pointer no longer needs: its entries but ``keep`` (the current one
    and the one it replaced, which a reader that resolved the pointer just before the swap may
    still be reading), entries and pointers left by a killed promotion, and the folder of the
    layout before pointers (users looked there; it must not outlive its replacement)."""
    for stale in (folder / VERSIONS).glob(f"{key}-*"):
        if stale not in keep:
            shutil.rmtree(stale, ignore_errors=True)
    shutil.rmtree(folder / key, ignore_errors=True)
    for temporary in folder.glob(f".{key}.json.*.tmp"):
        temporary.unlink(missing_ok=True)


def promote(results: Path, vessel: str, adapter: Path, record: dict, *,
            supersedes=None, card=None, what: str = "adapter") -> tuple[bool, str]:
    """Keep ``adapter`` as the vessel's best if it beats the entry there; says why or why not.

    ``supersedes(current)``: True where the new entry replaces the current one whatever their
    scores (a student of a newer teacher); ``card``: the model card's writer; ``what``: the
    entry's kind in messages. ``record["payload"]`` names the entry's model folder."""
    card = card or model_card
    with _locked(results) as folder:
        current = read_entry(results, vessel)
        score, mode = record["score"], record["mode"]
        if current is not None and not (supersedes and supersedes(current)):
            if current["validation_split"] != record["validation_split"]:
                return False, (f"kept the existing {vessel} {what}: it was scored on another "
                               "validation split, so the two cannot be compared")
            better = score > current["score"] if mode == "max" else score < current["score"]
            if not better:
                return False, (f"kept the existing {vessel} {what} ({record['metric']} "
                               f"{current['score']:.4f} vs {score:.4f})")
        replaced = None if current is None else {
            key: current.get(key) for key in ("stage", "strategy", "score", "search", "trial_id")}
        now = datetime.datetime.now(datetime.timezone.utc)
        version = (folder / VERSIONS
                   / f"{vessel}-{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}")
        previous = entry_dir(results, vessel)
        try:
            _write_version(version, adapter,
                           {**record, "vessel": vessel, "angiotune_version": __version__,
                            "replaced": replaced, "created": now.isoformat(timespec="seconds")},
                           card)
            _switch(folder, vessel, version)
        except OSError as error:  # a full disk, most likely: the pointer names the old entry
            shutil.rmtree(version, ignore_errors=True)
            raise RegistryError(f"could not write the new {vessel} entry in {folder} "
                                f"({error.strerror or error}); the existing entry is "
                                "unchanged") from None
        _fsync(folder)  # the pointer's new content, past a power cut
        _collect(folder, vessel, {version, previous})
        was = f" (was {current['score']:.4f})" if current else ""
        return True, f"new best {vessel} {what}: {record['metric']} {score:.4f}{was}"


STAGE_NAMES = {1: "stage 1 lesion LoRA", 2: "stage 2 multi-task", 3: "stage 3 vessel LoRA"}


def model_card(manifest: dict, title: str = "angiotune adapter",
               local_paths: bool = True) -> str:
    """The entry's card in Markdown. ``title`` names what it describes (an exported merged
    model reuses it); ``local_paths=False`` leaves out this machine's folders (a card that
    travels with an export may name a user or a site in them): the index's file name only."""
    config = manifest.get("config", {})
    zero = manifest.get("zero_shot", {})
    heads = ("; heads for CASS segment, % diameter stenosis, MLD and reference diameter (mm)"
             if manifest.get("heads") else "")
    scope = ("every vessel (general)" if manifest["vessel"] == GENERAL
             else manifest["vessel"])
    index = manifest.get("index")
    if not local_paths and index:
        index = Path(index).name
    origin = manifest.get("base_model_path")
    origin = ("the embedded model" if not origin else
              origin if local_paths else "a local SAM 3 folder")
    return f"""# {title}: {scope} lesion segmentation

- Task: segment the analysed coronary segment inside a box prompt (SAM 3 tracker){heads}.
- Stage: {STAGE_NAMES.get(manifest.get('stage', 1))}
- Data: {manifest.get('data_note', 'see the index named below')}
- Index: {index}
- Base model: {manifest.get('base_model')}
  (from {origin})
- Strategy: {manifest.get('strategy', config.get('strategy'))}, rank {config.get('rank')},
  targets {config.get('targets')}, lr {config.get('lr')}, init {config.get('init', 'none')}
- Validation {manifest['metric']}: {manifest['score']:.4f}
  (zero-shot base: {zero.get(manifest['metric'], float('nan')):.4f})
- Search: {manifest.get('search')}, trial {manifest.get('trial_id')}, epoch {manifest.get('epoch')}

Validation scores are on the validation split used for selection; held-out test scores come from
`angiotune evaluate`. Results on phantoms test the software; they are not clinical results.
"""


def best(vessel: str = GENERAL, results: str | Path = "results") -> dict | None:
    """The kept adapter of ``vessel`` (a vessel or ``general``): its manifest, with ``path``,
    the folder that holds it; None when nothing is kept for it. ``angiotune best`` prints it."""
    if vessel not in ENTRY_KEYS:
        raise RegistryError(f"no registry entry {vessel!r}: one of {', '.join(ENTRY_KEYS)}")
    return read_entry(Path(results), vessel)


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
    from angiotune.model.adapters import load_adapter
    from angiotune.model.sam3 import base_model_id, load_base_model

    model = load_adapter(load_base_model(base_model_path, mode), folder,
                         base_id=base_model_id(base_model_path, mode))
    if mode != "box":
        return model
    return with_adapter_parts(model, folder)


def with_adapter_parts(segmenter, folder: Path):
    """``segmenter`` (the base with the adapter of ``folder`` applied) as a ``LesionModel``
    with that adapter's heads, refiner and crop."""
    from angiotune.model.adapters import crop_context_of
    from angiotune.model.heads import has_heads, load_heads
    from angiotune.model.lesion import LesionModel
    from angiotune.model.refine import has_refiner, load_refiner

    return LesionModel(segmenter, load_heads(folder) if has_heads(folder) else None,
                       crop_context_of(folder),
                       load_refiner(folder) if has_refiner(folder) else None).eval()
