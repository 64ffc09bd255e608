"""The Ray Train loop: the plain step and evaluation, fed by Ray Data, reported with checkpoints.

One trial's configuration is a flat dict (what the search space suggested, plus the run's
settings). Each epoch every rank trains on its shard of the training split and evaluates the whole
validation split (it is not split across workers, so no rank waits on another), and rank 0
reports the metrics with an adapter-only checkpoint.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch

from angiotune.model.adapters import AdapterSettings, adapt, load_adapter, save_adapter
from angiotune.model.losses import LossWeights
from angiotune.model.sam3 import (
    base_model_id,
    enable_gradient_checkpointing,
    load_base_model,
    load_prompt_tokenizer,
)
from angiotune.train.step import PRECISIONS, evaluate, train_step

STATE_FILE = "training_state.pt"
ADAPTER_DIR = "adapter"


def adapter_settings(config: dict) -> AdapterSettings:
    rank = int(config.get("rank", 8))
    alpha = config.get("alpha") or rank * float(config.get("alpha_ratio", 2))
    targets = config.get("targets", "vision_qv")
    return AdapterSettings(strategy=config.get("strategy", "lora"), rank=rank, alpha=float(alpha),
                           dropout=float(config.get("dropout", 0.0)),
                           targets=tuple(str(targets).split("+")),
                           train_decoder=bool(config.get("train_decoder", True)))


def loss_weights(config: dict) -> LossWeights:
    return LossWeights(dice=float(config.get("dice_weight", 1.0)),
                       pixel=float(config.get("pixel_weight", 1.0)),
                       iou=float(config.get("iou_weight", 0.1)),
                       score=float(config.get("score_weight", 1.0)),
                       pixel_loss=config.get("pixel_loss", "focal"),
                       pos_weight=float(config.get("pos_weight", 10.0)),
                       focal_gamma=float(config.get("focal_gamma", 2.0)))


class DivergedError(RuntimeError):
    """The loss became NaN or infinite: the trial stops and is recorded as failed."""


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker function; ``config`` holds the trial's parameters and run settings."""
    import ray.train
    import ray.train.torch

    torch.manual_seed(int(config.get("seed", 0)))
    settings = adapter_settings(config)
    weights = loss_weights(config)
    mode = config.get("prompt_mode", "box")
    tokenizer = load_prompt_tokenizer(config.get("model_path")) if mode == "text_box" else None
    base = load_base_model(config.get("model_path"), mode)
    model = adapt(base, settings)
    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    state = None
    if checkpoint:
        with checkpoint.as_directory() as folder:
            model = load_adapter(load_base_model(config.get("model_path"), mode),
                                 Path(folder) / ADAPTER_DIR, trainable=True)
            state = torch.load(Path(folder) / STATE_FILE, weights_only=True)
            start_epoch = int(state["epoch"])
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    if config.get("gradient_checkpointing", on_gpu):
        enable_gradient_checkpointing(model)
    precision = config.get("precision") or ("bf16" if on_gpu else "fp32")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    model = ray.train.torch.prepare_model(model, parallel_strategy=None
                                          if ray.train.get_context().get_world_size() == 1
                                          else "ddp")
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=float(config.get("lr", 1e-3)),
                                  weight_decay=float(config.get("weight_decay", 1e-4)))
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    batch_size = int(config.get("batch_size", 8))
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    rank = ray.train.get_context().get_world_rank()
    for epoch in range(start_epoch, int(config["epochs"])):
        losses = []
        for batch in train_shard.iter_batches(batch_size=batch_size):
            parts = train_step(model, batch, optimizer, weights, tokenizer=tokenizer,
                               autocast_dtype=PRECISIONS[precision], scaler=scaler)
            if not math.isfinite(parts["loss"]):
                raise DivergedError(f"loss became {parts['loss']} in epoch {epoch + 1}")
            losses.append(parts["loss"])
        metrics = evaluate(model, val_shard.iter_batches(batch_size=batch_size), tokenizer)
        metrics.update(epoch=epoch + 1, train_loss=sum(losses) / max(len(losses), 1))
        with tempfile.TemporaryDirectory() as folder:
            result = None
            if rank == 0:
                plain = model.module if hasattr(model, "module") else model
                save_adapter(plain, settings, Path(folder) / ADAPTER_DIR,
                             base_model_id(config.get("model_path"), mode))
                torch.save({"epoch": epoch + 1, "optimizer": optimizer.state_dict()},
                           Path(folder) / STATE_FILE)
                result = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=result)
