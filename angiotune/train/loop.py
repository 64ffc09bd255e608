"""The training loop: the plain step and evaluation, fed by Ray Data, reported with checkpoints.

It runs in a Ray Train worker (a DDP rank) or in a Tune trial of one worker; ``TrainBackend``
is what differs between the two.

One trial's configuration is a flat dict (what the search space suggested, plus the run's
settings). Each epoch every rank trains on its shard of the training split and evaluates the whole
validation split (it is not split across workers, so no rank waits on another), and rank 0
reports the metrics with an adapter-only checkpoint (the heads, when there are any, beside it).

Stages differ only in configuration: ``heads`` adds the stage-2 measurement heads, ``init``
starts from a kept adapter (``init_adapters`` maps its name to a folder), and ``vessel`` (set by
the stage-3 search) has already narrowed the data to one vessel's lesions.
"""

from __future__ import annotations

import math
import tempfile
import time
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from angiotune.data.transforms import DEFAULT_CROP_CONTEXT
from angiotune.errors import ConfigError
from angiotune.model.adapters import (
    AdapterSettings,
    adapt,
    crop_context_of,
    load_adapter,
    read_adapter_record,
    save_adapter,
    settings_of,
)
from angiotune.model.embedding_cache import EmbeddingCache, encoder_is_frozen
from angiotune.model.heads import (
    TASKS,
    HeadSettings,
    LesionHeads,
    feature_dim_of,
    has_heads,
    load_heads,
    save_heads,
)
from angiotune.model.lesion import LesionModel, unwrap
from angiotune.model.losses import HeadLossWeights, LossWeights
from angiotune.model.refine import MaskRefiner, has_refiner, load_refiner, save_refiner
from angiotune.model.sam3 import (
    base_model_id,
    enable_gradient_checkpointing,
    load_base_model,
    load_prompt_tokenizer,
)
from angiotune.taxonomies import VESSELS
from angiotune.train.calibration import ReadoutCollector
from angiotune.train.metrics import with_objective
from angiotune.train.step import PRECISIONS, evaluate, train_step

STATE_FILE = "training_state.pt"
ADAPTER_DIR = "adapter"


def adapter_settings(config: dict) -> AdapterSettings:
    rank = int(config.get("rank", 8))
    alpha = config.get("alpha") or rank * float(config.get("alpha_ratio", 2))
    targets = config.get("targets", "vision_qv")
    return AdapterSettings(strategy=config.get("strategy", "lora"), rank=rank, alpha=float(alpha),
                           dropout=float(config.get("dropout", AdapterSettings.dropout)),
                           targets=tuple(str(targets).split("+")),
                           train_decoder=bool(config.get("train_decoder", True)),
                           crop_context=trial_crop_context(config))


def trial_crop_context(config: dict) -> float:
    """The crop a trial trains on: its start adapter's when it starts from one (the adapter
    learned that crop), else the searched or fixed ``crop_context``."""
    start = init_adapter(config)
    if start is not None:
        return crop_context_of(start)
    return float(config.get("crop_context", DEFAULT_CROP_CONTEXT))


def loss_weights(config: dict) -> LossWeights:
    return LossWeights(dice=float(config.get("dice_weight", 1.0)),
                       pixel=float(config.get("pixel_weight", 1.0)),
                       iou=float(config.get("iou_weight", 0.1)),
                       score=float(config.get("score_weight", 1.0)),
                       pixel_loss=config.get("pixel_loss", "focal"),
                       pos_weight=float(config.get("pos_weight", 10.0)),
                       focal_gamma=float(config.get("focal_gamma", 2.0)))


def head_loss_weights(config: dict) -> HeadLossWeights:
    counts = config.get("class_counts")
    class_weights = None
    if config.get("class_weights", "none") == "balanced" and counts:
        # Inverse frequency, mean 1; a class absent from training weighs as one seen once.
        inverse = [1.0 / max(int(c), 1) for c in counts]
        class_weights = tuple(w * len(inverse) / sum(inverse) for w in inverse)
    return HeadLossWeights(segment=float(config.get("segment_weight", 1.0)),
                           stenosis=float(config.get("stenosis_weight", 1.0)),
                           mld=float(config.get("mld_weight", 1.0)),
                           rvd=float(config.get("rvd_weight", 0.5)),
                           weighting=config.get("head_weighting", "fixed"),
                           class_loss=config.get("class_loss", "ce"),
                           class_weights=class_weights)


