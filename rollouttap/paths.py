"""Where rollouttap keeps what it builds once and reuses (the tiny model, the proxy's bytecode)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO


def cache_root() -> Path:
    """$ROLLOUTTAP_CACHE, or ~/.cache/rollouttap."""
    return Path(os.environ.get("ROLLOUTTAP_CACHE") or Path.home() / ".cache" / "rollouttap")


PRIVATE_MODE = 0o600  # stores and exports hold whole prompts, tool outputs and request bodies


def create_private(path: str | Path) -> bool:
    """Create ``path`` empty, readable by its owner only, unless it exists; True if this call created it."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE))
    except FileExistsError:
        return False
    return True


def open_private(path: str | Path, mode: str = "w", **kwargs: object) -> IO:
    """``open(path, mode)`` for writing, a new file created owner-only (an existing one keeps its mode)."""
    create_private(path)
    return open(path, mode, **kwargs)  # type: ignore[call-overload]
