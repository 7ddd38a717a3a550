"""Socket tuning for the proxy's TCP connections: acknowledge every read at once, one pass per read of a body.

Why: urllib3 (so ``requests``) turns Nagle's algorithm on for connections to a proxy and writes a POST's
headers and body apart. After one request/response exchange on a keep-alive connection the kernel
treats it as interactive and delays our ACK of the headers (up to 40 ms) hoping to piggyback it on a
reply; the client's Nagle holds the body until that ACK comes, and we wait for the body: ~40 ms per
POST. ``TCP_QUICKACK`` sends a pending ACK at once, but the kernel clears it again, so it is re-armed
after every read: one setsockopt per received chunk, about a microsecond. asyncio already sets
``TCP_NODELAY`` on every socket it wraps; we check it and set it where it is missing.

And the chunks of a chunked body that one read brought pass mitmproxy's layers as one
(``addon/chunk_coalescing.py``): a streamed answer whose events arrive together costs one pass of its HTTP
machinery and one ``send`` to the client, not one of each per event.

Load with ``mitmdump -s addon/tcp_tuning.py`` or add ``TcpTuning()`` to another script's ``addons``.
"""

# No `from __future__ import annotations`: mitmdump -s loads this file outside sys.modules, where
# dataclasses cannot resolve string annotations.
import logging
import socket
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from mitmproxy import ctx
from mitmproxy.connection import Client, Connection
from mitmproxy.proxy.server_hooks import ServerConnectionHookData

from rollouttap.addon import chunk_coalescing

log = logging.getLogger(__name__)

# Linux only; elsewhere the option does not exist and the addon stays idle.
TCP_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)
_INET = (socket.AF_INET, socket.AF_INET6)


@dataclass
class TuningStats:
    """What the addon did; logged at shutdown and readable by embedding code."""
    client_tuned: int = 0
    server_tuned: int = 0
    nodelay_set: int = 0  # sockets that lacked TCP_NODELAY
    skipped: int = 0  # connections without a plain TCP socket (e.g. WireGuard/local modes)
    failed: int = 0  # sockets whose tuning raised; their traffic is untouched
    quickacks: int = 0  # TCP_QUICKACK re-armed after a read
    chunks_joined: int = 0  # chunks of a chunked body read with the one before (chunk_coalescing.py)

    def summary(self) -> str:
        """One line for the log."""
        return " ".join(f"{k}={v}" for k, v in asdict(self).items())


class QuickAckReads:
    """Wraps a protocol's ``data_received`` so that each read is followed by TCP_QUICKACK."""

    def __init__(self, sock: Any, protocol: Any, stats: TuningStats,
                 on_error: Callable[[str, BaseException], None]) -> None:
        self.sock = sock
        self.protocol = protocol
        self.stats = stats
        self.on_error = on_error
        self.active = True
        self._original = protocol.data_received
        protocol.data_received = self.data_received

    def data_received(self, data: bytes) -> None:
        if self.active:
            try:
                self.sock.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 1)
                self.stats.quickacks += 1
            except (OSError, ValueError) as exc:  # closed or odd socket: stop tuning, keep the data
                self.active = False
                self.stats.failed += 1
                self.on_error("re-arming TCP_QUICKACK failed", exc)
        self._original(data)


def tcp_socket(transport: Any) -> Any | None:
    """The transport's TCP socket, or None when it has none (mitmproxy_rs streams, unix sockets)."""
    get = getattr(transport, "get_extra_info", None)
    sock = get("socket") if get is not None else None
    if sock is None or sock.family not in _INET or sock.type != socket.SOCK_STREAM:
        return None
    return sock


def ensure_nodelay(sock: Any) -> bool:
    """Set TCP_NODELAY if it is off; True when it had to be set."""
    if sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY):
        return False
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return True


def tune_transport(transport: Any, stats: TuningStats,
                   on_error: Callable[[str, BaseException], None]) -> QuickAckReads | None:
    """Tune one connection's transport; None when there is nothing to tune. May raise OSError."""
    sock = tcp_socket(transport)
    if sock is None or TCP_QUICKACK is None:
        return None
    if ensure_nodelay(sock):
        stats.nodelay_set += 1
    sock.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 1)
    return QuickAckReads(sock, transport.get_protocol(), stats, on_error)


def connection_transport(client_id: str, conn: Connection) -> Any | None:
    """The asyncio transport mitmproxy keeps for ``conn`` (of the client ``client_id``), or None."""
    handler = ctx.master.addons.get("proxyserver").connections.get(client_id)
    io = handler.transports.get(conn) if handler is not None else None
    writer = getattr(io, "writer", None)
    return getattr(writer, "transport", None)


class TcpTuning:
    """mitmproxy addon: TCP_QUICKACK after every read (and TCP_NODELAY) on client and server sockets, and one
    pass per read of a chunked body."""

    def __init__(self) -> None:
        self.stats = TuningStats()
        self._warned: set[str] = set()
        self._running = False

    def load(self, loader: Any) -> None:
        loader.add_option("rollouttap_tcp_quickack", bool, True,
                          "Acknowledge every read at once (TCP_QUICKACK), so clients that use Nagle's "
                          "algorithm (requests) do not wait ~40 ms per keep-alive POST.")
        loader.add_option("rollouttap_coalesce_chunks", bool, True,
                          "Pass the chunks of a chunked body (a streamed answer's events) that one read brought "
                          "through mitmproxy's layers as one chunk, not one by one.")

    def running(self) -> None:
        # Here, not at load: the wrap is process-wide (mitmproxy's module), so only a running proxy takes it.
        self._running = True
        self._coalesce()

    def configure(self, updated: set[str]) -> None:
        if self._running and "rollouttap_coalesce_chunks" in updated:
            self._coalesce()

    def client_connected(self, client: Client) -> None:
        if self._enabled():
            self._tune("client", client.id, client)

    def server_connected(self, data: ServerConnectionHookData) -> None:
        if self._enabled():
            self._tune("server", data.client.id, data.server)

    def done(self) -> None:
        self._running = False
        chunk_coalescing.uninstall()
        log.info("rollouttap tcp tuning: %s", self.stats.summary())

    def _enabled(self) -> bool:
        return TCP_QUICKACK is not None and ctx.options.rollouttap_tcp_quickack

    def _tune(self, side: str, client_id: str, conn: Connection) -> None:
        try:
            transport = connection_transport(client_id, conn)
            tuned = tune_transport(transport, self.stats, self._warn_once) if transport else None
        except Exception as exc:  # tuning is an optimisation: never let it break the connection
            self.stats.failed += 1
            self._warn_once(f"tuning a {side} socket failed", exc)
            return
        if tuned is None:
            self.stats.skipped += 1
        elif side == "client":
            self.stats.client_tuned += 1
        else:
            self.stats.server_tuned += 1

    def _coalesce(self) -> None:
        if not ctx.options.rollouttap_coalesce_chunks:
            chunk_coalescing.uninstall()
        elif not chunk_coalescing.install(self.stats):
            self._warn_once("coalescing chunked bodies failed", LookupError("this mitmproxy has no reader to wrap"))

    def _warn_once(self, what: str, exc: BaseException) -> None:
        if what not in self._warned:
            self._warned.add(what)
            log.warning("rollouttap tcp tuning: %s (%r); traffic flows as it would without it", what, exc)


addons = [TcpTuning()]
