"""Where gradmap keeps its caches (dequantized bundled models, extracted text, zero-shot data, JIT-built ops)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Directory where gradmap caches the dequantized bundled models, the extracted Wikipedia text and datasets.

    ``$GRADMAP_CACHE`` if set, else ``$XDG_CACHE_HOME/gradmap`` or ``~/.cache/gradmap``. Nothing is created here.
    """
    env = os.environ.get("GRADMAP_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gradmap"
