"""Stage-2 heads: losses, metrics against hand-worked values, features, and a multi-task step."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from angiotune.data.context import CONTEXT_DIM
from angiotune.data.stream import SampleSettings, load_rows, prepare_sample
from angiotune.model.adapters import AdapterSettings, adapt
from angiotune.model.heads import (
    TASKS,
    HeadSettings,
    LesionHeads,
    feature_dim_of,
    load_heads,
    mask_geometry,
    save_heads,
)
from angiotune.model.lesion import LesionModel
from angiotune.model.losses import (
    HeadLossWeights,
    LossWeights,
    classification_loss,
    combine_head_losses,
    regression_loss,
)
from angiotune.model.sam3 import load_base_model
from angiotune.train.metrics import (
    accuracy,
    macro_f1,
    mean_absolute_error,
    objective,
    summarise_by,
    with_objective,
)
from angiotune.train.step import evaluate, train_step


def test_macro_f1_and_accuracy_by_hand():
    true, pred = ["1", "1", "2", "3"], ["1", "2", "2", "1"]
    # class 1: tp 1, fp 1, fn 1 -> 0.5; class 2: tp 1, fp 1 -> 2/3; class 3: fn 1 -> 0
    assert macro_f1(true, pred) == pytest.approx((0.5 + 2 / 3 + 0) / 3)
    assert accuracy(true, pred) == 0.5
    assert macro_f1(["4"], ["4"]) == 1.0
    assert math.isnan(macro_f1([], []))


def test_mae_skips_unknown_values():
    assert mean_absolute_error([10, np.nan, 30], [12, 5, 27]) == pytest.approx(2.5)
    assert math.isnan(mean_absolute_error([np.nan], [1.0]))


def test_summaries_per_vessel_and_objective():
    records = pd.DataFrame({
        "vessel": ["LAD", "LAD", "RCA"], "segment": ["12", "13", "2"],
        "segment_pred": ["12", "12", "2"], "dice": [0.5, 0.7, 0.9], "iou": [0.4, 0.5, 0.8],
        "diameter_stenosis_pct": [50.0, 60.0, 40.0], "stenosis_pct_pred": [40.0, 70.0, 40.0],
        "mld_mm": [1.0, 1.2, 2.0], "mld_mm_pred": [1.5, 1.2, 1.0],
        "rvd_mm": [3.0, 3.0, 3.0], "rvd_mm_pred": [3.0, 3.0, 3.0]})
    metrics = summarise_by(records, "vessel")
    assert metrics["dice/LAD"] == pytest.approx(0.6) and metrics["n/RCA"] == 1
    assert metrics["cass_accuracy"] == pytest.approx(2 / 3)
    assert metrics["stenosis_mae/LAD"] == pytest.approx(10.0)
    assert metrics["mld_mae_mm"] == pytest.approx(0.5)
    terms = {"dice": 1.0, "stenosis_mae": -0.01}
    assert objective(metrics, terms) == pytest.approx(metrics["dice"] - 0.01 * 20 / 3)
    metrics = with_objective(metrics, terms, ["LAD", "RCA", "LCX"])
    assert metrics["objective/RCA"] == pytest.approx(0.9)
    assert "objective/LCX" not in metrics
    # A term without a value (no QCA values in validation) is left out, not NaN for all.
    assert objective({"dice": 0.5, "stenosis_mae": math.nan}, terms) == pytest.approx(0.5)
    assert math.isnan(objective({"stenosis_mae": math.nan}, terms))


def test_classification_loss_ignores_unknown_and_weights_classes():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [5.0, -5.0]])
    target = torch.tensor([0, 0, -1])
    plain = classification_loss(logits, target, HeadLossWeights())
    by_hand = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(2))) / 2
    assert float(plain) == pytest.approx(by_hand, rel=1e-5)
    focal = classification_loss(logits, target, HeadLossWeights(class_loss="focal"))
    assert float(focal) < float(plain)  # easy examples count less
    weighted = classification_loss(torch.tensor([[2.0, 0.0], [2.0, 0.0]]), torch.tensor([0, 1]),
                                   HeadLossWeights(class_weights=(1.0, 3.0)))
    expected = (1 * math.log(1 + math.exp(-2)) + 3 * math.log(1 + math.exp(2))) / 4
    assert float(weighted) == pytest.approx(expected, rel=1e-5)


def test_regression_loss_is_huber_in_units_and_skips_nan():
    pred, target = torch.tensor([55.0, 80.0, 10.0]), torch.tensor([50.0, 50.0, float("nan")])
    # errors of 0.5 and 3 units of 10 pp: 0.5 * 0.5^2 and 3 - 0.5
    assert float(regression_loss(pred, target, 10.0)) == pytest.approx((0.125 + 2.5) / 2)


def test_uncertainty_weighting_by_hand():
    losses = {"segment": torch.tensor(2.0), "stenosis": torch.tensor(1.0),
              "mld": torch.tensor(0.5), "rvd": torch.tensor(0.0)}
    fixed = combine_head_losses(losses, HeadLossWeights(segment=1, stenosis=2, mld=4, rvd=1))
    assert float(fixed) == pytest.approx(2 + 2 + 2)
    log_vars = torch.tensor([0.0, math.log(2.0), 0.0, 0.0])
    learned = combine_head_losses(losses, HeadLossWeights(weighting="uncertainty"), log_vars)
    assert float(learned) == pytest.approx(2 + 0.5 + math.log(2.0) + 0.5)


def test_mask_geometry_measures_a_narrowing():
    logits = torch.full((1, 112, 112), -20.0)
    logits[0, 50:56, 20:90] = 20.0  # a 6 px wide vessel along x
    logits[0, 50:52, 50:60] = -20.0  # narrowed to 2 px over 10 px
    logits[0, 54:56, 50:60] = -20.0
    geometry = mask_geometry(logits, torch.tensor([[20.0, 50.0, 90.0, 56.0]]), 112)[0]
    minimum, median, narrowing = (float(v) for v in geometry[4:])
    assert minimum == pytest.approx(0.2) and median == pytest.approx(0.6)
    assert narrowing == pytest.approx(1 - 2 / 6)


def test_millimetre_heads_scale_with_pixel_spacing(tmp_path):
    heads = LesionHeads(HeadSettings(classes=("1", "2", "3"), feature_dim=10)).eval()
    features, context = torch.randn(4, 10), torch.randn(4, CONTEXT_DIM)
    near = heads(features, context, torch.full((4,), 0.1))
    far = heads(features, context, torch.full((4,), 0.2))
    torch.testing.assert_close(far["mld_mm"], 2 * near["mld_mm"])
    torch.testing.assert_close(far["stenosis_pct"], near["stenosis_pct"])
    save_heads(heads, tmp_path)
    again = load_heads(tmp_path)(features, context, torch.full((4,), 0.1))
    torch.testing.assert_close(again["segment_logits"], near["segment_logits"])
    assert again["stenosis_pct"].min() >= 0 and again["stenosis_pct"].max() <= 100


def _batch(phantom_index, size: int = 112) -> tuple[dict, tuple[str, ...]]:
    rows, root = load_rows(phantom_index, "train")
    settings = SampleSettings(image_size=size, augment=False)
    samples = [prepare_sample(r, root, settings) for r in rows.head(6).to_dict("records")]
    classes = tuple(sorted(rows["segment"].astype(str).unique()))
    return {k: np.stack([s[k] for s in samples]) for k in samples[0]}, classes


@pytest.mark.slow
@pytest.mark.parametrize("weighting", ["fixed", "uncertainty"])
def test_multitask_step_learns_heads_and_reports_their_metrics(phantom_index, weighting):
    torch.manual_seed(0)
    batch, classes = _batch(phantom_index.out)
    base = load_base_model()
    heads = LesionHeads(HeadSettings(classes=classes, feature_dim=feature_dim_of(base.config)))
    model = LesionModel(adapt(base, AdapterSettings(rank=4, alpha=8)), heads)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    weights = HeadLossWeights(weighting=weighting)
    first = train_step(model, batch, optimizer, LossWeights(), head_weights=weights)
    for _ in range(25):
        last = train_step(model, batch, optimizer, LossWeights(), head_weights=weights)
    assert {"segment_loss", "stenosis_loss", "mld_loss", "rvd_loss"} <= set(first)
    assert last["segment_loss"] < first["segment_loss"]
    assert last["stenosis_loss"] < first["stenosis_loss"]
    metrics = evaluate(model, [batch])
    assert {"cass_accuracy", "cass_macro_f1", "stenosis_mae", "mld_mae_mm",
            "rvd_mae_mm"} <= set(metrics)
    assert metrics["n"] == 6 and 0 <= metrics["cass_accuracy"] <= 1


def test_heads_learn_faster_than_the_adapter():
    from angiotune.train.config import OptimiserSettings
    from angiotune.train.loop import parameter_groups

    base = load_base_model()
    heads = LesionHeads(HeadSettings(classes=("1", "2"), feature_dim=feature_dim_of(base.config)))
    model = LesionModel(adapt(base, AdapterSettings(rank=2, alpha=4)), heads)
    adapter, head = parameter_groups(model, OptimiserSettings(lr=1e-3, head_lr_ratio=10))
    assert adapter["lr"] == 1e-3 and head["lr"] == pytest.approx(1e-2)
    assert {id(p) for p in head["params"]} == {id(p) for p in heads.parameters()}
    assert len(parameter_groups(LesionModel(adapt(load_base_model(), AdapterSettings())),
                                OptimiserSettings(lr=1e-3))) == 1


@pytest.mark.parametrize("decoder_width", [64, 96])
def test_feature_width_from_the_config_matches_a_forward_pass(decoder_width):
    """The heads are sized from the config (no forward pass on the full model in every trial):
    the width must be what the model's pooled features really are."""
    from transformers import Sam3TrackerModel

    from angiotune.model.heads import pooled_features
    from angiotune.model.sam3 import tiny_tracker_config, to_pixel_values

    config = tiny_tracker_config()
    config.mask_decoder_config.hidden_size = decoder_width
    config.vision_config.fpn_hidden_size = decoder_width
    config.prompt_encoder_config.hidden_size = decoder_width
    model = Sam3TrackerModel(config).eval()
    boxes = torch.tensor([[10.0, 10.0, 60.0, 60.0]])
    with torch.no_grad():
        out = model(pixel_values=to_pixel_values(torch.zeros(1, 112, 112)),
                    input_boxes=boxes[:, None], multimask_output=False)
    features = pooled_features(out.image_embeddings, out.pred_masks[:, 0, 0], boxes, 112)
    assert features.shape[-1] == feature_dim_of(config)