def trained_tasks(config: dict) -> tuple[str, ...]:
    """The heads a trial trains: all with learned (uncertainty) weighting, else those whose
    loss weight is above 0 (the segment head always)."""
    if config.get("head_weighting", "fixed") == "uncertainty":
        return TASKS
    weights = head_loss_weights(config)
    return tuple(task for task, weight in zip(TASKS, weights.fixed(), strict=True)
                 if task == "segment" or weight > 0)


def init_adapter(config: dict) -> Path | None:
    """The kept adapter a trial starts from, or None to start from the base."""
    name = config.get("init", "none")
    if name == "none":
        return None
    if name == "vessel":
        name = config["vessel"]
    return Path(config["init_adapters"][name])


def trial_base_id(config: dict) -> str:
    """The base weights' id: named once by the search's driver, else from the checkpoint."""
    return config.get("base_id") or base_model_id(config.get("model_path"),
                                                  config.get("prompt_mode", "box"))


def build_model(config: dict, checkpoint_dir: Path | None = None):
    """The trainable model and the adapter settings it saves with.

    From the trial's own checkpoint when resuming, else from ``init`` (keeping that adapter's
    shape: its strategy, rank and targets), else a fresh adapter on the base. Box mode wraps the
    tracker in a ``LesionModel``, with heads when ``heads`` is set.
    """
    mode = config.get("prompt_mode", "box")
    source = checkpoint_dir / ADAPTER_DIR if checkpoint_dir else init_adapter(config)
    base = load_base_model(config.get("model_path"), mode)
    if source is None:
        settings = adapter_settings(config)
        model = adapt(base, settings)
    else:
        model = load_adapter(base, source, trainable=True,
                             base_id=trial_base_id(config))
        settings = settings_of(read_adapter_record(source))
    if mode != "box":
        return model, settings
    heads = None
    if source is not None and has_heads(source):  # heads carry on from where they started
        heads = load_heads(source).train()
    elif config.get("heads"):
        heads = LesionHeads(HeadSettings(classes=tuple(config["classes"]),
                                         feature_dim=feature_dim_of(base.config),
                                         hidden=int(config.get("head_hidden", 128)),
                                         taxonomy=str(config.get("taxonomy", "CASS")),
                                         tasks=trained_tasks(config)))
    if heads is not None:  # unused parameters would stall DDP's gradient reduction
        heads.log_vars.requires_grad_(config.get("head_weighting", "fixed") == "uncertainty")
    refiner = None
    if source is not None and has_refiner(source):  # as the heads: it carries on
        refiner = load_refiner(source).train()
    elif config.get("refine"):
        refiner = MaskRefiner()
    return LesionModel(model, heads, settings.crop_context, refiner), settings


def save_trained(model: torch.nn.Module, settings: AdapterSettings, folder: Path,
                 base_id: str) -> None:
    """The adapter (and heads, and refiner) of a model as ``build_model`` made it."""
    model = unwrap(model)
    if isinstance(model, LesionModel):
        save_adapter(model.segmenter, settings, folder, base_id)
        if model.heads is not None:
            save_heads(model.heads, folder)
        if model.refiner is not None:
            save_refiner(model.refiner, folder)
    else:
        save_adapter(model, settings, folder, base_id)


def parameter_groups(model: torch.nn.Module, config: dict) -> list[dict]:
    """The adapter at ``lr``; the heads, which start from nothing rather than adjust a
    pre-trained model, at ``lr * head_lr_ratio``."""
    lr = float(config.get("lr", 1e-3))
    heads = getattr(unwrap(model), "heads", None)
    in_heads = {id(p) for p in heads.parameters()} if heads is not None else set()
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in in_heads], "lr": lr}]
    if in_heads:
        groups.append({"params": [p for p in trainable if id(p) in in_heads],
                       "lr": lr * float(config.get("head_lr_ratio", 10.0))})
    return groups


