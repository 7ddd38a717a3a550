"""Routes: send requests for a hard-wired host (``api.openai.com``) to another base URL (the policy), and
requests addressed to this proxy's own reverse listeners on to those listeners' targets."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Iterable
from urllib.parse import urlsplit

from rollouttap.addon.loopback import is_any_address


class RouteError(ValueError):
    """A route option value that cannot be parsed."""


@dataclass(frozen=True)
class Route:
    match_host: str
    match_port: int | None
    scheme: str
    host: str
    port: int
    path_prefix: str

    def target(self, path: str) -> tuple[str, str, int, str]:
        """(scheme, host, port, path) for a request path under this route."""
        return self.scheme, self.host, self.port, self.path_prefix + path


def parse_route(spec: str) -> Route:
    """``api.openai.com=http://127.0.0.1:8000`` (or ``host:443=...``, ``[fd77::9]:80=...``) -> Route."""
    source, sep, base = spec.partition("=")
    if not sep or not source.strip() or not base.strip():
        raise RouteError(f"route {spec!r} is not HOST[:PORT]=BASE_URL")
    match_host, match_port = _route_source(source.strip().lower(), spec)
    base = base.strip()
    url = urlsplit(base)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise RouteError(f"route {spec!r}: {base!r} is not an http(s) URL")
    port = url.port or (443 if url.scheme == "https" else 80)
    return Route(match_host, match_port, url.scheme, url.hostname, port, url.path.rstrip("/"))


def _route_source(source: str, spec: str) -> tuple[str, int | None]:
    """A route's ``HOST``, ``HOST:PORT``, ``[V6]``, ``[V6]:PORT`` or bare IPv6 address as (host, port or None)."""
    if source.startswith("["):  # written as in a URL
        host, close, rest = source[1:].partition("]")
        address = _ipv6(host)
        if not close or address is None or (rest and not rest.startswith(":")):
            raise RouteError(f"route {spec!r}: {source!r} is not [IPV6] or [IPV6]:PORT")
        return address, (_port(rest[1:], spec) if rest else None)
    if source.count(":") == 1:
        host, port_text = source.split(":")
        return host, _port(port_text, spec)
    if ":" not in source:
        return source, None
    if (address := _ipv6(source)) is None:
        raise RouteError(f"route {spec!r}: {source!r} is neither HOST[:PORT] nor an IPv6 address")
    head, _, tail = source.rpartition(":")
    if tail.isdigit() and _ipv6(head) is not None:  # fd77::9:80 is an address, and fd77::9 with port 80
        raise RouteError(f"route {spec!r}: {source!r} is ambiguous: write [{source}] for that address, or "
                         f"[{head}]:{tail} for port {tail} of {head}")
    return address, None


def _port(text: str, spec: str) -> int:
    if not text.isdigit() or not 0 < int(text) <= 65535:
        raise RouteError(f"route {spec!r}: port {text!r} is not a number from 1 to 65535")
    return int(text)


def _ipv6(text: str) -> str | None:
    """An IPv6 address in its one written form (``FD77:0::9`` -> ``fd77::9``), or None for anything else."""
    try:
        return ipaddress.IPv6Address(text).compressed
    except ValueError:
        return None


def parse_routes(specs: Iterable[str]) -> tuple[Route, ...]:
    return tuple(parse_route(s) for s in specs)


def find_route(routes: tuple[Route, ...], host: str, port: int) -> Route | None:
    """The first route for this host (and port, when the route names one)."""
    host = host.lower()
    if ":" in host:  # an IPv6 address, matched in any of its written forms
        host = _ipv6(host) or host
    for route in routes:
        if route.match_host == host and route.match_port in (None, port):
            return route
    return None


# The names mitmproxy treats as itself when it refuses to connect to one of its own listeners.
SELF_NAMES = ("localhost", "127.0.0.1", "::1")


def own_reverse_routes(listeners: tuple[tuple[str, int, str, str, int], ...],
                       here: Iterable[str] = ()) -> tuple[Route, ...]:
    """Routes for requests addressed to one of this proxy's reverse listeners, each given as (listen host,
    listen port, target scheme, target host, target port): they go where that listener sends its requests.
    ``here``: this host's addresses, by which agents (another host's too) name a listener on every address.

    A client that matches NO_PROXY by host alone (aiohttp) or ignores its ports (curl) sends a base URL on
    the reverse listener to the regular listener instead, and mitmproxy will not connect to itself."""
    routes: list[Route] = []
    for listen_host, listen_port, scheme, host, port in listeners:
        if scheme not in ("http", "https"):
            continue
        names = (*SELF_NAMES, listen_host.lower(), *(here if is_any_address(listen_host) else ()))
        for name in dict.fromkeys(names):
            routes.append(Route(name, listen_port, scheme, host, port, ""))
    return tuple(routes)