@pytest.mark.slow
def test_segment_head_trains_without_calibration_or_measurements(phantom_index):
    """COCO data (ARCADE's SYNTAX segments): no mm per pixel and no QCA values. The mm heads
    give NaN, and no NaN reaches a gradient, so the segment head and the adapter still learn."""
    torch.manual_seed(0)
    batch, classes = _batch(phantom_index.out)
    batch["pixel_spacing_mm"] = np.full_like(batch["pixel_spacing_mm"], np.nan)
    for column in ("diameter_stenosis_pct", "mld_mm", "rvd_mm"):
        batch[column] = np.full(len(batch[column]), np.nan)
    base = load_base_model()
    heads = LesionHeads(HeadSettings(classes=classes, feature_dim=feature_dim_of(base.config)))
    model = LesionModel(adapt(base, AdapterSettings(rank=4, alpha=8)), heads)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=3e-3)
    weights = HeadLossWeights(stenosis=0.0, mld=0.0, rvd=0.0)
    first = train_step(model, batch, optimizer, LossWeights(), head_weights=weights)
    for _ in range(15):
        last = train_step(model, batch, optimizer, LossWeights(), head_weights=weights)
        assert all(torch.isfinite(p).all() for p in trainable)
    assert last["segment_loss"] < first["segment_loss"]
    metrics = evaluate(model, [batch])
    assert 0 <= metrics["cass_accuracy"] <= 1 and math.isnan(metrics["mld_mae_mm"])


