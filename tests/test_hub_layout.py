"""The reduced-depth SAM 3 stand-in in the hub folder's layout (``tests/hub_layout.py``).

What the stand-in must get right, so that tests built on it mean something for the real
``facebook/sam3`` folder: the real widths and 1008 px, the ``sam3_video`` config, one safetensors
file with the hub's key prefixes, a CLIP tokenizer that loads offline, and loading reports that
match the hub folder's (nothing missing) and the ``save_pretrained`` layout's (decoder missing).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hub_layout import (
    EOS,
    HUB_PREFIXES,
    NESTED_TRACKER_PREFIX,
    WEIGHTS_NAME,
    build_clip_tokenizer,
    build_hub_layout,
    build_nested_layout,
    global_attn_indexes,
    hub_config,
    weight_keys,
)

PROMPTS = ["mid LAD stenosis", "proximal RCA lesion", "first obtuse marginal", "Ramus intermedius"]


def _load(model_class, folder: Path):
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    return model_class.from_pretrained(folder, local_files_only=True, output_loading_info=True)


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_hub_layout(tmp_path_factory.mktemp("sam3_hub"), layers=1, seed=0)


@pytest.fixture(scope="module")
def nested_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_nested_layout(tmp_path_factory.mktemp("sam3_nested"), layers=1, seed=0)


# --- config and tokenizer only ------------------------------------------------------------------


def test_config_keeps_real_widths_and_lowers_depth_in_both_backbones():
    from transformers import Sam3VideoConfig

    real, small = Sam3VideoConfig(), hub_config(layers=2)
    assert small.model_type == "sam3_video" and small.architectures == ["Sam3VideoModel"]
    for part in ("detector_config", "tracker_config"):
        real_bb = getattr(real, part).vision_config.backbone_config
        small_bb = getattr(small, part).vision_config.backbone_config
        assert small_bb.num_hidden_layers == 2 and small_bb.global_attn_indexes == [1]
        for name in ("hidden_size", "intermediate_size", "num_attention_heads", "image_size",
                     "patch_size", "window_size", "pretrain_image_size"):
            assert getattr(small_bb, name) == getattr(real_bb, name), (part, name)
        assert small_bb.image_size == 1008
    real_text, small_text = real.detector_config.text_config, small.detector_config.text_config
    assert small_text.num_hidden_layers == 2 < real_text.num_hidden_layers
    assert small_text.hidden_size == real_text.hidden_size == 1024
    for part in ("detr_encoder_config", "detr_decoder_config"):
        assert getattr(small.detector_config, part).num_layers == 2
        assert (getattr(small.detector_config, part).hidden_size
                == getattr(real.detector_config, part).hidden_size)
    assert (small.tracker_config.mask_decoder_config.to_dict()
            == real.tracker_config.mask_decoder_config.to_dict())


def test_global_attention_follows_the_real_rule():
    assert global_attn_indexes(32) == [7, 15, 23, 31]  # the real model's
    assert global_attn_indexes(1) == [0]
    assert global_attn_indexes(4) == [3]


def test_clip_tokenizer_ids_fit_a_small_vocab():
    tokenizer = build_clip_tokenizer()
    encoded = tokenizer(PROMPTS, padding="max_length", max_length=16, truncation=True)
    ids = [i for row in encoded["input_ids"] for i in row]
    assert min(ids) >= 0 and max(ids) == len(tokenizer) - 1  # <|endoftext|> is the last id
    assert tokenizer.convert_tokens_to_ids(EOS) == tokenizer.eos_token_id == len(tokenizer) - 1
    assert tokenizer.bos_token_id == len(tokenizer) - 2
    decoded = tokenizer.batch_decode(encoded["input_ids"], skip_special_tokens=True)
    assert decoded == [p.lower() for p in PROMPTS]


# --- built folders (one build of each per module, ~1-2 s each once torch is imported) -----------


@pytest.mark.slow
def test_hub_folder_has_the_hub_layout(hub_folder: Path):
    assert sorted(p.name for p in hub_folder.glob("*.safetensors")) == [WEIGHTS_NAME]
    config = json.loads((hub_folder / "config.json").read_text(encoding="utf-8"))
    assert config["model_type"] == "sam3_video"
    assert config["architectures"] == ["Sam3VideoModel"]
    for part in ("detector_config", "tracker_config"):
        backbone = config[part]["vision_config"]["backbone_config"]
        assert (backbone["num_hidden_layers"], backbone["image_size"]) == (1, 1008)
        assert backbone["hidden_size"] == 1024
    text = config["detector_config"]["text_config"]
    assert text["num_hidden_layers"] == 1
    keys = weight_keys(hub_folder)
    assert {key.split(".")[0] + "." for key in keys} == set(HUB_PREFIXES)
    assert not [key for key in keys if key.startswith(NESTED_TRACKER_PREFIX)]
    assert any(key.startswith("tracker_model.mask_decoder.") for key in keys)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                 "processor_config.json"):
        assert (hub_folder / name).is_file(), name


@pytest.mark.slow
def test_nested_folder_has_the_save_pretrained_layout(nested_folder: Path):
    keys = weight_keys(nested_folder)
    assert any(key.startswith(NESTED_TRACKER_PREFIX + "mask_decoder.") for key in keys)


def test_both_layouts_hold_the_same_weights(hub_folder: Path, nested_folder: Path):
    """Same seed, same tensors: the layouts differ only in the tracker's key prefix."""
    from safetensors.torch import load_file

    hub = load_file(hub_folder / WEIGHTS_NAME)
    nested = load_file(nested_folder / WEIGHTS_NAME)
    renamed = {key.replace(NESTED_TRACKER_PREFIX, "tracker_model.", 1): value
               for key, value in nested.items()}
    assert renamed.keys() == hub.keys()
    assert all(torch.equal(hub[key], renamed[key]) for key in hub)


