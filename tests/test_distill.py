"""Distillation: the student's shape and start, the teacher's targets, the loss, the registry
beside the teacher, `predict --student`, and `angiotune distill` end to end on real Ray."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import Sam3TrackerConfig, Sam3TrackerModel

from angiotune.cli import main
from angiotune.data.stream import load_rows
from angiotune.errors import ConfigError
from angiotune.model.adapters import AdapterSettings, adapt, save_adapter
from angiotune.model.lesion import LesionModel
from angiotune.model.sam3 import base_model_id, load_base_model
from angiotune.model.student import (
    StudentShape,
    build_student,
    frame_flops,
    load_student,
    merged_tracker,
    save_student,
    student_config,
)
from angiotune.predict import PredictSettings, predict
from angiotune.registry.store import RegistryError, load_best_model, promote
from angiotune.registry.students import (
    load_kept_student,
    promote_student,
    read_student,
    student_key,
)
from angiotune.search.space import load_space, parse_space
from angiotune.train.distill import (
    DistillSettings,
    DistillTargets,
    cine_frames,
    distill_loss,
    score,
    student_forward,
    teacher_targets,
    train_student,
)


@pytest.mark.slow
def test_a_student_shape_shrinks_the_encoder_and_keeps_the_decoder_width():
    full = Sam3TrackerConfig()  # the hub's facebook/sam3 tracker: 32 x 1024 at 1008 px
    config = student_config(full, StudentShape(0.5, 0.25, 0.5))
    backbone = config.vision_config.backbone_config
    assert (backbone.hidden_size, backbone.num_hidden_layers, backbone.num_attention_heads,
            backbone.image_size) == (512, 8, 8, 504)
    assert backbone.hidden_size // backbone.num_attention_heads == 64  # the teacher's head size
    assert backbone.global_attn_indexes == [1, 3, 5, 7]
    assert config.vision_config.backbone_feature_sizes == [[144, 144], [72, 72], [36, 36]]
    assert config.prompt_encoder_config.image_size == 504
    assert config.mask_decoder_config.hidden_size == full.mask_decoder_config.hidden_size
    assert config.vision_config.fpn_hidden_size == full.vision_config.fpn_hidden_size
    # Counted on the meta device: a 50x cheaper encoder than the teacher's, no weights loaded.
    assert frame_flops(config) < frame_flops(full) / 20
    with pytest.raises(Exception, match="share in"):
        StudentShape(0.0, 0.5, 1.0)


def test_a_student_starts_from_its_teachers_decoder_and_evenly_spaced_blocks():
    teacher = load_base_model()
    same_width = build_student(teacher, StudentShape(1.0, 0.5, 1.0))
    narrow = build_student(teacher, StudentShape(0.5, 0.5, 0.75))
    source = teacher.state_dict()
    for student in (same_width, narrow):
        own = student.state_dict()
        decoder = [k for k in own if k.startswith("mask_decoder.")]
        assert decoder and all(torch.equal(own[k], source[k]) for k in decoder)
    # 2 of 4 blocks: the teacher's blocks 1 and 3 (the last one always).
    own = same_width.state_dict()
    for student_block, teacher_block in ((0, 1), (1, 3)):
        key = "vision_encoder.backbone.layers.{}.attention.q_proj.weight"
        assert torch.equal(own[key.format(student_block)], source[key.format(teacher_block)])
    assert narrow.config.vision_config.backbone_config.hidden_size == 32


def test_a_saved_student_is_a_plain_hugging_face_folder(tmp_path):
    teacher = load_base_model()
    student = LesionModel(build_student(teacher, StudentShape(1.0, 0.25, 0.75)), None, 1.5)
    save_student(student, tmp_path / "s", {"crop_context": 1.5, "shape": {}})
    plain = Sam3TrackerModel.from_pretrained(tmp_path / "s", local_files_only=True)
    loaded = load_student(tmp_path / "s")
    assert loaded.crop_context == 1.5
    images, boxes = torch.rand(2, 84, 84), torch.tensor([[20.0, 20, 50, 60], [5, 5, 40, 30]])
    with torch.no_grad():
        expected = student.eval()(images, boxes)["logits"]
        assert torch.allclose(loaded(images, boxes)["logits"], expected, atol=1e-5)
    assert isinstance(plain, Sam3TrackerModel)
    with pytest.raises(Exception, match="not a distilled student"):
        load_student(tmp_path)


def test_cine_frames_start_with_the_analysed_one_and_spread_over_the_run():
    assert cine_frames(2, 3, 4) == [2, 0, 1]
    assert cine_frames(10, 40, 4) == [10, 0, 13, 26]
    assert cine_frames(5, 40, 1) == [5]
    assert cine_frames(0, 1, 4) == [0]


def test_the_loss_mixes_teacher_and_truth_as_weighted():
    torch.manual_seed(0)
    logits = torch.randn(2, 8, 8, requires_grad=True)
    batch = {"teacher": torch.randn(2, 8, 8), "truth": (torch.rand(2, 8, 8) > 0.5).float(),
             "has_truth": torch.tensor([True, False]), "embeddings": torch.randn(2, 4, 2, 2)}
    follow_only = distill_loss(logits, batch, DistillSettings(distill_weight=1.0))
    other_truth = {**batch, "truth": 1 - batch["truth"]}
    assert torch.isclose(follow_only, distill_loss(logits, other_truth,
                                                   DistillSettings(distill_weight=1.0)))
    truth_only = DistillSettings(distill_weight=0.0)
    other_teacher = {**batch, "teacher": -batch["teacher"]}
    assert torch.isclose(distill_loss(logits, batch, truth_only),
                         distill_loss(logits, other_teacher, truth_only))
    assert not torch.isclose(distill_loss(logits, batch, truth_only),
                             distill_loss(logits, other_truth, truth_only))
    # The encoder's match: zero when the student's embedding is the teacher's (pooled).
    settings = DistillSettings(distill_weight=1.0, feature_weight=1.0)
    same = torch.nn.functional.adaptive_avg_pool2d(batch["embeddings"], (1, 1))
    assert torch.isclose(distill_loss(logits, batch, settings, same), follow_only)
    assert distill_loss(logits, batch, settings, same + 1) > follow_only
    with pytest.raises(ConfigError):
        DistillSettings(distill_weight=1.5)


def test_distill_spaces_are_validated_on_load():
    space = load_space("distill.yaml")
    assert space.stage == "distill" and space.metric == "dice"
    base = {"name": "d", "stage": "distill", "params": {"lr": {"type": "float", "low": 1e-4,
                                                               "high": 1e-3}}}
    assert parse_space({**base, "vessels": ["LAD", "general"]}, "x.yaml").vessels == (
        "LAD", "general")
    refusals = [
        ({**base, "fixed": {"rank": 4}}, "not a setting of a student trial"),
        ({"name": "a", "params": {"width_ratio": {"type": "categorical", "choices": [0.5]}}},
         "not a setting of an adapter trial"),
        ({"name": "a", "metric": "agreement", "params": base["params"]}, "only a distillation"),
        ({**base, "metric": "stenosis_mae", "mode": "min"}, "selects students on one of"),
        ({**base, "fixed": {"input_ratio": 1.5}}, "share in"),
        ({**base, "params": {"frames_per_cine": {"type": "int", "low": 1, "high": 4}}},
         "cannot be searched"),
        ({**base, "vessels": ["LM"]}, "registry entries"),
        ({**base, "stage": "distil"}, "must be one of"),
        ({**base, "fixed": {"batch_size": 0}}, "batch size"),
        ({**base, "fixed": {"feature_weight": -1}}, "0 or more"),
    ]
    for raw, message in refusals:
        with pytest.raises(ConfigError, match=message):
            parse_space(raw, "x.yaml")


@pytest.fixture(scope="module")
def teacher_results(tmp_path_factory, phantom_index) -> Path:
    """A registry with a (random, untrained) LAD adapter and a general one, each naming the
    session's phantom index as the data it was searched on."""
    results = tmp_path_factory.mktemp("distill-results")
    torch.manual_seed(0)
    settings = AdapterSettings(rank=2)
    for key in ("LAD", "general"):
        folder = results.parent / f"teacher-{key}"
        save_adapter(adapt(load_base_model(), settings), settings, folder, base_model_id())
        promote(results, key, folder, {
            "metric": "dice", "mode": "max", "score": 0.5, "validation_split": "s",
            "metrics": {}, "zero_shot": {}, "config": {"rank": 2}, "stage": 1,
            "strategy": "lora", "base_model": base_model_id(), "search": "test",
            "trial_id": "t0", "index": str(phantom_index.out)})
    return results


