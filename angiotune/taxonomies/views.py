"""Standard angiographic views and the vessel each shows best, loaded from ``views.yaml``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml

from angiotune.errors import ConfigError
from angiotune.names import ADAPTER_VESSELS
from angiotune.taxonomies import VESSELS

VIEWS_FILE = Path(__file__).resolve().parent / "views.yaml"


@dataclass(frozen=True)
class StandardView:
    name: str
    vessel: str
    lao_deg: float
    cranial_deg: float

    def distance(self, lao_deg: float, cranial_deg: float) -> float:
        return math.hypot(lao_deg - self.lao_deg, cranial_deg - self.cranial_deg)


@dataclass(frozen=True)
class ViewTable:
    views: tuple[StandardView, ...]
    ambiguity_deg: float
    adapter_for: dict[str, str]
    head_override_probability: float

    def of(self, vessel: str) -> list[StandardView]:
        return [v for v in self.views if v.vessel == vessel]


@cache
def load_views(path: Path = VIEWS_FILE) -> ViewTable:
    with open(path, encoding="utf-8") as handle:
        raw = yaml.safe_load(handle)
    keys = {"ambiguity_deg", "head_override_probability", "adapter_for", "views"}
    if not isinstance(raw, dict) or set(raw) != keys:
        raise ConfigError(f"{path}: expected exactly the keys {sorted(keys)}")
    if not 0 < float(raw["head_override_probability"]) <= 1:
        raise ConfigError(f"{path}: head_override_probability must be in (0, 1]")
    adapter_for = raw["adapter_for"]
    if (not isinstance(adapter_for, dict) or set(adapter_for) != set(VESSELS)
            or not set(adapter_for.values()) <= set(ADAPTER_VESSELS)):
        raise ConfigError(f"{path}: adapter_for must map each of {VESSELS} to one of "
                          f"{ADAPTER_VESSELS}")
    views = []
    for i, entry in enumerate(raw["views"] or []):
        where = f"{path}: views[{i}]"
        if not isinstance(entry, dict) or set(entry) != {"name", "vessel", "lao", "cranial"}:
            raise ConfigError(f"{where}: expected exactly 'name', 'vessel', 'lao', 'cranial'")
        if entry["vessel"] not in ADAPTER_VESSELS:
            raise ConfigError(f"{where}.vessel: {entry['vessel']!r} is not one of "
                              f"{ADAPTER_VESSELS}")
        if abs(float(entry["lao"])) > 180 or abs(float(entry["cranial"])) > 90:
            raise ConfigError(f"{where}: angles out of range (|lao| <= 180, |cranial| <= 90)")
        views.append(StandardView(str(entry["name"]), entry["vessel"], float(entry["lao"]),
                                  float(entry["cranial"])))
    if {v.vessel for v in views} != set(ADAPTER_VESSELS):
        raise ConfigError(f"{path}: every vessel of {ADAPTER_VESSELS} needs a standard view")
    return ViewTable(tuple(views), float(raw["ambiguity_deg"]), dict(adapter_for),
                     float(raw["head_override_probability"]))
