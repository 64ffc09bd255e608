"""Stage-2 measurement heads on SAM 3 features of the prompted lesion.

The heads read the tracker's FPN image embeddings pooled two ways (weighted by the predicted mask,
and averaged inside the box prompt), plus the lesion's view context (positioner angles and where
the box sits in the frame: the crop alone barely shows which branch it is). They predict:

- the CASS segment, over the classes present in the index (``HeadSettings.classes`` is the
  documented mapping: class id i is segment code ``classes[i]``);
- % diameter stenosis (0-100);
- MLD and reference diameter in mm. These are predicted in model pixels and multiplied by the
  sample's mm per model pixel, so one set of weights is right across magnifications.

Once fitted (``fit_calibration``), % DS, MLD and RVD at evaluation and inference are a linear
read of three estimates: QCA of the predicted mask with edges from the crop's intensity, QCA
with edges from the mask (``angiotune.qca.readout``), and the head's own output. The weights
are fitted by least squares on the trial's training predictions, so they learn how far to trust
each estimate (QCA of a mask that follows a branch is confidently wrong; the fit shrinks it).

The CASS segment is read the same way once fitted (``fit_segment_read``): a multinomial logistic
read of the view context, where the box sits along the frame's vessel tree
(``angiotune.qca.tree``), the frame's tree itself (where the box lies from its root, the
tree's spread and area) and the calibrated reference diameter in mm. A segment is named by its
place on the tree and vessels taper from the ostium, so these say more than the crop; the
pooled crop features are left to the head's own logits, which the read replaces. The answer is
then taken among the segments of the lesion's vessel (``restrict_to_vessel``).

Saved beside the adapter as ``heads.safetensors`` + ``heads.json``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from scipy.optimize import minimize
from torch import nn

from angiotune import jsonio
from angiotune.data.context import CONTEXT_DIM, ROOT_END, TREE_END, VIEW_END, VIEWS_END
from angiotune.errors import ConfigError
from angiotune.names import ADAPTER_VESSELS
from angiotune.qca.readout import QUANTITIES, READOUTS
from angiotune.taxonomies.views import load_views

log = logging.getLogger(__name__)
HEADS_WEIGHTS = "heads.safetensors"
HEADS_CONFIG = "heads.json"
TASKS = ("segment", "stenosis", "mld", "rvd")
MEASURED = ("stenosis", "mld", "rvd")  # the tasks a calibration reads QCA for, in QUANTITIES order
CALIBRATION_INPUTS = (*READOUTS, "head", "bias")
MIN_CALIBRATION_SAMPLES = 12
# The segment read: the view, the box, the place along the tree, the frame's tree (the box's
# offset from its root, its spread and area) and the reference diameter (mm), last.
SEGMENT_READ_DIM = TREE_END + (CONTEXT_DIM - VIEWS_END) + 1
# The vessel read: the view and the box, how far the view is from each vessel's standard
# views, which way the box lies from the tree's root and which way the tree spreads from it
# (each alone and times each angle), and the tree's area (``angiotune.data.context``); the
# path length and the calibre name segments, not vessels.
VESSEL_READ_DIM = VIEW_END + (VIEWS_END - TREE_END) + 4 * 3 + 1
# Weight decay on standardised inputs, chosen per fit by cross-validation over lesions: a
# trial with few lesions of its vessel needs the heavy end (near the class prior), one with a
# hundred the light end.
SEGMENT_READ_DECAYS = (1e-3, 3e-2, 1.0)
SEGMENT_READ_FOLDS = 3
OLD_CONTEXT_DIM = 6  # heads.json without "context_dim": the view context before the tree
READ_PARTS = ("weight", "bias", "mean", "scale", "fitted")
SEGMENT_READ_BUFFERS = tuple(f"segment_{part}" for part in READ_PARTS)
VESSEL_READ_BUFFERS = tuple(f"vessel_{part}" for part in READ_PARTS)
# 2: the QCA read; 3: the segment read and the tree; 4: the vessel read and the standard views;
# 5: the vessel read also reads the box's offset from the tree's root and the frame's tree;
# 6: so does the segment read (an older one loads widened, its new inputs at zero weight).
HEADS_FORMAT = 6


@dataclass(frozen=True)
class HeadSettings:
    """``taxonomy``: what the segment classes' codes are (CASS, SYNTAX); ``tasks``: the heads
    that were trained (a loss weight above 0): the others' outputs are not reported."""

    classes: tuple[str, ...]
    feature_dim: int
    hidden: int = 128
    dropout: float = 0.1
    taxonomy: str = "CASS"
    tasks: tuple[str, ...] = TASKS
    context_dim: int = CONTEXT_DIM  # heads saved before the tree position read the first 6

    def __post_init__(self) -> None:
        if len(self.classes) < 2:
            raise ConfigError(f"the CASS head needs at least two segment classes, got "
                              f"{list(self.classes)}")
        unknown = set(self.tasks) - set(TASKS)
        if unknown:
            raise ConfigError(f"unknown head task(s) {sorted(unknown)}; known: {TASKS}")


