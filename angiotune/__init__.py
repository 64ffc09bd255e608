"""angiotune: Ray-distributed search for SAM 3 LoRA adapters on coronary angiograms.

The main API, importable from here (each name is loaded on first use, so ``import angiotune``
stays light; the CLI is a thin layer over the same functions)::

    import angiotune

    angiotune.phantoms("data/phantoms")                      # synthetic cines to try it on
    angiotune.index("export/manifest.csv", "results/index.parquet")   # a core-lab export
    outcome = angiotune.search(angiotune.load_space("lora_rank.yaml"),
                               data=Path("results/index.parquet"))
    angiotune.best("LAD")                                   # the kept adapter's entry
    table = angiotune.evaluate(Path("results"))             # the test split
    angiotune.predict("RUN.dcm", "predictions")             # segment and measure
    angiotune.export_model("LAD", "exported/LAD")           # merged, for transformers alone
"""

import os
from importlib import import_module
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from angiotune import predict, search
    from angiotune.data.coco import CocoSource
    from angiotune.data.coco import build_coco_index as index_coco
    from angiotune.data.ingest import IndexSettings
    from angiotune.data.ingest import build_index as index
    from angiotune.data.phantoms import PhantomSettings
    from angiotune.data.phantoms import generate_phantoms as phantoms
    from angiotune.evaluation.test_split import evaluate_kept as evaluate
    from angiotune.export.model import export_model
    from angiotune.predict import PredictSettings
    from angiotune.qca import measure
    from angiotune.registry.store import best, load_best_model
    from angiotune.search import load_space
    from angiotune.search.distill import distill

# Public name -> (module, name there; None: the module itself, a ``CallableModule``).
_API = {
    "search": ("angiotune.search", None),
    "load_space": ("angiotune.search.space", "load_space"),
    "best": ("angiotune.registry.store", "best"),
    "load_best_model": ("angiotune.registry.store", "load_best_model"),
    "evaluate": ("angiotune.evaluation.test_split", "evaluate_kept"),
    "predict": ("angiotune.predict", None),
    "export_model": ("angiotune.export.model", "export_model"),
    "distill": ("angiotune.search.distill", "distill"),
    "PredictSettings": ("angiotune.predict.pipeline", "PredictSettings"),
    "index": ("angiotune.data.ingest", "build_index"),
    "IndexSettings": ("angiotune.data.ingest", "IndexSettings"),
    "index_coco": ("angiotune.data.coco", "build_coco_index"),
    "CocoSource": ("angiotune.data.coco", "CocoSource"),
    "phantoms": ("angiotune.data.phantoms.generate", "generate_phantoms"),
    "PhantomSettings": ("angiotune.data.phantoms.generate", "PhantomSettings"),
    "measure": ("angiotune.qca.measure", "measure"),
}
__all__ = ["CocoSource", "IndexSettings", "PhantomSettings", "PredictSettings", "best",
           "distill", "evaluate", "export_model", "index", "index_coco", "load_best_model",
           "load_space", "measure", "phantoms", "predict", "search"]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'angiotune' has no attribute {name!r}")
    module, attribute = _API[name]
    found = import_module(module)
    return found if attribute is None else getattr(found, attribute)


class CallableModule(ModuleType):
    """A subpackage that is also its main function: ``angiotune.search(space)`` runs
    ``angiotune.search.search`` and ``angiotune.predict(...)`` ``angiotune.predict.predict``,
    while ``import angiotune.search.space`` and the subpackages' other names work as ever (a
    function of the same name would hide them)."""

    def __call__(self, *args, **kwargs):
        return getattr(self, self.__name__.rsplit(".", 1)[-1])(*args, **kwargs)


def angiotune_home() -> Path:
    """The user's private angiotune folder (the pseudonym salt, remembered weight hashes):
    ``ANGIOTUNE_HOME``, else ``~/.angiotune``."""
    from angiotune.names import HOME_ENV

    return Path(os.environ.get(HOME_ENV, Path.home() / ".angiotune"))
