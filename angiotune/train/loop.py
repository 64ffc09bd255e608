"""The training loop: the plain step and evaluation, fed by Ray Data, reported with checkpoints.

It runs in a Ray Train worker (a DDP rank) or in a Tune trial of one worker; ``TrainBackend``
is what differs between the two.

One trial's configuration is a ``TrialConfig`` (``angiotune.train.config``), read once from the
flat dict Tune hands the trial. Each epoch every rank trains on its shard of the training split
and evaluates the whole validation split (it is not split across workers, so no rank waits on
another), and rank 0 reports the metrics with an adapter-only checkpoint (the heads, when there
are any, beside it).

Stages differ only in configuration: ``heads`` adds the stage-2 measurement heads, ``start``
begins from a kept adapter, and ``run.vessel`` (set by the stage-3 search) says the data is
already narrowed to one vessel's lesions.
"""

from __future__ import annotations

import math
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

import torch

from angiotune.errors import ConfigError
from angiotune.model.adapters import (
    AdapterSettings,
    adapt,
    load_adapter,
    read_adapter_record,
    save_adapter,
    settings_of,
)
from angiotune.model.embedding_cache import EmbeddingCache, encoder_is_frozen
from angiotune.model.encoder_prefix import frozen_prefix_depth
from angiotune.model.heads import (
    HeadSettings,
    LesionHeads,
    feature_dim_of,
    has_heads,
    load_heads,
    save_heads,
)
from angiotune.model.lesion import LesionModel, unwrap
from angiotune.model.refine import MaskRefiner, has_refiner, load_refiner, save_refiner
from angiotune.model.sam3 import (
    base_model_id,
    enable_gradient_checkpointing,
    load_base_model,
    load_prompt_tokenizer,
)
from angiotune.names import VESSELS
from angiotune.train.calibration import ReadoutCollector
from angiotune.train.config import OptimiserSettings, TrialConfig
from angiotune.train.faults import KilledAfterCheckpoint, claim_injected_fault, with_step_fault
from angiotune.train.metrics import with_objective
from angiotune.train.step import PRECISIONS, evaluate, train_step

STATE_FILE = "training_state.pt"
ADAPTER_DIR = "adapter"


def trial_base_id(trial: TrialConfig) -> str:
    """The base weights' id: named once by the search's driver, else from the checkpoint."""
    return trial.run.base_id or base_model_id(trial.run.model_path, trial.run.prompt_mode)


def build_model(trial: TrialConfig, checkpoint_dir: Path | None = None):
    """The trainable model and the adapter settings it saves with.

    From the trial's own checkpoint when resuming, else from ``start`` (keeping that adapter's
    shape: its strategy, rank and targets), else a fresh adapter on the base. Box mode wraps the
    tracker in a ``LesionModel``, with heads when the trial has ``heads``.
    """
    mode = trial.run.prompt_mode
    source = checkpoint_dir / ADAPTER_DIR if checkpoint_dir else trial.start.adapter
    base = load_base_model(trial.run.model_path, mode)
    if source is None:
        settings = trial.adapter
        model = adapt(base, settings)
    else:
        model = load_adapter(base, source, trainable=True, base_id=trial_base_id(trial))
        settings = settings_of(read_adapter_record(source))
    if mode != "box":
        return model, settings
    heads = None
    if source is not None and has_heads(source):  # heads carry on from where they started
        heads = load_heads(source).train()
    elif trial.heads is not None:
        heads = LesionHeads(HeadSettings(classes=trial.heads.classes,
                                         feature_dim=feature_dim_of(base.config),
                                         hidden=trial.heads.hidden,
                                         taxonomy=trial.heads.taxonomy,
                                         tasks=trial.heads.tasks,
                                         **({} if trial.heads.context_dim is None else
                                            {"context_dim": trial.heads.context_dim})))
    if heads is not None:  # unused parameters would stall DDP's gradient reduction
        learned = trial.heads is not None and trial.heads.losses.weighting == "uncertainty"
        heads.log_vars.requires_grad_(learned)
    refiner = None
    if source is not None and has_refiner(source):  # as the heads: it carries on
        refiner = load_refiner(source).train()
    elif trial.refine:
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