def test_a_space_needs_only_the_measurements_its_heads_train_on(tmp_path):
    from angiotune.search import load_space

    full = load_space("stage2_multitask.yaml")
    assert set(full.measurements_needed()) == {"diameter_stenosis_pct", "mld_mm", "rvd_mm",
                                               "pixel_spacing_mm"}
    assert load_space("stage2_segment.yaml").measurements_needed() == ()
    ratio_only = load_space("stage2_segment.yaml", ["fixed.stenosis_weight=0.5"])
    assert ratio_only.measurements_needed() == ("diameter_stenosis_pct",)
    learned = load_space("stage2_segment.yaml", ["fixed.head_weighting=uncertainty"])
    assert len(learned.measurements_needed()) == 4
    assert load_space("lora_rank.yaml").measurements_needed() == ()


def test_heads_remember_their_taxonomy_and_report_only_trained_tasks(tmp_path):
    """A segment-only head on SYNTAX labels: predict reads its codes as SYNTAX (5 is the left
    main there, an RCA branch in CASS) and reports no untrained stenosis or MLD."""
    from angiotune.predict.segment import _head_outputs
    from angiotune.train.config import TrialConfig

    def tasks_of(flat: dict) -> tuple[str, ...]:
        return TrialConfig.from_flat({"epochs": 1, "heads": True, "classes": ["5", "6"],
                                      **flat}).heads.tasks

    tasks = tasks_of({"stenosis_weight": 0, "mld_weight": 0, "rvd_weight": 0})
    assert tasks == ("segment",)
    assert tasks_of({"head_weighting": "uncertainty", "mld_weight": 0}) == TASKS
    heads = LesionHeads(HeadSettings(classes=("5", "6"), feature_dim=10, taxonomy="SYNTAX",
                                     tasks=tasks))
    save_heads(heads, tmp_path)
    again = load_heads(tmp_path)
    assert again.settings.taxonomy == "SYNTAX" and again.settings.tasks == ("segment",)
    model = LesionModel(adapt(load_base_model(), AdapterSettings(rank=2)), again)
    out = {"segment_logits": torch.tensor([[3.0, 0.0]]), "stenosis_pct": torch.tensor([40.0]),
           "mld_mm": torch.tensor([1.0]), "rvd_mm": torch.tensor([3.0])}
    report = _head_outputs(model, out, 0)
    assert (report["cass_segment"], report["segment_name"]) == ("5", "left main")
    assert report["taxonomy"] == "SYNTAX"
    assert not {"diameter_stenosis_pct", "MLD_mm", "RVD_mm"} & set(report)


