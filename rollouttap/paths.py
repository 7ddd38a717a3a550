"""Where rollouttap keeps what it builds once and reuses (the tiny model, the proxy's bytecode)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$ROLLOUTTAP_CACHE, or ~/.cache/rollouttap."""
    return Path(os.environ.get("ROLLOUTTAP_CACHE") or Path.home() / ".cache" / "rollouttap")
