"""C-arm view angles: parsing and the one sign convention the index stores.

Stored convention (DICOM's): ``angle_lao_deg`` is positive for LAO and negative for RAO;
``angle_cranial_deg`` is positive for cranial and negative for caudal. DICOM's
PositionerPrimaryAngle already uses it; core-lab CSVs usually give RAO as positive, so their
primary angle is negated on the way in.
"""

from __future__ import annotations

import math
import re

_PRIMARY = {"LAO": 1.0, "RAO": -1.0}
_SECONDARY = {"CRA": 1.0, "CRAN": 1.0, "CRANIAL": 1.0, "CAU": -1.0, "CAUD": -1.0, "CAUDAL": -1.0}
_LABELLED = re.compile(r"^\s*([A-Za-z]+)\.?\s*([-+]?\d+(?:\.\d+)?)\s*°?\s*$")
MAX_PRIMARY_DEG = 180.0
MAX_SECONDARY_DEG = 90.0


def lao_from_csv_primary(rao_positive_deg: float) -> float:
    """Core-lab CSV primary angle (RAO positive) -> stored convention (LAO positive)."""
    return -float(rao_positive_deg) + 0.0  # + 0.0 turns -0.0 into 0.0


def parse_primary(text: object) -> float | None:
    """"LAO 45" -> 45.0, "RAO 30" -> -30.0, "AP" -> 0.0; None for anything else."""
    return _parse(text, _PRIMARY, MAX_PRIMARY_DEG, straight={"AP", "PA"})


def parse_secondary(text: object) -> float | None:
    """"CRANIAL 25" / "CRA 25" -> 25.0, "CAUDAL 20" -> -20.0; None for anything else."""
    return _parse(text, _SECONDARY, MAX_SECONDARY_DEG, straight={"STRAIGHT", "0"})


def format_primary(lao_deg: float) -> str:
    return f"{'LAO' if lao_deg >= 0 else 'RAO'} {abs(lao_deg):g}"


def format_secondary(cranial_deg: float) -> str:
    return f"{'CRANIAL' if cranial_deg >= 0 else 'CAUDAL'} {abs(cranial_deg):g}"


def valid_angle(value: float | None, limit: float) -> bool:
    return value is not None and math.isfinite(value) and abs(value) <= limit


def _parse(text: object, labels: dict[str, float], limit: float,
           straight: set[str]) -> float | None:
    if not isinstance(text, str):
        return None
    if text.strip().upper() in straight:
        return 0.0
    match = _LABELLED.match(text)
    if not match or match.group(1).upper() not in labels:
        return None
    value = labels[match.group(1).upper()] * float(match.group(2))
    return value if valid_angle(value, limit) else None
