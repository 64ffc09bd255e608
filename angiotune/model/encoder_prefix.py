"""The tracker's image encoder split after its frozen leading blocks.

LoRA confined to the encoder's last blocks (``AdapterSettings.lora_depth``) leaves every block
before them as the base had it: their output for a crop never changes, so it is computed once
and cached (``angiotune.model.embedding_cache``), and a training step runs only the adapted
blocks, the neck and the decoder. ``encode_prefix`` then ``encode_rest`` gives exactly what the
tracker's own ``get_image_embeddings`` gives (tested), so a trial with the cache trains the
same model as one without.
"""

from __future__ import annotations

import torch
from torch import nn

EMBEDDING_PARTS = ("embeddings.", "layer_norm.")  # of the backbone, before its first block


def tracker_of(segmenter: nn.Module) -> nn.Module:
    """The Sam3TrackerModel inside a peft wrapper (LoRA layers are injected in place)."""
    return segmenter.get_base_model() if hasattr(segmenter, "get_base_model") else segmenter


def encoder_blocks(segmenter: nn.Module) -> nn.ModuleList:
    return tracker_of(segmenter).vision_encoder.backbone.layers


def frozen_prefix_depth(segmenter: nn.Module) -> int:
    """How many leading encoder blocks (with the patch embedding before them) train nothing:
    their output may be cached. 0 when the embedding itself trains."""
    backbone = tracker_of(segmenter).vision_encoder.backbone
    if any(p.requires_grad for name, p in backbone.named_parameters()
           if name.startswith(EMBEDDING_PARTS)):
        return 0
    depth = 0
    for block in backbone.layers:
        if any(p.requires_grad for p in block.parameters()):
            break
        depth += 1
    return depth


def encode_prefix(segmenter: nn.Module, pixel_values: torch.Tensor, depth: int) -> torch.Tensor:
    """The backbone's hidden states (B, H, W, C) after its first ``depth`` blocks."""
    backbone = tracker_of(segmenter).vision_encoder.backbone
    patch = backbone.config.patch_size
    hidden = backbone.embeddings(pixel_values)
    height, width = pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch
    hidden = backbone.layer_norm(hidden.view(hidden.shape[0], height, width, hidden.shape[-1]))
    for block in backbone.layers[:depth]:
        hidden = block(hidden)
    return hidden


def encode_rest(segmenter: nn.Module, hidden: torch.Tensor, depth: int) -> list[torch.Tensor]:
    """The tracker's ``image_embeddings`` from ``encode_prefix``'s output: the blocks from
    ``depth`` on, the neck, the decoder's projections and the no-memory embedding, as
    ``Sam3TrackerModel.get_image_embeddings`` applies them."""
    tracker = tracker_of(segmenter)
    for block in tracker.vision_encoder.backbone.layers[depth:]:
        hidden = block(hidden)
    spatial = hidden.permute(0, 3, 1, 2)
    # The tracker keeps the neck's first len(backbone_feature_sizes) levels and adds the
    # no-memory embedding to the neck's last level, which it then drops when the neck makes one
    # more (SAM 3's does): levels it drops are not computed here.
    fpn = tracker.vision_encoder.neck.fpn_layers
    kept = len(tracker.backbone_feature_sizes)
    maps = [layer(spatial) for layer in fpn[:kept]]
    maps[0] = tracker.mask_decoder.conv_s0(maps[0])
    maps[1] = tracker.mask_decoder.conv_s1(maps[1])
    if len(fpn) == kept:
        maps[-1] = maps[-1] + tracker.no_memory_embedding.view(1, -1, 1, 1)
    return maps
