"""High-resolution mask refinement: the decoder's coarse mask, sharpened on the input pixels.

SAM's mask decoder predicts on a grid a quarter of its input (32 x 32 for the embedded 112 px
model, 288 x 288 for SAM 3 at 1008 px): coarse for a lumen a few cells wide, and bilinear
upsampling turns it into a blob about twice the lumen. In the spirit of HQ-SAM, which fuses
early high-resolution features with the decoder's mask features, a small convolutional head
reads the upsampled coarse logits together with the input image at full resolution (the only
features of that resolution a ViT has) and predicts a correction. Its last layer starts at zero,
so training starts from the decoder's own mask; the coarse mask keeps a loss of its own (deep
supervision, ``angiotune.train.step``), so the decoder still learns which vessel and how far,
while the refiner learns where the lumen's edges are.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from angiotune.errors import ConfigError

REFINER_WEIGHTS = "refiner.safetensors"
REFINER_CONFIG = "refiner.json"
LOGIT_SCALE = 4.0  # coarse logits enter as tanh(logit / 4): sure inside/outside, and the edge
# The lumen's darkness is judged against its surroundings: a window of about a seventh of the
# crop (15 px of the embedded 112 px input; a vessel and some background on either side).
LOCAL_WINDOW_FRACTION = 15 / 112


@dataclass(frozen=True)
class RefinerSettings:
    channels: int = 24

    def __post_init__(self) -> None:
        if not 4 <= self.channels <= 256:
            raise ConfigError(f"refiner channels: {self.channels} is not in [4, 256]")


class MaskRefiner(nn.Module):
    def __init__(self, settings: RefinerSettings = RefinerSettings()) -> None:
        super().__init__()
        self.settings = settings
        width = settings.channels
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, width, 3, padding=2, dilation=2), nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, 1, 3, padding=1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, coarse_logits: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Refined logits (B, S, S) from the coarse ones (B, S, S) and the input images
        (B, S, S, in [0, 1]). The coarse logits are detached: their own loss trains them."""
        image = images[:, None].to(coarse_logits.dtype)
        window = max(3, int(round(image.shape[-1] * LOCAL_WINDOW_FRACTION)) | 1)
        local = image - F.avg_pool2d(image, window, 1, window // 2, count_include_pad=False)
        features = torch.cat([torch.tanh(coarse_logits[:, None] / LOGIT_SCALE), 4 * local,
                              2 * image - 1], dim=1)
        return coarse_logits.detach() + LOGIT_SCALE * self.net(features)[:, 0]


def save_refiner(refiner: MaskRefiner, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in refiner.state_dict().items()},
              folder / REFINER_WEIGHTS)
    record = {**asdict(refiner.settings), "format": 1}
    (folder / REFINER_CONFIG).write_text(json.dumps(record, indent=1) + "\n")


def has_refiner(folder: Path) -> bool:
    return (Path(folder) / REFINER_CONFIG).is_file()


def load_refiner(folder: Path) -> MaskRefiner:
    path = Path(folder) / REFINER_CONFIG
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        refiner = MaskRefiner(RefinerSettings(channels=int(record["channels"])))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as error:
        raise ConfigError(f"{path}: unreadable refiner record ({error})") from None
    refiner.load_state_dict(load_file(Path(folder) / REFINER_WEIGHTS))
    return refiner.eval()
