"""Chunked bodies read one pass per read: the reader over h11's own buffer and reader, its install into
mitmproxy's HTTP/1 layers, then a real mitmdump streaming a burst of SSE events to a real HTTP client (h11).

No timing here (what it saves is in bench/RESULTS.md): the tests check that the bytes, their order and the
message's end are what mitmproxy would have passed on, in fewer chunks.
"""

from __future__ import annotations

import random
import signal
import socket
import subprocess
import threading
import warnings
from dataclasses import dataclass

import h11
import pytest
from h11._readers import ChunkedReader, ContentLengthReader
from h11._receivebuffer import ReceiveBuffer
from mitmproxy.proxy.layers.http import _http1

from conftest import LISTENING_RE, output_lines, wait_line
from rollouttap.addon import chunk_coalescing, tcp_tuning
from rollouttap.addon.chunk_coalescing import CoalescingChunkedReader
from test_tcp_tuning import MITMDUMP, SUMMARY_RE, _summary

with warnings.catch_warnings():
    # mitmproxy 12.2's flowfilter (imported by its test helpers) calls names pyparsing 3.3 deprecates.
    warnings.simplefilter("ignore", DeprecationWarning)
    from mitmproxy.test import taddons


@dataclass
class Count:
    chunks_joined: int = 0


@pytest.fixture(autouse=True)
def _mitmproxy_reader_restored():
    yield
    chunk_coalescing.uninstall()
    assert _http1.make_body_reader.__module__ == _http1.__name__


def _chunked(*chunks: bytes, end: bytes = b"0\r\n\r\n") -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + end


def _read(reader, pieces: list[bytes]) -> list:
    """Feed ``pieces`` one read at a time, calling the reader until it has nothing more, as mitmproxy's
    ``read_body`` does; the events it returned, a raised ProtocolError last."""
    buf, events = ReceiveBuffer(), []
    for piece in pieces:
        buf += piece
        try:
            while (event := reader(buf)) is not None:
                events.append(event)
                if type(event) is h11.EndOfMessage:
                    return events
        except h11.ProtocolError as exc:
            return [*events, exc]
    return events


def _shape(events: list) -> list:
    """Data as its bytes, an end as its trailers (if any), an error as its type's name."""
    return [bytes(e.data) if type(e) is h11.Data else
            ("EndOfMessage", *e.headers) if type(e) is h11.EndOfMessage and e.headers else type(e).__name__
            for e in events]


BODY = _chunked(b"data: a\n\n", b"data: bb\n\n", b"data: [DONE]\n\n")
MID = BODY.index(b"bb") + 1  # inside the second chunk


@pytest.mark.parametrize("pieces, expected, joined", [
    ([BODY], [b"data: a\n\ndata: bb\n\ndata: [DONE]\n\n", "EndOfMessage"], 2),
    # One chunk per read: nothing to join, the events of h11's reader as they were.
    ([_chunked(b"data: a\n\n", end=b""), _chunked(b"data: bb\n\n", end=b""), b"0\r\n\r\n"],
     [b"data: a\n\n", b"data: bb\n\n", "EndOfMessage"], 0),
    # A read that ends inside a chunk: what it completed plus the part it has, the rest next time.
    ([BODY[:MID], BODY[MID:]], [b"data: a\n\ndata: b", b"b\n\ndata: [DONE]\n\n", "EndOfMessage"], 2),
    # Good chunks, then a malformed one: the good ones pass first, then the error (as without joining).
    ([_chunked(b"one", b"two", end=b"zz\r\n")], [b"onetwo", "LocalProtocolError"], 1),
    ([_chunked(b"one", b"two", end=b"0\r\nX-Trailer: 1\r\n\r\n")],
     [b"onetwo", ("EndOfMessage", (b"x-trailer", b"1"))], 1),
    ([b"3\r\non"], [b"on"], 0),
    ([b"zz\r\n"], ["LocalProtocolError"], 0),  # an error at once: raised at once
])
def test_a_read_passes_as_one_chunk(pieces, expected, joined):
    count = Count()
    assert _shape(_read(CoalescingChunkedReader(ChunkedReader(), count), pieces)) == expected
    assert count.chunks_joined == joined


