"""The full-size SAM 3 tracker on one GPU: training and inference speed, memory, TFLOP/s, and a
projection of a whole three-stage search on two RTX 3090s.

Runs without Ray (a GPU box may not have it): the training step here is the one angiotune's
workers run (``angiotune.train.step.train_step``: box prompt, logits upsampled to the input,
Dice + focal + IoU-head loss, AdamW on the trainable weights), written out over the same model
and loss modules so that it needs only torch, transformers, peft and safetensors. Weights are
random (the real ones are gated): speed and memory do not depend on them.

    python benchmarks/gpu_sam3.py --out results/gpu_sam3.json          # the GPU, full size
    python benchmarks/gpu_sam3.py --small --out results/gpu_small.json # CPU, embedded model

FLOPs are counted by torch's FlopCounterMode on the meta device (no memory, any machine).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# Dense bf16 tensor-core peaks (TFLOP/s) by device name; the RTX 3090 with fp32 accumulation.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0,
                    "RTX 4090": 165.0, "RTX 3090": 35.6, "L40S": 362.0}
RTX_3090 = {"tflops": 35.6, "memory_gib": 24.0}
LESIONS = 800
SPLITS = {"train": 0.70, "val": 0.15}  # angiotune's patient-level split (test 0.15 unused)
# A search a core lab would run with full-size SAM 3 (the shipped spaces are sized for CPUs):
# stage 3 trains each vessel's trials on that vessel's lesions (about a third each).
SHARES = (0.5, 0.25, 0.125)  # lora_depth: the share of the encoder's last blocks LoRA adapts
VIEWS = 4  # augmented views per training crop the prefix cache holds (augment_views)
PLAN_EPOCHS = 10
PLAN = {"stage 1 (lesion LoRA)": {"trials": 24, "epochs": PLAN_EPOCHS, "asha": True,
                                  "share": 1.0},
        "stage 2 (heads)": {"trials": 12, "epochs": PLAN_EPOCHS, "asha": True, "share": 1.0},
        "stage 3 (per vessel)": {"trials": 3 * 8, "epochs": PLAN_EPOCHS, "asha": False,
                                 "share": 1 / 3}}
OVERNIGHT_HOURS = 12  # issue 20: the plan on two 3090s, overnight


def peak_tflops(name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def full_config(image_size: int):
    from transformers import Sam3TrackerConfig

    config = Sam3TrackerConfig()
    assert config.vision_config.backbone_config.image_size == image_size, "full size is 1008"
    return config


def build(config, device, rank: int | None, lora_depth: float = 1.0):
    """The tracker (random weights) with LoRA on the vision encoder's q/v (its last
    ``lora_depth`` share of blocks) and the mask decoder trained, as ``lora_rank.yaml`` trains
    it; ``rank=None``: the bare tracker."""
    from transformers import Sam3TrackerModel

    from angiotune.model.adapters import AdapterSettings, adapt

    model = Sam3TrackerModel(config).to(device)
    model.requires_grad_(False)
    if rank is None:
        return model
    return adapt(model, AdapterSettings(strategy="lora", rank=rank, alpha=2.0 * rank,
                                        targets=("vision_qv",), train_decoder=True,
                                        lora_depth=lora_depth))


def count_flops(config, image_size: int, rank: int) -> dict[str, float]:
    """Per image: encoder forward, one box's decoder forward, a LoRA training step (with and
    without gradient checkpointing), and a decoder-only step on cached embeddings."""
    from torch.utils.flop_counter import FlopCounterMode

    from angiotune.model.adapters import AdapterSettings, adapt
    from angiotune.model.sam3 import enable_gradient_checkpointing

    with torch.device("meta"):
        images = torch.zeros(1, image_size, image_size)
        boxes = torch.tensor([[image_size * 0.3, image_size * 0.3,
                               image_size * 0.5, image_size * 0.5]])
        target = torch.zeros(1, image_size, image_size)
        counts = {}
        model = build(config, "meta", None)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            embeddings = model.get_image_embeddings(_pixels(images))
        counts["encoder_forward"] = counter.get_total_flops()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(image_embeddings=embeddings, input_boxes=boxes[:, None],
                  multimask_output=False)
        counts["decoder_forward"] = counter.get_total_flops()
        for checkpointing in (False, True):
            model = build(config, "meta", rank)
            if checkpointing:
                enable_gradient_checkpointing(model)
            with FlopCounterMode(display=False) as counter:
                _loss(model, images, boxes, target).backward()
            counts[f"lora_step{'_checkpointed' if checkpointing else ''}"] = \
                counter.get_total_flops()
        decoder_only = adapt(build(config, "meta", None), AdapterSettings("decoder_only"))
        with FlopCounterMode(display=False) as counter:
            _loss(decoder_only, images, boxes, target, embeddings).backward()
        counts["decoder_only_step_cached"] = counter.get_total_flops()
        counts.update(_prefix_flops(config, images, boxes, target, rank))
    return counts


def _prefix_flops(config, images, boxes, target, rank: int) -> dict[str, float]:
    """LoRA on the encoder's last blocks only, the frozen blocks' output read from the cache
    (``lora_depth``; angiotune.model.encoder_prefix): what encoding the prefix once costs, and
    what a training step and a validation forward cost after it."""
    from torch.utils.flop_counter import FlopCounterMode

    from angiotune.model.encoder_prefix import encode_prefix, encode_rest, frozen_prefix_depth
    from angiotune.model.sam3 import enable_gradient_checkpointing

    counts = {}
    for share in SHARES:
        model = build(config, "meta", rank, share)
        depth = frozen_prefix_depth(model)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            hidden = encode_prefix(model, _pixels(images), depth)
        counts[f"prefix_forward_{share}"] = counter.get_total_flops()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(image_embeddings=encode_rest(model, hidden, depth),
                  input_boxes=boxes[:, None], multimask_output=False)
        counts[f"rest_forward_{share}"] = counter.get_total_flops()
        enable_gradient_checkpointing(model)
        with FlopCounterMode(display=False) as counter:
            _loss(model, images, boxes, target, prefix=(depth, hidden)).backward()
        counts[f"lora_last_{share}_step_cached_checkpointed"] = counter.get_total_flops()
    return counts


def _pixels(images: torch.Tensor) -> torch.Tensor:
    from angiotune.model.sam3 import to_pixel_values

    return to_pixel_values(images)


def _loss(model, images, boxes, target, embeddings=None, prefix=None):
    """The loss ``train_step`` takes for a box-prompted tracker (see LesionModel.forward)."""
    from angiotune.model.encoder_prefix import encode_rest
    from angiotune.model.losses import LossWeights, segmentation_loss

    if prefix is not None:
        embeddings = encode_rest(model, prefix[1], prefix[0])
    inputs = ({"image_embeddings": embeddings} if embeddings is not None
              else {"pixel_values": _pixels(images)})
    out = model(**inputs, input_boxes=boxes[:, None], multimask_output=False)
    logits = F.interpolate(out.pred_masks[:, 0], size=images.shape[-2:], mode="bilinear",
                           align_corners=False)[:, 0]
    confidence = out.iou_scores[:, 0, 0].float()
    if logits.is_meta:  # counting FLOPs: the loss reads values (negligible FLOPs) a meta lacks
        return logits.float().mean() + confidence.mean()
    loss, _ = segmentation_loss(logits.float(), confidence, target, LossWeights())
    return loss


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _inputs(batch: int, image_size: int, device):
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch, image_size, image_size, generator=generator).to(device)
    boxes = torch.tensor([[image_size * 0.4, image_size * 0.4, image_size * 0.55,
                           image_size * 0.6]] * batch, device=device)
    target = torch.zeros(batch, image_size, image_size, device=device)
    target[:, int(image_size * 0.45):int(image_size * 0.55),
           int(image_size * 0.45):int(image_size * 0.5)] = 1
    return images, boxes, target


def train_speed(config, image_size: int, device, dtype, rank: int, batch: int,
                checkpointing: bool, steps: int) -> dict:
    from angiotune.model.sam3 import enable_gradient_checkpointing

    row = {"batch": batch, "gradient_checkpointing": checkpointing}
    model = None
    try:
        model = build(config, device, rank).train()
        if checkpointing:
            enable_gradient_checkpointing(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                      lr=1e-4)
        images, boxes, target = _inputs(batch, image_size, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        timings = []
        for step in range(steps + 2):  # two warm-up steps
            _sync(device)
            started = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = _loss(model, images, boxes, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            _sync(device)
            if step >= 2:
                timings.append(time.perf_counter() - started)
        seconds = sorted(timings)[len(timings) // 2]
        row.update(images_per_s=batch / seconds, step_s=seconds)
        if device.type == "cuda":
            row["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
            row["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
            # The 3090's 24 GiB less about 0.6 GiB for the CUDA context.
            row["fits_rtx3090"] = row["peak_reserved_gib"] < RTX_3090["memory_gib"] - 0.6
    except torch.OutOfMemoryError:
        row.update(images_per_s=None, out_of_memory=True, fits_rtx3090=False)
    finally:
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def inference_speed(config, image_size: int, device, dtype, lesions: int,
                    repeats: int) -> dict:
    """ms per frame: the whole model once per lesion, against encoding the frame once and
    decoding each lesion's box on the same embeddings."""
    model = build(config, device, None).eval()
    images, boxes, _ = _inputs(1, image_size, device)

    def timed(function) -> float:
        for _ in range(2):
            function()
        _sync(device)
        started = time.perf_counter()
        for _ in range(repeats):
            function()
        _sync(device)
        return (time.perf_counter() - started) / repeats * 1000

    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        whole = timed(lambda: model(pixel_values=_pixels(images), input_boxes=boxes[:, None],
                                    multimask_output=False))
        encode = timed(lambda: model.get_image_embeddings(_pixels(images)))
        embeddings = model.get_image_embeddings(_pixels(images))
        decode = timed(lambda: model(image_embeddings=embeddings, input_boxes=boxes[:, None],
                                     multimask_output=False))
    return {"whole_model_ms": whole, "encode_ms": encode, "decode_ms_per_lesion": decode,
            f"frame_with_{lesions}_lesions_ms_naive": whole * lesions,
            f"frame_with_{lesions}_lesions_ms_encode_once": encode + decode * lesions}


