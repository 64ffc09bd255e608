"""The search API: ``search()`` runs a space end to end; ``load_space`` validates a YAML file.

Names are loaded on first use (PEP 562): every Tune trial actor imports this package to reach
``angiotune.search.trial``, so importing the package loads neither ``angiotune.search.api``
(which needs torch) nor torch, transformers or peft (``tests/test_imports.py``).
"""

from __future__ import annotations

import sys
from importlib import import_module
from typing import TYPE_CHECKING

from angiotune import CallableModule

if TYPE_CHECKING:
    from angiotune.search.api import SearchOutcome, embedded_index, search, zero_shot
    from angiotune.search.space import load_space

__all__ = ["SearchOutcome", "embedded_index", "load_space", "search", "zero_shot"]
_HOMES = {"SearchOutcome": "api", "embedded_index": "api", "search": "api", "zero_shot": "api",
          "load_space": "space"}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'angiotune.search' has no attribute {name!r}")
    return getattr(import_module(f"angiotune.search.{_HOMES[name]}"), name)

sys.modules[__name__].__class__ = CallableModule  # ``angiotune.search(...)`` calls ``search``
