"""Search overhead: the share of a search's wall time spent outside training and evaluation.

Runs one real search (Ray Tune + Optuna over Ray Train, the embedded tiny model) on phantoms it
generates, then adds up what every trial's workers reported per epoch (``train_s``, ``eval_s``,
``data_wait_s``, see ``angiotune.train.loop.EpochClock``) and sets it against the search's wall
time. Everything else is overhead: Ray start, trial and worker-group start-up, imports, dataset
start-up, checkpoint writes, Optuna, the registry.

    python benchmarks/search_overhead.py [--lesions 240] [--trials 3] [--epochs 12]

Runs the search three ways, side by side: with a Ray Train worker group per trial
(``resources.worker_group: true``), training in Tune's trial process (the default for one
worker per trial) with one Ray Data stream for all of a trial's epochs (``data.stream: trial``,
the default), and the same with a fresh stream per epoch (``data.stream: epoch``, as before).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

WAYS = ("worker-group", "in-trial", "in-trial-epoch-stream")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lesions", type=int, default=240)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--concurrent", type=int, default=1)
    parser.add_argument("--only", choices=WAYS, action="append",
                        help="run only these ways (repeatable; default: all, side by side)")
    args = parser.parse_args()

    from angiotune.data.ingest import IndexSettings, build_index
    from angiotune.data.phantoms import PhantomSettings, generate_phantoms

    work = Path(tempfile.mkdtemp(prefix="overhead-"))
    generate_phantoms(work / "phantoms", PhantomSettings(lesions=args.lesions, size=256,
                                                         frames=3, seed=0))
    index = work / "index.parquet"
    build_index(work / "phantoms" / "manifest.csv", index, IndexSettings(salt="benchmark"))
    ways = args.only or list(WAYS)
    figures = {way: measure(index, work / way, args, worker_group=way == "worker-group",
                            stream="epoch" if way == "in-trial-epoch-stream" else "trial")
               for way in ways}
    print(f"\n{args.trials} trials x {args.epochs} epochs, {args.concurrent} at a time, "
          f"{args.lesions} phantom lesions, embedded tiny model, CPU")
    print(f"{'':38}" + "".join(f"{way:>23}" for way in ways))
    for name in next(iter(figures.values())):
        cells = "".join(f"{figures[way][name]:23.3f}" for way in ways)
        print(f"{name:38}{cells}")
    for way, base in (("in-trial", "worker-group"), ("in-trial", "in-trial-epoch-stream")):
        if way in figures and base in figures:
            for name in ("search wall s", "data_wait_s (all trials)"):
                ratio = figures[way][name] / max(figures[base][name], 1e-9)
                print(f"{name} ratio, {way} / {base}: {ratio:.2f}")


def measure(index: Path, folder: Path, args, worker_group: bool,
            stream: str) -> dict[str, float]:
    """One search; where its wall time went, from what every trial reported per epoch."""
    import ray

    from angiotune.search import search
    from angiotune.search.space import parse_space

    space = parse_space({
        "name": "overhead", "metric": "dice", "mode": "max", "samples": args.trials,
        "max_concurrent": args.concurrent, "epochs": args.epochs, "seed": 0, "asha": None,
        "data": {"image_size": 112, "batch_size": 8, "stream": stream},
        "fixed": {"strategy": "lora"},
        "resources": {"worker_group": worker_group},
        "params": {"lr": {"type": "float", "low": 1e-3, "high": 3e-3, "log": True}}},
        "overhead.yaml")
    started = time.perf_counter()
    outcome = search(space, data=index, results=folder)
    wall = time.perf_counter() - started
    ray.shutdown()

    spent = {"train_s": 0.0, "eval_s": 0.0, "data_wait_s": 0.0}
    trial_walls = []
    for path in (outcome.run_dir / "tune").glob("*/result.json"):
        epochs: dict[int, dict] = {}
        for line in path.read_text().splitlines():
            row = json.loads(line)
            epochs.setdefault(int(row["epoch"]), row)  # the final repeat is not counted twice
        for row in epochs.values():
            for name in spent:
                spent[name] += float(row.get(name, 0.0))
        trial_walls.append(max(float(r["time_total_s"]) for r in epochs.values()))
    capacity = wall * args.concurrent
    steps = spent["train_s"] + spent["eval_s"]
    return {"search wall s": wall,
            "mean trial s (Tune)": sum(trial_walls) / len(trial_walls),
            **{f"{name} (all trials)": seconds for name, seconds in spent.items()},
            "overhead share (not train/eval/wait)": 1 - (steps + spent["data_wait_s"]) / capacity,
            "share not in train/eval steps": 1 - steps / capacity,
            "data wait share of training": spent["data_wait_s"] / max(
                spent["data_wait_s"] + spent["train_s"], 1e-9)}


if __name__ == "__main__":
    main()