FAULT_DIR_ENV = "ANGIOTUNE_FAULT_DIR"
FAULT_KINDS = ("oom", "nan", "kill")
OOM_HINT = ("lower batch_size or rank, keep gradient_checkpointing on, or give each worker a "
            "GPU with more memory")


def claim_injected_fault(config: dict) -> str | None:
    """Test hook: a fault for this trial to suffer, or None.

    When the search was started with ``ANGIOTUNE_FAULT_DIR`` set to a folder, each trial's first
    worker takes (deletes) the first file there, in name order, whose name ends in ``oom``,
    ``nan`` or ``kill`` (``1-oom``, ``2-nan``, ``3-kill``) and suffers that fault: in its first
    training step an out-of-memory error raised as torch raises it, or a loss that is NaN; or,
    once its first checkpoint is registered, SIGKILL of its own process. Tests use it to cause
    these faults for real in one trial of a search; it is never set otherwise.
    """
    folder = config.get("fault_dir")
    if not folder:
        return None
    for path in sorted(Path(folder).glob("*")):
        kind = path.name.rsplit("-", 1)[-1]
        if kind not in FAULT_KINDS:
            continue
        try:
            path.unlink()  # only one worker can delete it: the claim is atomic
        except FileNotFoundError:
            continue
        return kind
    return None


def _die_after_first_checkpoint(backend: TrainBackend) -> None:
    """The ``kill`` fault: SIGKILL this process once a checkpoint to restart from is held (a
    kill before that would restart the trial from nothing)."""
    import os
    import signal

    backend.wait_for_checkpoints()
    # Windows has no SIGKILL; os.kill with SIGTERM there is TerminateProcess, as abrupt.
    os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


def _step_failure(parts: dict | None, error: Exception | None, epoch: int) -> str | None:
    if error is not None:
        return f"out of memory in epoch {epoch + 1} ({error}); {OOM_HINT}"
    if not math.isfinite(parts["loss"]):
        return (f"loss became {parts['loss']} in epoch {epoch + 1} (diverged); try a lower lr "
                "or fp32")
    return None


