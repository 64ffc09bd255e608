"""The text_box mode: tokenizer, prompts, the concept model's loss, adapters, frozen text."""

import numpy as np
import pytest
import torch
from peft import PeftModel

from angiotune.data.prompts import lesion_prompt, neighbour_prompt
from angiotune.model.adapters import AdapterSettings, adapt, load_adapter, save_adapter
from angiotune.model.concept import build_tokenizer, prompt_vocabulary
from angiotune.model.losses import LossWeights
from angiotune.model.sam3 import (
    EMBEDDED_IMAGE_SIZE,
    base_model_id,
    load_base_model,
    load_prompt_tokenizer,
)
from angiotune.taxonomies import load_taxonomy
from angiotune.train.pretrain import shape_batch
from angiotune.train.step import evaluate, predict_logits, train_step


@pytest.fixture(scope="module")
def tokenizer():
    return load_prompt_tokenizer()


@pytest.fixture()
def batch():
    return shape_batch(np.random.default_rng(1), EMBEDDED_IMAGE_SIZE, 4, jitter=False)


def test_tokenizer_covers_every_segment_name(tokenizer):
    unknown = tokenizer.unk_token_id
    for name in ("CASS", "SYNTAX"):
        for segment in load_taxonomy(name).segments.values():
            ids = tokenizer(lesion_prompt(segment.name))["input_ids"]
            assert unknown not in ids, segment.name
            assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer("mid LAD stenosis")["input_ids"] == \
        tokenizer("MID lad STENOSIS")["input_ids"]
    assert unknown in tokenizer("aortic valve")["input_ids"]
    assert len(tokenizer) == len(prompt_vocabulary()) == len(build_tokenizer())


def test_hard_negatives_name_another_segment_of_the_same_vessel():
    cass = load_taxonomy("CASS")
    rng = np.random.default_rng(0)
    for _ in range(20):
        negative = neighbour_prompt("13", "CASS", rng)
        assert negative != lesion_prompt("mid LAD")
        named = [s for s in cass.segments.values() if lesion_prompt(s.name) == negative]
        assert named and named[0].vessel == "LAD"


@pytest.mark.parametrize("strategy", ["lora", "decoder_only", "full"])
def test_text_encoder_stays_frozen(strategy):
    model = adapt(load_base_model(prompt_mode="text_box"), AdapterSettings(strategy=strategy))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    assert not [n for n in trainable if "text_encoder" in n or "text_projection" in n]


@pytest.mark.slow
def test_concept_training_and_adapter_round_trip(tokenizer, batch, tmp_path):
    torch.manual_seed(0)
    settings = AdapterSettings(rank=4, targets=("vision_qv", "decoder_attn"))
    model = adapt(load_base_model(prompt_mode="text_box"), settings)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    first = train_step(model, batch, optimizer, LossWeights(), tokenizer=tokenizer)
    for _ in range(8):
        last = train_step(model, batch, optimizer, LossWeights(), tokenizer=tokenizer)
    assert last["loss"] < first["loss"]
    assert {"mask_loss", "presence_loss", "negative_loss"} <= set(last)
    metrics = evaluate(model, [batch], tokenizer)
    assert 0.0 <= metrics["dice"] <= 1.0

    model.eval()
    images, boxes = torch.as_tensor(batch["image"]), torch.as_tensor(batch["box"])
    prompts = list(batch["prompt"])
    expected, _ = predict_logits(model, images, boxes, prompts, tokenizer)
    save_adapter(model, settings, tmp_path / "adapter", base_model_id(None, "text_box"))
    restored = load_adapter(load_base_model(prompt_mode="text_box"), tmp_path / "adapter")
    torch.testing.assert_close(predict_logits(restored, images, boxes, prompts, tokenizer)[0],
                               expected)
    plain = PeftModel.from_pretrained(load_base_model(prompt_mode="text_box"),
                                      tmp_path / "adapter").eval()
    torch.testing.assert_close(predict_logits(plain, images, boxes, prompts, tokenizer)[0],
                               expected)
