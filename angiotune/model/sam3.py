"""SAM 3 tracker models: the embedded tiny one, or a real checkpoint from a local directory.

The box-prompted tracker (``Sam3TrackerModel``) segments "the thing inside this box": the lesion
task. Nothing is fetched from the hub; a real checkpoint is a local folder in Hugging Face layout.
The embedded model has the same classes with a small config, pre-trained by
``angiotune.train.pretrain`` on generic shapes (not angiograms), so adapting it to lesions mirrors
adapting the real model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.utils.checkpoint
import transformers
from transformers import AutoConfig, Sam3Model, Sam3TrackerConfig, Sam3TrackerModel
from transformers.utils import logging as transformers_logging

from angiotune.errors import AngiotuneError
from angiotune.model.fingerprint import weights_fingerprint
from angiotune.names import PROMPT_MODES

EMBEDDED_DIR = Path(__file__).parent / "embedded"
EMBEDDED_CONCEPT_DIR = Path(__file__).parent / "embedded_concept"
EMBEDDED_IMAGE_SIZE = 112
SAM3_MODEL_TYPES = ("sam3_tracker", "sam3", "sam3_video", "sam3_tracker_video")
PIXEL_MEAN, PIXEL_STD = 0.5, 0.5  # Sam3Processor's normalisation


class ModelError(AngiotuneError):
    """A model path that is missing, not SAM 3, or not loadable."""


def tiny_tracker_config(image_size: int = EMBEDDED_IMAGE_SIZE) -> Sam3TrackerConfig:
    """A SAM 3 tracker small enough to train on two CPU cores (about 0.56 M parameters)."""
    tokens = image_size // 14
    vision = dict(
        model_type="sam3_vision_model",
        backbone_config=dict(model_type="sam3_vit_model", hidden_size=64, num_hidden_layers=4,
                             num_attention_heads=4, intermediate_size=128,
                             image_size=image_size, patch_size=14, window_size=tokens // 2,
                             global_attn_indexes=[1, 3]),
        fpn_hidden_size=64,
        backbone_feature_sizes=[[tokens * 4] * 2, [tokens * 2] * 2, [tokens] * 2])
    return Sam3TrackerConfig(
        vision_config=vision,
        prompt_encoder_config=dict(hidden_size=64, image_size=image_size, patch_size=14),
        mask_decoder_config=dict(hidden_size=64, mlp_dim=128, num_attention_heads=4,
                                 iou_head_hidden_dim=64))


def embedded_dir(prompt_mode: str = "box") -> Path:
    if prompt_mode not in PROMPT_MODES:
        raise ModelError(f"prompt_mode must be one of {PROMPT_MODES}, got {prompt_mode!r}")
    return EMBEDDED_DIR if prompt_mode == "box" else EMBEDDED_CONCEPT_DIR


def checked_folder(path: str | Path | None = None, prompt_mode: str = "box") -> Path:
    """The model folder, refused with a message that says what to do unless it holds a SAM 3
    config and safetensors weights."""
    folder = embedded_dir(prompt_mode) if path is None else Path(path)
    config_file = folder / "config.json"
    if not folder.is_dir():
        raise ModelError(f"model path {folder} does not exist or is not a folder")
    if not config_file.is_file():
        raise ModelError(f"model path {folder} has no config.json: not a Hugging Face model "
                         "folder (download SAM 3 with access to facebook/sam3 and pass its folder)")
    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelError(f"{config_file}: unreadable ({error})") from None
    if model_type not in SAM3_MODEL_TYPES:
        raise ModelError(f"{folder} holds a {model_type!r} model, not SAM 3 "
                         f"(expected one of {', '.join(SAM3_MODEL_TYPES)})")
    if not any(folder.glob("*.safetensors")):
        raise ModelError(f"{folder} has no .safetensors weights (only safetensors are loaded)")
    return folder


def model_config(path: str | Path | None = None, prompt_mode: str = "box"):
    """The config of the part a prompt mode runs (the tracker, or the concept model), read
    without loading any weights: a hub ``sam3_video`` folder holds both."""
    folder = checked_folder(path, prompt_mode)
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ModelError(f"{folder}/config.json: not a config this transformers "
                         f"{transformers.__version__} reads ({error})") from None
    part = "tracker_config" if prompt_mode == "box" else "detector_config"
    return getattr(config, part, None) or config


def load_base_model(path: str | Path | None = None, prompt_mode: str = "box"):
    """The frozen starting point: the embedded tiny model (None) or a local SAM 3 checkpoint.

    ``box`` loads the tracker (``Sam3TrackerModel``), ``text_box`` the concept model
    (``Sam3Model``); a full SAM 3 checkpoint holds both. Every weight of the loaded model must
    come from the checkpoint: transformers fills missing ones at random and only prints a table,
    and key layouts drift between releases, so a partial load is refused here instead of
    training on noise.
    """
    folder = checked_folder(path, prompt_mode)
    transformers_logging.disable_progress_bar()  # one bar per trial worker is noise
    model_class = Sam3TrackerModel if prompt_mode == "box" else Sam3Model
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # the missing-keys table: refused below instead
    try:
        model, info = model_class.from_pretrained(folder, local_files_only=True,
                                                  use_safetensors=True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as error:
        raise ModelError(f"cannot load SAM 3 from {folder}: {error}") from None
    finally:
        transformers_logging.set_verbosity(verbosity)
    check_loading(folder, model_class.__name__, info)
    return model.eval()


def check_loading(folder: Path, class_name: str, info: dict) -> None:
    """Refuse a model some of whose weights the checkpoint did not fill (all of the tracker's
    and of the concept model's modules run in angiotune), or filled with the wrong shape."""
    missing = sorted(info.get("missing_keys") or ())
    mismatched = sorted(str(m[0]) if isinstance(m, tuple) else str(m)
                        for m in info.get("mismatched_keys") or ())
    if not missing and not mismatched:
        return
    problem = (f"{len(missing)} weights missing from the checkpoint (first: "
               f"{', '.join(missing[:4])})" if missing else
               f"{len(mismatched)} weights of another shape (first: {', '.join(mismatched[:4])})")
    raise ModelError(
        f"{folder}: {class_name} was not filled from this checkpoint: {problem}, with "
        f"transformers {transformers.__version__}. Its keys do not follow the layout this "
        "transformers release maps (the hub's facebook/sam3 folder has detector_model., "
        "tracker_model. and tracker_neck. prefixes); use the folder as downloaded, or a "
        "transformers release that reads its layout")


def load_prompt_tokenizer(path: str | Path | None = None):
    """The concept model's tokenizer: the embedded word-level one, or the checkpoint's CLIP one."""
    from transformers import AutoTokenizer

    folder = EMBEDDED_CONCEPT_DIR if path is None else Path(path)
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ModelError(f"no tokenizer in {folder} for the text_box mode ({error})") from None


def base_model_id(path: str | Path | None = None, prompt_mode: str = "box") -> str:
    """Names the base weights an adapter needs, from their content, not from where the folder
    is (``angiotune.model.fingerprint``): a moved or copied folder keeps its id."""
    folder = checked_folder(path, prompt_mode)
    name = f"embedded:{folder.name}" if path is None else "sam3"
    return f"{name}@{weights_fingerprint(folder)}"


def image_size_of(model_or_config) -> int:
    """The input side in pixels, of a model or of its config (the tracker and the concept model
    share the backbone). The RoPE tables are built for it: no other size runs."""
    config = getattr(model_or_config, "config", model_or_config)
    return int(config.vision_config.backbone_config.image_size)


def to_pixel_values(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W) grey in [0, 1] -> (B, 3, H, W) normalised as SAM 3 expects."""
    return ((images - PIXEL_MEAN) / PIXEL_STD).unsqueeze(1).expand(-1, 3, -1, -1)


_VISION_BLOCK = re.compile(r"(^|\.)vision_encoder\.backbone\.layers\.\d+$")


def enable_gradient_checkpointing(model: torch.nn.Module) -> int:
    """Recompute each vision-encoder block during backward instead of keeping its activations.

    The tracker does not offer Hugging Face's switch, so each block's forward is wrapped in
    ``torch.utils.checkpoint``; results and gradients are unchanged. Returns the block count.
    """
    blocks = [m for name, m in model.named_modules() if _VISION_BLOCK.search(name)]
    for block in blocks:
        forward = block.forward

        def checkpointed(*args, _forward=forward, **kwargs):
            if torch.is_grad_enabled():
                return torch.utils.checkpoint.checkpoint(_forward, *args, use_reentrant=False,
                                                         **kwargs)
            return _forward(*args, **kwargs)

        block.forward = checkpointed
    return len(blocks)
