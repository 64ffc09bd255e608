"""Fits the stage-2 heads' QCA read (``angiotune.model.heads.fit_calibration``) each epoch, from
the trial's own training predictions: no extra forward pass, and never a validation lesion (the
validation split scores the calibrated heads; fitting on it would grade the fit on itself)."""

from __future__ import annotations

import numpy as np
import torch

from angiotune.model.heads import MEASURED, LesionHeads, fit_calibration
from angiotune.qca.readout import crop_readouts

PER_EPOCH = 48  # lesions read per epoch; each costs two QCAs, about 35 ms on one CPU core
WINDOW = 3  # epochs a fit draws on: three times the lesions for the cost of one epoch's reads


class ReadoutCollector:
    """Collects, for up to ``limit`` training lesions an epoch, QCA of the predicted masks, the
    heads' own estimates and the targets, all in model pixels; ``fit`` calibrates the heads on
    the last ``window`` epochs' rows (older predictions come from a slightly different model,
    which a late-training fit barely feels; a small vessel's trial needs the rows)."""

    def __init__(self, heads: LesionHeads, limit: int = PER_EPOCH, window: int = WINDOW) -> None:
        self.heads = heads
        self.limit = limit
        self.window = window
        self.rows: list[np.ndarray] = []
        self.history: list[np.ndarray] = []

    @property
    def wanted(self) -> bool:
        return any(task in self.heads.settings.tasks for task in MEASURED)

    @property
    def collected(self) -> int:
        return sum(len(r) for r in self.rows)

    def add(self, batch: dict, outputs: dict) -> None:
        """``train_step``'s ``on_outputs`` hook."""
        room = self.limit - self.collected
        if room <= 0 or not self.wanted:
            return
        take = slice(0, room)
        spacing = batch["pixel_spacing_mm"][take].float().cpu().numpy()[:, None]
        readouts = crop_readouts(batch["image"][take].float().cpu().numpy(),
                                 torch.sigmoid(outputs["logits"][take].float()).cpu().numpy(),
                                 batch["box"][take].float().cpu().numpy())
        own = torch.stack([outputs["stenosis_pct"], outputs["mld_mm"], outputs["rvd_mm"]],
                          dim=1)[take].float().cpu().numpy()
        targets = np.column_stack([np.asarray(batch[name][take].cpu(), dtype=np.float32)
                                   for name in ("diameter_stenosis_pct", "mld_mm", "rvd_mm")])
        # Diameters in model pixels, as the heads predict them (NaN without calibration).
        own[:, 1:] /= spacing
        targets[:, 1:] /= spacing
        self.rows.append(np.concatenate([readouts, own, targets], axis=1))

    def fit(self) -> None:
        """Calibrate the heads on what every worker collected in the window, then start the
        next epoch's collection."""
        rows = np.concatenate(self.rows) if self.rows else np.empty((0, 12), np.float32)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, rows)  # every rank fits the same
            rows = np.concatenate(gathered)
        self.rows = []
        self.history = [*self.history, rows][-self.window:]
        if not self.wanted:
            return
        rows = np.concatenate(self.history)
        weights, fitted = fit_calibration(rows[:, :6], rows[:, 6:9], rows[:, 9:12])
        trained = np.array([task in self.heads.settings.tasks for task in MEASURED])
        self.heads.set_calibration(weights, fitted & trained)