def parameter_groups(model: torch.nn.Module, optimiser: OptimiserSettings) -> list[dict]:
    """The adapter at ``lr``; the heads, which start from nothing rather than adjust a
    pre-trained model, at ``lr * head_lr_ratio``."""
    heads = getattr(unwrap(model), "heads", None)
    in_heads = {id(p) for p in heads.parameters()} if heads is not None else set()
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in in_heads], "lr": optimiser.lr}]
    if in_heads:
        groups.append({"params": [p for p in trainable if id(p) in in_heads],
                       "lr": optimiser.lr * optimiser.head_lr_ratio})
    return groups


OOM_HINT = ("lower batch_size or rank, keep gradient_checkpointing on, or give each worker a "
            "GPU with more memory")


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

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.seconds = {"data_wait_s": 0.0, "train_s": 0.0, "eval_s": 0.0}
        self._last = clock()

    def waiting(self, batches):
        iterator = iter(batches)
        while True:
            started = self.clock()
            try:
                batch = next(iterator)
            except StopIteration:
                self.seconds["data_wait_s"] += self.clock() - started
                return
            self.seconds["data_wait_s"] += self.clock() - started
            yield batch

    def mark(self, name: str) -> None:
        """Everything since the last mark, less the data waits inside it, goes to ``name``."""
        now = self.clock()
        waited = self.seconds["data_wait_s"] if name == "train_s" else 0.0
        self.seconds[name] += now - self._last - waited
        self._last = now


def embedding_cache_for(model: torch.nn.Module, trial: TrialConfig) -> EmbeddingCache | None:
    """The shared cache of what the base's frozen encoder computes, when the search asked for
    one: the whole encoder's output when nothing in it trains, else the hidden states after its
    frozen leading blocks (LoRA on the last blocks only, ``lora_depth`` < 1); refused when the
    first block trains, since nothing before it could be kept."""
    if not trial.run.embedding_cache:
        return None
    folder, base_id = Path(trial.run.embedding_cache), trial_base_id(trial)
    if encoder_is_frozen(model):
        return EmbeddingCache(folder, base_id)
    depth = frozen_prefix_depth(getattr(unwrap(model), "segmenter", model))
    if depth == 0:
        raise ConfigError("embedding_cache needs a frozen image encoder or frozen leading "
                          "blocks: use strategy decoder_only, lora with targets decoder_attn, "
                          "or lora with lora_depth below 1")
    return EmbeddingCache(folder, base_id, depth)


def with_embeddings(batches, cache: EmbeddingCache | None, model: torch.nn.Module, device):
    """Batches with the cache's ``image_embeddings`` (or ``encoder_prefix``: depth and hidden
    states) added; unchanged without a cache."""
    segmenter = getattr(unwrap(model), "segmenter", None)
    for batch in batches:
        if cache is not None and segmenter is not None:
            found = cache.embeddings(batch["image"], segmenter, device)
            batch = {**batch, **({"image_embeddings": found} if cache.depth is None
                                 else {"encoder_prefix": (cache.depth, found[0])})}
        yield batch


def _missing_scores(trial: TrialConfig) -> dict[str, float]:
    """The search's metrics as NaN: a failed trial has no score."""
    return {name: math.nan for name in trial.run.metrics}


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

    def __init__(self, datasets: dict, use_gpu: bool, storage: Path | None = None) -> None:
        """``storage``: the Tune run's folder in storage (trial folders inside, by name)."""
        self.datasets = datasets
        self.use_gpu = use_gpu
        self.storage = storage
        self.reported = 0

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

        self.reported += 1
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder)
                    if folder else None)

    def wait_for_checkpoints(self, timeout_s: float = 120.0) -> None:
        # tune.report persists the checkpoint before it returns; the driver registers the
        # result, and syncs the trial's result log to storage, some time after it takes it.
        # Storage holding every reported result is what a restarted trial resumes from.
        from ray import tune

        if self.storage is None:
            raise ConfigError("this trial was not told where its Tune run keeps results")
        log = self.storage / tune.get_context().get_trial_name() / "result.json"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if log.exists() and len(log.read_text().splitlines()) >= self.reported:
                return
            time.sleep(0.2)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker function; ``config`` holds the trial's parameters and run settings."""
    run_training(config, RayTrainBackend())


