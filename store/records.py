"""Typed records read back from the store, and decoding of stored bodies."""

from __future__ import annotations

import gzip
import json
import sqlite3
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from rollouttap.errors import StoreError


# An agent's meta key: registered with a token for a process run by hand (``rollouttap agent start``), whose
# credentials alone attribute it; a tag naming it is refused (any process may carry any tag). A manager's
# agent, also registered with a token before its process starts, is attributed by its tag meanwhile.
CREDENTIALS_ONLY = "credentials_only"


@dataclass(frozen=True)
class AgentRecord:
    agent_id: str
    run_id: str | None
    root_pid: int | None
    root_create_time: float | None
    token_hash: str | None
    status: str
    created_at: float
    started_at: float | None
    ended_at: float | None
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> AgentRecord:
        data = dict(row)
        data["meta"] = _column(data, "agent", "agent_id", "meta", "{}")
        return cls(**data)

    @property
    def credentials_only(self) -> bool:
        return bool(self.meta.get(CREDENTIALS_ONLY)) and self.token_hash is not None


@dataclass(frozen=True)
class FlowRecord:
    id: int
    flow_id: str
    proxy_id: str | None
    agent_id: str | None
    pid: int | None
    client_conn_id: str | None
    client_addr: str | None
    attribution: str
    method: str | None
    url: str | None
    scheme: str | None
    host: str | None
    port: int | None
    path: str | None
    request_headers: list[tuple[str, str]]
    request_body: bytes | None
    status_code: int | None
    response_headers: list[tuple[str, str]]
    response_body: bytes | None
    streamed: bool
    state: str
    error: str | None
    t_request: float | None
    t_response_headers: float | None
    t_first_byte: float | None
    t_end: float | None
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_row(cls, row: sqlite3.Row | Mapping[str, Any]) -> FlowRecord:
        data = dict(row)
        for name in ("request_headers", "response_headers"):
            data[name] = _headers(data, name)
        data["meta"] = _column(data, "flow", "id", "meta", "{}")
        data["streamed"] = bool(data["streamed"])
        for name in ("request_body", "response_body"):
            data[name] = _body(data, name)
        return cls(**data)

    def request_header(self, name: str) -> str | None:
        return header_value(self.request_headers, name)

    def response_header(self, name: str) -> str | None:
        return header_value(self.response_headers, name)

    def request_text(self) -> str:
        """The request body, content-decoded, as text."""
        body = decode_body(self.request_body, self.request_header("content-encoding"))
        return body.decode("utf-8", "replace")

    def response_text(self) -> str:
        """The response body (the raw SSE text when streamed), content-decoded, as text."""
        body = decode_body(self.response_body, self.response_header("content-encoding"))
        return body.decode("utf-8", "replace")

    def request_json(self) -> Any:
        """The request body parsed as JSON, or None when it is not JSON."""
        return _loads_or_none(self.request_text())

    def response_json(self) -> Any:
        """The (non-streamed) response body parsed as JSON, or None when it is not JSON."""
        return _loads_or_none(self.response_text())


def _column(data: dict[str, Any], kind: str, key: str, name: str, empty: str) -> Any:
    """A JSON column's value; a damaged one (a bit flipped on disk, a hand edit) is the store's error, naming
    its row, so a command over the whole store says which row rather than ending in a JSON traceback."""
    try:
        return json.loads(data[name] or empty)
    except ValueError as exc:
        raise StoreError(f"{kind} row {data.get(key)!r} of the store is damaged: its {name} column is not "
                         f"JSON ({exc})") from exc


def _body(data: dict[str, Any], name: str) -> bytes | None:
    """A body column: bytes as the writer stores them, or text written by hand (``sqlite3``, SCHEMA.md) as its
    UTF-8 bytes; anything else is a damaged row."""
    value = data[name]
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    raise StoreError(f"flow row {data.get('id')!r} of the store is damaged: its {name} column holds a "
                     f"{type(value).__name__}, not bytes")


def _headers(data: dict[str, Any], name: str) -> list[tuple[str, str]]:
    value = _column(data, "flow", "id", name, "[]")
    if not isinstance(value, list) or not all(isinstance(h, list) and len(h) == 2 for h in value):
        raise StoreError(f"flow row {data.get('id')!r} of the store is damaged: its {name} column holds no "
                         f"name-value pairs")
    return [(h[0], h[1]) for h in value]


def header_value(headers: list[tuple[str, str]], name: str) -> str | None:
    name = name.lower()
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def decode_body(body: bytes | None, encoding: str | None) -> bytes:
    """Undo Content-Encoding; bodies are stored exactly as they crossed the wire."""
    if not body:
        return b""
    for enc in reversed([e.strip().lower() for e in (encoding or "").split(",") if e.strip()]):
        try:
            body = _decode_one(body, enc)
        except Exception:  # a truncated stream still yields what decodes
            return body
    return body


class GzipMembers:
    """gzip as clients read it (urllib3, browsers): one member after another (a server may compress each write as
    one), fed in pieces; once a member has ended, bytes that do not start another are ignored. zlib.error when
    the stream does not start as gzip (or zlib)."""

    def __init__(self) -> None:
        self._z = zlib.decompressobj(32 + zlib.MAX_WBITS)  # 32+: a gzip or a zlib header, as mitmproxy reads it
        self._ended_one = False  # a whole member was read: an error after it is trailing garbage
        self._trailing = False  # such garbage came: the rest is ignored

    def decoder(self) -> tuple[Callable[[bytes], bytes], Callable[[], bytes]]:
        return self.decompress, self.flush

    def decompress(self, data: bytes) -> bytes:
        out: list[bytes] = []
        while data and not self._trailing:
            try:
                out.append(self._z.decompress(data))
            except zlib.error:
                if not self._ended_one:
                    raise
                self._trailing = True
                break
            if not self._z.eof:
                break
            data, self._ended_one = self._z.unused_data, True
            self._z = zlib.decompressobj(32 + zlib.MAX_WBITS)
        return b"".join(out)

    def flush(self) -> bytes:
        if self._trailing:
            return b""
        try:
            return self._z.flush()
        except zlib.error:
            if not self._ended_one:
                raise
            return b""


def gunzip(body: bytes) -> bytes:
    """A whole gzip body as clients read it (``GzipMembers``), as much of a truncated one as decodes; ValueError
    when it does not start as gzip."""
    members = GzipMembers()
    try:
        return members.decompress(body) + members.flush()
    except zlib.error as exc:
        raise ValueError(f"not gzip: {exc}") from exc


def _decode_one(body: bytes, enc: str) -> bytes:
    if enc in ("gzip", "x-gzip"):
        return gunzip(body)
    if enc == "deflate":
        try:
            return zlib.decompress(body)
        except zlib.error:
            return zlib.decompress(body, -zlib.MAX_WBITS)
    if enc == "br":
        import brotli  # installed with mitmproxy
        return brotli.decompress(body)
    if enc == "zstd":
        import zstandard  # installed with mitmproxy
        return zstandard.ZstdDecompressor().decompressobj(read_across_frames=True).decompress(body)
    if enc == "identity":
        return body
    return gzip.decompress(body) if body[:2] == b"\x1f\x8b" else body


def _loads_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None
