"""The box-prompted segmenter and its optional stage-2 heads as one module.

One module, so that DDP synchronises the heads' gradients with the adapter's and a single
``forward`` gives everything a step or an evaluation needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from angiotune.data.transforms import DEFAULT_CROP_CONTEXT
from angiotune.model.encoder_prefix import encode_rest
from angiotune.model.heads import LesionHeads, pooled_features
from angiotune.model.refine import MaskRefiner
from angiotune.model.sam3 import to_pixel_values
from angiotune.qca.readout import crop_readouts

UNUSED_WITH_A_BOX = "pred_obj_score_head"


class LesionModel(nn.Module):
    """``crop_context``: the lesion crop (in boxes) the adapter was trained on, for whoever
    crops for it (``angiotune.predict.segment``); ``refiner``: the optional high-resolution
    mask refinement (``angiotune.model.refine``)."""

    def __init__(self, segmenter: nn.Module, heads: LesionHeads | None = None,
                 crop_context: float = DEFAULT_CROP_CONTEXT,
                 refiner: MaskRefiner | None = None) -> None:
        super().__init__()
        self.segmenter = segmenter
        self.heads = heads
        self.refiner = refiner
        self.crop_context = float(crop_context)
        # The tracker's object-score head says whether the object is visible in a video frame;
        # a box on one frame never uses it, and under DDP a trainable parameter that gets no
        # gradient stops the next step ("did not receive grad"). Frozen, it stays as loaded.
        for name, parameter in segmenter.named_parameters():
            if UNUSED_WITH_A_BOX in name:
                parameter.requires_grad_(False)

    def forward(self, images: torch.Tensor, boxes: torch.Tensor,
                context: torch.Tensor | None = None,
                mm_per_pixel: torch.Tensor | None = None,
                embeddings: list[torch.Tensor] | None = None,
                prefix: tuple[int, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """``logits`` (B, S, S) at the input size, ``confidence`` (B,) from the IoU head, and
        the heads' outputs when there are heads (they need ``context`` and ``mm_per_pixel``).
        With a refiner, ``logits`` are refined and ``coarse_logits`` are the decoder's own.
        ``embeddings``: the images' encoder output, when a cache has it (the encoder is then
        skipped; ``images`` still gives the output size). ``prefix``: (depth, hidden states)
        after the encoder's first ``depth`` blocks, when a cache has them: only the rest runs."""
        if prefix is not None:
            embeddings = encode_rest(self.segmenter, prefix[1], prefix[0])
        inputs = ({"image_embeddings": embeddings} if embeddings is not None
                  else {"pixel_values": to_pixel_values(images.float())})
        out = self.segmenter(**inputs, input_boxes=boxes.float()[:, None],
                             multimask_output=False)
        low_res = out.pred_masks[:, 0, 0]
        logits = F.interpolate(low_res[:, None], size=images.shape[-2:], mode="bilinear",
                               align_corners=False)[:, 0]
        result = {"logits": logits, "confidence": out.iou_scores[:, 0, 0]}
        if self.refiner is not None:
            result.update(logits=self.refiner(logits, images), coarse_logits=logits)
        if self.heads is not None:
            features = pooled_features(out.image_embeddings, low_res, boxes, images.shape[-1])
            readouts = (self.readouts(images, result["logits"], boxes)
                        if self.heads.reads_qca and not self.training else None)
            result.update(self.heads(features, context, mm_per_pixel, readouts))
        return result

    @staticmethod
    def readouts(images: torch.Tensor, logits: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """QCA of the predicted masks on their crops (``angiotune.qca.readout``), (B, 6)."""
        values = crop_readouts(images.detach().float().cpu().numpy(),
                               torch.sigmoid(logits.detach().float()).cpu().numpy(),
                               boxes.detach().float().cpu().numpy())
        return torch.as_tensor(values, device=logits.device)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or the module itself)."""
    return model.module if hasattr(model, "module") else model