@pytest.fixture(scope="module")
def lad_targets(teacher_results, phantom_index, tmp_path_factory) -> DistillTargets:
    teacher = load_best_model(teacher_results, "LAD")
    rows, root = load_rows(phantom_index.out)
    return teacher_targets(teacher, rows, root, tmp_path_factory.mktemp("targets"),
                           frames_per_cine=3)


@pytest.mark.slow  # the teacher over the session's phantom cines
def test_teacher_targets_hold_every_chosen_frame_and_truth_on_the_analysed_one(
        lad_targets, phantom_index, teacher_results):
    rows, _ = load_rows(phantom_index.out)
    frames = [len(cine_frames(int(r.frame_index), int(r.frames), 3)) for r in rows.itertuples()]
    assert len(lad_targets) == sum(frames)
    assert int(np.sum(lad_targets.has_truth)) == len(rows)  # one analysed frame per lesion
    assert not np.asarray(lad_targets.truth)[~np.asarray(lad_targets.has_truth)].any()
    assert lad_targets.teacher.shape == lad_targets.images.shape == (len(lad_targets), 112, 112)
    assert lad_targets.embeddings.shape[1:] == (64, 8, 8)
    # The stored logits are the teacher's own on the stored crop and box.
    teacher = load_best_model(teacher_results, "LAD")
    with torch.no_grad():
        again = teacher(torch.as_tensor(lad_targets.images[:2] / np.float32(255)),
                        torch.as_tensor(np.array(lad_targets.boxes[:2])))["logits"]
    assert np.allclose(again.numpy(), lad_targets.teacher[:2].astype(np.float32), atol=0.05)
    # The teacher agrees with itself: its own masks score agreement 1 against the targets.
    assert score(lad_targets, "val", None, 112)["teacher_dice"] >= 0


