"""angiotune: Ray-distributed search for SAM 3 LoRA adapters on coronary angiograms."""

import os
from pathlib import Path

__version__ = "0.1.0"


def angiotune_home() -> Path:
    """The user's private angiotune folder (the pseudonym salt, remembered weight hashes):
    ``ANGIOTUNE_HOME``, else ``~/.angiotune``."""
    return Path(os.environ.get("ANGIOTUNE_HOME", Path.home() / ".angiotune"))
