"""Strict JSON out: every JSON file angiotune writes goes through ``dumps``.

A metric that has no value is NaN in Python, which ``json.dumps`` writes as ``NaN``: not JSON,
and strict parsers (``jq``, a browser, most other languages) reject the whole file. Here it is
``null``; numpy scalars and arrays become plain numbers and lists.
"""

from __future__ import annotations

import json
import math
from pathlib import PurePath


def plain(value):
    """``value`` with NaN and infinities as None, numpy values as Python ones, tuples as lists
    and paths as strings, recursively."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, PurePath):
        return str(value)
    if hasattr(value, "tolist"):  # numpy arrays and scalars, without importing numpy here
        return plain(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def dumps(value, **options) -> str:
    """``json.dumps`` of ``plain(value)``; raises rather than write anything that is not JSON."""
    return json.dumps(plain(value), allow_nan=False, **options)
