"""A kept adapter merged into its base: a Hugging Face folder that deploys without peft.

A LoRA adapter is merged into the weights (peft's ``merge_and_unload``); decoder-only and full
fine-tuning changed the base's own weights, which are saved as they are. The folder holds what
``Sam3TrackerModel.from_pretrained`` (``Sam3Model`` for a text_box adapter) and the matching
processor read, and a model card whose YAML front matter carries the metadata the Hub and its
tools read (``library_name``, ``base_model``, tags, metrics).

A hub ``facebook/sam3`` base (a ``sam3_video`` folder with prefixed keys) is loaded as the tracker
alone, so the export is a plain ``sam3_tracker`` checkpoint: smaller, and loaded without the
prefix mapping. The stage-2 heads and the mask refiner are angiotune modules, not part of a
transformers model: they are copied beside it into ``angiotune_parts/`` as the safetensors and
settings angiotune saved, and the card says what the model alone lacks without them.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import shutil
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import yaml

from angiotune import __version__
from angiotune.errors import ConfigError
from angiotune.registry.store import ADAPTER, RegistryError, base_path_of, best, model_card

PARTS = "angiotune_parts"
CARD = "README.md"
# What the hub calls the base a real checkpoint was downloaded as; the embedded tiny model is on
# no hub, so its card names no base_model.
DEFAULT_HUB_ID = "facebook/sam3"


@dataclass(frozen=True)
class ModelExport:
    """What ``export_model`` wrote."""

    folder: Path
    vessel: str
    strategy: str
    merged: bool  # a LoRA merged into the weights; False: the weights were trained in place
    model_class: str
    parts: tuple[str, ...]  # files in angiotune_parts/ (heads, refiner, their settings)
    tested: bool  # the card carries held-out test scores from `angiotune evaluate`


def export_model(vessel: str, out: str | Path, results: str | Path = "results",
                 model: str | Path | None = None,
                 hub_id: str | None = DEFAULT_HUB_ID) -> ModelExport:
    """Write the kept model of ``vessel`` (RCA, LAD, LCX or general) to the new folder ``out``.

    ``model``: the base's folder when it has moved since the search (as for predict);
    ``hub_id``: the hub name of a real base, for the card's ``base_model``.
    """
    from angiotune.model.adapters import crop_context_of, load_adapter, strategy_of
    from angiotune.model.sam3 import base_model_id, load_base_model

    entry = best(vessel, results)
    if entry is None:
        raise RegistryError(f"no adapter kept for {vessel} in {Path(results) / 'best'}; run "
                            "`angiotune search` first (or pass --results)")
    out = Path(out)
    _check_new_folder(out)
    mode = entry.get("prompt_mode", "box")
    adapter = Path(entry["path"]) / ADAPTER
    base_path = base_path_of(entry, None if model is None else Path(model))
    strategy = strategy_of(adapter)
    segmenter = load_adapter(load_base_model(base_path, mode), adapter,
                             base_id=base_model_id(base_path, mode))
    if strategy == "lora":
        with warnings.catch_warnings():  # peft asks a transformers 5 property it deprecated
            warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
            segmenter = segmenter.merge_and_unload()
    staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        segmenter.save_pretrained(staging, safe_serialization=True)
        processor(segmenter, base_path, mode).save_pretrained(staging)
        parts = _copy_parts(adapter, staging / PARTS)
        tests = held_out_scores(Path(results), entry)
        (staging / CARD).write_text(
            card(entry, strategy, type(segmenter).__name__, crop_context_of(adapter), parts,
                 tests, hub_id if base_path is not None else None), encoding="utf-8")
        if out.exists():
            out.rmdir()  # empty: checked above
        os.replace(staging, out)
    except OSError as error:
        raise ConfigError(f"could not write the export to {out} ({error.strerror or error})") \
            from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ModelExport(out, vessel, strategy, strategy == "lora", type(segmenter).__name__,
                       parts, tests is not None)


def _check_new_folder(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} exists and is not an empty folder; export to a new one "
                          "(an export is never written over another)")


def processor(model, base_path: str | None, mode: str):
    """The transformers processor for the model's input size: resize, rescale and normalise
    as angiotune does (mean and std 0.5), and the tokenizer for text prompts."""
    from transformers import Sam3ImageProcessor, Sam3Processor, Sam3TrackerProcessor

    from angiotune.model.sam3 import PIXEL_MEAN, PIXEL_STD, image_size_of, load_prompt_tokenizer

    size = image_size_of(model)
    options = {"size": {"height": size, "width": size},
               "image_mean": [PIXEL_MEAN] * 3, "image_std": [PIXEL_STD] * 3}
    grid = getattr(model.config.vision_config, "backbone_feature_sizes", None)
    if grid:  # the decoder's mask grid, for mask prompts
        options["mask_size"] = {"height": int(grid[0][0]), "width": int(grid[0][1])}
    images = Sam3ImageProcessor(**options)
    if mode == "box":
        return Sam3TrackerProcessor(image_processor=images, target_size=size)
    return Sam3Processor(image_processor=images, tokenizer=load_prompt_tokenizer(base_path),
                         target_size=size)


def _copy_parts(adapter: Path, folder: Path) -> tuple[str, ...]:
    """The heads and refiner with their settings, and the adapter's settings record (the crop
    the model was trained on); nothing when the adapter has neither."""
    from angiotune.model.adapters import SETTINGS_FILE
    from angiotune.model.heads import HEADS_CONFIG, HEADS_WEIGHTS, has_heads
    from angiotune.model.refine import REFINER_CONFIG, REFINER_WEIGHTS, has_refiner

    names = [*((HEADS_CONFIG, HEADS_WEIGHTS) if has_heads(adapter) else ()),
             *((REFINER_CONFIG, REFINER_WEIGHTS) if has_refiner(adapter) else ())]
    if not names:
        return ()
    folder.mkdir()
    for name in (*names, SETTINGS_FILE):
        shutil.copy2(adapter / name, folder / name)
    return (*names, SETTINGS_FILE)


def held_out_scores(results: Path, entry: dict) -> dict | None:
    """The entry's held-out scores from `angiotune evaluate` (kept model and zero-shot base,
    all its test lesions), when an evaluation written after the entry was kept scored it;
    None otherwise (an older evaluation scored the adapter this one replaced)."""
    from angiotune.evaluation.test_split import COLUMNS

    created = entry.get("created")
    if not created:
        return None
    since = datetime.datetime.fromisoformat(created).timestamp()
    vessel = entry["vessel"]
    for name in (f"test_metrics_{vessel}.json", "test_metrics.json"):
        path = results / "evaluation" / name
        if not path.is_file() or path.stat().st_mtime < since:
            continue
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        found = {row.get("model"): row for row in rows if isinstance(row, dict)
                 and row.get("vessel") == vessel and row.get("segment") == "all"}
        kept = found.get("kept")
        if kept is None or kept.get("stage") != entry.get("stage", 1):
            continue
        return {model: {column: round(float(row[column]), 4) for column in COLUMNS
                        if isinstance(row.get(column), (int, float))
                        and math.isfinite(row[column])}
                for model, row in found.items() if model in ("kept", "zero-shot")}
    return None


def card(entry: dict, strategy: str, model_class: str, crop_context: float,
         parts: tuple[str, ...], tests: dict | None, hub_id: str | None) -> str:
    """The model card: YAML front matter (Hub metadata), the registry's card, how to use it."""
    phantoms = "phantom" in str(entry.get("data_note", "")).lower()
    metric_type = entry["metric"].split("/")[0]
    dataset = ({"name": "angiotune synthetic phantoms", "type": "synthetic-phantoms"} if phantoms
               else {"name": "unpublished coronary angiography index", "type": "private"})
    task = {"type": "image-segmentation", "name": "coronary lesion segmentation"}
    results = [{"task": dict(task), "dataset": {**dataset, "split": "validation"},
                "metrics": [{"type": metric_type, "value": round(float(entry["score"]), 4),
                             "name": f"validation {entry['metric']}"}]}]
    kept = (tests or {}).get("kept", {})
    if kept:
        results.append({"task": dict(task), "dataset": {**dataset, "split": "test"},
                        "metrics": [{"type": column, "value": kept[column],
                                     "name": f"test {column}"}
                                    for column in ("dice", "iou") if column in kept]})
    metadata = {
        "library_name": "transformers",
        "pipeline_tag": "mask-generation",
        **({"base_model": hub_id, "base_model_relation": "finetune"} if hub_id else {}),
        "tags": ["angiotune", "sam3", "coronary-angiography", "stenosis", "lesion-segmentation",
                 "quantitative-coronary-angiography", "research-only",
                 *(["synthetic-data"] if phantoms else [])],
        "model-index": [{"name": f"angiotune-{entry['vessel']}", "results": results}],
        "angiotune": {
            "version": __version__, "vessel": entry["vessel"], "stage": entry.get("stage", 1),
            "strategy": strategy, "lora_merged": strategy == "lora",
            "model_class": model_class, "prompt_mode": entry.get("prompt_mode", "box"),
            "base_model": entry.get("base_model"), "crop_context": crop_context,
            "data_note": entry.get("data_note"),
            "validation": {"metric": entry["metric"], "score": round(float(entry["score"]), 4),
                           "zero_shot": _rounded(entry.get("zero_shot", {}).get(
                               entry["metric"]))},
            "test": tests, "parts": list(parts), "search": entry.get("search"),
            "trial_id": entry.get("trial_id")},
    }
    front = yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True)
    title = "angiotune merged model" if strategy == "lora" else "angiotune fine-tuned model"
    return (f"---\n{front}---\n\n{model_card(entry, title, local_paths=False)}\n"
            f"{_usage(strategy, model_class, crop_context, parts, tests, phantoms)}")


