"""Store columns from mitmproxy flows: the only place that knows both shapes."""

from __future__ import annotations

import time
from typing import Any

from mitmproxy import http

from rollouttap.addon.attribution import Attribution
from rollouttap.store import redact_headers


def _headers(headers: http.Headers) -> list[tuple[str, str]]:
    return redact_headers([(k, v) for k, v in headers.items(multi=True)])


def _addr(address: tuple[Any, ...] | None) -> str | None:
    if not address:
        return None
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def opened(flow: http.HTTPFlow, proxy_id: str, who: Attribution) -> dict[str, Any]:
    """Columns of the row written when a request's headers arrive (state ``open``)."""
    req = flow.request
    return {
        "flow_id": flow.id,
        "proxy_id": proxy_id,
        "agent_id": who.agent_id,
        "pid": who.pid,
        "client_conn_id": flow.client_conn.id,
        "client_addr": _addr(flow.client_conn.peername),
        "attribution": who.method,
        "method": req.method,
        "url": req.pretty_url if req.method != "CONNECT" else f"{req.host}:{req.port}",
        "scheme": req.scheme,
        "host": req.pretty_host,
        "port": req.port,
        "path": req.path,
        "request_headers": _headers(req.headers),
        "t_request": req.timestamp_start or time.time(),
        "state": "open",
    }


def request_sent(flow: http.HTTPFlow) -> dict[str, Any]:
    """Columns once the whole request is in: its body, and where it goes (routes may change it)."""
    req = flow.request
    return {
        "request_body": req.raw_content,
        "url": req.pretty_url,
        "scheme": req.scheme,
        "host": req.pretty_host,
        "port": req.port,
        "path": req.path,
        "request_headers": _headers(req.headers),
    }


def response_started(flow: http.HTTPFlow, streamed: bool) -> dict[str, Any]:
    resp = flow.response
    assert resp is not None
    return {
        "status_code": resp.status_code,
        "response_headers": _headers(resp.headers),
        "t_response_headers": resp.timestamp_start or time.time(),
        "streamed": int(streamed),
    }