def _agreed_failure(failure: str | None) -> str | None:
    """Every DDP rank stops together when one fails; a lone rank stopping would hang the rest."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return failure
    flag = torch.tensor([1.0 if failure else 0.0])
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag)
    return failure or ("another worker failed" if flag.item() > 0 else None)


class ValidationCache:
    """Validation samples are the same every epoch (no augmentation): keep the first epoch's
    batches in memory and evaluate later epochs on them instead of decoding them again, unless
    they outgrow ``limit_bytes`` (the full-size model's crops are large)."""

    def __init__(self, limit_bytes: int = 2 * 2**30) -> None:
        self.limit_bytes = limit_bytes
        self.kept: list[dict] | None = None
        self.too_large = False

    def batches(self, shard, batch_size: int):
        if self.kept is not None:
            return iter(self.kept)
        return self._streaming(shard, batch_size)

    def _streaming(self, shard, batch_size: int):
        kept, size = [], 0
        for batch in shard.iter_batches(batch_size=batch_size):
            if not self.too_large:
                size += sum(getattr(value, "nbytes", 0) for value in batch.values())
                self.too_large = size > self.limit_bytes
                kept.append(batch)
            yield batch
        if not self.too_large:
            self.kept = kept


class EpochClock:
    """Where an epoch's time goes: ``data_wait_s`` (waiting for the next training batch),
    ``train_s`` (the rest of the training pass) and ``eval_s``. Reported with the metrics so that
    a search's overhead (whatever is in none of them) can be measured from its results."""

    def __init__(self) -> None:
        self.seconds = {"data_wait_s": 0.0, "train_s": 0.0, "eval_s": 0.0}
        self._last = time.perf_counter()

    def waiting(self, batches):
        iterator = iter(batches)
        while True:
            started = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                self.seconds["data_wait_s"] += time.perf_counter() - started
                return
            self.seconds["data_wait_s"] += time.perf_counter() - started
            yield batch

    def mark(self, name: str) -> None:
        """Everything since the last mark, less the data waits inside it, goes to ``name``."""
        now = time.perf_counter()
        waited = self.seconds["data_wait_s"] if name == "train_s" else 0.0
        self.seconds[name] += now - self._last - waited
        self._last = now


def embedding_cache_for(model: torch.nn.Module, config: dict) -> EmbeddingCache | None:
    """The shared cache of the base's image embeddings, when the search asked for one; refused
    when the encoder trains, since its embeddings would change under the cache."""
    if not config.get("embedding_cache"):
        return None
    if not encoder_is_frozen(model):
        raise ConfigError("embedding_cache needs a frozen image encoder: use strategy "
                          "decoder_only, or lora with targets decoder_attn only")
    return EmbeddingCache(Path(config["cache_dir"]), trial_base_id(config))


def with_embeddings(batches, cache: EmbeddingCache | None, model: torch.nn.Module, device):
    """Batches with ``image_embeddings`` from the cache added (unchanged without a cache)."""
    segmenter = getattr(unwrap(model), "segmenter", None)
    for batch in batches:
        if cache is not None and segmenter is not None:
            batch = {**batch, "image_embeddings": cache.embeddings(batch["image"], segmenter,
                                                                   device)}
        yield batch


def _missing_scores(config: dict) -> dict[str, float]:
    """The search's metrics as NaN: a failed trial has no score."""
    metrics = config.get("metrics") or [config["metric"]]
    return {name: math.nan for name in metrics}


class TrainBackend(ABC):
    """Where the loop gets its data, device and checkpoint, and where it reports: a Ray Train
    worker (``RayTrainBackend``) or a Tune trial running the loop itself (``TuneTrialBackend``).
    The loop is the same either way."""

    rank = 0
    world_size = 1

    @abstractmethod
    def restored(self):
        """The checkpoint to resume from, or None."""

    @abstractmethod
    def device(self) -> torch.device:
        ...

    @abstractmethod
    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        ...

    @abstractmethod
    def dataset(self, name: str):
        ...

    @abstractmethod
    def report(self, metrics: dict, folder: Path | None = None) -> None:
        ...

    @abstractmethod
    def wait_for_checkpoints(self) -> None:
        """Return once every reported checkpoint is safely held."""


class RayTrainBackend(TrainBackend):
    """A worker of a Ray Train worker group: one of several DDP ranks."""

    def __init__(self) -> None:
        import ray.train

        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()

    def restored(self):
        import ray.train

        return ray.train.get_checkpoint()

    def device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(
            model, parallel_strategy=None if self.world_size == 1 else "ddp")

    def dataset(self, name: str):
        import ray.train

        return ray.train.get_dataset_shard(name)

    def report(self, metrics: dict, folder: Path | None = None) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder)
                         if folder else None)

    def wait_for_checkpoints(self) -> None:
        import ray.train

        ray.train.get_all_reported_checkpoints()  # returns once every report is registered


class TuneTrialBackend(TrainBackend):
    """The Tune trial's own process trains: a trial of one worker needs no Train controller
    and worker group, whose start-up (a fresh process importing the training stack) cost about
    20 s per trial on the development machine (``benchmarks/search_overhead.py``). Tune then
    keeps the checkpoints and restarts a failed trial from its last one."""

    def __init__(self, datasets: dict, use_gpu: bool) -> None:
        self.datasets = datasets
        self.use_gpu = use_gpu

    def restored(self):
        from ray import tune

        return tune.get_checkpoint()

    def device(self) -> torch.device:
        if self.use_gpu:
            import ray

            gpu_ids = ray.get_gpu_ids()  # Ray sets CUDA_VISIBLE_DEVICES to the trial's GPU
            if not gpu_ids or not torch.cuda.is_available():
                raise ConfigError("the trial was given a GPU, but torch sees none")
            return torch.device("cuda", 0)
        return torch.device("cpu")

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device())

    def dataset(self, name: str):
        return self.datasets[name]

    def report(self, metrics: dict, folder: Path | None = None) -> None:
        from ray import tune

        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder)
                    if folder else None)

    def wait_for_checkpoints(self) -> None:
        # tune.report persists the checkpoint before it returns; the driver registers it when
        # it takes the result, which the next report would otherwise wait for.
        time.sleep(3)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker function; ``config`` holds the trial's parameters and run settings."""
    run_training(config, RayTrainBackend())


