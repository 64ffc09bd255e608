"""Normalisers for the free-text fields technicians type: vessel names and study phases."""

from __future__ import annotations

import re

# Tokens as they appear in core-lab exports, mapped to the adapter vessel groups.
_VESSEL_TOKENS = {
    "RCA": "RCA", "PDA": "RCA", "RPDA": "RCA", "RPL": "RCA", "PLV": "RCA", "AM": "RCA",
    "LAD": "LAD", "D1": "LAD", "D2": "LAD", "D3": "LAD", "DIAG": "LAD", "DIAGONAL": "LAD",
    "LCX": "LCX", "CX": "LCX", "CIRC": "LCX", "CIRCUMFLEX": "LCX", "OM": "LCX", "OM1": "LCX",
    "OM2": "LCX", "OM3": "LCX", "LPDA": "LCX",
    "LM": "LM", "LMCA": "LM", "LMS": "LM",
    "RAMUS": "RAMUS", "RI": "RAMUS", "IM": "RAMUS",
}
_PHRASES = {"LEFT MAIN": "LM", "RIGHT CORONARY": "RCA", "LEFT ANTERIOR DESCENDING": "LAD",
            "OBTUSE MARGINAL": "LCX", "RAMUS INTERMEDIUS": "RAMUS"}
_PHASES = {"INDEX BASELINE": "BASELINE", "BASELINE": "BASELINE", "INDEX": "BASELINE",
           "PRE": "PRE", "PRE PCI": "PRE", "POST": "POST", "POST PCI": "POST", "FINAL": "FINAL",
           "FOLLOW UP": "FOLLOW-UP", "FOLLOW-UP": "FOLLOW-UP", "FU": "FOLLOW-UP"}
PHASES = ("BASELINE", "PRE", "POST", "FINAL", "FOLLOW-UP", "UNKNOWN")


def parse_vessel_text(text: object) -> set[str]:
    """Vessel groups named in free text ("MID RCA FINAL", "mid-lcx", "D1"); empty if none."""
    if not isinstance(text, str):
        return set()
    upper = " ".join(re.split(r"[^A-Z0-9]+", text.upper())).strip()
    found = {vessel for phrase, vessel in _PHRASES.items() if phrase in upper}
    found |= {_VESSEL_TOKENS[token] for token in upper.split() if token in _VESSEL_TOKENS}
    return found


def normalise_phase(text: object) -> str:
    """One of PHASES; unknown text becomes UNKNOWN (the caller warns)."""
    if not isinstance(text, str):
        return "UNKNOWN"
    key = " ".join(re.split(r"[^A-Z]+", text.upper())).strip()
    return _PHASES.get(key, "UNKNOWN")