def test_tracker_loads_every_key_from_the_hub_layout(hub_folder: Path):
    from transformers import Sam3TrackerModel

    model, info = _load(Sam3TrackerModel, hub_folder)
    assert list(info["missing_keys"]) == []
    assert list(info["mismatched_keys"]) == []
    assert list(info["unexpected_keys"]) == []  # the concept and memory parts are ignored
    assert model.config.vision_config.backbone_config.num_hidden_layers == 1
    assert model.config.vision_config.backbone_config.image_size == 1008


def test_concept_model_loads_every_key_from_the_hub_layout(hub_folder: Path):
    from transformers import AutoTokenizer, Sam3Model

    model, info = _load(Sam3Model, hub_folder)
    assert list(info["missing_keys"]) == []
    assert list(info["mismatched_keys"]) == []
    assert list(info["unexpected_keys"]) == []  # tracker_model.* and tracker_neck.* are ignored
    tokenizer = AutoTokenizer.from_pretrained(hub_folder, local_files_only=True)
    assert len(tokenizer) == model.config.text_config.vocab_size
    tokens = tokenizer(PROMPTS, padding="max_length", max_length=16, truncation=True,
                       return_tensors="pt")
    with torch.no_grad():
        text = model.get_text_features(input_ids=tokens["input_ids"],
                                       attention_mask=tokens["attention_mask"])
    assert torch.isfinite(text.last_hidden_state).all()


def test_angiotune_reads_the_tokenizer_offline(hub_folder: Path):
    from angiotune.model.sam3 import load_prompt_tokenizer

    tokenizer = load_prompt_tokenizer(hub_folder)
    assert tokenizer("mid LAD stenosis")["input_ids"][0] == tokenizer.bos_token_id


def test_nested_layout_leaves_the_tracker_decoder_unloaded(nested_folder: Path):
    """The layout ``Sam3VideoModel.save_pretrained`` writes in transformers 5.24: the tracker's
    mask decoder and prompt encoder stay newly initialised, which only the loading info shows."""
    from transformers import Sam3Model, Sam3TrackerModel

    _, info = _load(Sam3TrackerModel, nested_folder)
    missing = list(info["missing_keys"])
    assert any(key.startswith("mask_decoder.") for key in missing)
    assert any(key.startswith("prompt_encoder.") for key in missing)
    assert not any(key.startswith("vision_encoder.") for key in missing)  # the backbone loads
    _, info = _load(Sam3Model, nested_folder)
    assert list(info["missing_keys"]) == []
