"""Search overhead: the share of a search's wall time spent outside training and evaluation.

Runs one real search (Ray Tune + Optuna over Ray Train, the embedded tiny model) on phantoms it
generates, then adds up what every trial's workers reported per epoch (``train_s``, ``eval_s``,
``data_wait_s``, see ``angiotune.train.loop.EpochClock``) and sets it against the search's wall
time. Everything else is overhead: Ray start, trial and worker-group start-up, imports, dataset
start-up, checkpoint writes, Optuna, the registry.

    python benchmarks/search_overhead.py [--lesions 60] [--trials 3] [--epochs 4]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lesions", type=int, default=60)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--concurrent", type=int, default=1)
    args = parser.parse_args()

    import ray

    from angiotune.data.ingest import IndexSettings, build_index
    from angiotune.data.phantoms import PhantomSettings, generate_phantoms
    from angiotune.search import search
    from angiotune.search.space import parse_space

    work = Path(tempfile.mkdtemp(prefix="overhead-"))
    generate_phantoms(work / "phantoms", PhantomSettings(lesions=args.lesions, size=256,
                                                         frames=3, seed=0))
    index = work / "index.parquet"
    build_index(work / "phantoms" / "manifest.csv", index, IndexSettings(salt="benchmark"))
    space = parse_space({
        "name": "overhead", "metric": "dice", "mode": "max", "samples": args.trials,
        "max_concurrent": args.concurrent, "epochs": args.epochs, "seed": 0, "asha": None,
        "data": {"image_size": 112, "batch_size": 8}, "fixed": {"strategy": "lora"},
        "params": {"lr": {"type": "float", "low": 1e-3, "high": 3e-3, "log": True}}},
        "overhead.yaml")
    started = time.perf_counter()
    outcome = search(space, data=index, results=work / "results")
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
    useful = sum(spent.values())
    print(f"{outcome.trials} trials x {args.epochs} epochs, {args.concurrent} at a time, "
          f"{args.lesions} phantom lesions, embedded tiny model, CPU")
    print(f"search wall time            {wall:8.1f} s")
    print(f"mean trial time (Tune)      {sum(trial_walls) / len(trial_walls):8.1f} s")
    for name, seconds in spent.items():
        print(f"  {name:<25} {seconds:8.1f} s")
    overhead = 1 - useful / (wall * args.concurrent)
    print(f"overhead share of wall time {overhead:8.1%}")
    waited = spent["data_wait_s"] / max(spent["data_wait_s"] + spent["train_s"], 1e-9)
    print(f"data wait share of training {waited:8.1%}")


if __name__ == "__main__":
    main()