GEOMETRY_DIM = 7


def mask_geometry(mask_logits: torch.Tensor, boxes: torch.Tensor, image_size: int) -> torch.Tensor:
    """(B, 7) QCA-style sizes of the predicted mask in model pixels / 10.

    Soft area (as a side length), the box's long and short sides, area over long side (the mean
    width), and the width profile along the box's long axis over its central 60 %: its minimum,
    its median, and 1 - min / median (a diameter-stenosis estimate). These carry what MLD and
    stenosis are made of, as far as the predicted mask is right.
    """
    probs = torch.sigmoid(mask_logits.detach().float())
    if probs.shape[-1] != image_size:
        probs = F.interpolate(probs[:, None], size=(image_size, image_size), mode="bilinear",
                              align_corners=False)[:, 0]
    inside = box_weights(boxes, (image_size, image_size), image_size)[:, 0]
    probs = probs * inside
    sides = (boxes[:, 2:] - boxes[:, :2]).float().clamp(min=1.0)
    long, short = sides.max(1).values, sides.min(1).values
    area = probs.sum((1, 2))
    horizontal = sides[:, 0] >= sides[:, 1]
    profile = torch.where(horizontal[:, None], probs.sum(1), probs.sum(2))  # (B, S)
    centres = torch.arange(image_size, device=boxes.device).float() + 0.5
    start = torch.where(horizontal, boxes[:, 0], boxes[:, 1]).float()
    core = ((centres[None] >= start[:, None] + 0.2 * long[:, None])
            & (centres[None] <= start[:, None] + 0.8 * long[:, None]))
    core[core.sum(1) == 0] = True  # a box under 5 px long: use the whole profile
    minimum = torch.where(core, profile, torch.full_like(profile, float("inf"))).min(1).values
    median = torch.where(core, profile, torch.full_like(profile, float("nan"))).nanmedian(1).values
    narrowing = 1 - minimum / median.clamp(min=1e-3)
    return torch.stack([area.sqrt() / 10, long / 10, short / 10, area / long / 10,
                        minimum / 10, median / 10, narrowing], dim=1)


def pooled_features(embeddings: tuple[torch.Tensor, ...], mask_logits: torch.Tensor,
                    boxes: torch.Tensor, image_size: int) -> torch.Tensor:
    """(B, 2 * sum of channels + 7): each FPN level averaged under the predicted mask and in the
    box, and the mask's geometry. The mask is detached, so the heads cannot bend the
    segmentation to suit themselves."""
    weights = torch.sigmoid(mask_logits.detach().float())[:, None]
    parts = [mask_geometry(mask_logits, boxes, image_size)]
    for level in embeddings:
        level = level.float()
        size = level.shape[-2:]
        mask = F.interpolate(weights, size=size, mode="bilinear", align_corners=False)
        parts.append((level * mask).sum((2, 3)) / mask.sum((2, 3)).clamp(min=1e-3))
        box = box_weights(boxes, size, image_size)
        parts.append((level * box).sum((2, 3)) / box.sum((2, 3)).clamp(min=1e-3))
    return torch.cat(parts, dim=1)


