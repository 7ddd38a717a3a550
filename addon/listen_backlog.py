"""A longer accept queue for mitmproxy's listening sockets.

Why: mitmproxy listens through ``asyncio.start_server`` with its default backlog of 100. When a few
hundred agents start at once (a GRPO step launches them together) their connects arrive faster than one
event loop accepts them; once 100 wait in the kernel's queue the rest of the SYNs are dropped and each of
those clients retries after 1, then 3 seconds: nothing is lost, but a step waits for its slowest agent.
Calling ``listen()`` again on a listening socket only changes its backlog (Linux caps it at
``net.core.somaxconn``, 4096 by default), so the addon does that once the servers are up, and again after
every server change (mitmproxy restarts listeners when ``listen_port`` or ``mode`` change).

Load with ``mitmdump -s addon/listen_backlog.py`` or add ``ListenBacklog()`` to another script's ``addons``.
"""

# No `from __future__ import annotations`: mitmdump -s loads this file outside sys.modules.
import logging
import os
import socket
from collections.abc import Iterable
from typing import Any

from mitmproxy import ctx

log = logging.getLogger(__name__)

DEFAULT_BACKLOG = 4096


def listening_sockets(instances: Iterable[Any]) -> list[Any]:
    """The TCP listening sockets of mitmproxy's server instances (asyncio servers only)."""
    found = []
    for instance in instances:
        # AsyncioServerInstance keeps its asyncio.Server objects here; other kinds (WireGuard, local
        # redirect) have no kernel accept queue of ours to tune.
        for server in getattr(instance, "_servers", None) or ():
            for sock in getattr(server, "sockets", None) or ():
                if sock.type == socket.SOCK_STREAM:
                    found.append(sock)
    return found


def set_backlog(sock: Any, backlog: int) -> None:
    """Re-listen ``sock`` (an asyncio TransportSocket or a socket) with a longer accept queue."""
    # A dup shares the kernel socket: listen() on it changes the original's queue; closing the dup
    # leaves the original open.
    with socket.socket(sock.family, sock.type, sock.proto, fileno=os.dup(sock.fileno())) as twin:
        twin.listen(backlog)


class ListenBacklog:
    """mitmproxy addon: raise the listening sockets' backlog (``rollouttap_listen_backlog``)."""

    def load(self, loader: Any) -> None:
        loader.add_option("rollouttap_listen_backlog", int, DEFAULT_BACKLOG,
                          "Accept queue length of the proxy's listening sockets (mitmproxy's default is "
                          "100; the kernel caps it at net.core.somaxconn). 0 leaves it alone.")

    def running(self) -> None:
        servers = ctx.master.addons.get("proxyserver").servers
        servers.changed.connect(self._servers_changed)  # running() fires once per addon
        self._apply(servers)  # servers may already be up when running() fires

    def _servers_changed(self) -> None:
        self._apply(ctx.master.addons.get("proxyserver").servers)

    def _apply(self, servers: Iterable[Any]) -> None:
        backlog = ctx.options.rollouttap_listen_backlog
        if backlog <= 0:
            return
        done = 0
        for sock in listening_sockets(servers):
            try:
                set_backlog(sock, backlog)
                done += 1
            except OSError as exc:  # an optimisation: the listener works with the old queue
                log.warning("rollouttap: could not raise the listen backlog of %s (%r)", sock, exc)
        if done:
            log.info("rollouttap: listen backlog %d on %d socket(s)", backlog, done)


addons = [ListenBacklog()]
