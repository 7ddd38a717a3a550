"""Fewer sends for what one event makes: mitmproxy writes every ``SendData`` command apart.

Why: mitmproxy's HTTP/1 layer turns each chunk of a chunked body into its own ``SendData``, and its
connection handler writes each at once, so a read that brought 50 SSE events from the model server
costs 50 ``send`` calls to the client (and 50 wake-ups of it), where a buffered body costs one (after
its head's). A streamed answer's events pile up in one read whenever the proxy reads slower than the
server writes: a server under load, a busy proxy, a network that coalesces segments. The handler
consumes a layer's commands in one go, with no ``await`` between them, so joining consecutive
``SendData`` to the same TCP connection changes only how many writes carry the same bytes, in the same
order (and when: see ``merge_sends``).
"""

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from mitmproxy.proxy import commands
from mitmproxy.proxy.layer import NextLayer

SendData = commands.SendData


class SendCount(Protocol):
    """Where merging counts the writes it spared (``SendData`` joined to the one before)."""
    sends_merged: int


def merge_sends(cmds: Iterable[commands.Command], count: SendCount) -> Iterator[commands.Command]:
    """``cmds`` with each run of consecutive ``SendData`` to one TCP connection joined into a few writes.

    A run goes out in groups that grow fourfold: its first send at once, then 4, 16, 64, ... joined. The
    client starts on the first events while the proxy works through the rest (joined whole, a burst kept a
    client that is slower per event than the proxy, such as the openai SDK's stream parser, idle until it
    was all through mitmproxy's layers: +0.3 ms per 54-event answer), and a burst of n sends costs about
    log4(n) writes. Any other command (a hook, a close, a send elsewhere) first gets the held bytes out, so
    every command keeps its place. UDP connections are left alone: there each ``SendData`` is a datagram.
    """
    conn: Any = None
    parts: list[bytes] = []
    group = 1  # sends the current group of the run takes: 1, 4, 16, ...
    try:
        for command in cmds:
            if type(command) is SendData and command.connection.transport_protocol == "tcp":
                if command.connection is not conn:
                    if parts:
                        yield _joined(conn, parts, count)
                    conn, parts, group = command.connection, [], 1
                parts.append(command.data)
                if len(parts) >= group:
                    yield _joined(conn, parts, count)
                    parts, group = [], group * 4
                continue
            if parts:
                yield _joined(conn, parts, count)
                parts = []
            conn = None
            yield command
    except Exception:
        # The layer failed mid-event: what it had already sent goes out, as it would have without merging,
        # before mitmproxy's handler logs the error.
        if parts:
            yield _joined(conn, parts, count)
        raise
    if parts:
        yield _joined(conn, parts, count)


def _joined(conn: Any, parts: list[bytes], count: SendCount) -> SendData:
    if len(parts) == 1:
        return SendData(conn, parts[0])
    count.sends_merged += len(parts) - 1
    return SendData(conn, b"".join(parts))


def merge_handler_sends(handler: Any, count: SendCount) -> bool:
    """Route the commands of a mitmproxy connection handler's layer stack through ``merge_sends``.

    The handler writes whatever its root layer's ``handle_event`` yields; the root layer (the proxy mode's, set
    before the client_connected hook) stays for the connection's life. False (nothing changed) when the handler
    has no such layer, or its root is still a NextLayer, which replaces its own ``handle_event`` once it has
    chosen its child (the wrapper would be dropped unseen).
    """
    layer = getattr(handler, "layer", None)
    if layer is None or isinstance(layer, NextLayer):
        return False
    handle: Callable[[Any], Iterable[commands.Command]] | None = getattr(layer, "handle_event", None)
    if handle is None or not callable(handle):
        return False
    if getattr(handle, "merges_sends", False):  # wrapped already (the tuning addon loaded twice)
        return True

    def merged(event: Any) -> Iterator[commands.Command]:
        return merge_sends(handle(event), count)
    merged.merges_sends = True  # type: ignore[attr-defined]
    layer.handle_event = merged
    return True