def run_training(config: dict | TrialConfig, backend: TrainBackend) -> None:
    """Train one trial, epoch by epoch, reporting metrics and an adapter-only checkpoint.
    ``config``: the typed trial, or Tune's flat dict of it."""
    trial = config if isinstance(config, TrialConfig) else TrialConfig.from_flat(config)
    torch.manual_seed(trial.run.seed)
    head_weights = trial.heads.losses if trial.heads is not None else None
    mode = trial.run.prompt_mode
    tokenizer = load_prompt_tokenizer(trial.run.model_path) if mode == "text_box" else None
    start_epoch = 0
    checkpoint = backend.restored()
    state = None
    if checkpoint:
        with checkpoint.as_directory() as folder:
            model, settings = build_model(trial, Path(folder))
            state = torch.load(Path(folder) / STATE_FILE, weights_only=True)
            start_epoch = int(state["epoch"])
    else:
        model, settings = build_model(trial)
    cache = embedding_cache_for(model, trial)
    device = backend.device()
    on_gpu = device.type == "cuda"
    checkpointing = trial.run.gradient_checkpointing
    if on_gpu if checkpointing is None else checkpointing:
        enable_gradient_checkpointing(model)
    precision = trial.run.precision or ("bf16" if on_gpu else "fp32")
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    model = backend.prepare(model)
    optimizer = torch.optim.AdamW(parameter_groups(model, trial.optimiser),
                                  weight_decay=trial.optimiser.weight_decay)
    epochs = trial.run.epochs
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        if start_epoch >= epochs and state.get("metrics"):
            # Restored after its last epoch (a search resumed after a kill): say the result
            # again, or Tune ends the trial without its metric.
            backend.report(state["metrics"])
            return
    fault = (claim_injected_fault(trial.run.fault_dir)
             if backend.rank == 0 and state is None else None)
    step = with_step_fault(train_step, fault)
    if fault == "kill":
        backend = KilledAfterCheckpoint(backend)
    train_shard, val_shard = backend.dataset("train"), backend.dataset("val")
    batch_size = trial.run.batch_size
    validation = ValidationCache()
    heads = getattr(unwrap(model), "heads", None)
    readouts = ReadoutCollector(heads) if heads is not None and tokenizer is None else None
    for epoch in range(start_epoch, epochs):
        losses = []
        clock = EpochClock()
        batches = clock.waiting(train_shard.iter_batches(batch_size=batch_size))
        for batch in with_embeddings(batches, cache, model, device):
            parts, error = None, None
            try:
                parts = step(model, batch, optimizer, trial.losses, tokenizer=tokenizer,
                             autocast_dtype=PRECISIONS[precision], scaler=scaler,
                             head_weights=head_weights,
                             on_outputs=None if readouts is None else readouts.add)
            except torch.OutOfMemoryError as caught:
                error = caught
            failure = _agreed_failure(_step_failure(parts, error, epoch))
            if failure:
                # Reported, not raised: a retry would fail the same way. The search records
                # the trial as failed with this reason, and Optuna as FAIL.
                backend.report({**_missing_scores(trial), "epoch": epoch + 1,
                                "failed": failure})
                return
            losses.append(parts["loss"])
        if readouts is not None:
            readouts.fit()  # the heads' QCA read, before validation scores it
        clock.mark("train_s")
        validate_at = trial.run.validate_at
        if validate_at is not None and epoch + 1 not in validate_at:
            continue  # validate: rungs: nothing decides on this epoch's scores
        val_batches = with_embeddings(validation.batches(val_shard, batch_size), cache, model,
                                      device)
        metrics = evaluate(model, val_batches, tokenizer)
        clock.mark("eval_s")
        metrics = with_objective(metrics, trial.run.objective, VESSELS)
        metrics.update(epoch=epoch + 1, train_loss=sum(losses) / max(len(losses), 1),
                       resumed_from_epoch=start_epoch, **clock.seconds)
        if cache is not None:
            metrics.update(embedding_cache_hits=cache.hits, embedding_cache_misses=cache.misses)
        with tempfile.TemporaryDirectory() as folder:
            saved = None
            if backend.rank == 0:
                saved = Path(folder)
                save_trained(model, settings, saved / ADAPTER_DIR, trial_base_id(trial))
                torch.save({"epoch": epoch + 1, "optimizer": optimizer.state_dict(),
                            "metrics": {k: v.item() if hasattr(v, "item") else v
                                        for k, v in metrics.items()}}, saved / STATE_FILE)
            backend.report(metrics, saved)
