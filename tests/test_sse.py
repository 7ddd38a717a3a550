"""SSE parsing: WHATWG field rules, byte-preserving events, any split of the input gives the same events."""

from __future__ import annotations

import json
import random

import pytest

from rollouttap.store.sse import SSEEvent, SSEParser, format_event, json_events, parse_sse

# (name, raw body, [(data, event, id, retry, complete)])
CASES = [
    ("lf", b'data: {"a": 1}\n\n', [('{"a": 1}', None, None, None, True)]),
    ("crlf", b"data: x\r\n\r\n", [("x", None, None, None, True)]),
    ("cr", b"data: x\r\r", [("x", None, None, None, True)]),
    ("multiline data", b"data: a\ndata: b\ndata:\n\n", [("a\nb\n", None, None, None, True)]),
    ("no space after colon", b"data:x\n\n", [("x", None, None, None, True)]),
    ("only one space removed", b"data:  x\n\n", [(" x", None, None, None, True)]),
    ("field without colon", b"data\n\n", [("", None, None, None, True)]),
    ("comment only", b": keep-alive\n\n", [(None, None, None, None, True)]),
    ("comment between data", b"data: a\n: note\ndata: b\n\n", [("a\nb", None, None, None, True)]),
    ("event id retry", b"event: delta\nid: 7\nretry: 1500\ndata: x\n\n", [("x", "delta", "7", 1500, True)]),
    ("bad retry and NUL id ignored", b"retry: 1.5\nid: a\x00b\ndata: x\n\n", [("x", None, None, None, True)]),
    ("unknown field ignored", b"foo: bar\ndata: x\n\n", [("x", None, None, None, True)]),
    ("extra blank line", b"data: a\n\n\ndata: b\n\n",
     [("a", None, None, None, True), (None, None, None, None, True), ("b", None, None, None, True)]),
    ("mixed line endings", b"data: a\r\ndata: b\rdata: c\n\r\n", [("a\nb\nc", None, None, None, True)]),
    ("done marker", b"data: {}\n\ndata: [DONE]\n\n",
     [("{}", None, None, None, True), ("[DONE]", None, None, None, True)]),
    ("trailing event without blank line", b"data: a\n\ndata: tail",
     [("a", None, None, None, True), ("tail", None, None, None, False)]),
    ("trailing line ending only", b"data: a\n\ndata: b\n",
     [("a", None, None, None, True), ("b", None, None, None, False)]),
    ("utf-8", "data: héllo € 😀\n\n".encode(), [("héllo € 😀", None, None, None, True)]),
    ("bom stripped", b"\xef\xbb\xbfdata: x\n\n", [("x", None, None, None, True)]),
    ("empty", b"", []),
]


def _summary(events: list[SSEEvent]) -> list[tuple]:
    return [(e.data, e.event, e.id, e.retry, e.complete) for e in events]


def _feed_in_pieces(raw: bytes, cuts: list[int]) -> list[SSEEvent]:
    parser, events, prev = SSEParser(), [], 0
    for cut in [*cuts, len(raw)]:
        events += parser.feed(raw[prev:cut])
        prev = cut
    return events + parser.finish()


@pytest.mark.parametrize("name,raw,expected", CASES, ids=[c[0] for c in CASES])
def test_parse_whole_body(name, raw, expected):
    events = parse_sse(raw)
    assert _summary(events) == expected
    assert b"".join(e.raw for e in events) == raw  # every byte is in exactly one event


@pytest.mark.parametrize("name,raw,expected", CASES, ids=[c[0] for c in CASES])
def test_any_split_gives_the_same_events(name, raw, expected):
    whole = parse_sse(raw)
    rng = random.Random(name)
    splits = [list(range(1, len(raw)))]  # byte by byte, including inside UTF-8 and CRLF
    splits += [sorted(rng.sample(range(1, len(raw)), rng.randint(0, len(raw) - 1))) for _ in range(50)] if len(raw) > 1 else []
    for cuts in splits:
        assert _feed_in_pieces(raw, cuts) == whole, cuts


def test_events_come_out_as_soon_as_complete():
    parser = SSEParser()
    assert parser.feed(b"data: a\n") == []
    assert [e.data for e in parser.feed(b"\ndata: b")] == ["a"]
    assert parser.feed(b"\r") == []  # a CR at the end may be half of a CRLF
    assert [e.raw for e in parser.feed(b"\n\r\n")] == [b"data: b\r\n\r\n"]
    assert parser.finish() == []


def test_a_long_stream_fed_in_network_sized_reads():
    chunks = [{"i": i, "text": "x" * (i % 50)} for i in range(2000)]
    raw = b"".join(format_event(json.dumps(c)) for c in chunks) + b"data: [DONE]\n\n"
    events = _feed_in_pieces(raw, list(range(1460, len(raw), 1460)))
    assert list(json_events(events)) == chunks
    assert events[-1].is_done


def test_json_events_skip_done_comments_and_non_json():
    body = 'data: {"a": 1}\n\n: ping\n\ndata: not json\n\ndata: [DONE]\n\n'
    assert list(json_events(body)) == [{"a": 1}]
    with pytest.raises(ValueError):
        list(json_events(body, strict=True))


@pytest.mark.parametrize("data,eol", [("x", b"\n"), ("line1\nline2", b"\n"), ('{"k": "v"}', b"\r\n"), ("", b"\r")])
def test_format_event_round_trips(data, eol):
    raw = format_event(data, event="e", id="1", eol=eol)
    (event,) = parse_sse(raw)
    assert (event.data, event.event, event.id, event.eol) == (data, "e", "1", eol)


def test_event_json_and_done():
    done, chunk, comment = parse_sse(b"data: [DONE]\n\ndata: [1, 2]\n\n: c\n\n")
    assert done.is_done and not chunk.is_done and not comment.is_done
    assert chunk.json() == [1, 2]
    with pytest.raises(ValueError):
        comment.json()
