"""Sends merged per event: the pure merge over mitmproxy's own command objects, then a real mitmdump that
streams a burst of SSE events to a real client.

No timing here (what it saves is in bench/RESULTS.md): the tests check that the bytes, their order and
every other command are what mitmproxy would have written, in fewer writes.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import warnings
from dataclasses import dataclass

import pytest
import requests
from mitmproxy.options import Options
from mitmproxy.proxy import commands
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layer import NextLayer

from conftest import LISTENING_RE, output_lines, wait_line
from rollouttap.addon import tcp_tuning
from rollouttap.addon.send_merging import merge_handler_sends, merge_sends
from test_tcp_tuning import MITMDUMP, SUMMARY_RE, _summary

with warnings.catch_warnings():
    # mitmproxy 12.2's flowfilter (imported by its test helpers) calls names pyparsing 3.3 deprecates.
    warnings.simplefilter("ignore", DeprecationWarning)
    from mitmproxy.test import tflow

SendData = commands.SendData


@dataclass
class Count:
    sends_merged: int = 0


CLIENT = tflow.tclient_conn()
SERVER = tflow.tserver_conn()
UDP = tflow.tclient_conn()
UDP.transport_protocol = "udp"
CLOSE = commands.CloseConnection(CLIENT)
LOG = commands.Log("x")


def _send(conn, data: bytes) -> SendData:
    return SendData(conn, data)


def _plain(cmds) -> list[tuple]:
    """Commands as comparable tuples: (kind, connection, data)."""
    return [("send", c.connection, c.data) if isinstance(c, SendData) else (type(c).__name__, c) for c in cmds]


def _run(n: int, conn=CLIENT) -> list[SendData]:
    return [_send(conn, b"%d," % i) for i in range(n)]


@pytest.mark.parametrize("given, expected, folded", [
    pytest.param([], [], 0, id="nothing"),
    pytest.param([_send(CLIENT, b"a")], [("send", CLIENT, b"a")], 0, id="one send"),
    pytest.param(_run(5), [("send", CLIENT, b"0,"), ("send", CLIENT, b"1,2,3,4,")], 3,
                 id="a run: the first at once, then four joined"),
    pytest.param(_run(30), [("send", CLIENT, b"0,"), ("send", CLIENT, b"1,2,3,4,"),
                            ("send", CLIENT, b"".join(b"%d," % i for i in range(5, 21))),
                            ("send", CLIENT, b"".join(b"%d," % i for i in range(21, 30)))], 26,
                 id="groups grow fourfold, the rest at the end"),
    pytest.param([_send(CLIENT, b"a"), _send(SERVER, b"x"), _send(CLIENT, b"b")],
                 [("send", CLIENT, b"a"), ("send", SERVER, b"x"), ("send", CLIENT, b"b")], 0,
                 id="alternating connections keep their order"),
    pytest.param([*_run(3), CLOSE, *_run(2)],
                 [("send", CLIENT, b"0,"), ("send", CLIENT, b"1,2,"), ("CloseConnection", CLOSE),
                  ("send", CLIENT, b"0,"), ("send", CLIENT, b"1,")], 1,
                 id="a close gets the held bytes out first, and a new run starts after it"),
    pytest.param([LOG, *_run(3, SERVER), LOG],
                 [("Log", LOG), ("send", SERVER, b"0,"), ("send", SERVER, b"1,2,"), ("Log", LOG)], 1,
                 id="other commands keep their place"),
    pytest.param([*_run(2, UDP)], [("send", UDP, b"0,"), ("send", UDP, b"1,")], 0, id="datagrams stay apart"),
    pytest.param([*_run(3), _send(UDP, b"d"), *_run(2)],
                 [("send", CLIENT, b"0,"), ("send", CLIENT, b"1,2,"), ("send", UDP, b"d"), ("send", CLIENT, b"0,"),
                  ("send", CLIENT, b"1,")], 1, id="a datagram between sends ends their run"),
    pytest.param([*_run(3), *_run(3, SERVER), *_run(3)],
                 [("send", CLIENT, b"0,"), ("send", CLIENT, b"1,2,"), ("send", SERVER, b"0,"),
                  ("send", SERVER, b"1,2,"), ("send", CLIENT, b"0,"), ("send", CLIENT, b"1,2,")], 3,
                 id="a run broken by another connection starts again at one"),
])
def test_merge_sends(given, expected, folded):
    count = Count()
    assert _plain(merge_sends(iter(given), count)) == expected
    assert count.sends_merged == folded


def test_a_layer_that_fails_mid_event_still_sends_what_it_had_sent():
    def failing():
        yield from _run(3)
        raise RuntimeError("layer bug")
    merged = merge_sends(failing(), Count())
    assert _plain([next(merged), next(merged)]) == [("send", CLIENT, b"0,"), ("send", CLIENT, b"1,2,")]
    with pytest.raises(RuntimeError, match="layer bug"):
        next(merged)


def test_merge_handler_sends_wraps_the_root_layer_only_when_there_is_one():
    class Layer:
        def handle_event(self, event):
            for _ in range(3):
                yield _send(CLIENT, event)

    class Handler:
        layer = Layer()
    count, handler = Count(), Handler()
    assert merge_handler_sends(handler, count) is True
    assert merge_handler_sends(handler, count) is True  # a second wrap (the addon loaded twice) adds nothing
    assert _plain(handler.layer.handle_event(b"z")) == [("send", CLIENT, b"z"), ("send", CLIENT, b"zz")]
    assert count.sends_merged == 1
    assert merge_handler_sends(object(), count) is False


def test_a_next_layer_root_is_left_alone():
    """NextLayer swaps its own handle_event once it has chosen a child: a wrapper there would vanish."""
    handler = type("Handler", (), {})()
    handler.layer = NextLayer(Context(tflow.tclient_conn(), Options()))
    before = handler.layer.handle_event
    assert merge_handler_sends(handler, Count()) is False
    assert handler.layer.handle_event == before


# -- a real mitmdump ---------------------------------------------------------------------------------
EVENTS = [b'data: {"n": %d, "text": "%s"}\n\n' % (i, b"x" * (i % 7)) for i in range(40)] + [b"data: [DONE]\n\n"]


class BurstServer:
    """An HTTP/1.1 server that writes a whole chunked SSE answer, one chunk per event, in one ``sendall``:
    the proxy reads it in one read, and mitmproxy's layer makes one SendData per chunk."""

    def __init__(self, answers: int) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.answers = answers
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            for _ in range(self.answers):
                request = b""
                while b"\r\n\r\n" not in request:
                    request += conn.recv(65536)
                head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                conn.sendall(head)
                conn.sendall(b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in EVENTS) + b"0\r\n\r\n")

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("merge", [True, False])
def test_a_streamed_burst_reaches_the_client_whole_in_fewer_writes(tmp_path, merge):
    answers = 5
    server = BurstServer(answers)
    proc = subprocess.Popen(
        [*MITMDUMP, "--listen-host", "127.0.0.1", "--listen-port", "0", "-s", tcp_tuning.__file__,
         "--set", f"confdir={tmp_path}", "--set", "termlog_verbosity=info", "--set", "flow_detail=0",
         "--set", "stream_large_bodies=1", "--set", f"rollouttap_merge_sends={'true' if merge else 'false'}",
         "--set", "rollouttap_coalesce_chunks=false"],  # one SendData per chunk, as mitmproxy makes them
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = output_lines(proc)
        port = int(wait_line(lines, LISTENING_RE, 60).group(1))
        with requests.Session() as session:
            session.trust_env = False
            for _ in range(answers):
                reply = session.get(f"http://127.0.0.1:{server.port}/v1/stream", stream=True, timeout=30,
                                    proxies={"http": f"http://127.0.0.1:{port}"})
                assert reply.status_code == 200
                assert reply.raw.read() == b"".join(EVENTS)  # every byte, in order, chunk framing undone
        proc.send_signal(signal.SIGINT)
        stats = _summary(wait_line(lines, SUMMARY_RE, 30).group(1))
    finally:
        proc.kill()
        proc.wait()
        server.close()
    if merge:
        assert stats["merging"] == 1
        # Each answer's body came in one read (or a few): its 41 chunks went out in a handful of writes (1 + 4 +
        # 16 + 20 from one read: 37 joined; three reads join at least 31); the response head and the final empty
        # chunk are sent on events of their own (mitmproxy logs and runs the response hook between them).
        assert stats["sends_merged"] >= answers * (len(EVENTS) - 10), stats
    else:
        assert stats["merging"] == 0 and stats["sends_merged"] == 0