def _usage(strategy: str, model_class: str, crop: float, parts: tuple[str, ...],
           tests: dict | None, phantoms: bool) -> str:
    weights = ("The LoRA adapter is merged into the weights (peft `merge_and_unload`): no peft "
               "is needed." if strategy == "lora" else
               f"The {strategy} fine-tuning changed the base's own weights; they are saved as "
               "they are (there was no adapter to merge).")
    processor_class = "Sam3TrackerProcessor" if model_class == "Sam3TrackerModel" else \
        "Sam3Processor"
    if parts:
        extra = (f"The {' and '.join(_part_names(parts))} are angiotune modules, not part of "
                 f"a transformers `{model_class}`: they are in `{PARTS}/` as the safetensors "
                 "and JSON settings angiotune saved. With angiotune installed, "
                 "`angiotune.registry.store.with_adapter_parts(model, folder / "
                 f"'{PARTS}')` gives the complete model. Without them, the masks are the "
                 "decoder's own" + (" (before the refinement that angiotune applies)"
                                    if any(p.startswith("refiner") for p in parts) else "")
                 + (" and there is no CASS segment or stenosis estimate from the heads"
                    if any(p.startswith("heads") for p in parts) else "") + ".")
    else:
        extra = "The adapter had no heads or refiner: this folder is the whole model."
    kept, zero = (tests or {}).get("kept", {}), (tests or {}).get("zero-shot", {})
    tested = (f"Held-out test split (`angiotune evaluate`, {kept.get('n', 0):.0f} lesions): "
              f"Dice {kept.get('dice', float('nan')):.4f}, IoU {kept.get('iou', float('nan')):.4f}"
              f"; zero-shot base Dice {zero.get('dice', float('nan')):.4f}." if kept else
              "No held-out test scores are recorded for this model: run `angiotune evaluate` "
              "before exporting to have them here.")
    prompt = ("; `multimask_output=False`" if model_class == "Sam3TrackerModel" else
              " and the text prompt angiotune trained with (`angiotune.model.concept`)")
    caution = ("Trained and scored on synthetic phantoms: these numbers test the software and "
               "say nothing about clinical performance." if phantoms else
               "Research use only: not a medical device, not validated for clinical decisions.")
    return f"""## Use without angiotune

```python
from transformers import {model_class}, {processor_class}

model = {model_class}.from_pretrained("path/to/this/folder")
processor = {processor_class}.from_pretrained("path/to/this/folder")
```

{weights}

Prepare inputs as in training: a square crop centred on the lesion box, {crop} times the box's
longer side (at least 48 frame pixels), windowed to the crop's 1st to 99th intensity percentiles,
grey repeated to RGB; the box prompt in the crop's pixels{prompt}.

{extra}

{tested}

{caution}
"""


def _part_names(parts: tuple[str, ...]) -> list[str]:
    names = {"heads": "stage-2 heads (CASS segment, % stenosis, MLD, RVD)",
             "refiner": "mask refiner"}
    return [text for prefix, text in names.items() if any(p.startswith(prefix) for p in parts)]


def _rounded(value) -> float | None:
    return round(float(value), 4) if isinstance(value, (int, float)) and math.isfinite(value) \
        else None
