"""Store columns from mitmproxy flows: the only place that knows both shapes."""

from __future__ import annotations

import functools
import time
from typing import Any

from mitmproxy import http
from mitmproxy.proxy import mode_specs
from mitmproxy.net.http import url

from rollouttap.addon.attribution import Attribution
from rollouttap.addon.loopback import url_host
from rollouttap.store import redact_headers, redact_query
from rollouttap.store.redact import hide_agent_tokens


def _headers(headers: http.Headers) -> list[tuple[str, str]]:
    return redact_headers([(k, v) for k, v in headers.items(multi=True)])


def _addr(address: tuple[Any, ...] | None) -> str | None:
    if not address:
        return None
    return f"{url_host(str(address[0]))}:{address[1]}"


@functools.lru_cache(maxsize=256)
def _authority(host_header: str) -> tuple[str, int | None]:
    # mitmproxy parses the Host header on every pretty_host/pretty_url (an IDNA decode each time);
    # agents talk to a handful of hosts.
    return url.parse_authority(host_header, check=False)


def pretty_where(req: http.Request, regular: bool = False) -> tuple[str, str]:
    """``(req.pretty_url, req.pretty_host)`` as mitmproxy computes them, parsing the Host header once; in
    ``regular`` proxy mode where the request goes (its target's host and port), whatever its Host header says.
    An IPv6 host is in brackets in the URL (mitmproxy's URLs leave them out)."""
    host_header = req.host_header
    if not host_header or (regular and req.method != "CONNECT"):
        if req.first_line_format == "authority":
            return req.authority, req.host
        return _url(req.scheme, req.host, req.port, req.path), req.host
    host, port = _authority(host_header)
    if req.first_line_format == "authority":
        return req.authority, host
    return _url(req.scheme, host, port or url.default_port(req.scheme) or 443, req.path), host


def _url(scheme: str, host: str, port: int, path: str) -> str:
    return url.unparse(scheme, url_host(host), port, path if path != "*" else "")


def bracket_ipv6_host(req: http.Request) -> None:
    """Write an IPv6 target in brackets in the Host header (HTTP/2: authority) where mitmproxy left them out.

    Its ``Request.host`` setter (routes) and its reverse mode write ``Host: ::1:8000``, which servers refuse
    or misread, and which would be stored as the flow's host."""
    host = req.host
    if ":" not in host:
        return
    bare = url.hostport(req.scheme, host, req.port)
    if req.headers.get("Host") == bare:
        req.headers["Host"] = url.hostport(req.scheme, url_host(host), req.port)
    if req.authority == bare:
        req.authority = url.hostport(req.scheme, url_host(host), req.port)


def _regular(flow: http.HTTPFlow) -> bool:
    # mitmproxy turns an absolute-form target into origin-form before the hooks: the mode tells them apart. Inside
    # a TLS tunnel (CONNECT) the target comes from the tunnel and the Host header is the request's own authority.
    return isinstance(flow.client_conn.proxy_mode, mode_specs.RegularMode) and not flow.client_conn.tls_established


def opened(flow: http.HTTPFlow, proxy_id: str, who: Attribution) -> dict[str, Any]:
    """Columns of the row written when a request's headers arrive (state ``open``)."""
    req = flow.request
    pretty_url, pretty_host = pretty_where(req, _regular(flow))
    return {
        "flow_id": flow.id,
        "proxy_id": proxy_id,
        "agent_id": who.agent_id,
        "pid": who.pid,
        "client_conn_id": flow.client_conn.id,
        "client_addr": _addr(flow.client_conn.peername),
        "attribution": who.method,
        "method": req.method,
        "url": stored_target(pretty_url) if req.method != "CONNECT" else _addr((req.host, req.port)),
        "scheme": req.scheme,
        "host": pretty_host,
        "port": req.port,
        "path": stored_target(req.path),
        "request_headers": _headers(req.headers),
        "t_request": req.timestamp_start or time.time(),
        "state": "open",
    }


def stored_target(target: str) -> str:
    """A URL or path as stored: secret query and path parameter values and a base-URL path token redacted."""
    return hide_agent_tokens(redact_query(target))  # in the path, or a base URL inside a query value


def request_key(req: http.Request) -> tuple[Any, ...]:
    """Everything the URL and header columns are computed from: equal keys, equal columns."""
    data = req.data
    # Headers keep their fields in a tuple that every change replaces.
    return (data.headers.fields, data.method, data.scheme, data.host, data.port, data.path,
            data.authority, data.http_version)


def request_sent(flow: http.HTTPFlow, key_at_open: tuple[Any, ...] | None = None) -> dict[str, Any]:
    """Columns once the whole request is in: its body, and where it goes (routes may change it).

    With the ``request_key`` taken when the row was opened, columns that cannot have changed are left out.
    """
    req = flow.request
    if key_at_open is not None and request_key(req) == key_at_open:
        return {"request_body": req.raw_content}
    pretty_url, pretty_host = pretty_where(req, _regular(flow))
    return {
        "request_body": req.raw_content,
        "url": stored_target(pretty_url),
        "scheme": req.scheme,
        "host": pretty_host,
        "port": req.port,
        "path": stored_target(req.path),
        "request_headers": _headers(req.headers),
    }


def response_started(flow: http.HTTPFlow, streamed: bool) -> dict[str, Any]:
    """Status, headers and their arrival time of a response whose headers are in."""
    resp = flow.response
    assert resp is not None
    return {
        "status_code": resp.status_code,
        "response_headers": _headers(resp.headers),
        "t_response_headers": resp.timestamp_start or time.time(),
        "streamed": int(streamed),
    }
