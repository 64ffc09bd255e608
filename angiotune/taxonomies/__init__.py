"""Coronary segment taxonomies (CASS, SYNTAX) loaded from YAML and validated on load."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml

from angiotune.errors import ConfigError

VESSELS = ("RCA", "LAD", "LCX", "LM", "RAMUS")
POSITIONS = ("proximal", "mid", "distal", "branch")
_BUILTIN = Path(__file__).parent
BUILTIN_NAMES = ("CASS", "SYNTAX")

__all__ = ["VESSELS", "POSITIONS", "Segment", "Taxonomy", "load_taxonomy"]


@dataclass(frozen=True)
class Segment:
    code: str
    name: str
    vessel: str
    position: str


@dataclass(frozen=True)
class Taxonomy:
    name: str
    segments: dict[str, Segment]

    def lookup(self, code: object) -> Segment | None:
        """The segment for a code as found in a CSV cell (13, "13", 13.0); None when unknown."""
        return self.segments.get(normalise_code(code))

    def codes_of(self, vessel: str) -> list[str]:
        return [c for c, s in self.segments.items() if s.vessel == vessel]


def normalise_code(code: object) -> str:
    text = str(code).strip()
    try:
        number = float(text)
    except ValueError:
        return text.lower()
    return str(int(number)) if number.is_integer() else text


@cache
def load_taxonomy(name_or_path: str = "CASS") -> Taxonomy:
    """Load a built-in taxonomy by name (CASS, SYNTAX) or a YAML file with the same schema."""
    builtin = name_or_path.upper() in BUILTIN_NAMES
    path = _BUILTIN / f"{name_or_path.lower()}.yaml" if builtin else Path(name_or_path)
    if not path.exists():
        raise ConfigError(f"taxonomy {name_or_path!r}: not a built-in name (CASS, SYNTAX) "
                          "and no such file")
    with open(path, encoding="utf-8") as handle:
        raw = yaml.safe_load(handle)
    return _parse(raw, str(path))


def _parse(raw: object, source: str) -> Taxonomy:
    if not isinstance(raw, dict) or set(raw) != {"name", "segments"}:
        raise ConfigError(f"{source}: expected exactly the keys 'name' and 'segments'")
    if not isinstance(raw["segments"], dict) or not raw["segments"]:
        raise ConfigError(f"{source}: 'segments' must be a non-empty mapping of code -> segment")
    segments: dict[str, Segment] = {}
    for code, entry in raw["segments"].items():
        key = f"{source}: segments.{code}"
        if not isinstance(entry, dict) or set(entry) != {"name", "vessel", "position"}:
            raise ConfigError(f"{key}: expected exactly 'name', 'vessel' and 'position'")
        if entry["vessel"] not in VESSELS:
            raise ConfigError(f"{key}.vessel: {entry['vessel']!r} is not one of {VESSELS}")
        if entry["position"] not in POSITIONS:
            raise ConfigError(f"{key}.position: {entry['position']!r} is not one of {POSITIONS}")
        normalised = normalise_code(code)
        if normalised in segments:
            raise ConfigError(f"{key}: duplicate segment code")
        segments[normalised] = Segment(normalised, str(entry["name"]), entry["vessel"],
                                       entry["position"])
    return Taxonomy(str(raw["name"]), segments)