def box_weights(boxes: torch.Tensor, size: tuple[int, int], image_size: int) -> torch.Tensor:
    """(B, 1, h, w): 1 where a feature cell's centre lies inside the box, else 0."""
    h, w = size
    ys = (torch.arange(h, device=boxes.device) + 0.5) * image_size / h
    xs = (torch.arange(w, device=boxes.device) + 0.5) * image_size / w
    b = boxes.float()
    inside_x = (xs[None] >= b[:, 0:1]) & (xs[None] <= b[:, 2:3])
    inside_y = (ys[None] >= b[:, 1:2]) & (ys[None] <= b[:, 3:4])
    return (inside_y[:, :, None] & inside_x[:, None, :]).float()[:, None]


def fit_calibration(readouts: np.ndarray, own: np.ndarray, targets: np.ndarray,
                    ridge: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares weights over ``CALIBRATION_INPUTS`` for each of ``MEASURED``.

    ``readouts`` (N, 6) from ``crop_readouts``; ``own`` (N, 3): the heads' % DS, MLD and RVD
    (model pixels); ``targets`` (N, 3) alike. Returns weights (3, 4) and whether each task was
    fitted: one with under ``MIN_CALIBRATION_SAMPLES`` complete rows keeps the head's own
    output. A light ridge on the slopes keeps two nearly equal QCA readouts from cancelling.
    """
    weights = np.tile(np.array([0.0, 0.0, 1.0, 0.0]), (len(MEASURED), 1))
    fitted = np.zeros(len(MEASURED), dtype=bool)
    for j in range(len(MEASURED)):
        x = np.column_stack([readouts[:, j], readouts[:, len(QUANTITIES) + j], own[:, j],
                             np.ones(len(own))]).astype(np.float64)
        y = targets[:, j].astype(np.float64)
        ok = np.isfinite(x).all(1) & np.isfinite(y)
        if ok.sum() < MIN_CALIBRATION_SAMPLES:
            continue
        x, y = x[ok], y[ok]
        gram = x.T @ x
        penalty = ridge * np.trace(gram[:3, :3]) / 3 * np.diag([1.0, 1.0, 1.0, 0.0])
        weights[j] = np.linalg.solve(gram + penalty, x.T @ y)
        fitted[j] = True
    return weights, fitted


def fit_segment_read(inputs: np.ndarray, labels: np.ndarray, classes: int,
                     folds: np.ndarray | None = None) -> dict[str, np.ndarray] | None:
    """Multinomial logistic weights from (N, ``SEGMENT_READ_DIM``) inputs to class ids (-1:
    outside the classes, left out). Inputs are standardised, missing ones set to their mean;
    None with under ``MIN_CALIBRATION_SAMPLES`` rows or a single class. ``folds`` (N,): each
    row's fold, by lesion (a lesion read twice stays in one fold); the decay of
    ``SEGMENT_READ_DECAYS`` that names most held-out rows right is used (None: the lightest)."""
    keep = labels >= 0
    x, y = inputs[keep].astype(np.float64), labels[keep].astype(np.int64)
    if len(y) < MIN_CALIBRATION_SAMPLES or len(np.unique(y)) < 2:
        return None
    decay = SEGMENT_READ_DECAYS[0]
    held_out = np.full(len(labels), -1)
    if folds is not None:
        folds = folds[keep]
        predicted = [_held_out_predictions(x, y, folds, classes, d) for d in SEGMENT_READ_DECAYS]
        scores = [float(np.mean(p == y)) for p in predicted]
        best = len(scores) - 1 - int(np.argmax(scores[::-1]))  # ties: the heavier decay
        decay, held_out[keep] = SEGMENT_READ_DECAYS[best], predicted[best]
    # ``held_out``: each row's class as the read fitted without its fold names it (-1: none).
    return {**_logistic(x, y, classes, decay), "decay": np.float64(decay), "held_out": held_out}


def _held_out_predictions(x: np.ndarray, y: np.ndarray, folds: np.ndarray, classes: int,
                          decay: float) -> np.ndarray:
    predicted = np.full(len(y), -1)
    for fold in np.unique(folds):
        held = folds == fold
        if held.all():
            continue
        fit = _logistic(x[~held], y[~held], classes, decay)
        z = np.where(np.isfinite(x[held]), (x[held] - fit["mean"]) / fit["scale"], 0.0)
        predicted[held] = (z @ fit["weight"].T + fit["bias"]).argmax(1)
    return predicted


def _logistic(x: np.ndarray, y: np.ndarray, classes: int, decay: float) -> dict[str, np.ndarray]:
    finite = np.isfinite(x)
    counts = finite.sum(0)
    mean = np.where(counts > 0, np.where(finite, x, 0).sum(0) / np.maximum(counts, 1), 0.0)
    spread = np.sqrt(np.where(finite, (x - mean) ** 2, 0).sum(0) / np.maximum(counts, 1))
    scale = np.where(spread > 1e-6, spread, 1.0)
    z = np.where(finite, (x - mean) / scale, 0.0)
    onehot = np.eye(classes)[y]
    features = z.shape[1]

    def loss_and_gradient(flat: np.ndarray) -> tuple[float, np.ndarray]:
        weight, bias = flat[:classes * features].reshape(classes, features), flat[-classes:]
        logits = z @ weight.T + bias
        logits -= logits.max(1, keepdims=True)
        log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        error = (np.exp(log_p) - onehot) / len(y)
        loss = -(onehot * log_p).sum() / len(y) + decay * (weight ** 2).sum()
        gradient = np.concatenate([(error.T @ z + 2 * decay * weight).ravel(), error.sum(0)])
        return float(loss), gradient

    # Plain numpy with L-BFGS: a few hundred rows and classes take milliseconds.
    found = minimize(loss_and_gradient, np.zeros(classes * (features + 1)), jac=True,
                     method="L-BFGS-B", options={"maxiter": 200})
    return {"weight": found.x[:classes * features].reshape(classes, features),
            "bias": found.x[-classes:], "mean": mean, "scale": scale}


def restrict_to_vessel(logits: torch.Tensor, classes: tuple[str, ...], taxonomy: str,
                       vessels: list[str | None]) -> torch.Tensor:
    """The segment logits with every class outside each row's vessel group (the adapter it
    was routed to: LM with LAD, the ramus with LCX) at -inf. A row without a known vessel, or
    whose vessel has none of the classes, keeps all."""
    from angiotune.taxonomies.views import load_views

    groups = class_vessels(classes, taxonomy)
    adapter_for = load_views().adapter_for
    out = logits.clone()
    for i, vessel in enumerate(vessels):
        vessel = adapter_for.get(vessel, vessel)  # an index's LM is routed to the LAD
        allowed = [group == vessel for group in groups]
        if vessel is not None and any(allowed):
            out[i, ~torch.as_tensor(allowed, device=logits.device)] = -math.inf
    return out


def class_vessels(classes: tuple[str, ...], taxonomy: str) -> list[str | None]:
    """The adapter vessel each class code belongs to (None where the taxonomy is not at hand
    or does not know the code)."""
    from angiotune.taxonomies import load_taxonomy
    from angiotune.taxonomies.views import load_views

    try:
        segments = load_taxonomy(taxonomy).segments
    except ConfigError:
        return [None] * len(classes)
    adapter_for = load_views().adapter_for
    return [adapter_for.get(segments[c].vessel) if c in segments else None for c in classes]


class LesionHeads(nn.Module):
    """A shared trunk and one output per task; ``log_vars`` serve uncertainty weighting."""

    def __init__(self, settings: HeadSettings) -> None:
        super().__init__()
        self.settings = settings
        half = settings.hidden // 2
        # Image features and view context get their own projections: hundreds of pooled
        # channels would otherwise drown the few context numbers that decide the branch.
        self.image = nn.Sequential(nn.LayerNorm(settings.feature_dim),
                                   nn.Linear(settings.feature_dim, half))
        self.context = nn.Linear(settings.context_dim, settings.hidden - half)
        self.trunk = nn.Sequential(nn.GELU(), nn.Dropout(settings.dropout),
                                   nn.Linear(settings.hidden, settings.hidden), nn.GELU())
        self.segment = nn.Linear(settings.hidden, len(settings.classes))
        self.stenosis = nn.Linear(settings.hidden, 1)
        self.diameters_px = nn.Linear(settings.hidden, 2)  # MLD, reference, in model pixels
        self.log_vars = nn.Parameter(torch.zeros(len(TASKS)))
        # The QCA read (see the module's docstring): buffers, so they travel in the weights.
        weights, _ = fit_calibration(np.empty((0, 6)), np.empty((0, 3)), np.empty((0, 3)))
        self.register_buffer("calibration", torch.as_tensor(weights, dtype=torch.float32))
        self.register_buffer("calibrated", torch.zeros(len(MEASURED), dtype=torch.bool))
        # Whether the vessel read routes (``predict.routing.second_opinion``): it named the
        # vessels of its held-out training lesions better than the nearest standard view did.
        self.register_buffer("vessel_decides", torch.zeros((), dtype=torch.bool))
        classes = len(settings.classes)
        for read, outputs, inputs in (("segment", classes, SEGMENT_READ_DIM),
                                      ("vessel", len(ADAPTER_VESSELS), VESSEL_READ_DIM)):
            self.register_buffer(f"{read}_weight", torch.zeros(outputs, inputs))
            self.register_buffer(f"{read}_bias", torch.zeros(outputs))
            self.register_buffer(f"{read}_mean", torch.zeros(inputs))
            self.register_buffer(f"{read}_scale", torch.ones(inputs))
            self.register_buffer(f"{read}_fitted", torch.zeros((), dtype=torch.bool))

    @property
    def reads_qca(self) -> bool:
        return bool(self.calibrated.any())

    def set_segment_read(self, fit: dict[str, np.ndarray] | None) -> None:
        self._set_read("segment", fit)

    def set_vessel_read(self, fit: dict[str, np.ndarray] | None, decides: bool = False) -> None:
        self._set_read("vessel", fit)
        self.vessel_decides.fill_(fit is not None and decides)

    def _set_read(self, read: str, fit: dict[str, np.ndarray] | None) -> None:
        getattr(self, f"{read}_fitted").fill_(fit is not None)
        if fit is not None:
            for name in READ_PARTS[:-1]:
                getattr(self, f"{read}_{name}").copy_(torch.as_tensor(fit[name]))

    def read_segment(self, context: torch.Tensor, rvd_mm: torch.Tensor) -> torch.Tensor:
        """(B, classes) logits of the segment read from ``segment_read_inputs``."""
        return self._read("segment", segment_read_inputs(context, rvd_mm))

    def read_vessel(self, context: torch.Tensor) -> torch.Tensor:
        """(B, 3) logits over ``ADAPTER_VESSELS`` from ``vessel_read_inputs``."""
        return self._read("vessel", vessel_read_inputs(context))

    def _read(self, read: str, x: torch.Tensor) -> torch.Tensor:
        mean, scale = getattr(self, f"{read}_mean"), getattr(self, f"{read}_scale")
        x = x.to(mean)
        z = torch.where(torch.isfinite(x), (x - mean) / scale, torch.zeros_like(x))
        return z @ getattr(self, f"{read}_weight").T + getattr(self, f"{read}_bias")

    def set_calibration(self, weights: np.ndarray, fitted: np.ndarray) -> None:
        self.calibration.copy_(torch.as_tensor(weights, dtype=torch.float32))
        self.calibrated.copy_(torch.as_tensor(fitted, dtype=torch.bool))

    def forward(self, features: torch.Tensor, context: torch.Tensor,
                mm_per_pixel: torch.Tensor,
                readouts: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``readouts``: ``crop_readouts`` of the batch; given, and the heads calibrated, % DS,
        MLD and RVD are the calibrated read (training passes none: the heads learn alone)."""
        hidden = self.trunk(torch.cat([
            self.image(features.float()),
            self.context(torch.nan_to_num(context[:, :self.settings.context_dim].float()))],
            dim=1))
        stenosis = 100 * torch.sigmoid(self.stenosis(hidden)[:, 0])
        diameters_px = F.softplus(self.diameters_px(hidden))
        if readouts is not None and self.reads_qca:
            own = torch.cat([stenosis[:, None], diameters_px], dim=1)
            read = self.read_qca(own, readouts.to(own))
            stenosis, diameters_px = read[:, 0].clamp(0, 100), read[:, 1:].clamp(min=0)
        # Without calibration (COCO data) there are no mm: NaN out, with no NaN in the
        # gradients (a product with NaN would poison them even where the loss skips it).
        scale = mm_per_pixel.float()[:, None]
        calibrated = torch.isfinite(scale)
        diameters = diameters_px * torch.where(calibrated, scale, torch.zeros_like(scale))
        diameters = torch.where(calibrated, diameters, torch.full_like(diameters, math.nan))
        segment = self.segment(hidden)
        if not self.training and bool(self.segment_fitted):
            rvd = diameters[:, 1] if "rvd" in self.settings.tasks else torch.full_like(
                diameters[:, 1], math.nan)  # an untrained RVD head: as in the fit
            segment = self.read_segment(context, rvd)
        out = {"segment_logits": segment, "stenosis_pct": stenosis,
               "mld_mm": diameters[:, 0], "rvd_mm": diameters[:, 1]}
        if not self.training and bool(self.vessel_fitted):
            # The vessel, for routing. It rests on the angles: without them, no answer (NaN).
            vessels = self.read_vessel(context)
            angles_missing = context[:, 2:3].to(vessels) > 0
            out["vessel_logits"] = torch.where(angles_missing, torch.full_like(vessels, math.nan),
                                               vessels)
        return out

    def read_qca(self, own: torch.Tensor, readouts: torch.Tensor) -> torch.Tensor:
        """(B, 3): per task, the calibrated read where its inputs are all there, else ``own``."""
        k = len(QUANTITIES)
        inputs = torch.stack([readouts[:, :k], readouts[:, k:], own, torch.ones_like(own)],
                             dim=2)  # (B, 3 tasks, 4 inputs)
        read = (inputs * self.calibration[None]).sum(2)
        usable = torch.isfinite(inputs).all(2) & self.calibrated[None]
        return torch.where(usable, read, own)


