"""`angiotune export model`: a kept adapter merged into its base, read back the way a deployer
reads it (transformers alone, no peft), with its card's YAML front matter and its processor."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import Sam3TrackerModel, Sam3TrackerProcessor

from angiotune.cli import main
from angiotune.data.context import CONTEXT_DIM
from angiotune.errors import ConfigError
from angiotune.export.model import PARTS, export_model
from angiotune.model.adapters import AdapterSettings, adapt, save_adapter
from angiotune.model.heads import HeadSettings, LesionHeads, feature_dim_of, save_heads
from angiotune.model.refine import MaskRefiner, save_refiner
from angiotune.model.sam3 import base_model_id, load_base_model, to_pixel_values
from angiotune.registry.store import RegistryError, load_best_model, promote, with_adapter_parts


def _record(vessel: str, strategy: str, **extra) -> dict:
    return {"metric": f"dice/{vessel}", "mode": "max", "score": 0.71, "validation_split": "s",
            "metrics": {}, "zero_shot": {f"dice/{vessel}": 0.6}, "config": {"rank": 2},
            "stage": 2, "strategy": strategy, "base_model": base_model_id(),
            "search": "test", "trial_id": "t0", **extra}


def _trained(model: torch.nn.Module, scale: float = 0.05) -> None:
    """Weights as if trained: a fresh LoRA's B is zero (merging it would change nothing), and a
    decoder copy that equals the base would not show whether the merge kept it."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(scale * torch.randn(parameter.shape, generator=generator))