def _gap_to_teacher(student, targets: DistillTargets, size: int) -> float:
    """Mean absolute difference of the student's and the teacher's mask probabilities over
    the training frames: what the teacher term of the loss drives down."""
    rows = targets.where("train")
    with torch.no_grad():
        batch = targets.batch(rows)
        logits, _ = student_forward(student.eval(), batch["image"], batch["box"], size)
    return float((torch.sigmoid(logits) - torch.sigmoid(batch["teacher"])).abs().mean())


@pytest.mark.slow  # the teacher over the session's phantom cines
def test_a_lesion_whose_cine_cannot_be_read_is_left_out_and_named(
        teacher_results, phantom_index, tmp_path):
    rows, root = load_rows(phantom_index.out)
    rows = rows.head(3).copy()
    rows.loc[1, "image_path"] = "dicom/missing.dcm"
    targets = teacher_targets(load_best_model(teacher_results, "LAD"), rows, root,
                              tmp_path / "t", frames_per_cine=2)
    kept = [0, 2]
    assert len(targets) == sum(len(cine_frames(int(rows.frame_index[i]), int(rows.frames[i]), 2))
                               for i in kept)
    assert sorted(set(np.asarray(targets.lesion))) == kept
    assert [s["sample_id"] for s in targets.meta["skipped"]] == [rows.sample_id[1]]
    assert not list((tmp_path / "t").glob("*.part"))


@pytest.mark.slow  # the teacher over the session's phantom cines
def test_a_student_trained_on_targets_comes_closer_to_its_teacher(lad_targets, teacher_results):
    teacher = load_best_model(teacher_results, "LAD")
    student = LesionModel(build_student(merged_tracker(teacher), StudentShape(1.0, 0.5, 0.75)),
                          None, 1.5)
    size = student.segmenter.config.vision_config.backbone_config.image_size
    before = _gap_to_teacher(student, lad_targets, size)
    reports = []
    # Only the teacher: this one is untrained, so the truth would pull the other way.
    train_student(student, lad_targets, DistillSettings(distill_weight=1.0, lr=1e-3), 4, size,
                  lambda epoch, scores, _: reports.append((epoch, scores)))
    assert [epoch for epoch, _ in reports] == [1, 2, 3, 4]
    assert {"dice", "agreement", "agreement_all_frames", "teacher_dice", "train_loss"} <= set(
        reports[-1][1])
    assert reports[-1][1]["train_loss"] < reports[0][1]["train_loss"]
    assert _gap_to_teacher(student, lad_targets, size) < before