def segment_read_inputs(context: torch.Tensor, rvd_mm: torch.Tensor) -> torch.Tensor:
    """(B, ``SEGMENT_READ_DIM``): the view, the box, the place along the tree, the frame's
    tree and the reference diameter in mm. Not the standard views: three more inputs cost the
    segment read more than they told it; the frame's tree named more segments, on the phantoms
    and on ARCADE's real frames alike (``benchmarks/segment_read.py``)."""
    return torch.cat([context[:, :TREE_END].float(), context[:, VIEWS_END:CONTEXT_DIM].float(),
                      rvd_mm.float()[:, None]], dim=1)


def vessel_read_inputs(context: torch.Tensor) -> torch.Tensor:
    """(B, ``VESSEL_READ_DIM``): the view, the box, the distances to the standard views, the
    box's offset from the tree's root and the tree's spread, each alone and times each angle
    (which way a branch runs on the frame turns with the C-arm, and a linear read sees that
    turn only through products), and the tree's area."""
    context = context.float()
    directions, angles = context[:, VIEWS_END:ROOT_END + 2], context[:, :2]
    turned = (directions[:, :, None] * angles[:, None, :]).flatten(1)
    return torch.cat([context[:, :VIEW_END], context[:, TREE_END:VIEWS_END], directions, turned,
                      context[:, ROOT_END + 2:CONTEXT_DIM]], dim=1)


