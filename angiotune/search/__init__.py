"""The search API: ``search()`` runs a space end to end; ``load_space`` validates a YAML file.

Names are loaded on first use (PEP 562): every Tune trial actor imports this package to reach
``angiotune.search.trial``, and must not pay for torch, transformers and peft to do so.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

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
