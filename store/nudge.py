"""Nudging a proxy's store writer: "write your commit watermark now".

A reader that waits for a proxy's watermark (the manager, the moment an agent has ended) sends the
proxy process ``NUDGE_SIGNAL``; the addon answers it with ``StoreWriter.nudge()``, and the writer marks
everything queued before the nudge as soon as it is committed. Without a nudge the reader waits for
the writer's next idle watermark, which comes at doubling intervals up to the heartbeat (tens of ms
after an agent's last call, typically just when its process exits).

SIGURG because its default action is to ignore it: a proxy that has not installed the handler yet (or
an older addon), or a pid reused by another process since the reader looked, is not harmed by a nudge.
"""

from __future__ import annotations

import os
import signal

NUDGE_SIGNAL = signal.SIGURG


def nudge(pid: int) -> bool:
    """Ask the proxy process ``pid`` to write its watermark; False when it cannot be signalled."""
    try:
        os.kill(pid, NUDGE_SIGNAL)
    except OSError:  # gone, or another user's process: the reader falls back on idle watermarks
        return False
    return True
