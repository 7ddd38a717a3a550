"""The TCP tuning addon: TCP_QUICKACK re-armed after every read, on real sockets and in a real mitmdump.

No timing here (the ~40 ms it saves is in bench/RESULTS.md): the tests check the mechanism — the kernel
leaves a keep-alive connection in delayed-ACK mode, the addon switches quick ACKs on at every read, and
a socket it cannot tune keeps working.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import socket
import subprocess
import sys
import warnings

import pytest
import requests

from conftest import LISTENING_RE, output_lines, wait_line
from rollouttap.addon import tcp_tuning
from rollouttap.addon.tcp_tuning import (
    QuickAckReads, TcpTuning, TuningStats, ensure_nodelay, tcp_socket, tune_transport,
)

with warnings.catch_warnings():
    # mitmproxy 12.2's flowfilter (imported by its test helpers) calls names pyparsing 3.3 deprecates.
    warnings.simplefilter("ignore", DeprecationWarning)
    from mitmproxy.test import taddons, tflow

pytestmark = pytest.mark.skipif(tcp_tuning.TCP_QUICKACK is None, reason="TCP_QUICKACK is Linux-only")

MITMDUMP = [sys.executable, "-c", "from mitmproxy.tools.main import mitmdump; mitmdump()"]
SUMMARY_RE = re.compile(r"rollouttap tcp tuning: (.*)")


class SocketTransport:
    """Just enough of an asyncio transport for tcp_socket()."""

    def __init__(self, sock: socket.socket | None) -> None:
        self.sock = sock

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self.sock if name == "socket" else default


@pytest.fixture
def tcp_pair():
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
        yield client, accepted
        client.close()
        accepted.close()


@pytest.mark.parametrize("kind, tuned", [("tcp", True), ("unix", False), ("none", False)])
def test_tcp_socket_only_for_tcp(kind, tuned, tcp_pair):
    a = b = None
    if kind == "unix":
        a, b = socket.socketpair()
    sock = {"tcp": tcp_pair[1], "unix": a, "none": None}[kind]
    try:
        assert tcp_socket(SocketTransport(sock)) is (sock if tuned else None)
    finally:
        for s in (a, b):
            if s is not None:
                s.close()


def test_ensure_nodelay_sets_it_once(tcp_pair):
    sock = tcp_pair[1]
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
    assert ensure_nodelay(sock) is True
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    assert ensure_nodelay(sock) is False


async def _quickack_state_at_each_read(tune: bool, exchanges: int) -> tuple[list[int], TuningStats]:
    """Serve ``exchanges`` request/response round trips on one keep-alive connection; at every read,
    record whether the socket is in quick-ACK mode (TCP_QUICKACK reads 1) or delayed-ACK mode (0)."""
    states: list[int] = []
    stats = TuningStats()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        protocol = writer.transport.get_protocol()
        original = protocol.data_received

        def recording(data: bytes) -> None:
            states.append(sock.getsockopt(socket.IPPROTO_TCP, tcp_tuning.TCP_QUICKACK))
            original(data)
        protocol.data_received = recording
        if tune:
            assert tune_transport(writer.transport, stats, lambda what, exc: None) is not None
        while data := await reader.read(65536):
            writer.write(b"r" * len(data) * 2)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    def client() -> None:
        with socket.create_connection(("127.0.0.1", port)) as conn:
            for _ in range(exchanges):
                conn.sendall(b"q" * 50)
                got = 0
                while got < 100:
                    got += len(conn.recv(4096))
    await asyncio.to_thread(client)
    server.close()
    await server.wait_closed()
    return states, stats


def test_quickack_is_rearmed_at_every_read_of_a_keepalive_connection():
    untuned, _ = asyncio.run(_quickack_state_at_each_read(False, 8))
    tuned, stats = asyncio.run(_quickack_state_at_each_read(True, 8))
    # The problem: after one exchange the kernel delays ACKs on this connection (pingpong mode).
    assert 0 in untuned[1:], untuned
    # The cure: quick ACKs are on at every read, and each read was counted.
    assert tuned and all(state == 1 for state in tuned), tuned
    assert stats.quickacks == len(tuned)
    assert stats.failed == 0 and stats.nodelay_set == 0  # asyncio already sets TCP_NODELAY


def test_a_socket_that_cannot_be_tuned_keeps_its_data_and_warns_once():
    async def scenario() -> tuple[bytes, TuningStats, list[str]]:
        stats, warnings, received = TuningStats(), [], bytearray()
        a, b = socket.socketpair()  # AF_UNIX: setting TCP_QUICKACK fails for real
        reader, writer = await asyncio.open_connection(sock=a)
        QuickAckReads(writer.get_extra_info("socket"), writer.transport.get_protocol(), stats,
                      lambda what, exc: warnings.append(what))
        for chunk in (b"one ", b"two ", b"three"):
            b.sendall(chunk)
            received += await reader.read(100)
        b.close()
        writer.close()
        return bytes(received), stats, warnings
    received, stats, warnings = asyncio.run(scenario())
    assert received == b"one two three"
    assert stats.failed == 1 and stats.quickacks == 0
    assert warnings == ["re-arming TCP_QUICKACK failed"]


def test_tuning_failures_are_counted_and_logged_once(caplog):
    addon = TcpTuning()
    with taddons.context(addon), caplog.at_level(logging.WARNING):
        # The test master has no proxyserver: looking the connection up fails like a changed mitmproxy would.
        addon.client_connected(tflow.tclient_conn())
        addon.client_connected(tflow.tclient_conn())
    assert addon.stats.failed == 2 and addon.stats.client_tuned == 0
    said = [r.getMessage() for r in caplog.records if "tcp tuning" in r.getMessage()]
    assert len(said) == 1 and "tuning a client socket failed" in said[0]


def test_option_off_tunes_nothing():
    addon = TcpTuning()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, rollouttap_tcp_quickack=False)
        addon.client_connected(tflow.tclient_conn())
    assert addon.stats == TuningStats()


# -- a real mitmdump ---------------------------------------------------------------------------------
def _summary(text: str) -> dict[str, int]:
    return {k: int(v) for k, v in (part.split("=") for part in text.split())}


@pytest.mark.parametrize("enabled", [True, False])
def test_mitmdump_with_the_addon_tunes_keepalive_connections(upstream, tmp_path, enabled):
    proc = subprocess.Popen(
        [*MITMDUMP, "--listen-host", "127.0.0.1", "--listen-port", "0", "-s", tcp_tuning.__file__,
         "--set", f"confdir={tmp_path}", "--set", "termlog_verbosity=info", "--set", "flow_detail=0",
         "--set", f"rollouttap_tcp_quickack={'true' if enabled else 'false'}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = output_lines(proc)
        port = int(wait_line(lines, LISTENING_RE, 60).group(1))
        body = {"model": "policy", "messages": [{"role": "user", "content": "hello"}]}
        with requests.Session() as session:  # urllib3: Nagle on, headers and body written apart
            session.trust_env = False
            proxies = {"http": f"http://127.0.0.1:{port}"}
            for _ in range(20):
                reply = session.post(upstream.base_url + "/chat/completions", json=body, proxies=proxies,
                                     timeout=30)
                assert reply.status_code == 200
        proc.send_signal(signal.SIGINT)
        stats = _summary(wait_line(lines, SUMMARY_RE, 30).group(1))
    finally:
        proc.kill()
        proc.wait()
    if enabled:
        assert stats["client_tuned"] == 1 and stats["server_tuned"] == 1
        assert stats["quickacks"] >= 20 and stats["failed"] == 0 and stats["skipped"] == 0
    else:
        # chunks_joined too: coalescing is on, but the scripted upstream's answers carry a content-length.
        assert stats == _summary(TuningStats().summary())
