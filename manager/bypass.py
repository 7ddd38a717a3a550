"""Detecting agents that talk to the model server directly, around the proxy (their calls are not captured).

Each scan reads the kernel's TCP tables once (sock_diag, else /proc/net/tcp and tcp6), keeps the sockets
connected to the model server's address, and looks for them among the agents' own processes' file
descriptors. The proxy's own upstream connections go to the same address but belong to no agent. Scans
sample: a direct connection opened and closed between two scans is not seen.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from rollouttap.addon import sockdiag  # pure netlink code, no mitmproxy
from rollouttap.addon.loopback import resolve_host

log = logging.getLogger(__name__)

Address = tuple[str, int]

# Kernel TCP states that hold a live connection a process owns (TIME_WAIT sockets have no owner).
TCP_STATES = {"01": "ESTABLISHED", "02": "SYN_SENT", "08": "CLOSE_WAIT"}
_STATE_NAMES = {int(code, 16): name for code, name in TCP_STATES.items()}


@dataclass(frozen=True)
class TcpSocket:
    local: Address
    remote: Address
    state: str
    inode: int


@dataclass(frozen=True)
class BypassConnection:
    """A direct TCP connection from one of an agent's processes to the model server."""
    pid: int
    local: Address
    remote: Address
    state: str
    seen_at: float

    def to_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "local": f"{self.local[0]}:{self.local[1]}",
                "remote": f"{self.remote[0]}:{self.remote[1]}", "state": self.state,
                "seen_at": self.seen_at}


@functools.lru_cache(maxsize=4096)  # every tick meets the same few addresses on every socket of the host
def normalise_ip(ip: str) -> str:
    """Canonical text of an address; IPv4-mapped IPv6 becomes plain IPv4."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return str(addr)


def parse_hex_address(text: str) -> Address:
    """``0100007F:1F90`` -> ("127.0.0.1", 8080); IPv6 is four host-order 32-bit words."""
    host, _, port = text.partition(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        packed = raw[::-1]
    else:
        packed = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    family = socket.AF_INET if len(packed) == 4 else socket.AF_INET6
    return normalise_ip(socket.inet_ntop(family, packed)), int(port, 16)


def parse_tcp_table(text: str) -> list[TcpSocket]:
    """Sockets in live states from the text of /proc/net/tcp or /proc/net/tcp6."""
    sockets = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or fields[3] not in TCP_STATES:
            continue
        sockets.append(TcpSocket(parse_hex_address(fields[1]), parse_hex_address(fields[2]),
                                 TCP_STATES[fields[3]], int(fields[9])))
    return sockets


def read_tcp_sockets(proc: str = "/proc", *, sock_diag: bool = True) -> list[TcpSocket]:
    """This namespace's TCP sockets in live states: from sock_diag where it answers, else /proc/net/tcp*."""
    if sock_diag and proc == "/proc":  # netlink answers for this namespace, what /proc/net describes
        try:
            return [TcpSocket((normalise_ip(s.local[0]), s.local[1]), (normalise_ip(s.remote[0]), s.remote[1]),
                              _STATE_NAMES[s.state], s.inode) for s in sockdiag.tcp_sockets(_STATE_NAMES)]
        except OSError as exc:  # no netlink here (a sandbox may forbid it): the text tables say the same
            log.debug("sock_diag unavailable (%s); reading /proc/net/tcp", exc)
    sockets: list[TcpSocket] = []
    for name in ("tcp", "tcp6"):
        try:
            with open(f"{proc}/net/{name}", encoding="ascii") as fh:
                sockets.extend(parse_tcp_table(fh.read()))
        except OSError:
            continue
    return sockets


def model_targets(url: str) -> frozenset[Address]:
    """Every (ip, port) the model server's URL resolves to."""
    parts = urlsplit(url)
    if not parts.hostname:
        return frozenset()
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return frozenset((normalise_ip(ip), port) for ip in resolve_host(parts.hostname, port))


def sockets_to(targets: frozenset[Address], sockets: Iterable[TcpSocket]) -> dict[int, TcpSocket]:
    """Sockets (by inode) whose remote end is one of the targets."""
    return {s.inode: s for s in sockets if s.remote in targets and s.inode}


def socket_inodes(pid: int, proc: str = "/proc") -> set[int]:
    """Inodes of the sockets a process holds open."""
    fd_dir = f"{proc}/{pid}/fd"
    found: set[int] = set()
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return found
    for name in names:
        try:
            link = os.readlink(f"{fd_dir}/{name}")
        except OSError:
            continue
        if link.startswith("socket:["):
            found.add(int(link[8:-1]))
    return found


class BypassDetector:
    """Scans agents' processes for direct connections to the model server."""

    def __init__(self, targets: frozenset[Address], proc: str = "/proc") -> None:
        self.targets = targets
        self.proc = proc

    def scan(self, pids_by_agent: Mapping[str, Iterable[int]]) -> dict[str, list[BypassConnection]]:
        """Direct connections found now, by agent; agents without any are left out."""
        if not self.targets or not pids_by_agent:
            return {}
        direct = sockets_to(self.targets, read_tcp_sockets(self.proc))
        if not direct:
            return {}
        now = time.time()
        found: dict[str, list[BypassConnection]] = {}
        for agent_id, pids in pids_by_agent.items():
            for pid in pids:
                for inode in socket_inodes(pid, self.proc) & direct.keys():
                    sock = direct[inode]
                    found.setdefault(agent_id, []).append(
                        BypassConnection(pid, sock.local, sock.remote, sock.state, now))
        return found


def merge(seen: list[BypassConnection], new: Iterable[BypassConnection]) -> None:
    """Add connections not seen before (one per pid and local address), in place."""
    keys = {(c.pid, c.local) for c in seen}
    for conn in new:
        if (conn.pid, conn.local) not in keys:
            keys.add((conn.pid, conn.local))
            seen.append(conn)
