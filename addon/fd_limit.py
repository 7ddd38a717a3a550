"""The proxy may hold as many open files as its hard limit allows, not the soft limit it was started with.

Why: every agent connection costs the proxy two descriptors (the agent's and the upstream's), and many
systems start processes with a soft limit of 1,024 (a login session's default; containerd's since 2.0) under
a hard limit hundreds of times that. Past ~500 agents at once accept() then fails with EMFILE, and asyncio
stops accepting for a second at a time while the connects wait. Raising the soft limit to the hard one
needs no privilege and changes nothing else.

Load with ``mitmdump -s addon/fd_limit.py`` or add ``FdLimit()`` to another script's ``addons``.
"""

# No `from __future__ import annotations`: mitmdump -s loads this file outside sys.modules.
import logging
from typing import Any

try:
    import resource
except ImportError:  # not a Unix: no such limit to raise
    resource = None  # type: ignore[assignment]

log = logging.getLogger(__name__)


def raise_fd_limit() -> tuple[int, int]:
    """Set this process's soft RLIMIT_NOFILE to its hard one; (soft before, soft now), (0, 0) where there is none."""
    if resource is None:
        return 0, 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == hard:
        return soft, soft  # Linux's hard limit is finite (nr_open); elsewhere, leave an unbounded one alone
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        log.warning("rollouttap: cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
        return soft, soft
    return soft, hard


class FdLimit:
    """mitmproxy addon: raise the proxy's open-file limit to its hard limit when loaded."""

    def load(self, loader: Any) -> None:
        before, now = raise_fd_limit()
        if now != before:
            log.info("rollouttap: open-file limit raised from %d to %d", before, now)


addons = [FdLimit()]
