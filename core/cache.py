"""Where converted models, exported test graphs, corpora and teacher caches are kept."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CACHE_ENV", "default_cache_dir"]

CACHE_ENV = "PANGU_LIGHT_CACHE"


def default_cache_dir() -> Path:
    """``$PANGU_LIGHT_CACHE`` if set, else ``~/.cache/pangu-light`` (never inside the repo)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser().resolve()
    return Path.home() / ".cache" / "pangu-light"
