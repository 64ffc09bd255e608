"""Pseudonymous patient keys: a salted HMAC, so the raw ID never needs to be stored anywhere.

The salt is a secret kept outside the data and the index (``ANGIOTUNE_SALT`` or a private file
under ``~/.angiotune``). Without it the short, guessable IDs trials use cannot be recovered by
hashing candidates; with the same salt, two indexes give the same patient the same key.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from angiotune import angiotune_home
from angiotune.names import SALT_ENV

KEY_LENGTH = 16


def salt_file() -> Path:
    return angiotune_home() / "salt"


def resolve_salt(explicit: str | None = None) -> str:
    """The salt to use: given, from the environment, or the user's private salt file."""
    if explicit:
        return explicit
    if os.environ.get(SALT_ENV):
        return os.environ[SALT_ENV]
    path = salt_file()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
    return path.read_text().strip()


def patient_key(raw_id: str, salt: str) -> str:
    normalised = " ".join(raw_id.split()).upper()
    digest = hmac.new(salt.encode(), normalised.encode(), hashlib.sha256).hexdigest()
    return "P" + digest[:KEY_LENGTH]


def salt_fingerprint(salt: str) -> str:
    """Identifies a salt (to tell whether two indexes share one) without revealing it."""
    return hashlib.sha256(b"angiotune-salt-fingerprint:" + salt.encode()).hexdigest()[:12]
