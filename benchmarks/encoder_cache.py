"""Encoder cache: time per trial with and without it, for decoder_only (the whole encoder's
output cached) and LoRA on the encoder's last half (the frozen first half's output cached).

Plain PyTorch (the training step a Ray Train worker runs, without Ray), so only the model's
compute differs: a trial without the cache encodes every crop every epoch; the first trial with
it encodes each crop once and writes it, later trials (and searches) only read. Crops are
synthetic shapes; with the embedded model at 112 px, or the same tiny architecture with random
weights at a larger ``--image-size`` (the encoder's share of the step grows with the side).

    python benchmarks/encoder_cache.py [--image-size 112] [--samples 64] [--epochs 4]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

STRATEGIES = {"decoder_only": {"strategy": "decoder_only"},
              "lora, last half of the encoder": {"strategy": "lora", "rank": 8,
                                                 "lora_depth": 0.5}}


def make_model(image_size: int, strategy: str):
    from angiotune.model.adapters import AdapterSettings, adapt
    from angiotune.model.lesion import LesionModel
    from angiotune.model.sam3 import EMBEDDED_IMAGE_SIZE, load_base_model, tiny_tracker_config

    if image_size == EMBEDDED_IMAGE_SIZE:
        base = load_base_model()
    else:
        from transformers import Sam3TrackerModel

        torch.manual_seed(0)
        base = Sam3TrackerModel(tiny_tracker_config(image_size))
    return LesionModel(adapt(base, AdapterSettings(**STRATEGIES[strategy])))


def make_cache(folder: Path, image_size: int, strategy: str):
    """The cache a search gives this strategy (``angiotune.train.loop.embedding_cache_for``)."""
    from angiotune.train.config import RunSettings, TrialConfig
    from angiotune.train.loop import embedding_cache_for

    trial = TrialConfig(run=RunSettings(epochs=1, embedding_cache=str(folder),
                                        base_id=f"benchmark-{image_size}"))
    return embedding_cache_for(make_model(image_size, strategy), trial)


def run_trial(batches: list[dict], epochs: int, image_size: int, strategy: str, cache) -> float:
    from angiotune.model.losses import LossWeights
    from angiotune.train.loop import with_embeddings
    from angiotune.train.step import train_step

    model = make_model(image_size, strategy)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    started = time.perf_counter()
    for _ in range(epochs):
        for batch in with_embeddings(batches, cache, model, "cpu"):
            train_step(model, batch, optimizer, LossWeights())
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--trials", type=int, default=8, help="Trials in the projected search.")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    from angiotune.train.pretrain import shape_batch

    rng = np.random.default_rng(0)
    batches = [shape_batch(rng, args.image_size, args.batch_size, jitter=True)
               for _ in range(args.samples // args.batch_size)]
    print(f"{args.samples} crops of {args.image_size} px, {args.epochs} epochs, batch "
          f"{args.batch_size}, CPU ({torch.get_num_threads()} threads), best of {args.repeat}")
    for strategy in STRATEGIES:
        run_trial(batches[:1], 1, args.image_size, strategy, None)  # warm up
        # Interleaved repeats, best of each: the machine's other load falls on all alike.
        times: dict[str, float] = {}
        for _ in range(args.repeat):
            folder = Path(tempfile.mkdtemp(prefix="embeddings-"))
            cache = make_cache(folder, args.image_size, strategy)
            for name, use in (("no cache", None), ("cache, first trial", cache),
                              ("cache, later trial", cache)):
                seconds = run_trial(batches, args.epochs, args.image_size, strategy, use)
                times[name] = min(times.get(name, float("inf")), seconds)
        size_mb = sum(p.stat().st_size for p in folder.rglob("*.safetensors")) / 2**20
        print(f"{strategy}:")
        for name, seconds in times.items():
            print(f"  {name:<20} {seconds:7.2f} s per trial   speed-up "
                  f"{times['no cache'] / seconds:5.2f}x")
        search = args.trials * times["no cache"]
        cached = times["cache, first trial"] + (args.trials - 1) * times["cache, later trial"]
        print(f"  a search of {args.trials} trials: {search:.1f} s -> {cached:.1f} s "
              f"({search / cached:.2f}x); cache on disk {size_mb:.1f} MB "
              f"({size_mb * 1024 / args.samples:.0f} KB per crop)")


if __name__ == "__main__":
    main()
