"""Adaptation strategies over a frozen SAM 3 base: LoRA (peft), decoder-only, full fine-tuning.

What a strategy trains is saved on its own, never the base: LoRA as a peft adapter folder
(``adapter_config.json`` + ``adapter_model.safetensors``, loadable with plain
``PeftModel.from_pretrained``), decoder-only and full as ``trained_weights.safetensors``.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from angiotune.data.transforms import DEFAULT_CROP_CONTEXT
from angiotune.errors import ConfigError
from angiotune.names import CROP_CONTEXT_RANGE, STRATEGIES, TARGET_GROUPS

if TYPE_CHECKING:
    from peft import PeftModel

# What decoder_only trains: the tracker's prompt encoder and mask decoder, or the concept
# model's geometry encoder, DETR decoder, scoring and mask decoder.
DECODER_MODULES = ("mask_decoder", "prompt_encoder", "detr_decoder", "geometry_encoder",
                   "dot_product_scoring")
FROZEN_MODULES = ("text_encoder", "text_projection")  # text stays as pre-trained
WEIGHTS_FILE = "trained_weights.safetensors"
SETTINGS_FILE = "angiotune_adapter.json"
ADAPTER_FORMAT = 2  # of SETTINGS_FILE; raise it when the saved layout changes
FORMAT_1_CROP_CONTEXT = 3.0  # format 1 did not record the crop: it was always 3 boxes


@dataclass(frozen=True)
class AdapterSettings:
    """Which weights train, and the crop they learn to see. ``train_decoder`` also trains the
    whole mask decoder under LoRA; ``crop_context`` is the lesion crop's side in boxes, which
    every later use of the adapter (evaluate, predict, reports) must crop alike."""

    strategy: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.1  # the seed plan's value
    targets: tuple[str, ...] = ("vision_qv",)
    train_decoder: bool = True
    crop_context: float = DEFAULT_CROP_CONTEXT
    # The share of the image encoder's blocks, counted from its output, that LoRA adapts: 1.0
    # all of them; below 1 the blocks before stay the base's, and their output can be cached
    # (angiotune.model.encoder_prefix). A share, not a count, so one space fits every model.
    lora_depth: float = 1.0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy: {self.strategy!r} is not one of {STRATEGIES}")
        unknown = [t for t in self.targets if t not in TARGET_GROUPS]
        if unknown:
            raise ConfigError(f"targets: unknown target module group(s) {unknown}; "
                              f"known: {sorted(TARGET_GROUPS)}")
        if self.strategy == "lora" and (self.rank < 1 or not self.targets):
            raise ConfigError("lora needs rank >= 1 and at least one target group")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout: {self.dropout} is not in [0, 1)")
        if not 0 < self.lora_depth <= 1:
            raise ConfigError(f"lora_depth: {self.lora_depth} is not in (0, 1] (the share of "
                              "the image encoder's last blocks that LoRA adapts)")
        low, high = CROP_CONTEXT_RANGE
        if not low <= self.crop_context <= high:
            raise ConfigError(f"crop_context: {self.crop_context} is not in [{low:g}, {high:g}] "
                              "(the crop's side in lesion boxes)")

    def adapted_blocks(self, blocks: int) -> range:
        """The encoder blocks (of ``blocks``) that LoRA's vision targets reach: the last ones."""
        return range(blocks - max(1, math.ceil(self.lora_depth * blocks - 1e-9)), blocks)

    def target_regex(self, blocks: int | None = None) -> str:
        """peft's target pattern; with the encoder's block count, vision targets confined to
        ``adapted_blocks``."""
        patterns = [TARGET_GROUPS[t] for t in self.targets]
        if blocks is not None and self.lora_depth < 1:
            chosen = "|".join(str(i) for i in self.adapted_blocks(blocks))
            blocks_prefix = rf"vision_encoder\.backbone\.layers\.({chosen})\..*\."
            patterns = [p.replace(VISION_PREFIX, blocks_prefix) for p in patterns]
        return r".*(" + "|".join(patterns) + r")"


VISION_PREFIX = r"vision_encoder\..*\."  # how TARGET_GROUPS' encoder groups begin
_BLOCK_NAME = re.compile(r"vision_encoder\.backbone\.layers\.(\d+)$")


def encoder_block_count(model: torch.nn.Module) -> int:
    return sum(1 for name, _ in model.named_modules() if _BLOCK_NAME.search(name))


def adapt(base: torch.nn.Module, settings: AdapterSettings) -> torch.nn.Module:
    """The model to train: the base with only the strategy's weights left trainable."""
    if settings.strategy == "lora":
        from peft import LoraConfig, get_peft_model  # peft pulls in transformers' model code

        config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha,
                            lora_dropout=settings.dropout,
                            target_modules=settings.target_regex(encoder_block_count(base)),
                            modules_to_save=["mask_decoder"] if settings.train_decoder else None)
        return _freeze_text(get_peft_model(base, config))
    return _set_trainable(base, settings)


