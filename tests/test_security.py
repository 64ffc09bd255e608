"""What the code may never do with user files, checked over the whole package's source."""

from __future__ import annotations

import ast
from pathlib import Path

import angiotune

PACKAGE = Path(angiotune.__file__).parent
# The one pickle: Tune's own checkpoint of the per-vessel searcher, written and read by the
# search itself in its run folder (as Ray's own searchers do), never a file a user supplies.
PICKLE_ALLOWED = {"search/run.py"}


def _calls() -> list[tuple[str, ast.Call]]:
    found = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        found += [(path.relative_to(PACKAGE).as_posix(), node) for node in ast.walk(tree)
                  if isinstance(node, ast.Call)]
    return found


def _name(call: ast.Call) -> str:
    func = call.func
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def _keyword(call: ast.Call, name: str):
    for keyword in call.keywords:
        if keyword.arg == name and isinstance(keyword.value, ast.Constant):
            return keyword.value.value
    return None


def test_weights_yaml_and_arrays_load_only_safely():
    calls = _calls()
    assert len(calls) > 500  # the scan sees the package
    for where, call in calls:
        name = _name(call)
        if name == "torch.load":
            assert _keyword(call, "weights_only") is True, f"{where}:{call.lineno} {name}"
        if name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load"):
            raise AssertionError(f"{where}:{call.lineno} {name}: use yaml.safe_load")
        if name in ("np.load", "numpy.load"):
            assert _keyword(call, "allow_pickle") is False, f"{where}:{call.lineno} {name}"
        builtin = isinstance(call.func, ast.Name)  # eval(...), not model.eval()
        if (builtin and name in ("eval", "exec")) or name in ("pickle.loads", "marshal.loads"):
            raise AssertionError(f"{where}:{call.lineno} {name}")
        if name == "pickle.load":
            assert where in PICKLE_ALLOWED, f"{where}:{call.lineno} {name}"
        if name.endswith("from_pretrained"):  # transformers / peft: never pickled weights
            assert _keyword(call, "use_safetensors") is not False, f"{where}:{call.lineno}"


def test_servers_bind_to_loopback_unless_asked():
    hosts = [(where, _keyword(call, "dashboard_host")) for where, call in _calls()
             if _name(call) == "ray.init" and any(k.arg == "dashboard_host"
                                                  for k in call.keywords)]
    assert hosts and all(host == "127.0.0.1" for _, host in hosts), hosts
