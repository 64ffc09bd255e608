"""Side-by-side masks on validation lesions: the truth, the search's best adapter and the
zero-shot base, each outlined on the model's own input crop."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from angiotune.names import GENERAL
from angiotune.report.records import SearchRecord

PANEL = 224
COLOURS = {"truth": (48, 224, 96), "adapter": (255, 140, 0), "zero-shot": (230, 60, 230)}


@dataclass
class Overlay:
    sample_id: str  # pseudonymous, as in the index
    segment: str
    dice_adapter: float
    dice_zero_shot: float
    png: bytes  # three panels: truth | adapter | zero-shot


def best_mask_overlays(record: SearchRecord, vessel: str,
                       count: int = 3) -> list[Overlay] | str:
    """Overlays for the first ``count`` validation lesions of ``vessel`` (by pseudonym, so the
    same lesions every time), or a sentence saying why there are none."""
    import torch

    from angiotune.data.stream import SampleSettings, load_rows, sample_batches
    from angiotune.model.adapters import crop_context_of
    from angiotune.model.sam3 import image_size_of, load_base_model, load_prompt_tokenizer
    from angiotune.registry.store import load_ready_model
    from angiotune.train.step import as_tensors, dice_scores, forward

    summary = record.summary
    best = summary.get("best", {}).get(vessel)
    if best is None or "index" not in summary:
        return f"the search kept no {vessel} adapter"
    adapter, index = Path(best["adapter"]), Path(summary["index"])
    for path, what in ((adapter, "best checkpoint"), (index, "index")):
        if not path.exists():
            return f"the {what} {path} no longer exists"
    rows, root = load_rows(index, "val")
    if vessel != GENERAL:  # the general adapter was chosen on every vessel's lesions
        rows = rows[rows["vessel"] == vessel]
    rows = rows.sort_values("sample_id").head(count)
    if rows.empty:
        return f"no validation lesions of {vessel}"
    mode, base_path = summary.get("prompt_mode", "box"), summary.get("base_model_path")
    base = load_base_model(base_path, mode).eval()
    models = {"adapter": load_ready_model(adapter, base_path, mode).eval(), "zero-shot": base}
    tokenizer = load_prompt_tokenizer(base_path) if mode == "text_box" else None
    settings = SampleSettings(image_size=image_size_of(base), augment=False,
                              context=crop_context_of(adapter))
    batch = sample_batches(rows, root, settings, batch_size=count)[0]
    tensors = as_tensors(batch)
    with torch.no_grad():
        logits = {name: forward(model, tensors, tokenizer)["logits"]
                  for name, model in models.items()}
    dice = {name: dice_scores(value, tensors["mask"]).tolist() for name, value in logits.items()}
    overlays = []
    for i in range(len(rows)):
        masks = {"truth": batch["mask"][i] > 0,
                 **{name: (value[i] > 0).numpy() for name, value in logits.items()}}
        overlays.append(Overlay(str(batch["sample_id"][i]), str(batch["segment"][i]),
                                dice["adapter"][i], dice["zero-shot"][i],
                                _strip(batch["image"][i], masks)))
    return overlays


def _strip(image: np.ndarray, masks: dict[str, np.ndarray]) -> bytes:
    """One PNG: a panel per mask, the crop in grey with the mask tinted and outlined."""
    grey = Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).convert("RGB")
    grey = grey.resize((PANEL, PANEL), Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", (len(masks) * PANEL + (len(masks) - 1) * 6, PANEL), "white")
    for k, (name, mask) in enumerate(masks.items()):
        big = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(
            (PANEL, PANEL), Image.Resampling.NEAREST)) > 0
        panel = np.asarray(grey).astype(float)
        colour = np.array(COLOURS[name], dtype=float)
        panel[big] = 0.65 * panel[big] + 0.35 * colour
        panel[big & ~ndimage.binary_erosion(big, iterations=2)] = colour
        tile = Image.fromarray(panel.astype(np.uint8))
        ImageDraw.Draw(tile).text((6, 4), name, fill=COLOURS[name])
        canvas.paste(tile, (k * (PANEL + 6), 0))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
