"""A reduced-depth SAM 3 in the exact layout of the hub's ``facebook/sam3`` folder (test support).

The hub folder is what transformers' own converter writes: ``config.json`` of a ``sam3_video``
model (``Sam3VideoModel``) whose ``detector_config`` is the concept model and ``tracker_config`` the
SAM 2-style tracker, ONE ``model.safetensors`` whose keys carry the prefixes ``detector_model.``,
``tracker_model.`` and ``tracker_neck.``, and the processor / CLIP tokenizer files. The real weights
are gated and 3.4 GB; this stand-in keeps every width, the 1008 px input, the patch size and the key
names, and lowers only depths:

* the ViT backbone's ``num_hidden_layers`` (and ``global_attn_indexes``) in BOTH
  ``detector_config.vision_config.backbone_config`` and
  ``tracker_config.vision_config.backbone_config`` (``Sam3TrackerModel`` builds its encoder from
  the tracker's copy);
* the CLIP text encoder, the DETR encoder and decoder and the geometry encoder
  (``detector_config``), and the tracker's memory attention (neither ``Sam3Model`` nor
  ``Sam3TrackerModel`` loads it);
* the text vocabulary: a CLIP-style byte-level BPE built offline (256 bytes, the same with
  ``</w>``, merges for the prompt words, then ``<|startoftext|>`` / ``<|endoftext|>`` as the last
  two ids, as in CLIP), and ``text_config.vocab_size`` / ``bos_token_id`` / ``eos_token_id`` set to
  match it (743 tokens instead of 49408: 1 M embedding parameters instead of 51 M).

Everything else (the mask decoders' two-way transformer, FPN necks, prompt encoder, memory encoder)
is at full size. Weights are random, drawn after ``torch.manual_seed(seed)``: the same seed gives
the same bytes. Never commit a built folder.

Two layouts:

* ``build_hub_layout``: keys as in the hub file (``tracker_model.mask_decoder...``). Both
  ``Sam3TrackerModel`` and ``Sam3Model`` load it with no missing keys.
* ``build_nested_layout``: keys exactly as ``Sam3VideoModel.save_pretrained`` writes them in
  transformers 5.24 (``tracker_model.tracker_model.mask_decoder...``); ``Sam3TrackerModel`` then
  leaves its mask decoder and prompt encoder newly initialised.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS_NAME = "model.safetensors"
HUB_PREFIXES = ("detector_model.", "tracker_model.", "tracker_neck.")
NESTED_TRACKER_PREFIX = "tracker_model.tracker_model."  # what save_pretrained writes (5.24)
HUB_TRACKER_PREFIX = "tracker_model."  # what the hub file has
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# Words that get whole-word BPE merges, besides angiotune's prompt vocabulary; any other text still
# encodes (byte by byte), so no prompt ever maps to an unknown id.
EXTRA_WORDS = ("a", "the", "of", "and", "in", "vessel", "artery", "coronary", "catheter", "wire")


# --- tokenizer --------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable character table (the byte-level BPE alphabet, CLIP order)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def _merge_words() -> list[str]:
    """The words that get merges: angiotune's prompt vocabulary plus a few common ones, sorted."""
    from angiotune.model.concept import SPECIAL_TOKENS, prompt_vocabulary

    words = set(EXTRA_WORDS)
    for entry in prompt_vocabulary():
        if entry not in SPECIAL_TOKENS:
            words.add(entry.lower())
    # the CLIP pre-tokenizer splits letters from digits and punctuation: keep letter runs only
    return sorted(w for w in words if w.isalpha() and len(w) > 1)


def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A small CLIP-style BPE: vocab in CLIP's order and left-to-right merges for each word."""
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [char + "</w>" for char in alphabet]
    merges: list[tuple[str, str]] = []
    seen = set(tokens)
    for word in _merge_words():
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        left = symbols[0]
        for right in symbols[1:]:
            merged = left + right
            if merged not in seen:
                merges.append((left, right))
                tokens.append(merged)
                seen.add(merged)
            left = merged
    tokens += [BOS, EOS]
    return {token: index for index, token in enumerate(tokens)}, merges