def _student_record(teacher_entry: str, score: float) -> dict:
    return {"metric": "dice", "mode": "max", "score": score, "validation_split": "s",
            "teacher_entry": teacher_entry, "validation": {"dice": score},
            "test": {"dice": score - 0.01, "teacher_dice": 0.5, "agreement": 0.9},
            "encoder": {"blocks": 2, "hidden_size": 64, "image_size": 84},
            "teacher_encoder": {"blocks": 4, "hidden_size": 64, "image_size": 112},
            "ms_per_lesion_rtx3090": {"student": 0.01, "teacher": 0.02},
            "ms_assumption": "assumed", "search": "d", "trial_id": "t1", "epoch": 2}


@pytest.mark.slow
def test_students_are_kept_beside_their_teacher_and_go_stale_with_it(teacher_results, tmp_path):
    import shutil

    results = tmp_path / "results"
    shutil.copytree(teacher_results, results)
    teacher = Path(read_student.__globals__["entry_dir"](results, "LAD")).name
    folder = tmp_path / "student"
    save_student(build_student(load_base_model(), StudentShape(1.0, 0.5, 0.75)), folder,
                 {"crop_context": 1.5, "shape": {}})
    assert promote_student(results, "LAD", folder, _student_record(teacher, 0.6))[0]
    assert not promote_student(results, "LAD", folder, _student_record(teacher, 0.5))[0]
    entry = read_student(results, "LAD")
    assert entry["score"] == 0.6 and not entry["stale"]
    assert (results / "best" / f"{student_key('LAD')}.json").is_file()
    assert "distilled student" in (Path(entry["path"]) / "README.md").read_text()
    assert isinstance(load_kept_student(results, "LAD"), LesionModel)
    # A new teacher: the old student is stale, and any student of the new one replaces it.
    new_teacher = tmp_path / "teacher2"
    shutil.copytree(Path(read_student.__globals__["entry_dir"](results, "LAD")) / "adapter",
                    new_teacher)
    promote(results, "LAD", new_teacher, {"metric": "dice", "mode": "max", "score": 0.9,
                                          "validation_split": "s", "config": {}})
    assert read_student(results, "LAD")["stale"]
    with pytest.raises(RegistryError, match="since been replaced"):
        load_kept_student(results, "LAD")
    kept, why = promote_student(results, "LAD", folder, _student_record(teacher, 0.99))
    assert not kept and "no longer the kept" in why  # a student of the old teacher
    newest = Path(read_student.__globals__["entry_dir"](results, "LAD")).name
    assert promote_student(results, "LAD", folder, _student_record(newest, 0.1))[0]
    assert not read_student(results, "LAD")["stale"]
    # The files are checked against the manifest, as an adapter's are.
    weights = Path(read_student(results, "LAD")["path"]) / "student" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(RegistryError, match="checksums"):
        read_student(results, "LAD")


@pytest.mark.slow  # the teacher over the session's phantom cines
def test_predict_with_students_reports_the_student_and_refuses_without_one(
        teacher_results, phantom_index, tmp_path, capsys):
    import shutil

    results = tmp_path / "results"
    shutil.copytree(teacher_results, results)
    assert main(["predict", str(phantom_index.out), "--out", str(tmp_path / "p0"),
                 "--results", str(results), "--student", "--no-overlay"]) == 2
    assert "no distilled student kept" in capsys.readouterr().err
    teacher = Path(read_student.__globals__["entry_dir"](results, "general")).name
    folder = tmp_path / "student"
    save_student(build_student(merged_tracker(load_best_model(results, "general")),
                               StudentShape(1.0, 0.5, 1.0)), folder,
                 {"crop_context": 1.5, "shape": {}})
    promote_student(results, "general", folder, _student_record(teacher, 0.6))
    summary = predict(phantom_index.out, tmp_path / "p1",
                      PredictSettings(results=results, student=True, overlays=False,
                                      vessel="general"))
    assert summary.lesions and not summary.failures
    adapter = summary.lesions[0].report["adapter"]
    assert adapter["student"]["teacher_entry"] == teacher and adapter["heads"] is False
    assert json.loads((tmp_path / "p1" / "predictions.json").read_text())["lesions"]


