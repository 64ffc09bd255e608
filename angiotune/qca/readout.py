"""QCA of the model's own mask on the crop it segmented: the measurements the stage-2 heads read.

A neural head asked for % DS straight from pooled image features learns little from a few
hundred lesions (on the embedded default it lost to the training mean). QCA of the predicted
mask already measures the lumen, and with the crop's pixels as the frame it measures it from
the image. So the heads read both QCAs of their own mask, in model pixels (the heads scale by
the spacing, as they do for their own diameters) and combine them with their own estimate
(``angiotune.model.heads.fit_calibration``).

Nothing here sees a true mask: the inputs are the model's probabilities and the crop it saw.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
from scipy import ndimage

from angiotune.qca.measure import QCAError, measure

log = logging.getLogger(__name__)

READOUTS = ("frame", "mask")  # edges from the crop's intensity; edges from the probabilities
QUANTITIES = ("stenosis_pct", "mld_px", "rvd_px")
READOUT_DIM = len(READOUTS) * len(QUANTITIES)
MAX_GRID = 256  # larger crops (the full model's 1008 px) are measured at this size


def crop_readouts(images: np.ndarray, probabilities: np.ndarray,
                  boxes: np.ndarray) -> np.ndarray:
    """(B, 6): % DS, MLD and RVD (model pixels) of each predicted mask, edges from the crop's
    intensity, then edges from the probabilities; NaN where QCA finds no segment to measure.

    ``images``, ``probabilities``: (B, S, S) in [0, 1]; ``boxes``: (B, 4) xyxy in model pixels,
    the analysed segment's extent (a mask stopping short of it is traced on, as in predict).
    """
    out = np.full((len(images), READOUT_DIM), np.nan, dtype=np.float32)
    size = images.shape[-1]
    factor = min(1.0, MAX_GRID / size)
    for i, (image, probability, box) in enumerate(zip(images, probabilities, boxes,
                                                      strict=True)):
        if factor < 1.0:  # the measurement's scale follows the crop's pixels, not the model's
            image = ndimage.zoom(image, factor, order=1, grid_mode=True, mode="nearest")
            probability = np.clip(ndimage.zoom(probability, factor, order=1, grid_mode=True,
                                               mode="nearest"), 0, 1)
        mask = probability >= 0.5
        if not mask.any():
            continue
        for k, frame in enumerate((image, None)):
            try:
                with warnings.catch_warnings(), np.errstate(all="ignore"):
                    warnings.simplefilter("ignore", RuntimeWarning)
                    result = measure(mask, 1.0, probability, frame=frame,
                                     box=None if frame is None else np.asarray(box) * factor)
                    values = (result.diameter_stenosis_pct, result.mld_mm / factor,
                              result.rvd_mm / factor)
            except (QCAError, ArithmeticError, ValueError, IndexError) as error:
                # Too small or too broken to measure (an untrained model's mask can be anything):
                # the head answers alone for this lesion, and the trial goes on.
                log.debug("no QCA of a predicted mask: %s", error)
                continue
            out[i, 3 * k:3 * k + 3] = values
    return out
