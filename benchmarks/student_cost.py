"""What each student shape of a distillation space costs per lesion, beside its teacher: FLOPs
counted on the meta device (no weights, any machine), the milliseconds they imply on an RTX 3090
at an assumed MFU, and (``--time``) one lesion crop through the model timed here for the
teacher and every shape within the space's budget, side by side in one run.

    python benchmarks/student_cost.py [--space distill.yaml] [--time] [--runs 3]
        [--device cpu] [--full-size-only]

Both teachers are counted: the embedded tiny model (112 px) and the full-size SAM 3 tracker
(1008 px, its default configuration, as the hub's facebook/sam3 has it). Timing uses random
weights: the time is what counts.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch
from transformers import Sam3TrackerConfig, Sam3TrackerModel

from angiotune.model.lesion import LesionModel
from angiotune.model.sam3 import tiny_tracker_config
from angiotune.model.student import (
    MS_ASSUMPTION,
    StudentShape,
    encoder_summary,
    frame_flops,
    rtx3090_ms,
    student_config,
)
from angiotune.search.space import load_space

SHAPE_KEYS = ("width_ratio", "depth_ratio", "input_ratio")


def space_shapes(space) -> list[StudentShape]:
    """Every shape the space can try: the product of its shape choices (fixed or searched)."""
    choices = [space.can_take(key, getattr(StudentShape(), key)) for key in SHAPE_KEYS]
    return [StudentShape(*values) for values in itertools.product(*choices)]


def timed_ms(config, device: str, runs: int) -> float:
    """Median ms of one lesion crop through the tracker (encoder, prompt, decoder)."""
    model = LesionModel(Sam3TrackerModel(config)).eval().to(device)
    size = config.vision_config.backbone_config.image_size
    images = torch.rand(1, size, size, device=device)
    boxes = torch.tensor([[size * 0.3, size * 0.3, size * 0.6, size * 0.6]], device=device)
    times = []
    with torch.no_grad():
        model(images, boxes)  # warm-up
        for _ in range(runs):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(images, boxes)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--space", default="distill.yaml")
    parser.add_argument("--time", action="store_true", help="also time each shape here")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--full-size-only", action="store_true")
    args = parser.parse_args()
    space = load_space(args.space)
    budget = float(space.fixed.get("max_ms_per_lesion", 50.0))
    teachers = {"full-size SAM 3 tracker": Sam3TrackerConfig()}
    if not args.full_size_only:
        teachers["embedded tiny tracker"] = tiny_tracker_config()
    print(f"space {space.name}: ms on an RTX 3090 are {MS_ASSUMPTION}; budget {budget:g} ms")
    for label, teacher in teachers.items():
        teacher_flops = frame_flops(teacher)
        teacher_time = timed_ms(teacher, args.device, args.runs) if args.time else None
        timed = f", {teacher_time:.1f} ms here" if teacher_time else ""
        print(f"\n{label} {encoder_summary(teacher)}: {teacher_flops / 1e9:.1f} GFLOP, "
              f"{rtx3090_ms(teacher_flops):.2f} ms on a 3090{timed}")
        print("| width | depth | input | encoder | GFLOP | ms on a 3090 | within budget | "
              "FLOP ratio |" + (" ms here | time ratio |" if args.time else ""))
        print("|---|---|---|---|---:|---:|---|---:|" + ("---:|---:|" if args.time else ""))
        for shape in space_shapes(space):
            config = student_config(teacher, shape)
            flops = frame_flops(config)
            encoder = encoder_summary(config)
            row = (f"| {shape.width_ratio:g} | {shape.depth_ratio:g} | {shape.input_ratio:g} | "
                   f"{encoder['blocks']} x {encoder['hidden_size']} @ {encoder['image_size']} | "
                   f"{flops / 1e9:.2f} | {rtx3090_ms(flops):.2f} | "
                   f"{'yes' if rtx3090_ms(flops) <= budget else 'no'} | "
                   f"{teacher_flops / flops:.1f}x |")
            if args.time and rtx3090_ms(flops) <= budget:  # a shape the search would run
                ms = timed_ms(config, args.device, args.runs)
                row += f" {ms:.1f} | {teacher_time / ms:.1f}x |"
            elif args.time:
                row += " - | - |"
            print(row)


if __name__ == "__main__":
    main()
