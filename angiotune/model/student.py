"""A distilled student: the SAM 3 tracker with a smaller image encoder, made from its teacher.

The student keeps the tracker's architecture and its decoder's width, so the prompt encoder and
mask decoder start as the teacher's (LoRA merged in) and only the encoder is smaller: fewer and
narrower ViT blocks on a smaller input. Its shape is given as shares of the teacher's
(``StudentShape``), so one distillation space fits the embedded model and the full SAM 3 alike.
An encoder as wide as the teacher's starts from evenly spaced teacher blocks (as DistilBERT
takes every other layer); a narrower one starts at random, as MobileSAM's does.

A student is a plain Hugging Face folder (``save_pretrained`` with safetensors) that
``Sam3TrackerModel.from_pretrained`` loads without angiotune, plus ``angiotune_student.json``
with the crop it was trained on and where it came from.
"""

from __future__ import annotations

import copy
import json
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import Sam3TrackerConfig, Sam3TrackerModel

from angiotune.model.lesion import LesionModel
from angiotune.model.sam3 import ModelError, check_loading

STUDENT_FILE = "angiotune_student.json"
# Time per lesion on the users' GPU, from FLOPs: an RTX 3090's dense bf16 peak at the MFU the
# search projection assumes where none is measured (benchmarks/gpu_sam3.py). An estimate.
RTX_3090_TFLOPS = 35.6
ASSUMED_MFU = 0.35
MS_ASSUMPTION = (f"FLOPs at {RTX_3090_TFLOPS} TFLOP/s (RTX 3090 bf16 peak) x MFU {ASSUMED_MFU}, "
                 "assumed as in benchmarks/gpu_sam3.py's projection; not measured")
STUDENT_FORMAT = 1
_BLOCK = re.compile(r"^vision_encoder\.backbone\.layers\.(\d+)\.")


@dataclass(frozen=True)
class StudentShape:
    """The student's encoder as shares of the teacher's: width (hidden size, in whole heads of
    the teacher's head size), depth (blocks) and input side (in whole patches)."""

    width_ratio: float = 0.5
    depth_ratio: float = 0.5
    input_ratio: float = 1.0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not 0 < float(value) <= 1:
                raise ModelError(f"{name} {value!r} is not a share in (0, 1] of the teacher's")


def student_config(teacher: Sam3TrackerConfig, shape: StudentShape) -> Sam3TrackerConfig:
    """The teacher's tracker config with the encoder shrunk to ``shape``; the decoder, prompt
    encoder and FPN width are the teacher's, so their weights carry over."""
    raw = teacher.to_dict()
    vision = raw["vision_config"]
    backbone = vision["backbone_config"]
    head_dim = backbone["hidden_size"] // backbone["num_attention_heads"]
    heads = max(1, round(shape.width_ratio * backbone["num_attention_heads"]))
    hidden = heads * head_dim
    depth = max(1, round(shape.depth_ratio * backbone["num_hidden_layers"]))
    patch = backbone["patch_size"]
    teacher_tokens = backbone["image_size"] // patch
    tokens = max(2, round(shape.input_ratio * teacher_tokens))
    window = max(1, round(backbone["window_size"] * tokens / teacher_tokens))
    globals_ = max(1, min(len(backbone.get("global_attn_indexes") or [0]), depth))
    backbone.update(
        hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=depth,
        intermediate_size=max(1, round(backbone["intermediate_size"] * hidden
                                       / backbone["hidden_size"])),
        image_size=tokens * patch, window_size=window,
        # The last block of each of as many groups as the teacher has global blocks.
        global_attn_indexes=sorted({round((i + 1) * depth / globals_) - 1
                                    for i in range(globals_)}))
    scales = [s for s in vision.get("scale_factors") or (4.0, 2.0, 1.0)][:3]
    vision["backbone_feature_sizes"] = [[round(tokens * s)] * 2 for s in scales]
    raw["prompt_encoder_config"]["image_size"] = tokens * patch
    # In eval mode the tracker swaps an unstable single mask for the best of its three
    # multimask outputs, which a student never trains (it learns the single-mask token, as a
    # box asks for one object): its validation Dice jumped by 0.1 between epochs until off.
    raw["mask_decoder_config"]["dynamic_multimask_via_stability"] = False
    return Sam3TrackerConfig.from_dict(raw)


def merged_tracker(model: LesionModel | torch.nn.Module) -> Sam3TrackerModel:
    """A copy of a kept model's tracker with any LoRA merged into its weights."""
    segmenter = copy.deepcopy(model.segmenter if isinstance(model, LesionModel) else model)
    if hasattr(segmenter, "merge_and_unload"):
        with warnings.catch_warnings():  # peft asks a transformers 5 property it deprecated
            warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
            segmenter = segmenter.merge_and_unload()
    return segmenter


