"""The identity of a checkpoint's weights: cheap to ask for, the same wherever the folder lives.

An adapter is only right on the base weights it was trained on, so every adapter records an id
of its base and loading refuses another. The id must not depend on the folder's path (users
copy and move the 3.4 GB SAM 3 folder between disks and machines), and asking for it must not
re-read gigabytes at every checkpoint. It combines what each safetensors header says (tensor
names, dtypes and shapes: read in microseconds) with a sha256 of each file's bytes, computed once
per file and remembered under ``ANGIOTUNE_HOME`` by the file's size and modification time. A
copied folder is hashed once more and gets the same id; a different checkpoint, even one of the
same shapes, gets another.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import uuid
from pathlib import Path

from angiotune import angiotune_home

HASH_CHUNK = 16 * 2**20
CACHE_NAME = "weight-hashes.json"


def weights_fingerprint(folder: Path) -> str:
    """16 hex digits naming the weights in ``folder``'s ``*.safetensors`` files."""
    digest = hashlib.sha256()
    for weights in sorted(Path(folder).glob("*.safetensors")):
        digest.update(_header_layout(weights).encode())
        digest.update(content_hash(weights).encode())
    return digest.hexdigest()[:16]


def _header_layout(path: Path) -> str:
    """Tensor names, dtypes and shapes from a safetensors header (offsets left out: the same
    tensors written in another order are the same weights)."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return json.dumps({name: [entry["dtype"], entry["shape"]] for name, entry in header.items()},
                      sort_keys=True)


def content_hash(path: Path) -> str:
    """sha256 of a file's bytes, read once and then remembered while its size and
    modification time stay the same."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_file = angiotune_home() / CACHE_NAME
    known = _read_cache(cache_file)
    if key in known:
        return known[key]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    known = {**_read_cache(cache_file), key: digest.hexdigest()}
    _write_cache(cache_file, known)
    return known[key]


def _read_cache(path: Path) -> dict[str, str]:
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def _write_cache(path: Path, known: dict[str, str]) -> None:
    """Whole or not at all (temp file, then rename): trials on one machine share the file. A
    cache that cannot be written only costs a re-hash next time."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_text(json.dumps(known, indent=0, sort_keys=True), encoding="utf-8")
        os.replace(temporary, path)
    except OSError:
        temporary.unlink(missing_ok=True)
