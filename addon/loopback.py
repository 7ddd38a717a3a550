"""Which listen addresses keep the proxy on this host: one rule for the addon and the manager's config.

No mitmproxy here, so the manager imports it too.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (``127.0.0.0/8``, ``::1``, ``[::1]``, IPv4-mapped ones)."""
    name = host.strip().strip("[]")
    if name.lower() == "localhost":
        return True
    try:
        addr = ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def is_ip_address(host: str) -> bool:
    """An IPv4 or IPv6 address (brackets and a zone allowed), not a name."""
    try:
        ipaddress.ip_address(host.strip().strip("[]").split("%", 1)[0])
    except ValueError:
        return False
    return True


def is_any_address(host: str) -> bool:
    """Whether a listen host means every address of this host (``0.0.0.0``, ``::``, or none given)."""
    return host.strip().strip("[]") in ("", "0.0.0.0", "::")


def url_host(host: str) -> str:
    """``host`` as a URL or a ``host:port`` writes it: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


def mitmproxy_listen_host(host: str) -> str:
    """The ``listen_host`` that makes mitmproxy listen where ``host`` says: ``::`` becomes "" (mitmproxy then
    listens on 0.0.0.0 and ::, IPv4 and IPv6), as mitmproxy hands ``::`` to asyncio, which binds it IPv6-only."""
    return "" if host.strip().strip("[]") == "::" else host


def is_host_port(text: str) -> bool:
    """``HOST``, ``HOST:PORT``, ``[V6]:PORT`` or a bare IPv6 address: no scheme, path, user or space."""
    text = text.strip()
    if not text or "/" in text or "@" in text or any(c.isspace() for c in text):
        return False
    if text.count(":") >= 2 and not text.startswith("["):  # a bare IPv6 address
        try:
            ipaddress.ip_address(text.split("%", 1)[0])
        except ValueError:
            return False
        return True
    try:
        parts = urlsplit("//" + text)
        parts.port  # noqa: B018 - raises ValueError for a port that is not 0-65535
    except ValueError:
        return False
    return bool(parts.hostname)


def resolve_host(host: str, port: int | None = None) -> set[str]:
    """The IP addresses ``host`` stands for (a name resolves to several; an unknown one to none)."""
    try:
        return {str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
    except OSError:
        return set()
