"""Coronary segment taxonomies (CASS, SYNTAX), and maps from a dataset's label categories to
them (ARCADE's), loaded from YAML and validated on load."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml

from angiotune.errors import ConfigError
from angiotune.names import UNKNOWN_VESSEL, VESSELS

POSITIONS = ("proximal", "mid", "distal", "branch")
_BUILTIN = Path(__file__).parent
BUILTIN_NAMES = ("CASS", "SYNTAX")
BUILTIN_CATEGORY_MAPS = ("ARCADE",)

__all__ = ["VESSELS", "POSITIONS", "UNKNOWN_VESSEL", "Segment", "Taxonomy", "CategoryMap",
           "load_taxonomy", "load_category_map"]


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


@dataclass(frozen=True)
class CategoryMap:
    """A dataset's label categories (by name) -> segments of a taxonomy; a category mapped to
    None labels a lesion whose segment and vessel are not given."""

    name: str
    taxonomy: Taxonomy
    categories: dict[str, Segment | None]

    def lookup(self, category_name: object) -> tuple[bool, Segment | None]:
        """(known, segment): unknown categories are (False, None)."""
        key = str(category_name).strip()
        if key in self.categories:
            return True, self.categories[key]
        return False, None


@cache
def load_category_map(name_or_path: str = "ARCADE") -> CategoryMap:
    """Load the built-in ARCADE map by name, or a YAML file with the same schema:
    ``name``, ``taxonomy`` (CASS, SYNTAX or a taxonomy file) and ``categories`` (category
    name -> segment code, or null)."""
    builtin = name_or_path.upper() in BUILTIN_CATEGORY_MAPS
    path = _BUILTIN / f"{name_or_path.lower()}.yaml" if builtin else Path(name_or_path)
    if not path.is_file():
        raise ConfigError(f"category map {name_or_path!r}: not a built-in name "
                          f"({', '.join(BUILTIN_CATEGORY_MAPS)}) and no such file")
    with open(path, encoding="utf-8") as handle:
        try:
            raw = yaml.safe_load(handle)
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML ({error})") from None
    source = str(path)
    if not isinstance(raw, dict) or set(raw) != {"name", "taxonomy", "categories"}:
        raise ConfigError(f"{source}: expected exactly the keys 'name', 'taxonomy' and "
                          "'categories'")
    taxonomy_name = str(raw["taxonomy"])
    if taxonomy_name.upper() not in BUILTIN_NAMES:  # a file, relative to the map's folder
        taxonomy_name = str((path.parent / taxonomy_name).resolve())
    taxonomy = load_taxonomy(taxonomy_name)
    if not isinstance(raw["categories"], dict) or not raw["categories"]:
        raise ConfigError(f"{source}: 'categories' must be a non-empty mapping of category "
                          "name -> segment code (or null)")
    categories: dict[str, Segment | None] = {}
    for category, code in raw["categories"].items():
        if code is None:
            categories[str(category).strip()] = None
            continue
        segment = taxonomy.lookup(code)
        if segment is None:
            raise ConfigError(f"{source}: categories.{category}: {code!r} is not a segment of "
                              f"the {taxonomy.name} taxonomy")
        categories[str(category).strip()] = segment
    return CategoryMap(str(raw["name"]), taxonomy, categories)
