"""Fits the stage-2 heads' QCA read (``angiotune.model.heads.fit_calibration``), their segment
read and their vessel read (``fit_segment_read``) each epoch, from the trial's own training
predictions: no extra forward pass, and never a validation lesion (the validation split scores
the calibrated heads; fitting on it would grade the fit on itself)."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from angiotune.data.context import CONTEXT_DIM
from angiotune.model.heads import (
    MEASURED,
    SEGMENT_READ_FOLDS,
    LesionHeads,
    class_vessels,
    fit_calibration,
    fit_segment_read,
    segment_read_inputs,
    vessel_read_inputs,
)
from angiotune.names import ADAPTER_VESSELS
from angiotune.predict.routing import route_by_angles
from angiotune.qca.readout import crop_readouts
from angiotune.train.step import head_targets

# Columns of a collected row: QCA readouts, the heads' own % DS / MLD / RVD, the targets, then
# mm per model pixel, the segment's class id, the lesion's fold and the view context.
READOUTS_END, OWN_END, TARGETS_END = 6, 9, 12
SPACING, CLASS_ID, FOLD, CONTEXT = 12, 13, 14, slice(15, 15 + CONTEXT_DIM)
PER_EPOCH = 48  # lesions read per epoch; each costs two QCAs, about 35 ms on one CPU core
WINDOW = 3  # epochs a fit draws on: three times the lesions for the cost of one epoch's reads


class ReadoutCollector:
    """Collects, for up to ``limit`` training lesions an epoch (every one when the heads measure
    nothing), QCA of the predicted masks, the heads' own estimates and the targets, all in model
    pixels, with each lesion's segment and view context; ``fit`` calibrates the heads on
    the last ``window`` epochs' rows (older predictions come from a slightly different model,
    which a late-training fit barely feels; a small vessel's trial needs the rows). The vessel
    read needs no QCA: it is fitted on every training lesion's segment and view context
    (``labelled``: rows of the same layout, the measurements NaN)."""

    def __init__(self, heads: LesionHeads, limit: int = PER_EPOCH, window: int = WINDOW) -> None:
        self.heads = heads
        self.limit = limit
        self.window = window
        self.rows: list[np.ndarray] = []
        self.labelled: list[np.ndarray] = []
        self.history: list[tuple[np.ndarray, np.ndarray]] = []

    @property
    def wanted(self) -> bool:
        return any(task in self.heads.settings.tasks for task in (*MEASURED, "segment"))

    @property
    def collected(self) -> int:
        return sum(len(r) for r in self.rows)

    @property
    def measures(self) -> bool:
        """Whether the heads measure (a QCA read to fit); if not, the segment read alone is
        fitted, which needs no QCA, so every training lesion is collected."""
        return any(task in self.heads.settings.tasks for task in MEASURED)

    def add(self, batch: dict, outputs: dict) -> None:
        """``train_step``'s ``on_outputs`` hook."""
        rows = len(batch["segment"])
        if not self.wanted:
            return
        labels = self._labels(batch)  # once a batch: the QCA rows take their first ``room``
        if "segment" in self.heads.settings.tasks:
            unmeasured = np.full((rows, SPACING + 1), np.nan, dtype=np.float32)
            self.labelled.append(np.concatenate([unmeasured, labels], axis=1))
        room = self.limit - self.collected if self.measures else rows
        if room <= 0:
            return
        take = slice(0, room)
        spacing = batch["pixel_spacing_mm"][take].float().cpu().numpy()[:, None]
        readouts = (crop_readouts(batch["image"][take].float().cpu().numpy(),
                                  torch.sigmoid(outputs["logits"][take].float()).cpu().numpy(),
                                  batch["box"][take].float().cpu().numpy()) if self.measures
                    else np.full((min(room, rows), READOUTS_END), np.nan, dtype=np.float32))
        own = torch.stack([outputs["stenosis_pct"], outputs["mld_mm"], outputs["rvd_mm"]],
                          dim=1)[take].float().cpu().numpy()
        targets = np.column_stack([np.asarray(batch[name][take].cpu(), dtype=np.float32)
                                   for name in ("diameter_stenosis_pct", "mld_mm", "rvd_mm")])
        # Diameters in model pixels, as the heads predict them (NaN without calibration).
        own[:, 1:] /= spacing
        targets[:, 1:] /= spacing
        self.rows.append(np.concatenate([readouts, own, targets, spacing, labels[take]],
                                        axis=1))

    def _labels(self, batch: dict) -> np.ndarray:
        """The class id, fold and view context columns of the batch's rows."""
        class_ids = head_targets(batch, self.heads.settings.classes)["segment"]
        class_ids = class_ids.cpu().numpy().astype(np.float32)[:, None]
        folds = np.array([[_fold(str(key))] for key in list(batch["sample_id"])],
                         dtype=np.float32)
        context = np.asarray(batch["context"].float().cpu(), dtype=np.float32)
        return np.concatenate([class_ids, folds, context], axis=1)

    def fit(self) -> None:
        """Calibrate the heads on what every worker collected in the window, then start the
        next epoch's collection."""
        epoch = tuple(_gathered(collected) for collected in (self.rows, self.labelled))
        self.rows, self.labelled = [], []
        self.history = [*self.history, epoch][-self.window:]
        if not self.wanted:
            return
        rows = np.concatenate([measured for measured, _ in self.history])
        readouts, own = rows[:, :READOUTS_END], rows[:, READOUTS_END:OWN_END]
        weights, fitted = fit_calibration(readouts, own, rows[:, OWN_END:TARGETS_END])
        trained = np.array([task in self.heads.settings.tasks for task in MEASURED])
        self.heads.set_calibration(weights, fitted & trained)
        if "segment" in self.heads.settings.tasks:
            self.heads.set_segment_read(self._segment_fit(rows, readouts, own))
            vessels = self._vessel_fit(np.concatenate([labelled for _, labelled in self.history]))
            if vessels is not None:  # else keep the read the heads started from, if any
                fit, decides = vessels
                self.heads.set_vessel_read(fit, decides)

    def _segment_fit(self, rows: np.ndarray, readouts: np.ndarray, own: np.ndarray):
        """The segment read on the reference diameter the just-fitted QCA read gives."""
        with torch.no_grad():
            read = self.heads.read_qca(torch.as_tensor(own).to(self.heads.calibration),
                                       torch.as_tensor(readouts).to(self.heads.calibration))
        # As the forward pass clamps it; an untrained RVD head says nothing (NaN: the mean).
        rvd_mm = read[:, 2].clamp(min=0).cpu().numpy() * rows[:, SPACING]
        if "rvd" not in self.heads.settings.tasks:
            rvd_mm = np.full(len(rows), np.nan)
        inputs = segment_read_inputs(torch.as_tensor(rows[:, CONTEXT]), torch.as_tensor(rvd_mm))
        return fit_segment_read(inputs.numpy(), rows[:, CLASS_ID].astype(np.int64),
                                len(self.heads.settings.classes), rows[:, FOLD])

    def _vessel_fit(self, rows: np.ndarray):
        """The vessel read (the same logistic read, over the adapter vessels), on the vessels
        of the rows' segments; None for a trial that saw one vessel (stage 3: its heads keep
        the read of the stage-2 entry they started from, which depends on the view and the frame,
        not on the adapter)."""
        settings = self.heads.settings
        to_vessel = np.array([ADAPTER_VESSELS.index(v) if v in ADAPTER_VESSELS else -1
                              for v in class_vessels(settings.classes, settings.taxonomy)])
        class_ids = rows[:, CLASS_ID].astype(np.int64)
        labels = np.where(class_ids >= 0, to_vessel[np.maximum(class_ids, 0)], -1)
        inputs = vessel_read_inputs(torch.as_tensor(rows[:, CONTEXT])).numpy()
        fit = fit_segment_read(inputs, labels, len(ADAPTER_VESSELS), rows[:, FOLD])
        if fit is None:
            return None
        # It routes only if, held out, it named these lesions' vessels better than the view,
        # on the lesions both can name (with angles: without, the read says nothing).
        context = rows[:, CONTEXT]
        seen = (labels >= 0) & (context[:, 2] == 0)
        if not seen.any():
            return fit, False
        by_view = np.array([route_by_angles(90 * float(lao), 90 * float(cranial)).vessel
                            for lao, cranial in context[seen, :2]], dtype=object)
        truth = np.array(ADAPTER_VESSELS, dtype=object)[labels[seen]]
        read_right = np.mean(fit["held_out"][seen] == labels[seen])
        return fit, bool(read_right > np.mean(by_view == truth))


def _gathered(collected: list[np.ndarray]) -> np.ndarray:
    """This epoch's rows of every worker (every rank then fits the same)."""
    rows = (np.concatenate(collected) if collected
            else np.empty((0, CONTEXT.stop), np.float32))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, rows)
        rows = np.concatenate(gathered)
    return rows


def _fold(sample_id: str) -> int:
    """A lesion's cross-validation fold for the segment read: the same in every epoch."""
    return int(hashlib.sha256(sample_id.encode()).hexdigest()[:8], 16) % SEGMENT_READ_FOLDS