def build_clip_tokenizer(max_length: int = 32):
    """The stand-in's ``CLIPTokenizer`` (``<|endoftext|>`` pads, as in CLIP), built offline."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


# --- config -----------------------------------------------------------------------------------


def global_attn_indexes(layers: int) -> list[int]:
    """The real rule (last layer of every 8: [7, 15, 23, 31] at 32), plus the last layer."""
    return sorted({i for i in range(layers) if i % 8 == 7} | {layers - 1})


def hub_config(layers: int = 1, vocab_size: int | None = None, bos_token_id: int | None = None,
               eos_token_id: int | None = None):
    """``Sam3VideoConfig()`` (the real model's sizes) with every depth capped at ``layers``."""
    from transformers import Sam3VideoConfig

    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    config = Sam3VideoConfig()
    detector, tracker = config.detector_config, config.tracker_config
    for backbone in (detector.vision_config.backbone_config,
                     tracker.vision_config.backbone_config):
        backbone.num_hidden_layers = min(layers, backbone.num_hidden_layers)
        backbone.global_attn_indexes = global_attn_indexes(backbone.num_hidden_layers)
    text = detector.text_config
    text.num_hidden_layers = min(layers, text.num_hidden_layers)
    for sub in (detector.detr_encoder_config, detector.detr_decoder_config,
                detector.geometry_encoder_config):
        sub.num_layers = min(layers, sub.num_layers)
    tracker.memory_attention_num_layers = min(layers, tracker.memory_attention_num_layers)
    if vocab_size is not None:
        text.vocab_size = vocab_size
    if bos_token_id is not None:
        text.bos_token_id = bos_token_id
    if eos_token_id is not None:
        text.eos_token_id = eos_token_id
    config.architectures = ["Sam3VideoModel"]
    return config


# --- writing ----------------------------------------------------------------------------------


def _save_processor(folder: Path, tokenizer) -> None:
    """Processor and tokenizer files as the hub folder has them (``AutoTokenizer`` reads them)."""
    from transformers import Sam3ImageProcessor, Sam3Processor

    Sam3Processor(image_processor=Sam3ImageProcessor(), tokenizer=tokenizer).save_pretrained(folder)
    # CLIP's own files too (the hub folder has them next to tokenizer.json)
    vocab, merges = clip_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = "".join(f"{left} {right}\n" for left, right in merges)
    (folder / "merges.txt").write_text("#version: 0.2\n" + lines, encoding="utf-8")


def _build(folder: Path, layers: int, seed: int) -> Path:
    """``Sam3VideoModel(config).save_pretrained(folder)`` plus the tokenizer (nested layout)."""
    from transformers import Sam3VideoModel
    from transformers.utils import logging as transformers_logging

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_clip_tokenizer()
    config = hub_config(layers, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    assert tokenizer.convert_tokens_to_ids(EOS) == len(tokenizer) - 1
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = Sam3VideoModel(config)
    finally:
        torch.random.set_rng_state(generator_state)
    transformers_logging.disable_progress_bar()
    model.save_pretrained(folder)
    del model
    _save_processor(folder, tokenizer)
    return folder


def _set_tracker_prefix(weights: Path, prefix: str) -> int:
    """Rewrite a safetensors file so every tracker key starts with ``prefix`` (the hub's
    ``tracker_model.`` or the nested ``tracker_model.tracker_model.``), whichever of the two a
    transformers release wrote. Returns how many keys changed."""
    tensors = load_file(weights)
    renamed = {}
    for key, tensor in tensors.items():
        for old in (NESTED_TRACKER_PREFIX, HUB_TRACKER_PREFIX):  # longest first
            if key.startswith(old):
                key = prefix + key[len(old):]
                break
        if key in renamed:
            raise ValueError(f"{weights}: renaming makes {key!r} twice")
        renamed[key] = tensor
    changed = len(set(renamed) - set(tensors))
    if changed:
        save_file(renamed, weights, metadata={"format": "pt"})
    return changed


def build_nested_layout(folder: Path, *, layers: int = 1, seed: int = 0) -> Path:
    """The stand-in as ``Sam3VideoModel.save_pretrained`` writes it in transformers 5.24
    (tracker keys ``tracker_model.tracker_model.*``; enforced should a release write otherwise).
    ``Sam3TrackerModel.from_pretrained`` leaves its mask decoder and prompt encoder newly
    initialised on this layout. Returns ``folder``."""
    folder = _build(Path(folder), layers, seed)
    _set_tracker_prefix(folder / WEIGHTS_NAME, NESTED_TRACKER_PREFIX)
    return folder


def build_hub_layout(folder: Path, *, layers: int = 1, seed: int = 0) -> Path:
    """The stand-in in the hub folder's layout (tracker keys ``tracker_model.*``), built in
    ``folder`` (created if needed). Same ``layers`` and ``seed``, same bytes. Returns ``folder``.
    """
    folder = _build(Path(folder), layers, seed)
    _set_tracker_prefix(folder / WEIGHTS_NAME, HUB_TRACKER_PREFIX)
    return folder


# --- inspection -------------------------------------------------------------------------------


def weight_keys(folder: Path) -> list[str]:
    """Tensor names of the folder's ``model.safetensors`` (header only)."""
    from safetensors import safe_open

    with safe_open(Path(folder) / WEIGHTS_NAME, framework="pt") as handle:
        return list(handle.keys())


def parameter_count(folder: Path) -> int:
    """Elements in the folder's ``model.safetensors`` (from the header, nothing loaded)."""
    path = Path(folder) / WEIGHTS_NAME
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
    total = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        count = 1
        for dim in entry["shape"]:
            count *= dim
        total += count
    return total


def folder_megabytes(folder: Path) -> float:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) / 1e6
