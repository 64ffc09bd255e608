"""Inference: from a cine run to measured lesions, with the kept adapter for the vessel in view."""

import sys

from angiotune import CallableModule
from angiotune.predict.pipeline import (
    KeptModels,
    LesionPrediction,
    PredictSettings,
    PredictSummary,
    predict,
    predict_cine,
)

__all__ = ["KeptModels", "LesionPrediction", "PredictSettings", "PredictSummary", "predict",
           "predict_cine"]

sys.modules[__name__].__class__ = CallableModule  # ``angiotune.predict(...)`` calls ``predict``