def test_distill_refuses_a_model_it_could_not_score_before_ray_starts(teacher_results, capsys):
    assert main(["distill", "--results", str(teacher_results), "--vessel", "LAD"]) == 2
    assert "no val lesions of LAD" in capsys.readouterr().err
    assert not (teacher_results / "searches").exists()


@pytest.mark.slow
def test_angiotune_distill_searches_keeps_and_predicts_with_students(
        teacher_results, phantom_index, ray_cluster, tmp_path, capsys):
    """The command as a user runs it, on the session's Ray: a Tune search per kept model,
    the best student kept beside its teacher with test scores, then predict --student."""
    import shutil

    results = tmp_path / "results"
    shutil.copytree(teacher_results, results)
    assert load_space("distill.yaml").vessels == ()  # every kept model unless named
    code = main(["distill", "--results", str(results), "--vessel", "general",
                 "--set", "samples=2", "--set", "epochs=2", "--set", "asha.grace_period=1",
                 "--set", "fixed.frames_per_cine=2"])
    output = capsys.readouterr().out
    assert code == 0, output
    entry = read_student(results, "general")
    assert entry is not None and not entry["stale"]
    assert {"dice", "agreement", "teacher_dice"} <= set(entry["test"])
    assert entry["flops_per_lesion"]["student"] < entry["flops_per_lesion"]["teacher"]
    assert entry["full_size_ms_per_lesion_rtx3090"]["teacher"] > 100
    assert read_student(results, "LAD") is None  # only general was asked for
    assert "general" in output and "test Dice" in output
    assert main(["best", "--vessel", "general", "--results", str(results)]) == 0
    assert "student: " in capsys.readouterr().out
    code = main(["predict", str(phantom_index.out), "--out", str(tmp_path / "p"),
                 "--results", str(results), "--student", "--vessel", "general",
                 "--no-overlay"])
    assert code == 0
    report = json.loads((tmp_path / "p" / "predictions.json").read_text())["lesions"][0]
    assert report["adapter"]["student"]["teacher_entry"] == entry["teacher_entry"]
    # A new teacher since: resuming would mix targets of two teachers, and is refused.
    teacher = Path(read_student.__globals__["entry_dir"](results, "general"))
    promote(results, "general", teacher / "adapter", {
        "metric": "dice", "mode": "max", "score": 0.9, "validation_split": "s", "config": {},
        "base_model": base_model_id(), "index": str(phantom_index.out)})
    capsys.readouterr()
    assert main(["distill", "--results", str(results), "--vessel", "general", "--resume"]) == 2
    assert "changed since this run started" in capsys.readouterr().err
    assert read_student(results, "general")["stale"]


@pytest.mark.slow  # builds a full-width SAM 3 in the hub's layout
def test_a_student_of_a_teacher_in_the_hubs_layout_builds_saves_and_runs(tmp_path):
    """The users' path: the base is the hub's facebook/sam3 folder (sam3_video, prefixed keys,
    1008 px; here one block deep), with a LoRA adapter on it."""
    from hub_layout import build_hub_layout

    from angiotune.model.sam3 import model_config

    folder = build_hub_layout(tmp_path / "sam3", layers=1, seed=0)
    teacher = LesionModel(adapt(load_base_model(folder), AdapterSettings(rank=2)), None, 1.5)
    shape = StudentShape(1.0, 1.0, 0.5)
    student = build_student(merged_tracker(teacher), shape)
    assert student.config.vision_config.backbone_config.image_size == 504
    source, own = merged_tracker(teacher).state_dict(), student.state_dict()
    token = "mask_decoder.iou_token.weight"
    assert torch.equal(own[token], source[token])
    assert frame_flops(student_config(model_config(folder, "box"), shape)) < frame_flops(
        model_config(folder, "box")) / 3
    save_student(student, tmp_path / "student", {"crop_context": 1.5, "shape": {}})
    with torch.no_grad():
        logits = load_student(tmp_path / "student")(torch.rand(1, 504, 504),
                                                    torch.tensor([[100.0, 120, 300, 260]]))
    assert logits["logits"].shape == (1, 504, 504)