def run_training(config: dict, backend: TrainBackend) -> None:
    """Train one trial, epoch by epoch, reporting metrics and an adapter-only checkpoint."""
    torch.manual_seed(int(config.get("seed", 0)))
    weights = loss_weights(config)
    head_weights = head_loss_weights(config)
    mode = config.get("prompt_mode", "box")
    tokenizer = load_prompt_tokenizer(config.get("model_path")) if mode == "text_box" else None
    start_epoch = 0
    checkpoint = backend.restored()
    state = None
    if checkpoint:
        with checkpoint.as_directory() as folder:
            model, settings = build_model(config, Path(folder))
            state = torch.load(Path(folder) / STATE_FILE, weights_only=True)
            start_epoch = int(state["epoch"])
    else:
        model, settings = build_model(config)
    cache = embedding_cache_for(model, config)
    device = backend.device()
    on_gpu = device.type == "cuda"
    if config.get("gradient_checkpointing", on_gpu):
        enable_gradient_checkpointing(model)
    precision = config.get("precision") or ("bf16" if on_gpu else "fp32")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    model = backend.prepare(model)
    optimizer = torch.optim.AdamW(parameter_groups(model, config),
                                  weight_decay=float(config.get("weight_decay", 1e-4)))
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        if start_epoch >= int(config["epochs"]) and state.get("metrics"):
            # Restored after its last epoch (a search resumed after a kill): say the result
            # again, or Tune ends the trial without its metric.
            backend.report(state["metrics"])
            return
    batch_size = int(config.get("batch_size", 8))
    train_shard = backend.dataset("train")
    val_shard = backend.dataset("val")
    rank = backend.rank
    fault = claim_injected_fault(config) if rank == 0 and state is None else None
    validation = ValidationCache()
    heads = getattr(unwrap(model), "heads", None)
    readouts = ReadoutCollector(heads) if heads is not None and tokenizer is None else None
    for epoch in range(start_epoch, int(config["epochs"])):
        losses = []
        clock = EpochClock()
        batches = clock.waiting(train_shard.iter_batches(batch_size=batch_size))
        for batch in with_embeddings(batches, cache, model, device):
            parts, error = None, None
            try:
                if fault == "oom":
                    raise torch.OutOfMemoryError("injected through ANGIOTUNE_FAULT_DIR")
                parts = train_step(model, batch, optimizer, weights, tokenizer=tokenizer,
                                   autocast_dtype=PRECISIONS[precision], scaler=scaler,
                                   head_weights=head_weights,
                                   on_outputs=None if readouts is None else readouts.add)
                if fault == "nan":
                    parts["loss"] = math.nan
            except torch.OutOfMemoryError as caught:
                error = caught
            failure = _agreed_failure(_step_failure(parts, error, epoch))
            if failure:
                # Reported, not raised: a retry would fail the same way. The search records
                # the trial as failed with this reason, and Optuna as FAIL.
                backend.report({**_missing_scores(config), "epoch": epoch + 1,
                                "failed": failure})
                return
            losses.append(parts["loss"])
        if readouts is not None:
            readouts.fit()  # the heads' QCA read, before validation scores it
        clock.mark("train_s")
        val_batches = with_embeddings(validation.batches(val_shard, batch_size), cache, model,
                                      device)
        metrics = evaluate(model, val_batches, tokenizer)
        clock.mark("eval_s")
        metrics = with_objective(metrics, config.get("objective"), VESSELS)
        metrics.update(epoch=epoch + 1, train_loss=sum(losses) / max(len(losses), 1),
                       resumed_from_epoch=start_epoch, **clock.seconds)
        if cache is not None:
            metrics.update(embedding_cache_hits=cache.hits, embedding_cache_misses=cache.misses)
        with tempfile.TemporaryDirectory() as folder:
            saved = None
            if rank == 0:
                saved = Path(folder)
                save_trained(model, settings, saved / ADAPTER_DIR, trial_base_id(config))
                torch.save({"epoch": epoch + 1, "optimizer": optimizer.state_dict(),
                            "metrics": {k: v.item() if hasattr(v, "item") else v
                                        for k, v in metrics.items()}}, saved / STATE_FILE)
            backend.report(metrics, saved)
        if fault == "kill":
            _die_after_first_checkpoint(backend)