def build_student(teacher: Sam3TrackerModel, shape: StudentShape, seed: int = 0
                  ) -> Sam3TrackerModel:
    """A student of ``shape`` initialised from ``teacher`` (a tracker with merged weights):
    every weight whose name and shape match is copied; an encoder of the teacher's width takes
    evenly spaced teacher blocks, ending with its last."""
    config = student_config(teacher.config, shape)
    torch.manual_seed(seed)
    student = Sam3TrackerModel(config)
    source = teacher.state_dict()
    teacher_depth = teacher.config.vision_config.backbone_config.num_hidden_layers
    depth = config.vision_config.backbone_config.num_hidden_layers
    take = {i: (i + 1) * teacher_depth // depth - 1 for i in range(depth)}
    own = student.state_dict()
    for name, value in own.items():
        block = _BLOCK.match(name)
        origin = (name if block is None else
                  _BLOCK.sub(f"vision_encoder.backbone.layers.{take[int(block[1])]}.", name))
        if origin in source and source[origin].shape == value.shape:
            own[name] = source[origin].detach().clone()
    student.load_state_dict(own)
    return student


def save_student(student: torch.nn.Module, folder: Path, record: dict) -> None:
    """The student as a Hugging Face folder, with ``record`` (its crop, shape, teacher)."""
    model = student.segmenter if isinstance(student, LesionModel) else student
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    (folder / STUDENT_FILE).write_text(json.dumps({"format": STUDENT_FORMAT, **record},
                                                  indent=1, sort_keys=True), encoding="utf-8")


def read_student_record(folder: Path) -> dict:
    try:
        return json.loads((Path(folder) / STUDENT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelError(f"{folder}: not a distilled student ({STUDENT_FILE}: {error})") \
            from None


def load_student(folder: Path) -> LesionModel:
    """A saved student, ready to segment as a kept model is (``angiotune.predict``)."""
    from transformers.utils import logging as transformers_logging

    record = read_student_record(folder)
    if record.get("format", 0) > STUDENT_FORMAT:
        raise ModelError(f"{folder}: a student of format {record['format']}, newer than this "
                         f"angiotune reads ({STUDENT_FORMAT}); upgrade angiotune")
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        model, info = Sam3TrackerModel.from_pretrained(
            folder, local_files_only=True, use_safetensors=True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as error:
        raise ModelError(f"cannot load the student in {folder}: {error}") from None
    finally:
        transformers_logging.set_verbosity(verbosity)
    check_loading(Path(folder), "Sam3TrackerModel", info)
    return LesionModel(model.eval(), None, float(record["crop_context"])).eval()


def encoder_summary(config: Sam3TrackerConfig) -> dict:
    """What a student's encoder is, for manifests and cards."""
    backbone = config.vision_config.backbone_config
    return {"hidden_size": backbone.hidden_size, "blocks": backbone.num_hidden_layers,
            "heads": backbone.num_attention_heads, "image_size": backbone.image_size}


def frame_flops(config: Sam3TrackerConfig) -> float:
    """FLOPs to segment one lesion's box crop with a tracker of ``config``, counted on the
    meta device: no weights, any size."""
    from torch.utils.flop_counter import FlopCounterMode

    size = config.vision_config.backbone_config.image_size
    with torch.device("meta"):
        model = Sam3TrackerModel(config).eval().requires_grad_(False)
        pixels = torch.zeros(1, 3, size, size)
        boxes = torch.tensor([[size * 0.3, size * 0.3, size * 0.6, size * 0.6]])
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            # In two calls, as gpu_sam3.py counts them: the counter's module hooks fail on the
            # prompt encoder's outputs inside one whole forward.
            embeddings = model.get_image_embeddings(pixels)
            model(image_embeddings=embeddings, input_boxes=boxes[:, None],
                  multimask_output=False)
    return float(counter.get_total_flops())


def rtx3090_ms(flops: float) -> float:
    """Milliseconds for ``flops`` on an RTX 3090 at the assumed MFU (``MS_ASSUMPTION``)."""
    return flops / (RTX_3090_TFLOPS * 1e12 * ASSUMED_MFU) * 1e3


def full_size_flops(shape: StudentShape | None = None) -> float:
    """FLOPs per lesion of the full-size SAM 3 tracker (1008 px; its default config, as the
    hub's facebook/sam3 has it), or of a student of that shape made from it: what a shape
    costs on the users' model, whichever teacher it is tried on."""
    full = Sam3TrackerConfig()
    return frame_flops(full if shape is None else student_config(full, shape))