def feature_dim_of(config) -> int:
    """Width of ``pooled_features`` for a tracker config, without running the model: each
    of the three feature levels pooled two ways, plus the box geometry. The two finer levels
    come out of the mask decoder's projections (``conv_s0``, ``conv_s1``: hidden / 8 and
    hidden / 4 channels), the coarsest straight from the neck."""
    hidden = int(config.mask_decoder_config.hidden_size)
    channels = hidden // 8 + hidden // 4 + int(config.vision_config.fpn_hidden_size)
    return 2 * channels + GEOMETRY_DIM


def save_heads(heads: LesionHeads, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in heads.state_dict().items()},
              folder / HEADS_WEIGHTS)
    fitted = heads.calibrated.tolist()
    record = {**asdict(heads.settings), "classes": list(heads.settings.classes),
              "tasks": list(heads.settings.tasks), "format": HEADS_FORMAT,
              "class_mapping": {str(i): code for i, code in enumerate(heads.settings.classes)},
              # For people reading the folder; the weights themselves are in the safetensors.
              "qca_read": {task: dict(zip(CALIBRATION_INPUTS, map(float, w), strict=True))
                           for task, w, ok in zip(MEASURED, heads.calibration.tolist(), fitted,
                                                  strict=True) if ok},
              # The view context measures distances to these: loading checks they still hold.
              "standard_views": _standard_views()}
    (folder / HEADS_CONFIG).write_text(jsonio.dumps(record, indent=1) + "\n")