@pytest.fixture(scope="module")
def kept(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry: LAD a trained-looking LoRA with heads and a refiner, on phantoms; RCA a
    decoder-only adapter."""
    results = tmp_path_factory.mktemp("results")
    for vessel, settings in (("LAD", AdapterSettings(rank=2)),
                             ("RCA", AdapterSettings(strategy="decoder_only"))):
        base = load_base_model()
        model = adapt(base, settings)
        _trained(model)
        folder = results.parent / f"adapter-{vessel}"
        save_adapter(model, settings, folder, base_model_id())
        extra = {}
        if vessel == "LAD":
            save_heads(LesionHeads(HeadSettings(classes=("12", "13"),
                                                feature_dim=feature_dim_of(base.config))), folder)
            refiner = MaskRefiner()
            _trained(refiner, 0.01)
            save_refiner(refiner, folder)
            extra = {"heads": True, "data_note": "angiotune's synthetic phantoms (not clinical "
                                                 "data) and the embedded tiny SAM 3 model"}
        promote(results, vessel, folder, _record(vessel, settings.strategy, **extra))
    return results


def _inputs(size: int = 112) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    images = torch.rand(2, size, size, generator=generator)
    return images, torch.tensor([[30.0, 28.0, 80.0, 70.0], [12.0, 20.0, 60.0, 96.0]])


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


@pytest.mark.slow
def test_a_merged_lora_loads_with_transformers_alone_and_predicts_the_same(kept, tmp_path):
    out = tmp_path / "LAD"
    done = export_model("LAD", out, kept)
    assert done.merged and done.model_class == "Sam3TrackerModel" and not done.tested
    assert not (out / "adapter_config.json").exists()  # a plain model, nothing for peft
    merged, info = Sam3TrackerModel.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert not [name for name in merged.state_dict() if "lora" in name or "modules_to_save"
                in name]
    ready = load_best_model(kept, "LAD")  # the peft model, heads and refiner as predict runs it
    images, boxes = _inputs()
    inputs = {"pixel_values": to_pixel_values(images), "input_boxes": boxes[:, None],
              "multimask_output": False}
    with torch.no_grad():
        expected = ready.segmenter(**inputs).pred_masks
        got = merged.eval()(**inputs).pred_masks
        base = load_base_model()(**inputs).pred_masks
    assert torch.allclose(got, expected, atol=1e-4)
    assert not torch.allclose(base, expected, atol=1e-3)  # the adapter did change the masks
    # The heads and the refiner beside it give back the whole model predict runs.
    assert sorted(done.parts) == sorted(p.name for p in (out / PARTS).iterdir())
    whole = with_adapter_parts(merged, out / PARTS)
    context, spacing = torch.zeros(2, CONTEXT_DIM), torch.tensor([0.2, 0.3])
    with torch.no_grad():
        want, have = ready(images, boxes, context, spacing), whole(images, boxes, context, spacing)
    for key in ("logits", "coarse_logits", "segment_logits", "stenosis_pct", "mld_mm"):
        assert torch.allclose(have[key], want[key], atol=1e-4), key


def test_the_card_carries_hub_metadata_and_says_what_it_was_trained_on(kept, tmp_path):
    out = tmp_path / "LAD"
    export_model("LAD", out, kept)
    card = (out / "README.md").read_text(encoding="utf-8")
    meta = _front_matter(card)
    assert meta["library_name"] == "transformers"
    assert "base_model" not in meta  # the embedded tiny model is on no hub: none claimed
    assert meta["angiotune"]["base_model"] == base_model_id()
    assert meta["angiotune"]["lora_merged"] is True and meta["angiotune"]["crop_context"] == 1.5
    [validation] = meta["model-index"][0]["results"]
    assert validation["metrics"][0]["value"] == 0.71 and validation["dataset"]["split"] == \
        "validation"
    assert "synthetic-data" in meta["tags"] and "phantoms" in validation["dataset"]["name"]
    assert "not clinical" in card and "say nothing about clinical performance" in card
    assert "Sam3TrackerModel.from_pretrained" in card and PARTS in card and "refine" in card
    assert str(kept) not in card  # no local paths in a card that travels


def test_held_out_scores_enter_the_card_only_when_they_scored_this_entry(kept, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(kept, results)
    evaluation = results / "evaluation"
    evaluation.mkdir()
    rows = [{"vessel": "LAD", "segment": "all", "model": "kept", "stage": 2.0, "n": 7.0,
             "dice": 0.81234, "iou": 0.7, "stenosis_mae": None},
            {"vessel": "LAD", "segment": "all", "model": "zero-shot", "stage": None, "n": 7.0,
             "dice": 0.6, "iou": 0.5},
            {"vessel": "LAD", "segment": "13 mid LAD", "model": "kept", "stage": 2.0, "n": 3.0,
             "dice": 0.1, "iou": 0.1}]
    (evaluation / "test_metrics.json").write_text(json.dumps(rows))
    done = export_model("LAD", tmp_path / "tested", results)
    meta = _front_matter((tmp_path / "tested" / "README.md").read_text(encoding="utf-8"))
    assert done.tested and meta["angiotune"]["test"]["kept"] == {"n": 7.0, "dice": 0.8123,
                                                                 "iou": 0.7}
    test = meta["model-index"][0]["results"][1]
    assert test["dataset"]["split"] == "test" and test["metrics"][0]["value"] == 0.8123
    # An evaluation written before the entry was kept scored the adapter it replaced.
    stale = time.time() - 3 * 24 * 3600
    os.utime(evaluation / "test_metrics.json", (stale, stale))
    assert not export_model("LAD", tmp_path / "stale", results).tested


def test_the_processor_prepares_pixels_as_angiotune_does(kept, tmp_path):
    export_model("LAD", tmp_path / "LAD", kept)
    processor = Sam3TrackerProcessor.from_pretrained(tmp_path / "LAD")
    crop = np.random.default_rng(0).integers(0, 256, (112, 112), dtype=np.uint8)
    inputs = processor(images=np.repeat(crop[..., None], 3, axis=-1),
                       input_boxes=[[[30.0, 28.0, 80.0, 70.0]]], return_tensors="pt")
    expected = to_pixel_values(torch.as_tensor(crop[None] / 255.0, dtype=torch.float32))
    assert torch.allclose(inputs["pixel_values"], expected, atol=1e-5)
    assert inputs["input_boxes"].tolist() == [[[30.0, 28.0, 80.0, 70.0]]]


def test_a_decoder_only_adapter_is_saved_as_trained(kept, tmp_path):
    done = export_model("RCA", tmp_path / "RCA", kept)
    assert not done.merged and done.strategy == "decoder_only" and done.parts == ()
    saved = Sam3TrackerModel.from_pretrained(tmp_path / "RCA").state_dict()
    trained = load_best_model(kept, "RCA").segmenter.state_dict()
    assert saved.keys() == trained.keys()
    assert all(torch.equal(saved[k], trained[k]) for k in saved)
    meta = _front_matter((tmp_path / "RCA" / "README.md").read_text(encoding="utf-8"))
    assert meta["angiotune"]["lora_merged"] is False and "parts" in meta["angiotune"]


def test_user_errors_are_one_clear_line(kept, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not an empty folder"):
        export_model("LAD", taken, kept)
    assert (taken / "keep.txt").read_text() == "mine"
    with pytest.raises(RegistryError, match="no adapter kept for LCX"):
        export_model("LCX", tmp_path / "x", kept)
    assert main(["export", "model", "--vessel", "LAD", "--out", str(taken),
                 "--results", str(kept)]) == 2
    assert main(["export", "model", "--vessel", "LMX", "--out", str(tmp_path / "y"),
                 "--results", str(kept)]) == 2
    err = capsys.readouterr().err
    assert "not an empty folder" in err and "Traceback" not in err
    assert not list(tmp_path.glob(".*partial*"))  # nothing half-written left behind
    assert main(["export", "model", "--vessel", "lad", "--out", str(tmp_path / "ok"),
                 "--results", str(kept)]) == 0
    assert "no peft needed" in " ".join(capsys.readouterr().out.split())


@pytest.mark.slow  # a full-width SAM 3 stand-in in the hub's layout: built, merged, saved, read
def test_a_hub_sam3_base_exports_as_a_plain_tracker_checkpoint(tmp_path):
    """The user's real base is the hub's facebook/sam3 folder (``sam3_video``, prefixed keys),
    loaded as the tracker alone; the export is a ``sam3_tracker`` folder that loads without any
    key mapping, and its card names the hub base."""
    from hub_layout import build_hub_layout

    hub = build_hub_layout(tmp_path / "sam3")
    settings = AdapterSettings(rank=2)
    model = adapt(load_base_model(hub), settings)
    _trained(model, 0.01)
    save_adapter(model, settings, tmp_path / "adapter", base_model_id(hub))
    results = tmp_path / "results"
    promote(results, "LAD", tmp_path / "adapter",
            {**_record("LAD", "lora"), "base_model": base_model_id(hub),
             "base_model_path": str(hub)})
    out = tmp_path / "LAD"
    done = export_model("LAD", out, results)
    assert json.loads((out / "config.json").read_text())["model_type"] == "sam3_tracker"
    meta = _front_matter((out / "README.md").read_text(encoding="utf-8"))
    assert meta["base_model"] == "facebook/sam3" and meta["base_model_relation"] == "finetune"
    assert str(hub) not in (out / "README.md").read_text(encoding="utf-8")
    assert done.merged and Sam3TrackerProcessor.from_pretrained(out).image_processor.size[
        "height"] == 1008
    merged = Sam3TrackerModel.from_pretrained(out).eval()
    images = torch.rand(1, 1008, 1008, generator=torch.Generator().manual_seed(3))
    inputs = {"pixel_values": to_pixel_values(images), "multimask_output": False,
              "input_boxes": torch.tensor([[[300.0, 280.0, 700.0, 650.0]]])}
    with torch.no_grad():
        expected = load_best_model(results, "LAD").segmenter(**inputs).pred_masks
        assert torch.allclose(merged(**inputs).pred_masks, expected, atol=1e-4)


def test_a_text_box_adapter_exports_the_concept_model_with_its_tokenizer(tmp_path):
    from transformers import Sam3Model, Sam3Processor

    settings = AdapterSettings(rank=2, targets=("decoder_attn",))
    model = adapt(load_base_model(None, "text_box"), settings)
    _trained(model, 0.01)
    save_adapter(model, settings, tmp_path / "adapter", base_model_id(None, "text_box"))
    promote(tmp_path / "results", "general", tmp_path / "adapter",
            {**_record("general", "lora"), "metric": "dice", "prompt_mode": "text_box",
             "base_model": base_model_id(None, "text_box")})
    done = export_model("general", tmp_path / "out", tmp_path / "results")
    assert done.model_class == "Sam3Model" and done.merged
    _, info = Sam3Model.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    processor = Sam3Processor.from_pretrained(tmp_path / "out")
    assert processor.tokenizer("mid LAD stenosis")["input_ids"]
    assert "Sam3Model.from_pretrained" in (tmp_path / "out" / "README.md").read_text()