# --- the QCA read: heads that measure the model's own mask ------------------------------------

def _narrowed_crop(size: int = 200) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 50 % narrowing of a 3 mm vessel: its X-ray-like crop, a soft model mask, its box."""
    from scipy import ndimage
    from shapes import SPACING_MM, angiogram, narrowing, straight, tube

    path = straight()
    diameters, _ = narrowing(path, 3.0, 50.0, plateau_mm=4.0)
    image, soft = angiogram(path, diameters), tube(path, diameters, soft=True)
    mask = soft >= 0.5
    ys, xs = np.nonzero(mask)
    box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)
    if size != image.shape[0]:
        factor = size / image.shape[0]
        image = ndimage.zoom(image, factor, order=1, grid_mode=True, mode="nearest")
        soft = np.clip(ndimage.zoom(soft, factor, order=1, grid_mode=True, mode="nearest"), 0, 1)
        box = box * factor
    assert SPACING_MM == 0.2  # the 3 mm reference is 15 px at size 200
    return image, soft.astype(np.float32), box


def test_crop_readouts_measure_the_predicted_mask_in_model_pixels():
    from angiotune.qca.readout import MAX_GRID, crop_readouts

    image, soft, box = _narrowed_crop()
    empty = np.zeros_like(soft)
    values = crop_readouts(np.stack([image, image]), np.stack([soft, empty]), np.stack([box, box]))
    frame, mask = values[0, :3], values[0, 3:]
    for stenosis, mld_px, rvd_px in (frame, mask):
        assert stenosis == pytest.approx(50, abs=8)
        assert mld_px == pytest.approx(7.5, abs=1.5) and rvd_px == pytest.approx(15, abs=1.5)
    assert np.isnan(values[1]).all()  # nothing predicted: nothing to read
    # A crop larger than the QCA grid is measured smaller, but reported in model pixels.
    image, soft, box = _narrowed_crop(size=2 * MAX_GRID)
    big = crop_readouts(image[None], soft[None], box[None])[0]
    scale = 2 * MAX_GRID / 200
    assert big[0] == pytest.approx(frame[0], abs=5)
    assert big[1] == pytest.approx(frame[1] * scale, rel=0.15)
    assert big[2] == pytest.approx(frame[2] * scale, rel=0.1)


def test_calibration_recovers_a_linear_read_and_needs_enough_lesions():
    from angiotune.model.heads import MIN_CALIBRATION_SAMPLES, fit_calibration

    rng = np.random.default_rng(0)
    readouts = rng.uniform(5, 80, size=(60, 6))
    own = rng.uniform(5, 80, size=(60, 3))
    truth = np.array([0.6, 0.2, 0.1, 5.0])
    targets = np.column_stack([readouts[:, j] * truth[0] + readouts[:, 3 + j] * truth[1]
                               + own[:, j] * truth[2] + truth[3] for j in range(3)])
    targets[:, 2] = np.nan  # no reference diameters in this index: that read is not fitted
    readouts[:5, 0] = np.nan  # lesions QCA could not measure are left out of the fit
    weights, fitted = fit_calibration(readouts, own, targets)
    assert fitted.tolist() == [True, True, False]
    np.testing.assert_allclose(weights[:2], np.tile(truth, (2, 1)), rtol=0.05)  # light ridge
    np.testing.assert_array_equal(weights[2], [0, 0, 1, 0])  # the head's own output
    few = MIN_CALIBRATION_SAMPLES - 1
    assert not fit_calibration(readouts[:few], own[:few], targets[:few])[1].any()


def test_calibrated_heads_read_qca_where_they_can_and_keep_it_when_saved(tmp_path):
    from safetensors.torch import load_file, save_file

    heads = LesionHeads(HeadSettings(classes=("1", "2"), feature_dim=10)).eval()
    heads.requires_grad_(False)
    features, context = torch.randn(2, 10), torch.randn(2, CONTEXT_DIM)
    spacing = torch.full((2,), 0.1)
    readouts = torch.tensor([[40.0, 8.0, 20.0, 50.0, 10.0, 18.0], [float("nan")] * 6])
    own = heads(features, context, spacing)
    assert torch.equal(heads(features, context, spacing, readouts)["mld_mm"], own["mld_mm"])
    weights = np.array([[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 2.0]])
    heads.set_calibration(weights, np.array([True, True, True]))
    read = heads(features, context, spacing, readouts)
    assert float(read["stenosis_pct"][0]) == pytest.approx(45.0)
    assert float(read["mld_mm"][0]) == pytest.approx(0.8)  # 8 px at 0.1 mm
    assert float(read["rvd_mm"][0]) == pytest.approx(2.0)  # (18 + 2) px
    for name in ("stenosis_pct", "mld_mm", "rvd_mm"):  # no QCA: the head's own estimate
        assert float(read[name][1]) == pytest.approx(float(own[name][1]))
    save_heads(heads, tmp_path)
    record = json.loads((tmp_path / "heads.json").read_text())
    assert record["qca_read"]["mld"] == {"frame": 1.0, "mask": 0.0, "head": 0.0, "bias": 0.0}
    again = load_heads(tmp_path)
    torch.testing.assert_close(again(features, context, spacing, readouts)["rvd_mm"],
                               read["rvd_mm"])
    # Heads saved before the QCA read (format 1): they load, and answer on their own.
    state = load_file(tmp_path / "heads.safetensors")
    save_file({k: v for k, v in state.items() if not k.startswith("calibrat")},
              tmp_path / "heads.safetensors")
    old = load_heads(tmp_path)
    assert not old.reads_qca
    assert torch.equal(old(features, context, spacing, readouts)["mld_mm"], own["mld_mm"])


@pytest.mark.slow
def test_training_steps_calibrate_the_heads_on_their_own_predictions(phantom_index):
    """The collector reads the step's outputs (no second forward pass) and fits the read; an
    evaluation then goes through it, a training forward does not."""
    from angiotune.taxonomies.views import load_views
    from angiotune.train.calibration import ReadoutCollector

    torch.manual_seed(0)
    batch, classes = _batch(phantom_index.out)
    batch = {k: np.concatenate([v, v]) for k, v in batch.items()}  # 12 lesions, enough to fit
    base = load_base_model()
    heads = LesionHeads(HeadSettings(classes=classes, feature_dim=feature_dim_of(base.config)))
    model = LesionModel(adapt(base, AdapterSettings(rank=2, alpha=4)), heads)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    collector = ReadoutCollector(heads, limit=12, window=2)
    for _ in range(2):
        train_step(model, batch, optimizer, LossWeights(), on_outputs=collector.add)
    assert collector.collected == 12  # the limit: the second step added nothing
    # The vessel read needs no QCA: every lesion's segment and view is kept for it.
    assert sum(map(len, collector.labelled)) == 24
    collector.fit()
    assert collector.collected == 0 and heads.reads_qca
    # The segment read is fitted on the same rows (these six lesions span several segments).
    assert len(set(batch["segment"])) > 1 and bool(heads.segment_fitted)
    assert not torch.equal(heads.segment_weight, torch.zeros_like(heads.segment_weight))
    # And the vessel read, where the rows span vessels (a stage-3 trial's rows do not).
    adapter_for = load_views().adapter_for
    spans = len({adapter_for.get(vessel, vessel) for vessel in batch["vessel"]}) > 1
    assert bool(heads.vessel_fitted) == spans
    first_fit = heads.calibration.clone()
    assert not np.allclose(first_fit.numpy(), [[0, 0, 1, 0]] * 3)
    for _ in range(2):  # the window holds two epochs: the third fit forgets the first's rows
        train_step(model, batch, optimizer, LossWeights(), on_outputs=collector.add)
        collector.fit()
    assert len(collector.history) == 2
    assert sum(len(measured) for measured, _ in collector.history) == 24
    assert sum(len(labelled) for _, labelled in collector.history) == 24
    assert not torch.equal(heads.calibration, first_fit)
    metrics = evaluate(model, [batch])
    assert math.isfinite(metrics["stenosis_mae"]) and math.isfinite(metrics["mld_mae_mm"])
    # Named among each lesion's vessel's segments, and read from the lesions it was fitted on.
    assert metrics["cass_accuracy"] >= 0.5


def test_a_trial_config_is_typed_checked_and_keeps_the_owners_defaults():
    """Tune's flat dict is read once; every part validates itself however it is made."""
    from dataclasses import replace

    from angiotune.errors import ConfigError
    from angiotune.model.losses import HeadLossWeights
    from angiotune.train.config import OptimiserSettings, RunSettings, StartSettings, TrialConfig

    trial = TrialConfig.from_flat({"epochs": 3, "rank": 4, "alpha_ratio": 1, "lr": 2e-3,
                                   "heads": True, "classes": ["1", "2"], "class_weights":
                                   "balanced", "class_counts": [1, 3], "pixel_loss": "bce",
                                   "metric": "objective", "index": "ignored.parquet"})
    assert (trial.adapter.rank, trial.adapter.alpha, trial.optimiser.lr) == (4, 4.0, 2e-3)
    assert trial.losses.pixel_loss == "bce" and trial.losses.dice == LossWeights().dice
    assert trial.heads.losses.rvd == HeadLossWeights().rvd  # the owner's default
    assert trial.heads.losses.class_weights == pytest.approx((1.5, 0.5))
    assert trial.run.metrics == ("objective",) and trial.start.adapter is None
    for bad, match in (({"epochs": 0}, "epochs"), ({"epochs": 1, "lr": -1}, "lr"),
                       ({"epochs": 1, "precision": "fp8"}, "precision"),
                       ({"epochs": 1, "init": "best"}, "no kept adapter 'best'"),
                       ({"epochs": 1, "heads": True, "classes": ["1"]}, "two classes"),
                       ({"epochs": 1, "strategy": "prefix"}, "strategy")):
        with pytest.raises(ConfigError, match=match):
            TrialConfig.from_flat(bad)
    with pytest.raises(ConfigError, match="batch_size"):
        replace(trial.run, batch_size=0)
    with pytest.raises(ConfigError, match="weight_decay"):
        OptimiserSettings(weight_decay=-0.1)
    with pytest.raises(ConfigError, match="vessel"):
        StartSettings(init="vessel", init_adapters={"LAD": "x"})
    assert RunSettings(epochs=1).precision is None  # follows the device


