"""Every JSON file angiotune writes is strict JSON: no NaN, which jq and browsers reject."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from angiotune import jsonio


def _strict(text: str):
    def refuse(constant: str):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_missing_values_become_null_and_numpy_becomes_plain():
    value = {"dice": np.float32(0.5), "mae": math.nan, "inf": -math.inf, 3: (1, 2),
             "array": np.array([1.0, np.nan]), "path": Path("a") / "b", "n": np.int64(7)}
    assert _strict(jsonio.dumps(value)) == {"dice": 0.5, "mae": None, "inf": None, "3": [1, 2],
                                            "array": [1.0, None], "path": str(Path("a") / "b"),
                                            "n": 7}
    with pytest.raises(ValueError):
        _strict(json.dumps({"mae": math.nan}))  # what the standard library would have written


def test_a_registry_manifest_with_a_missing_metric_is_strict_json(tmp_path):
    from angiotune.registry.store import promote, read_entry

    adapter = tmp_path / "trial" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "weights.bin").write_bytes(b"weights")
    record = {"metric": "dice", "mode": "max", "score": 0.7, "validation_split": "abc",
              "metrics": {"dice": 0.7, "stenosis_mae": math.nan}}
    assert promote(tmp_path / "results", "LAD", adapter, record)[0]
    entry = read_entry(tmp_path / "results", "LAD")
    manifest = _strict((Path(entry["path"]) / "manifest.json").read_text())
    assert manifest["metrics"] == {"dice": 0.7, "stenosis_mae": None}