@pytest.mark.parametrize("cut", range(1, len(BODY)))
def test_any_split_of_a_body_gives_h11s_bytes_and_end(cut):
    pieces = [BODY[:cut], BODY[cut:]]
    plain, joined = _read(ChunkedReader(), pieces), _read(CoalescingChunkedReader(ChunkedReader(), Count()), pieces)
    assert b"".join(bytes(e.data) for e in joined[:-1]) == b"".join(bytes(e.data) for e in plain[:-1])
    assert type(joined[-1]) is type(plain[-1]) is h11.EndOfMessage
    assert len(joined) <= 3  # at most one Data per read


# Bodies the scan must read as h11 does: plain chunks around what it leaves to h11 (an extension, whitespace
# before the CRLF, upper-case hex, a chunk without its CRLF, trailers, a bad header after good chunks), data
# that looks like chunks, and what follows the body on the connection (the next message).
ODD_BODIES = [
    BODY,
    _chunked(b"a" * 300, b"b", b"c" * 17),
    _chunked(b"1\r\nx\r\n", b"y", b"0\r\n\r\n"),
    b"3;name=v\r\nabc\r\n" + _chunked(b"def", b"gh"),
    _chunked(b"one") + b"3 \t\r\ntwo\r\n" + _chunked(b"three"),
    b"A\r\n0123456789\r\n" + _chunked(b"x"),
    b"3\nabc\r\n" + _chunked(b"x"),
    _chunked(b"one", end=b"") + b"3\r\ntwoXX" + _chunked(b"three"),
    _chunked(b"one", end=b"") + b"3\r\ntwo\n" + _chunked(b"three"),
    _chunked(b"one", b"two", end=b"0\r\nX-Trailer: 1\r\n\r\n"),
    _chunked(b"one", b"two", end=b"0\r\nbad\r\n\r\n"),
    _chunked(b"one", end=b"000\r\n\r\n"),
    _chunked(b"one", end=b"0;e=1\r\n\r\n"),
    _chunked(b"one", end=b"0 \r\n\r\n"),
    _chunked(b"one", end=b"") + b"00000000000000000003\r\nabc\r\n" + _chunked(b"z"),
    _chunked(b"one", end=b"") + b"000000000000000000003\r\nabc\r\n" + _chunked(b"z"),
    _chunked(b"one", b"two", end=b"zz\r\n"),
    _chunked(b"one", b"two") + b"HTTP/1.1 200 OK\r\n\r\n",
    _chunked(b"one", b"two") + b"5\r\nabcde\r\n",
]


def _outcome(reader, pieces: list[bytes], eof: bool = False) -> tuple:
    """What mitmproxy's ``read_body`` loop makes of ``pieces`` read one at a time: the body, how it ended (its
    trailers, or the error), what is left in the buffer for the next message, and how many Data it got."""
    buf, data, count = ReceiveBuffer(), bytearray(), 0
    for piece in pieces:
        buf += piece
        try:
            while (event := reader(buf)) is not None:
                if type(event) is not h11.Data:
                    return bytes(data), ("end", tuple(event.headers)), bytes(buf), count
                assert event.data  # no empty Data
                data += event.data
                count += 1
        except h11.ProtocolError as exc:
            return bytes(data), (type(exc).__name__, str(exc)), b"", count
    if eof:
        try:
            return bytes(data), ("eof", type(reader.read_eof()).__name__), b"", count
        except h11.ProtocolError as exc:
            return bytes(data), ("eof", type(exc).__name__, str(exc)), b"", count
    return bytes(data), None, bytes(buf), count


def _same_as_h11(pieces: list[bytes], eof: bool = False) -> None:
    plain = _outcome(ChunkedReader(), pieces, eof)
    joined = _outcome(CoalescingChunkedReader(ChunkedReader(), Count()), pieces, eof)
    assert joined[:3] == plain[:3], pieces
    assert joined[3] <= len(pieces), pieces  # at most one Data per read


@pytest.mark.parametrize("body", ODD_BODIES)
def test_the_scan_reads_every_body_as_h11_does_wherever_the_reads_cut_it(body):
    for cut in range(len(body) + 1):
        for cut2 in sorted({cut, min(cut + 5, len(body)), len(body)}):
            _same_as_h11([body[:cut], body[cut:cut2], body[cut2:]], eof=cut2 < len(body))