def _set_trainable(model: torch.nn.Module, settings: AdapterSettings) -> torch.nn.Module:
    for name, parameter in model.named_parameters():
        parameter.requires_grad = (settings.strategy == "full"
                                   or name.startswith(DECODER_MODULES))
    return _freeze_text(model)


def _freeze_text(model: torch.nn.Module) -> torch.nn.Module:
    for name, parameter in model.named_parameters():
        if any(f".{frozen}." in f".{name}" for frozen in FROZEN_MODULES):
            parameter.requires_grad = False
    return model


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def save_adapter(model: torch.nn.Module, settings: AdapterSettings, folder: Path,
                 base_id: str) -> None:
    """Only what was trained, plus the settings and the base it needs."""
    from peft import PeftModel

    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(model, PeftModel):
        model.save_pretrained(folder, safe_serialization=True)
    else:
        state = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters()
                 if p.requires_grad}
        save_file(state, folder / WEIGHTS_FILE)
    record = {"settings": asdict(settings), "base_model": base_id, "format": ADAPTER_FORMAT}
    (folder / SETTINGS_FILE).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


def read_adapter_record(folder: Path) -> dict:
    """The adapter's settings record, checked: present, readable, and a format this reads."""
    path = folder / SETTINGS_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{folder}: no {SETTINGS_FILE}: not an angiotune adapter (or one "
                          "saved by another tool)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path}: unreadable ({error})") from None
    found = record.get("format") if isinstance(record, dict) else None
    if not isinstance(found, int) or not 1 <= found <= ADAPTER_FORMAT or "settings" not in record:
        raise ConfigError(f"{path}: adapter format {found!r}; this angiotune reads formats 1 to "
                          f"{ADAPTER_FORMAT} (saved by another version: retrain or upgrade)")
    return record


def settings_of(record: dict) -> AdapterSettings:
    """The settings a checked record (``read_adapter_record``) was saved with."""
    saved = record["settings"]
    crop = saved.get("crop_context", FORMAT_1_CROP_CONTEXT if record["format"] == 1
                     else DEFAULT_CROP_CONTEXT)
    return AdapterSettings(**{**saved, "targets": tuple(saved["targets"]),
                              "crop_context": float(crop)})


def crop_context_of(folder: Path) -> float:
    """The crop an adapter folder was trained on (3 boxes for adapters saved before it was
    recorded)."""
    return settings_of(read_adapter_record(Path(folder))).crop_context


def strategy_of(folder: Path) -> str:
    """How an adapter folder adapts its base (``lora`` adapters can share one base)."""
    return settings_of(read_adapter_record(Path(folder))).strategy


def load_adapter(base: torch.nn.Module, folder: Path, trainable: bool = False,
                 base_id: str | None = None, name: str = "default") -> torch.nn.Module:
    """The base with a saved adapter applied: for inference, or to go on training it.

    ``base_id`` (``angiotune.model.sam3.base_model_id``) refuses an adapter saved for other base
    weights: peft would apply it without complaint and the masks would be wrong. ``name``: the
    LoRA adapter's name in the peft model (``add_adapter`` puts more beside it).
    """
    settings = _checked_settings(Path(folder), base_id)
    if settings.strategy == "lora":
        from peft import PeftModel

        with warnings.catch_warnings():  # peft asks a transformers 5 property it deprecated
            warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
            model = PeftModel.from_pretrained(base, folder, adapter_name=name,
                                              is_trainable=trainable)
        return _freeze_text(model) if trainable else model.eval()
    state = load_file(folder / WEIGHTS_FILE)
    missing = set(state) - set(dict(base.named_parameters()))
    if missing:
        raise ConfigError(f"{folder}: weights for {len(missing)} parameters the base model "
                          "does not have (an adapter saved for another base?)")
    base.load_state_dict(state, strict=False)
    return _set_trainable(base, settings) if trainable else base.eval()


def add_adapter(model: PeftModel, folder: Path, name: str, base_id: str | None = None) -> None:
    """Another kept LoRA adapter beside those ``model`` carries, on the same base weights (one
    base in memory for every vessel); ``model.set_adapter(name)`` chooses which one runs."""
    settings = _checked_settings(Path(folder), base_id)
    if settings.strategy != "lora":
        raise ConfigError(f"{folder}: a {settings.strategy} adapter changes the base's own "
                          "weights, so it cannot share a base with others")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
        model.load_adapter(folder, adapter_name=name, is_trainable=False)
    model.eval()


def _checked_settings(folder: Path, base_id: str | None) -> AdapterSettings:
    record = read_adapter_record(folder)
    if base_id and record.get("base_model") and record["base_model"] != base_id:
        raise ConfigError(f"{folder}: adapter saved for base model {record['base_model']}, not "
                          f"{base_id}; load it with the base it was trained on (--model)")
    return settings_of(record)
