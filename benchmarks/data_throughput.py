"""Data path throughput, measured side by side in one run.

1. Samples/s of the Ray Data stream (``lesion_dataset``) against a PyTorch DataLoader with as
   many worker processes as the stream runs decoding tasks at once (CPUs / CPU per task), and
   a plain single-process loop: the same rows, the same decoding (``prepare_sample``), batches
   of 8. The stream as a search runs it keeps decoded frames and masks in a frame cache
   (``angiotune.data.frame_cache``; measured warm, as every epoch after a search's first
   finds it); the DataLoader decodes every pass, as one writes it, and again with the same
   cache. ``--image-size 1008`` measures crops for the full-size model.
2. Decoding only the analysed frame of a cine against decoding the whole cine, per layout
   (uncompressed DICOM, RLE DICOM, NPY).

    python benchmarks/data_throughput.py [--lesions 40 --size 512 --frames 15 --cpus 2]

Prints ratios; figures from this machine are kept in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

from angiotune.data.ingest import IndexSettings, build_index  # noqa: E402
from angiotune.data.phantoms import PhantomSettings, generate_phantoms  # noqa: E402
from angiotune.data.readers import read_cine, read_frame  # noqa: E402
from angiotune.data.stream import (  # noqa: E402
    DATA_TASK_CPUS,
    SampleSettings,
    lesion_dataset,
    load_rows,
    prepare_sample,
)


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


class _Rows:
    """A map-style dataset over index rows: what a DataLoader user would write."""

    def __init__(self, records: list[dict], root: Path, settings: SampleSettings) -> None:
        self.records, self.root, self.settings = records, root, settings

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        return prepare_sample(self.records[i], self.root, self.settings)


def dataloader_seconds(records: list, root: Path, settings: SampleSettings,
                       processes: int) -> float:
    """Best of two passes, after a warm-up pass that starts the (persistent) workers."""
    from torch.utils.data import DataLoader

    loader = DataLoader(_Rows([r.to_dict() for r in records], root, settings), batch_size=8,
                        num_workers=processes, persistent_workers=True)

    def one_pass() -> None:
        count = sum(len(batch["sample_id"]) for batch in loader)
        assert count == len(records), count

    one_pass()
    return best_of(2, one_pass)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lesions", type=int, default=40)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--frames", type=int, default=15)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeat", type=int, default=8, help="Pass over the rows this often.")
    parser.add_argument("--task-cpus", type=float, default=DATA_TASK_CPUS,
                        help="CPUs each Ray Data decoding task asks for.")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="angiotune-bench-"))
    generate_phantoms(work / "data", PhantomSettings(lesions=args.lesions, size=args.size,
                                                     frames=args.frames, seed=1))
    index = work / "index.parquet"
    build_index(work / "data" / "manifest.csv", index, IndexSettings(salt="benchmark"))
    rows, root = load_rows(index)
    # The same rows several times over, so fixed start-up costs do not decide the comparison.
    rows = pd.concat([rows] * args.repeat, ignore_index=True)
    settings = SampleSettings(image_size=args.image_size, augment=False)
    records = [row for _, row in rows.iterrows()]
    print(f"{len(records)} samples; frames {args.size}x{args.size}, {args.frames} per cine; "
          f"model grid {args.image_size}; {args.cpus} CPUs; {args.task_cpus} CPU per data task")

    loop_s = best_of(2, lambda: [prepare_sample(r.to_dict(), root, settings) for r in records])
    loop_rate = len(records) / loop_s

    import ray

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)

    cached = replace(settings, frame_cache=str(work / "frames"))
    [prepare_sample(r.to_dict(), root, cached) for r in records]  # fill it, as epoch 1 does

    def stream_rate(reserve_per_operator: bool, settings: SampleSettings = settings) -> float:
        dataset = lesion_dataset(rows, None, settings=settings, data_root=root,
                                 cpus_per_task=args.task_cpus,
                                 reserve_per_operator=reserve_per_operator)

        def stream() -> None:
            count = sum(len(b["sample_id"]) for b in dataset.iter_batches(batch_size=8))
            assert count == len(records), count

        stream()  # warm-up: worker processes, imports
        return len(records) / best_of(2, stream)

    reserved_rate, unreserved_rate = stream_rate(True), stream_rate(False)
    cached_rate = stream_rate(True, cached)
    cached_unreserved_rate = stream_rate(False, cached)
    ray.shutdown()
    processes = max(1, int(args.cpus / args.task_cpus))
    loader_rate = len(records) / dataloader_seconds(records, root, settings, processes)
    cached_loader_rate = len(records) / dataloader_seconds(records, root, cached, processes)
    print("\n1. sample preparation (decode frame + mask, crop, normalise)")
    print(f"   plain loop, 1 process              : {loop_rate:7.1f} samples/s")
    print(f"   PyTorch DataLoader, {processes} workers     : {loader_rate:7.1f} samples/s")
    print(f"   Ray Data stream, up to {processes} tasks    : {reserved_rate:7.1f} samples/s")
    print(f"   same, no per-operator reserve      : {unreserved_rate:7.1f} samples/s")
    print(f"   stream with the frame cache (warm) : {cached_rate:7.1f} samples/s")
    print(f"   same, no per-operator reserve      : {cached_unreserved_rate:7.1f} samples/s")
    print(f"   DataLoader with the frame cache    : {cached_loader_rate:7.1f} samples/s")
    print(f"   ratio stream / DataLoader          : {reserved_rate / loader_rate:7.2f}x "
          f"({unreserved_rate / loader_rate:.2f}x without the reserve)")
    print(f"   ratio cached stream / DataLoader   : {cached_rate / loader_rate:7.2f}x "
          f"({cached_unreserved_rate / loader_rate:.2f}x without the reserve; "
          f"{cached_rate / cached_loader_rate:.2f}x a DataLoader with the cache)")
    print(f"   ratio stream / loop                : {reserved_rate / loop_rate:7.2f}x")

    print("\n2. one frame vs the whole cine (per file, best of 3)")
    for layout in ("Explicit VR Little Endian", "RLE Lossless", "npy"):
        unique = rows.drop_duplicates("image_path")
        subset = unique[unique["transfer_syntax"] == layout]
        if layout == "npy":
            subset = unique.assign(
                image_path=lambda f: f["image_path"].str.replace("dicom/", "cines/")
                .str.replace(".dcm", ".npy"))
        paths = [(root / p, int(i)) for p, i in zip(subset["image_path"], subset["frame_index"],
                                                     strict=True)][:10]
        if not paths:
            continue
        one = best_of(3, lambda paths=paths: [read_frame(p, i) for p, i in paths]) / len(paths)
        whole = best_of(3, lambda paths=paths: [read_cine(p)[i] for p, i in paths]) / len(paths)
        print(f"   {layout:26s}: one frame {1000 * one:7.2f} ms, whole cine "
              f"{1000 * whole:7.2f} ms, ratio {whole / one:6.1f}x")


if __name__ == "__main__":
    main()
