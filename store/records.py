"""Typed records read back from the store, and decoding of stored bodies."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from rollouttap.errors import StoreError
from rollouttap.store.codings import decode_body


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


def _loads_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None
