"""The ``text_box`` prompt mode: SAM 3's concept model (``Sam3Model``) with a text prompt and a box.

``Sam3Model`` finds every instance of a concept; the text ("mid LAD stenosis") names it and the
box is an exemplar. Training matches the query whose mask best fits the lesion (one target per
prompt), pushes that query's score and the presence head up, and, for a hard-negative prompt
naming a neighbouring segment of the same vessel, pushes presence and every query down: without
negatives the presence head learns to fire on any text. The text encoder stays frozen.

The embedded concept model brings its own word-level tokenizer over the prompt vocabulary (real
checkpoints bring their CLIP tokenizer); nothing is downloaded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerFast, Sam3Config

from angiotune.model.losses import LossWeights, dice_loss, focal_loss
from angiotune.model.sam3 import EMBEDDED_IMAGE_SIZE, tiny_tracker_config, to_pixel_values
from angiotune.taxonomies import VESSELS, load_taxonomy

MAX_PROMPT_TOKENS = 16
SPECIAL_TOKENS = ["[PAD]", "<bos>", "<eos>", "[UNK]"]
SHAPE_WORDS = ["ellipse", "polygon", "stroke", "ring", "shape", "object"]
LESION_WORDS = ["stenosis", "lesion", "segment", "branch"]


def prompt_vocabulary() -> list[str]:
    """Every word the prompts use: segment names of both taxonomies, vessels, a few nouns."""
    words = set(SHAPE_WORDS) | set(LESION_WORDS) | {v.lower() for v in VESSELS}
    for name in ("CASS", "SYNTAX"):
        for segment in load_taxonomy(name).segments.values():
            words |= set(_words(segment.name))
    return SPECIAL_TOKENS + sorted(words)


def _words(text: str) -> list[str]:
    return text.lower().replace("/", " ").replace("-", " ").split()


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``prompt_vocabulary()`` with <bos> ... <eos> framing."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {word: index for index, word in enumerate(prompt_vocabulary())}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.normalizer = normalizers.Sequence([normalizers.Lowercase(),
                                            normalizers.Replace("/", " "),
                                            normalizers.Replace("-", " ")])
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 1), ("<eos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="[UNK]",
                                   model_max_length=MAX_PROMPT_TOKENS)


def tiny_concept_config(vocab_size: int, image_size: int = EMBEDDED_IMAGE_SIZE) -> Sam3Config:
    """A SAM 3 concept model small enough for two CPU cores (about 1 M parameters)."""
    vision = tiny_tracker_config(image_size).vision_config.to_dict()
    small = dict(hidden_size=64, num_attention_heads=4, intermediate_size=128)
    return Sam3Config(
        vision_config=vision,
        text_config=dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=1, num_attention_heads=4, projection_dim=64,
                         max_position_embeddings=MAX_PROMPT_TOKENS, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2),
        geometry_encoder_config=dict(num_layers=1, **small),
        detr_encoder_config=dict(num_layers=1, **small),
        detr_decoder_config=dict(num_layers=1, num_queries=16, **small),
        mask_decoder_config=dict(hidden_size=64, num_attention_heads=4))


def _normalised_boxes(boxes: torch.Tensor, size: int) -> torch.Tensor:
    """xyxy pixels (B, 4) -> normalised cxcywh (B, 1, 4), the concept model's box format."""
    x0, y0, x1, y1 = boxes.float().unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1)[:, None] / size


def concept_forward(model, tokenizer, images: torch.Tensor, boxes: torch.Tensor,
                    prompts: list[str], vision_embeds=None):
    """Run the concept model for one prompt per image; returns (outputs, vision_embeds)."""
    tokens = tokenizer(list(prompts), padding="max_length", truncation=True,
                       max_length=MAX_PROMPT_TOKENS, return_tensors="pt")
    device = images.device
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if vision_embeds is None:
        vision_embeds = inner.get_vision_features(pixel_values=to_pixel_values(images.float()))
    out = model(vision_embeds=vision_embeds, input_ids=tokens["input_ids"].to(device),
                attention_mask=tokens["attention_mask"].to(device),
                input_boxes=_normalised_boxes(boxes, images.shape[-1]).to(device),
                input_boxes_labels=torch.ones(len(prompts), 1, dtype=torch.long, device=device))
    return out, vision_embeds


def best_query(out) -> tuple[torch.Tensor, torch.Tensor]:
    """The highest-scoring instance's mask logits (B, h, w) and its score in [0, 1] (B,)."""
    scores = torch.sigmoid(out.pred_logits) * torch.sigmoid(out.presence_logits)
    index = scores.argmax(dim=1)
    rows = torch.arange(len(index), device=index.device)
    return out.pred_masks[rows, index], scores[rows, index]


def concept_loss(positive, negative, target: torch.Tensor,
                 weights: LossWeights) -> tuple[torch.Tensor, dict[str, float]]:
    """Matched-query mask loss and scores for the lesion prompt; presence off for negatives."""
    masks = positive.pred_masks  # (B, Q, h, w)
    small = F.interpolate(target[:, None].float(), size=masks.shape[-2:], mode="area")[:, 0]
    probs = torch.sigmoid(masks).flatten(2)
    overlap = (probs * small.flatten(1)[:, None]).sum(-1)
    soft_dice = 2 * overlap / (probs.sum(-1) + small.flatten(1)[:, None].sum(-1) + 1e-6)
    matched = soft_dice.detach().argmax(dim=1)
    rows = torch.arange(len(matched), device=matched.device)
    logits = F.interpolate(masks[rows, matched][:, None], size=target.shape[-2:],
                           mode="bilinear", align_corners=False)[:, 0]
    mask_loss = weights.dice * dice_loss(logits, target.float()) + \
        weights.pixel * focal_loss(logits, target.float(), weights.focal_gamma,
                                   weights.focal_alpha)
    labels = torch.zeros_like(positive.pred_logits)
    labels[rows, matched] = 1.0
    scores = F.binary_cross_entropy_with_logits(positive.pred_logits, labels)
    presence = F.binary_cross_entropy_with_logits(
        positive.presence_logits, torch.ones_like(positive.presence_logits))
    negatives = F.binary_cross_entropy_with_logits(
        negative.presence_logits, torch.zeros_like(negative.presence_logits)) + \
        F.binary_cross_entropy_with_logits(negative.pred_logits,
                                           torch.zeros_like(negative.pred_logits))
    total = mask_loss + weights.score * (scores + presence + negatives)
    parts = {"loss": total, "mask_loss": mask_loss, "score_loss": scores,
             "presence_loss": presence, "negative_loss": negatives}
    return total, {name: float(value.detach()) for name, value in parts.items()}