def _random_body(rand: random.Random) -> bytes:
    """Chunks with sizes in every spelling h11 takes or refuses, data full of CRs, LFs and zeros, footers right
    and wrong, every kind of last chunk, and bytes after it."""
    out = b""
    for _ in range(rand.randint(0, 5)):
        size = rand.choice([1, 2, 3, 5, 16, 17])
        header = rand.choice([b"%x" % size] * 6 + [(b"%X" % size).rjust(20, b"0"), (b"%x" % size).rjust(21, b"0"),
                                                   b"%x;x=1" % size, b"%x " % size, b" %x" % size, b"g"])
        data = bytes(rand.choice(b"ab\r\n0") for _ in range(size))[:size - (rand.random() < 0.05)]
        footer = rand.choice([b"\r\n"] * 12 + [b"\n", b"\r", b"XX", b"\r\r\n"])
        out += header + rand.choice([b"\r\n"] * 19 + [b"\n"]) + data + footer
    end = rand.choice([b"0\r\n\r\n", b"0\r\n\r\n", b"000\r\n\r\n", b"0;e\r\n\r\n", b"0 \r\n\r\n",
                       b"0\r\nX-T: 1\r\n\r\n", b"0\r\nbad\r\n\r\n", b""])
    return out + end + rand.choice([b"", b"HTTP/1.1 200 OK\r\n\r\n", b"5\r\nabcde\r\n"])