def _standard_views() -> list[list]:
    return [[v.name, v.vessel, v.lao_deg, v.cranial_deg] for v in load_views().views]


def has_heads(folder: Path) -> bool:
    return (Path(folder) / HEADS_CONFIG).is_file()


def _widened_segment_read(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A segment read of formats 3-5 (the view, the box, the tree, the reference diameter)
    given the frame's tree's inputs at zero weight: the same logits as before, exactly."""
    weight = state.get("segment_weight")
    old_dim = TREE_END + 1
    if weight is None or weight.shape[1] != old_dim:
        return state
    extra = SEGMENT_READ_DIM - old_dim

    def widened(values: torch.Tensor, fill: float) -> torch.Tensor:
        pad = torch.full((*values.shape[:-1], extra), fill, dtype=values.dtype)
        return torch.cat([values[..., :TREE_END], pad, values[..., TREE_END:]], dim=-1)

    return {**state, "segment_weight": widened(weight, 0.0),
            "segment_mean": widened(state["segment_mean"], 0.0),
            "segment_scale": widened(state["segment_scale"], 1.0)}


def load_heads(folder: Path) -> LesionHeads:
    record = json.loads((Path(folder) / HEADS_CONFIG).read_text(encoding="utf-8"))
    if int(record.get("format", 1)) > HEADS_FORMAT:
        raise ConfigError(f"{folder}: heads of format {record['format']}, written by a newer "
                          f"angiotune (this one reads up to {HEADS_FORMAT}); upgrade angiotune")
    settings = HeadSettings(classes=tuple(record["classes"]),
                            feature_dim=int(record["feature_dim"]),
                            hidden=int(record["hidden"]), dropout=float(record["dropout"]),
                            # Heads saved before these were recorded: CASS, every task.
                            taxonomy=str(record.get("taxonomy", "CASS")),
                            tasks=tuple(record.get("tasks", TASKS)),
                            context_dim=int(record.get("context_dim", OLD_CONTEXT_DIM)))
    trained_on = record.get("standard_views")
    if trained_on is not None and trained_on != _standard_views():
        log.warning("angiotune: %s was trained with other standard views than "
                    "taxonomies/views.yaml holds now; its view context and vessel read see "
                    "other distances than in training", folder)
    heads = LesionHeads(settings)
    state = load_file(Path(folder) / HEADS_WEIGHTS)
    state = _widened_segment_read(state)
    if ("vessel_weight" in state
            and state["vessel_weight"].shape != heads.vessel_weight.shape):
        # Format 4: a vessel read of other inputs. Routing falls back to the segment vote.
        if bool(state.get("vessel_fitted", False)):
            log.warning("angiotune: %s has a vessel read of an older angiotune; it is not used "
                        "(routing asks the segment probabilities instead)", folder)
        state = {k: v for k, v in state.items()
                 if k not in (*VESSEL_READ_BUFFERS, "vessel_decides")}
    # Format-1 heads have no QCA read, format 2 no segment read, format 3 no vessel read: they
    # keep the unfitted buffers, their own outputs.
    missing = set(heads.state_dict()) - set(state)
    if missing - {"calibration", "calibrated", "vessel_decides", *SEGMENT_READ_BUFFERS,
                  *VESSEL_READ_BUFFERS}:
        raise ConfigError(f"{folder}: {HEADS_WEIGHTS} lacks {sorted(missing)}")
    heads.load_state_dict(state, strict=False)
    return heads.eval()