def test_crop_readouts_never_stop_a_trial_whatever_the_mask():
    """An untrained model's masks can be anything (specks, noise, a line one pixel wide, the
    whole crop): each is measured or left NaN for the head to answer alone, never raised."""
    from angiotune.qca.readout import READOUT_DIM, crop_readouts

    rng = np.random.default_rng(0)
    size = 64
    masks = [np.zeros((size, size)), np.ones((size, size)), rng.random((size, size)),
             np.pad(np.ones((1, 40)), ((30, 33), (10, 14))),  # a line one pixel wide
             np.pad(np.ones((2, 2)), ((5, 57), (5, 57)))]  # a speck
    masks += [(rng.random((size, size)) > threshold).astype(float)
              for threshold in (0.3, 0.6, 0.9, 0.99)]
    images = rng.random((len(masks), size, size)).astype(np.float32)
    boxes = np.tile(np.array([[4.0, 4.0, 60.0, 60.0]], dtype=np.float32), (len(masks), 1))
    values = crop_readouts(images, np.stack(masks).astype(np.float32), boxes)
    assert values.shape == (len(masks), READOUT_DIM)
    assert np.isnan(values[0]).all()  # nothing predicted, nothing read


def test_heads_that_only_name_segments_fit_their_read_on_every_lesion(phantom_index):
    """No measurement to calibrate, so no QCA is read: every training lesion of the epoch goes
    to the segment read, past the QCA read's per-epoch limit."""
    from angiotune.train.calibration import ReadoutCollector

    torch.manual_seed(0)
    batch, classes = _batch(phantom_index.out)
    batch = {k: np.concatenate([v, v, v]) for k, v in batch.items()}  # 18 lesions
    base = load_base_model()
    heads = LesionHeads(HeadSettings(classes=classes, feature_dim=feature_dim_of(base.config),
                                     tasks=("segment",)))
    model = LesionModel(adapt(base, AdapterSettings(rank=2, alpha=4)), heads)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    collector = ReadoutCollector(heads, limit=4)
    train_step(model, batch, optimizer, LossWeights(), on_outputs=collector.add)
    assert collector.collected == 18 and np.isnan(collector.rows[0][:, :6]).all()
    collector.fit()
    assert bool(heads.segment_fitted) and not heads.reads_qca
