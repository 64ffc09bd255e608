"""Names shared across angiotune, in a module that imports only the standard library.

Search spaces are checked against these in the CLI, in Tune's driver and in every trial actor;
taking them from the modules that act on them (torch, transformers, peft) would load the whole
training stack in each of those processes. Those modules import them from here, so each name is
defined once.
"""

from __future__ import annotations

# Vessels. Each adapter vessel has its own registry entry, stage-3 study and standard view.
ADAPTER_VESSELS = ("RCA", "LAD", "LCX")
# Every vessel a segment taxonomy may name: the adapter vessels, the left main and the ramus.
VESSELS = (*ADAPTER_VESSELS, "LM", "RAMUS")
GENERAL = "general"  # the registry entry chosen on every vessel's lesions
UNKNOWN_VESSEL = "UNKNOWN"  # a lesion label that names no segment (ARCADE's "stenosis")

# What an adapter trains (angiotune.model.adapters).
STRATEGIES = ("lora", "decoder_only", "full")
# Named groups of linear layers LoRA can target (regexes over module paths of the tracker).
TARGET_GROUPS = {
    "vision_qv": r"vision_encoder\..*\.(q_proj|v_proj)",
    "vision_attn": r"vision_encoder\..*\.(q_proj|k_proj|v_proj|o_proj)",
    "vision_mlp": r"vision_encoder\..*\.(fc1|fc2)",
    # The tracker's two-way transformer; in the concept model, the DETR decoder and the mask
    # decoder's prompt attention.
    "decoder_attn": r"(mask_decoder|detr_decoder)\..*\.(q_proj|k_proj|v_proj|o_proj)",
}
CROP_CONTEXT_RANGE = (1.0, 8.0)  # the crop's side in lesion boxes: the box itself up to 8

# Stage-2 head losses (angiotune.model.losses).
HEAD_WEIGHTINGS = ("fixed", "uncertainty")
CLASS_LOSSES = ("ce", "focal")

# How the base model is prompted (angiotune.model.sam3).
PROMPT_MODES = ("box", "text_box")

# Reported metrics and whether larger is better (angiotune.train.metrics computes them).
HEAD_METRICS = {"cass_accuracy": "max", "cass_macro_f1": "max", "stenosis_mae": "min",
                "mld_mae_mm": "min", "rvd_mae_mm": "min"}
SEGMENTATION_METRICS = {"dice": "max", "iou": "max"}
# agreement: a student's Dice against its teacher's masks (angiotune.train.distill).
METRIC_MODES = {**SEGMENTATION_METRICS, **HEAD_METRICS, "objective": "max", "agreement": "max"}

# Experiment trackers a space's ``callbacks`` section may turn on (angiotune.search.trackers),
# each with the settings it takes; the name is also the Python package it needs.
TRACKERS = {"mlflow": ("tracking_uri", "experiment"), "wandb": ("project", "entity", "mode")}
WANDB_MODES = ("offline", "online")  # offline: nothing leaves the machine until `wandb sync`

# Environment variables.
FAULT_DIR_ENV = "ANGIOTUNE_FAULT_DIR"  # test hook: faults for trials to suffer (train.faults)
HOME_ENV = "ANGIOTUNE_HOME"  # the private folder: pseudonym salt, remembered weight hashes
SALT_ENV = "ANGIOTUNE_SALT"  # the pseudonym salt itself, for a site that shares one