def test_the_scan_reads_random_bodies_as_h11_does():
    rand = random.Random(1)  # seeded: the same 300 bodies every run
    for _ in range(300):
        body = _random_body(rand)
        cuts = sorted(rand.sample(range(len(body) + 1), min(len(body) + 1, 2)))
        splits = [[body], [body[:cuts[0]], body[cuts[0]:cuts[-1]], body[cuts[-1]:]]]
        splits += [[body[:cut], body[cut:]] for cut in range(0, len(body) + 1, max(1, len(body) // 8))]
        for pieces in splits:
            _same_as_h11(pieces)
            _same_as_h11(pieces, eof=True)


class CountingReader(ChunkedReader):
    calls = 0

    def __call__(self, buf):
        self.calls += 1
        return super().__call__(buf)


def test_whole_chunks_are_taken_by_the_scan_not_by_h11s_reader_one_call_each():
    reader = CountingReader()
    events = _read(CoalescingChunkedReader(reader, count := Count()), [_chunked(*EVENTS)])
    assert _shape(events) == [b"".join(EVENTS), "EndOfMessage"]
    assert count.chunks_joined == len(EVENTS) - 1
    assert reader.calls <= 2  # the last chunk and its (empty) trailers


@pytest.mark.parametrize("size", [997, 1000, 64])
def test_reads_that_end_inside_a_chunk_are_scanned_too(size):
    """TCP cuts a stream anywhere: the scan takes the rest of the chunk a read ended in (or the CRLF h11 has yet
    to take) and goes on, instead of leaving every chunk after it to h11."""
    body = _chunked(*EVENTS * 5)
    pieces = [body[i:i + size] for i in range(0, len(body), size)]
    reader, buf, calls = CountingReader(), ReceiveBuffer(), []
    coalescing = CoalescingChunkedReader(reader, Count())
    out = bytearray()
    for piece in pieces:
        buf += piece
        before = reader.calls
        while (event := coalescing(buf)) is not None and type(event) is not h11.EndOfMessage:
            out += event.data
        calls.append(reader.calls - before)
    assert bytes(out) == b"".join(EVENTS * 5)
    assert max(calls) <= 3, calls  # the part of a chunk the read has, a look at the next header, the end


def test_without_h11s_internals_every_chunk_goes_through_its_reader(monkeypatch):
    monkeypatch.setattr(chunk_coalescing, "_SCANNABLE", False)
    reader = CountingReader()
    events = _read(CoalescingChunkedReader(reader, Count()), [_chunked(*EVENTS)])
    assert _shape(events) == [b"".join(EVENTS), "EndOfMessage"]
    assert reader.calls > len(EVENTS)


def test_end_of_file_inside_a_body_is_the_error_it_was():
    reader = CoalescingChunkedReader(ChunkedReader(), Count())
    assert _shape(_read(reader, [b"3\r\nabc\r\n"])) == [b"abc"]
    with pytest.raises(h11.RemoteProtocolError, match="incomplete chunked read"):
        reader.read_eof()


def test_end_of_file_right_after_a_joined_run_still_gets_the_end_it_held():
    buf, reader = ReceiveBuffer(), CoalescingChunkedReader(ChunkedReader(), Count())
    buf += _chunked(b"a", b"b")
    assert bytes(reader(buf).data) == b"ab"
    assert type(reader.read_eof()) is h11.EndOfMessage


def test_install_wraps_only_the_chunked_reader_once_and_uninstall_restores_it():
    original = _http1.make_body_reader
    assert chunk_coalescing.install(Count()) and chunk_coalescing.install(Count())
    assert chunk_coalescing.installed()
    assert _http1.make_body_reader.wrapped is original  # type: ignore[attr-defined]
    assert type(_http1.make_body_reader(None)) is CoalescingChunkedReader
    assert type(_http1.make_body_reader(10)) is ContentLengthReader
    chunk_coalescing.uninstall()
    assert _http1.make_body_reader is original and not chunk_coalescing.installed()


def test_the_tuning_addon_coalesces_only_while_the_proxy_runs_and_the_option_is_on():
    addon = tcp_tuning.TcpTuning()
    with taddons.context(addon) as tctx:
        assert not chunk_coalescing.installed()  # loaded and configured, not running: the process is left alone
        addon.running()
        assert chunk_coalescing.installed()
        tctx.configure(addon, rollouttap_coalesce_chunks=False)
        assert not chunk_coalescing.installed()
        tctx.configure(addon, rollouttap_coalesce_chunks=True)
        assert chunk_coalescing.installed()
        addon.done()
        assert not chunk_coalescing.installed()


# -- a real mitmdump ---------------------------------------------------------------------------------
EVENTS = [b'data: {"n": %d, "text": "%s"}\n\n' % (i, b"x" * (i % 7)) for i in range(40)] + [b"data: [DONE]\n\n"]


class BurstServer:
    """An HTTP/1.1 server that writes a whole chunked SSE answer, one chunk per event, in one ``sendall``:
    the proxy reads it in one read (or a few)."""

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


def _stream_once(server_port: int, conn: h11.Connection, sock: socket.socket) -> tuple[bytes, int]:
    """One GET through the proxy; the body and the number of chunks the proxy framed it in."""
    if conn.our_state is h11.DONE:
        conn.start_next_cycle()
    sock.sendall(conn.send(h11.Request(method="GET", target=f"http://127.0.0.1:{server_port}/v1/stream",
                                       headers=[("Host", f"127.0.0.1:{server_port}")])))
    sock.sendall(conn.send(h11.EndOfMessage()))
    body, chunks = bytearray(), 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(sock.recv(65536))
        elif type(event) is h11.Response:
            assert event.status_code == 200
        elif type(event) is h11.Data:
            body += event.data
            chunks += event.chunk_start
        elif type(event) is h11.EndOfMessage:
            return bytes(body), chunks


@pytest.mark.parametrize("coalesce", [True, False])
def test_a_streamed_burst_reaches_the_client_whole_in_fewer_chunks(tmp_path, coalesce):
    answers = 5
    server = BurstServer(answers)
    proc = subprocess.Popen(
        [*MITMDUMP, "--listen-host", "127.0.0.1", "--listen-port", "0", "-s", tcp_tuning.__file__,
         "--set", f"confdir={tmp_path}", "--set", "termlog_verbosity=info", "--set", "flow_detail=0",
         "--set", "stream_large_bodies=1", "--set", f"rollouttap_coalesce_chunks={'true' if coalesce else 'false'}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = output_lines(proc)
        port = int(wait_line(lines, LISTENING_RE, 60).group(1))
        conn = h11.Connection(our_role=h11.CLIENT)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            replies = [_stream_once(server.port, conn, sock) for _ in range(answers)]
        proc.send_signal(signal.SIGINT)
        stats = _summary(wait_line(lines, SUMMARY_RE, 30).group(1))
    finally:
        proc.kill()
        proc.wait()
        server.close()
    assert [body for body, _ in replies] == [b"".join(EVENTS)] * answers  # every byte, in order
    chunks = [n for _, n in replies]
    if coalesce:
        # Each answer's 41 chunks came in one read, or a few: as many chunks reached the client.
        assert max(chunks) <= 5 and stats["chunks_joined"] >= answers * (len(EVENTS) - 5), (chunks, stats)
    else:
        assert min(chunks) >= len(EVENTS) and stats["chunks_joined"] == 0, (chunks, stats)
