"""Base model loading, adapters (save/load with plain peft), losses and the plain training step."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel

from angiotune.errors import ConfigError
from angiotune.model.adapters import (
    AdapterSettings,
    adapt,
    load_adapter,
    save_adapter,
    trainable_parameters,
)
from angiotune.model.embedding_cache import EmbeddingCache, encoder_is_frozen
from angiotune.model.encoder_prefix import encode_prefix, encode_rest, frozen_prefix_depth
from angiotune.model.lesion import LesionModel
from angiotune.model.losses import LossWeights, dice_loss, focal_loss, hard_iou, weighted_bce
from angiotune.model.sam3 import (
    EMBEDDED_IMAGE_SIZE,
    ModelError,
    base_model_id,
    load_base_model,
    to_pixel_values,
)
from angiotune.train.pretrain import shape_batch
from angiotune.train.step import as_tensors, dice_scores, evaluate, predict_logits, train_step

SIZE = EMBEDDED_IMAGE_SIZE


@pytest.fixture()
def batch():
    return shape_batch(np.random.default_rng(0), SIZE, 4, jitter=False)


# --- losses against hand-worked values -------------------------------------------------------


def test_dice_loss_hand_values():
    target = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    sure = torch.tensor([[[20.0, 20.0], [-20.0, -20.0]]])
    assert float(dice_loss(sure, target, smooth=0.0)) == pytest.approx(0.0, abs=1e-6)
    half = torch.zeros(1, 2, 2)  # p = 0.5 everywhere: 2 * 1 / (2 + 2) = 0.5
    assert float(dice_loss(half, target, smooth=0.0)) == pytest.approx(0.5)


def test_focal_and_bce_hand_values():
    logit, target = torch.tensor([[0.0]]), torch.tensor([[1.0]])
    # p = 0.5: bce = ln 2; focal = alpha * (1 - 0.5)^2 * ln 2
    assert float(focal_loss(logit, target, gamma=2, alpha=0.25)) == \
        pytest.approx(0.25 * 0.25 * math.log(2))
    assert float(weighted_bce(logit, target, pos_weight=10.0)) == pytest.approx(10 * math.log(2))
    assert float(weighted_bce(logit, 1 - target, pos_weight=10.0)) == pytest.approx(math.log(2))


def test_hard_iou_and_dice_scores():
    target = torch.tensor([[[1.0, 1.0, 0.0, 0.0]]])
    logits = torch.tensor([[[1.0, -1.0, 1.0, -1.0]]])  # predicts pixels 0 and 2
    assert float(hard_iou(logits, target)[0]) == pytest.approx(1 / 3)
    assert float(dice_scores(logits, target)[0]) == pytest.approx(0.5)
    empty = torch.full((1, 1, 4), -1.0)
    assert float(dice_scores(empty, torch.zeros(1, 1, 4))[0]) == 1.0


def test_loss_weights_validate():
    with pytest.raises(ValueError, match="pixel_loss"):
        LossWeights(pixel_loss="hinge")


# --- base model ------------------------------------------------------------------------------


def test_embedded_model_loads_and_predicts(batch):
    model = load_base_model()
    logits, iou = predict_logits(model, torch.as_tensor(batch["image"]),
                                 torch.as_tensor(batch["box"]))
    assert logits.shape == (4, SIZE, SIZE) and iou.shape == (4,)
    assert base_model_id().startswith("embedded:embedded@")


def test_model_path_errors(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_base_model(tmp_path / "missing")
    with pytest.raises(ModelError, match="no config.json"):
        load_base_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelError, match="not SAM 3"):
        load_base_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "sam3_tracker"}))
    with pytest.raises(ModelError, match="safetensors"):
        load_base_model(tmp_path)


def test_base_id_follows_the_weights_not_the_folder(tmp_path):
    """A copied or moved checkpoint keeps its id (kept adapters stay valid); other weights of
    the very same shapes get another."""
    import shutil

    from safetensors.torch import load_file, save_file

    from angiotune.model.sam3 import EMBEDDED_DIR

    original = shutil.copytree(EMBEDDED_DIR, tmp_path / "models" / "sam3")
    moved = shutil.move(str(original), tmp_path / "elsewhere")
    assert base_model_id(moved) == base_model_id(shutil.copytree(moved, tmp_path / "copy"))
    assert base_model_id(moved).startswith("sam3@")
    weights = load_file(Path(moved) / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1e-3
    other = shutil.copytree(moved, tmp_path / "other")
    save_file(weights, other / "model.safetensors")
    assert base_model_id(other) != base_model_id(moved)


def test_a_weight_file_is_hashed_once_while_unchanged(tmp_path):
    import os

    from angiotune import angiotune_home
    from angiotune.model.fingerprint import CACHE_NAME, content_hash

    path = tmp_path / "w.safetensors"
    path.write_bytes(b"weights")
    real = content_hash(path)
    cache = angiotune_home() / CACHE_NAME
    remembered = json.loads(cache.read_text())
    key = next(k for k in remembered if k.startswith(str(path.resolve())))
    cache.write_text(json.dumps({**remembered, key: "remembered"}))
    assert content_hash(path) == "remembered"  # not read again
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert content_hash(path) == real  # changed since: read again


# --- adapters --------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["lora", "decoder_only", "full"])
def test_strategies_train_what_they_say(strategy):
    base = load_base_model()
    total = sum(p.numel() for p in base.parameters())
    model = adapt(base, AdapterSettings(strategy=strategy, rank=4, train_decoder=False))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if strategy == "lora":
        assert names and all("lora_" in n for n in names)
        assert trainable_parameters(model) < 0.1 * total
    elif strategy == "decoder_only":
        assert all(n.startswith(("mask_decoder", "prompt_encoder")) for n in names)
    else:
        assert trainable_parameters(model) == total


def test_unknown_target_group_is_rejected():
    with pytest.raises(ConfigError, match="targets"):
        AdapterSettings(targets=("vision_qv", "text_encoder"))


@pytest.mark.parametrize("strategy", ["lora", "decoder_only"])
def test_adapter_round_trip(tmp_path, batch, strategy):
    settings = AdapterSettings(strategy=strategy, rank=4, targets=("vision_qv", "decoder_attn"))
    model = adapt(load_base_model(), settings)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        train_step(model, batch, optimizer, LossWeights())
    model.eval()
    images, boxes = torch.as_tensor(batch["image"]), torch.as_tensor(batch["box"])
    expected, _ = predict_logits(model, images, boxes)
    save_adapter(model, settings, tmp_path / "adapter", base_model_id())
    restored = load_adapter(load_base_model(), tmp_path / "adapter")
    found, _ = predict_logits(restored, images, boxes)
    torch.testing.assert_close(found, expected)
    baseline, _ = predict_logits(load_base_model(), images, boxes)
    assert not torch.allclose(baseline, expected)
    if strategy == "lora":  # plain peft, no angiotune code, loads it too
        plain = PeftModel.from_pretrained(load_base_model(), tmp_path / "adapter").eval()
        torch.testing.assert_close(predict_logits(plain, images, boxes)[0], expected)


def test_an_adapter_for_other_weights_or_another_version_is_refused(tmp_path):
    settings = AdapterSettings(rank=2)
    folder = tmp_path / "adapter"
    saved = adapt(load_base_model(), settings)
    save_adapter(saved, settings, folder, base_model_id())
    # The same base is accepted: the adapter's weights come back as they were saved.
    loaded = load_adapter(load_base_model(), folder, base_id=base_model_id())
    assert isinstance(loaded, PeftModel)
    expected = {n: p for n, p in saved.named_parameters() if "lora_" in n}
    found = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert expected and found.keys() == expected.keys()
    for name, weight in expected.items():
        torch.testing.assert_close(found[name], weight)
    with pytest.raises(ConfigError, match="saved for base model embedded:embedded@"):
        load_adapter(load_base_model(), folder, base_id="/models/sam3@0123456789ab")
    record_file = folder / "angiotune_adapter.json"
    record = json.loads(record_file.read_text())
    record_file.write_text(json.dumps({**record, "format": 7}))
    with pytest.raises(ConfigError, match="adapter format 7"):
        load_adapter(load_base_model(), folder)
    record_file.unlink()
    with pytest.raises(ConfigError, match="not an angiotune adapter"):
        load_adapter(load_base_model(), folder)


def test_the_crop_an_adapter_learned_travels_with_it(tmp_path):
    from angiotune.model.adapters import crop_context_of
    from angiotune.registry.store import load_ready_model
    from angiotune.train.config import TrialConfig

    settings = AdapterSettings(rank=2, crop_context=2.25)
    folder = tmp_path / "adapter"
    save_adapter(adapt(load_base_model(), settings), settings, folder, base_model_id())
    assert crop_context_of(folder) == 2.25
    assert load_ready_model(folder, None).crop_context == 2.25
    # A trial started from it trains on its crop, whatever the space says.
    started = TrialConfig.from_flat({"epochs": 1, "init": "best", "crop_context": 1.2,
                                     "init_adapters": {"best": str(folder)}})
    assert started.adapter.crop_context == 2.25
    assert TrialConfig.from_flat({"epochs": 1, "crop_context": 1.2}).adapter.crop_context == 1.2
    # Adapters saved before the crop was recorded were all trained on 3 boxes.
    record_file = folder / "angiotune_adapter.json"
    record = json.loads(record_file.read_text())
    del record["settings"]["crop_context"]
    record_file.write_text(json.dumps({**record, "format": 1}))
    assert crop_context_of(folder) == 3.0
    with pytest.raises(ConfigError, match="crop_context"):
        AdapterSettings(crop_context=0.5)


@pytest.mark.slow
def test_the_refiner_starts_as_the_decoder_learns_and_travels(tmp_path, batch):
    """Zero-initialised, it starts from the decoder's mask; trained, it changes the mask; saved
    with the adapter, it comes back with it."""
    from angiotune.registry.store import load_ready_model
    from angiotune.train.config import TrialConfig
    from angiotune.train.loop import build_model, save_trained

    torch.manual_seed(0)
    model, settings = build_model(TrialConfig.from_flat(
        {"epochs": 1, "rank": 4, "targets": "vision_attn", "refine": True}))
    images, boxes = torch.as_tensor(batch["image"]), torch.as_tensor(batch["box"])
    with torch.no_grad():
        out = model(images, boxes)
    torch.testing.assert_close(out["logits"], out["coarse_logits"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    parts = [train_step(model, batch, optimizer, LossWeights()) for _ in range(8)]
    assert "coarse_loss" in parts[0] and parts[-1]["loss"] < parts[0]["loss"]
    model.eval()
    with torch.no_grad():
        out = model(images, boxes)
    assert not torch.allclose(out["logits"], out["coarse_logits"])
    save_trained(model, settings, tmp_path / "adapter", base_model_id())
    restored = load_ready_model(tmp_path / "adapter", None)
    assert restored.refiner is not None
    with torch.no_grad():
        torch.testing.assert_close(restored(images, boxes)["logits"], out["logits"])


def test_train_step_fits_a_batch(batch):
    torch.manual_seed(0)
    model = adapt(load_base_model(), AdapterSettings(rank=8, targets=("vision_attn",)))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    first = train_step(model, batch, optimizer, LossWeights())["loss"]
    for _ in range(15):
        last = train_step(model, batch, optimizer, LossWeights())["loss"]
    assert last < 0.8 * first
    metrics = evaluate(model, [batch])
    assert set(metrics) == {"dice", "iou", "dice/shape", "iou/shape", "n", "n/shape"}
    assert metrics["n"] == 4


def test_gradient_checkpointing_changes_nothing_but_memory(batch):
    def gradients(checkpointing: bool):
        torch.manual_seed(0)
        model = adapt(load_base_model(), AdapterSettings(rank=4, targets=("vision_attn",)))
        if checkpointing:
            from angiotune.model.sam3 import enable_gradient_checkpointing

            assert enable_gradient_checkpointing(model) == 4
        model.train()
        logits, _ = predict_logits(model, torch.as_tensor(batch["image"]),
                                   torch.as_tensor(batch["box"]))
        logits.mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name])


def test_bf16_autocast_step_runs(batch):
    model = adapt(load_base_model(), AdapterSettings(rank=4))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    parts = train_step(model, batch, optimizer, LossWeights(), autocast_dtype=torch.bfloat16)
    assert math.isfinite(parts["loss"])


def test_adapter_reloads_trainable_for_resume(tmp_path):
    settings = AdapterSettings(rank=4, train_decoder=True)
    model = adapt(load_base_model(), settings)
    expected = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    save_adapter(model, settings, tmp_path / "adapter", base_model_id())
    resumed = load_adapter(load_base_model(), tmp_path / "adapter", trainable=True)
    assert sorted(n for n, p in resumed.named_parameters() if p.requires_grad) == expected


def test_epoch_clock_splits_an_epoch_between_data_training_and_evaluation():
    """On a clock the test moves (no sleeps, so a loaded machine cannot change the split):
    three batches that each take 5 s to arrive and 2 s to train on, then 3 s of evaluation."""
    from angiotune.train.loop import EpochClock

    now = [100.0]

    def slow_batches():
        for number in range(3):
            now[0] += 5.0  # waiting for the data
            yield number
        now[0] += 0.5  # the end of the stream is waited for too

    clock = EpochClock(clock=lambda: now[0])
    for _ in clock.waiting(slow_batches()):
        now[0] += 2.0  # the step
    now[0] += 1.0  # the rest of the training pass (the heads' calibration)
    clock.mark("train_s")
    now[0] += 3.0
    clock.mark("eval_s")
    # The waits are not counted twice: training is the 7 s between them.
    assert clock.seconds == pytest.approx({"data_wait_s": 15.5, "train_s": 7.0, "eval_s": 3.0})


def test_validation_cache_decodes_once_unless_too_large():
    import numpy as np

    from angiotune.train.loop import ValidationCache

    class Shard:
        reads = 0

        def iter_batches(self, batch_size):
            Shard.reads += 1
            for start in range(0, 10, batch_size):
                yield {"image": np.zeros((min(batch_size, 10 - start), 8, 8), np.float32)}

    cache = ValidationCache()
    for _ in range(3):
        assert sum(len(b["image"]) for b in cache.batches(Shard(), 4)) == 10
    assert Shard.reads == 1
    small = ValidationCache(limit_bytes=1000)  # 10 x 8 x 8 float32 is 2560 bytes
    for _ in range(3):
        assert sum(len(b["image"]) for b in small.batches(Shard(), 4)) == 10
    assert Shard.reads == 4


# --- the frozen-encoder embedding cache ------------------------------------------------------


@pytest.mark.parametrize(("settings", "frozen"), [
    (AdapterSettings(strategy="decoder_only"), True),
    (AdapterSettings(strategy="lora", targets=("decoder_attn",), train_decoder=False), True),
    (AdapterSettings(strategy="lora", targets=("vision_qv",), train_decoder=False), False),
    (AdapterSettings(strategy="full"), False),
])
def test_encoder_is_frozen_follows_the_strategy(settings, frozen):
    assert encoder_is_frozen(adapt(load_base_model(), settings)) is frozen


def test_embedding_cache_gives_the_encoders_output_and_reuses_it(tmp_path, batch):
    model = LesionModel(adapt(load_base_model(), AdapterSettings(strategy="decoder_only")))
    model.eval()
    cache = EmbeddingCache(tmp_path, base_model_id())
    images = batch["image"]
    first = cache.embeddings(images, model.segmenter)
    assert (cache.hits, cache.misses) == (0, len(images))
    again = cache.embeddings(images[::-1].copy(), model.segmenter)  # order follows the input
    assert (cache.hits, cache.misses) == (len(images), len(images))
    for level, reversed_level in zip(first, again, strict=True):
        assert torch.equal(level, reversed_level.flip(0))
    tensors = as_tensors(batch)
    with torch.no_grad():
        direct = model(tensors["image"], tensors["box"])["logits"]
        cached = model(tensors["image"], tensors["box"], embeddings=first)["logits"]
    assert torch.allclose(direct, cached, atol=1e-6)
    # A changed pixel is another key; a damaged file is encoded again, not trusted.
    changed = images.copy()
    changed[0, 0, 0] += 0.5
    cache.embeddings(changed[:1], model.segmenter)
    assert cache.misses == len(images) + 1
    damaged = next(cache.folder.rglob("*.safetensors"))
    damaged.write_bytes(b"torn")
    cache.embeddings(images, model.segmenter)
    assert cache.misses == len(images) + 2
    # Another base model never shares entries.
    assert EmbeddingCache(tmp_path, "other@0").folder != cache.folder


@pytest.mark.parametrize("depth, blocks", [(1.0, 4), (0.5, 2), (0.25, 1), (0.01, 1)])
def test_lora_depth_confines_vision_lora_to_the_encoders_last_blocks(depth, blocks):
    model = adapt(load_base_model(), AdapterSettings(lora_depth=depth,
                                                     targets=("vision_qv", "vision_mlp")))
    adapted = {int(name.split("layers.")[1].split(".")[0])
               for name, p in model.named_parameters() if p.requires_grad and "lora_" in name}
    assert adapted == set(range(4 - blocks, 4))
    assert frozen_prefix_depth(model) == 4 - blocks
    # SAM 3's 32 blocks: a quarter is the last 8.
    assert AdapterSettings(lora_depth=0.25).adapted_blocks(32) == range(24, 32)


def test_the_encoder_split_after_its_frozen_blocks_gives_the_trackers_embeddings_and_gradients(
        batch):
    """Cached prefix + the rest with gradients is the same model: same embeddings at every
    depth, same logits and same LoRA gradients as the whole encoder run at once."""
    torch.manual_seed(0)
    segmenter = adapt(load_base_model(), AdapterSettings(lora_depth=0.5, dropout=0.0))
    for name, parameter in segmenter.named_parameters():
        if "lora_B" in name:  # LoRA starts as a no-op; make it count
            torch.nn.init.normal_(parameter, std=0.05)
    model = LesionModel(segmenter).train()
    tensors = as_tensors(batch)
    pixels = to_pixel_values(tensors["image"])
    with torch.no_grad():
        whole = segmenter.get_image_embeddings(pixels)
        for depth in range(5):
            split = encode_rest(segmenter, encode_prefix(segmenter, pixels, depth), depth)
            assert len(split) == len(whole)
            for a, b in zip(whole, split, strict=True):
                assert torch.allclose(a, b, atol=1e-6)
    grads = []
    for prefix in (None, (2, encode_prefix(segmenter, pixels, 2).detach())):
        model.zero_grad()
        logits = model(tensors["image"], tensors["box"], prefix=prefix)["logits"]
        logits.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()
                      if p.grad is not None and "lora_" in n})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5), name