def validated_share(epochs: int, asha: bool, grace: int = 2, factor: int = 2) -> float:
    """The share of a trial's epochs that validate with ``validate: rungs`` (the shipped
    spaces' grace period and reduction factor), as ``SearchSpace.validation_epochs`` says."""
    from angiotune.search.space import load_space

    overrides = [f"epochs={epochs}", "fixed.validate=rungs",
                 f"asha.grace_period={grace}", f"asha.reduction_factor={factor}"]
    if not asha:
        overrides.append("asha=off")
    return len(load_space("lora_rank.yaml", overrides).validation_epochs()) / epochs


def project(flops: dict, mfu: float, trial_startup_s: float, asha_fraction: float,
            epochs: int | None = None) -> list[dict]:
    """Wall time of PLAN over LESIONS lesions on two RTX 3090s (data-parallel, one trial at a
    time on both), at the MFU measured here; ``epochs`` replaces the plan's per trial."""
    rate = 2 * RTX_3090["tflops"] * 1e12 * mfu
    rows = []
    for name, stage in PLAN.items():
        stage = {**stage, "epochs": epochs or stage["epochs"]}
        train = LESIONS * SPLITS["train"] * stage["share"]
        val = LESIONS * SPLITS["val"] * stage["share"]
        evaluate = val * (flops["encoder_forward"] + flops["decoder_forward"])
        lora_epoch = train * flops["lora_step_checkpointed"] + evaluate
        # Frozen-encoder strategies with the cache: every crop encoded once per base model.
        cached_epoch = (train * flops["decoder_only_step_cached"]
                        + val * flops["decoder_forward"])
        encode_once = (train + val) * flops["encoder_forward"]
        # LoRA on the last blocks: the frozen prefix of every view of every crop encoded once
        # per base model; each epoch then runs the rest for training and validation.
        share = SHARES[1]
        prefix_epoch = (train * flops[f"lora_last_{share}_step_cached_checkpointed"]
                        + val * flops[f"rest_forward_{share}"])
        prefix_once = (train * VIEWS + val) * flops[f"prefix_forward_{share}"]
        for asha in (False, True):
            fraction = asha_fraction if asha and stage["asha"] else 1.0
            trial_epochs = stage["trials"] * stage["epochs"] * fraction
            startup = stage["trials"] * trial_startup_s
            # validate: rungs: a validation pass only at ASHA's milestones and the last epoch
            # (all of a full trial's share of them; without ASHA, the last epoch only).
            validated = validated_share(stage["epochs"], asha and stage["asha"])
            rungs_epoch = (train * flops[f"lora_last_{share}_step_cached_checkpointed"]
                           + validated * val * flops[f"rest_forward_{share}"])
            rows.append({"stage": name, "variant": "with ASHA" if asha else "without ASHA",
                         "asha_applied": asha and stage["asha"],
                         "trial_epochs": trial_epochs,
                         "lora_hours": (trial_epochs * lora_epoch / rate + startup) / 3600,
                         "lora_last_blocks_cached_hours":
                             ((trial_epochs * prefix_epoch + prefix_once) / rate + startup)
                             / 3600,
                         "lora_last_blocks_cached_validate_rungs_hours":
                             ((trial_epochs * rungs_epoch + prefix_once) / rate + startup)
                             / 3600,
                         "frozen_encoder_cached_hours":
                             ((trial_epochs * cached_epoch + encode_once) / rate + startup)
                             / 3600})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true",
                        help="The embedded tiny model at 112 px (for a CPU run).")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lesions-per-frame", type=int, default=3)
    parser.add_argument("--trial-startup-s", type=float, default=30.0,
                        help="Per-trial start-up added to the projection (CPU runs: ~20 s).")
    parser.add_argument("--asha-fraction", type=float, default=0.67,
                        help="Trial-epochs ASHA runs, as a share of the full budget "
                             "(benchmarks/search_efficiency.py measures it).")
    parser.add_argument("--student-shape", type=float, nargs=3, default=[1.0, 0.25, 0.5],
                        metavar=("WIDTH", "DEPTH", "INPUT"),
                        help="A distilled student's shape (shares of the encoder's width, "
                             "blocks and input side; angiotune.model.student), timed beside.")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import transformers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else None  # bf16 autocast is slow on CPUs
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor()
    full = full_config(1008)
    if args.small:
        from angiotune.model.sam3 import EMBEDDED_IMAGE_SIZE, tiny_tracker_config

        config, image_size = tiny_tracker_config(), EMBEDDED_IMAGE_SIZE
    else:
        config, image_size = full, 1008
    record = {"device": name or device.type, "torch": torch.__version__,
              "transformers": transformers.__version__, "image_size": image_size,
              "model": "embedded tiny tracker" if args.small else "full-size SAM 3 tracker",
              "precision": "bf16 autocast" if dtype else "fp32", "lora_rank": args.rank}
    print(json.dumps(record))
    flops = count_flops(config, image_size, args.rank)
    full_flops = flops if not args.small else count_flops(full, 1008, args.rank)
    record["flops_per_image"] = flops
    record["full_size_flops_per_image"] = full_flops
    print("TFLOP per image:", {k: round(v / 1e12, 4) for k, v in flops.items()})

    rows = []
    for checkpointing in (False, True):
        for batch in args.batch_sizes:
            row = train_speed(config, image_size, device, dtype, args.rank, batch,
                              checkpointing, args.steps)
            step_flops = flops["lora_step_checkpointed" if checkpointing else "lora_step"]
            if row.get("images_per_s"):
                row["achieved_tflops"] = row["images_per_s"] * step_flops / 1e12
                peak = peak_tflops(name) if device.type == "cuda" else None
                row["mfu"] = row["achieved_tflops"] / peak if peak else None
            rows.append(row)
            print(json.dumps(row), flush=True)
    record["training"] = rows
    record["inference"] = inference_speed(config, image_size, device, dtype,
                                          args.lesions_per_frame, repeats=5 if args.small
                                          else 10)
    print(json.dumps(record["inference"]))
    from angiotune.model.student import StudentShape, frame_flops, student_config

    shape = StudentShape(*args.student_shape)
    student = student_config(config, shape)
    student_size = student.vision_config.backbone_config.image_size
    record["student"] = {"shape": shape.__dict__, "image_size": student_size,
                         "flops_per_lesion": frame_flops(student),
                         "teacher_flops_per_lesion": frame_flops(config),
                         **inference_speed(student, student_size, device, dtype,
                                           args.lesions_per_frame,
                                           repeats=5 if args.small else 10)}
    print(json.dumps(record["student"]))
    print(f"student {shape}: {record['student']['whole_model_ms']:.1f} ms per lesion against "
          f"{record['inference']['whole_model_ms']:.1f} ms for the teacher "
          f"({record['inference']['whole_model_ms'] / record['student']['whole_model_ms']:.1f}x "
          "measured side by side)")

    measured = [r["mfu"] for r in rows if r.get("mfu") and r["gradient_checkpointing"]]
    mfu = max(measured) if measured else 0.35
    record["projection_mfu"] = mfu
    record["projection_mfu_source"] = ("measured here (best checkpointed batch)" if measured
                                       else "assumed 0.35: no GPU peak to measure against")
    record["projection"] = project(full_flops, mfu, args.trial_startup_s, args.asha_fraction)
    print(f"\nProjected three-stage search, {LESIONS} lesions, two RTX 3090s at MFU {mfu:.2f} "
          f"({record['projection_mfu_source']}):")
    for variant in ("without ASHA", "with ASHA"):
        chosen = [r for r in record["projection"] if r["variant"] == variant]
        lora = sum(r["lora_hours"] for r in chosen)
        last = sum(r["lora_last_blocks_cached_hours"] for r in chosen)
        rungs = sum(r["lora_last_blocks_cached_validate_rungs_hours"] for r in chosen)
        cached = sum(r["frozen_encoder_cached_hours"] for r in chosen)
        print(f"  {variant:<12}: LoRA on the encoder {lora:6.1f} h; LoRA on its last "
              f"{SHARES[1]:g} + prefix cache ({VIEWS} views) {last:6.1f} h, validating at the "
              f"rungs only {rungs:6.1f} h; frozen encoder + embedding cache {cached:6.1f} h")
    # What the cheaper trials buy: the most epochs per trial the last-blocks plan (validating at
    # the rungs, with ASHA) fits in an overnight 12 h, against the plan's 10.
    def rungs_hours(epochs: int) -> float:
        rows = project(full_flops, mfu, args.trial_startup_s, args.asha_fraction, epochs)
        return sum(r["lora_last_blocks_cached_validate_rungs_hours"] for r in rows
                   if r["variant"] == "with ASHA")

    affordable = max((e for e in range(PLAN_EPOCHS, 4 * PLAN_EPOCHS)
                      if rungs_hours(e) <= OVERNIGHT_HOURS), default=None)
    record["last_blocks_epochs_within_12h"] = affordable
    if affordable is None:
        print(f"  LoRA on the last {SHARES[1]:g} does not fit the plan's {PLAN_EPOCHS} epochs "
              f"in {OVERNIGHT_HOURS} h")
    else:
        print(f"  LoRA on the last {SHARES[1]:g}, validating at the rungs, with ASHA, fits "
              f"{affordable} epochs per trial in {OVERNIGHT_HOURS} h "
              f"({rungs_hours(affordable):.1f} h; the plan has {PLAN_EPOCHS})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1, default=str))


if __name__ == "__main__":
    main()
