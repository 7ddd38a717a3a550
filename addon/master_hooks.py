"""What the rollouttap addon does to mitmproxy's master and listeners, apart from flows: exit with the addon's
status after every done hook (an orphan's empty log removed), answer store nudges on the event loop, keep
listeners on loopback, stop with the parent process, and describe the listeners for the store's proxy row.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import psutil
from mitmproxy import ctx
from mitmproxy.proxy.mode_specs import ReverseMode

from rollouttap.addon.loopback import is_loopback, url_host
from rollouttap.store.nudge import NUDGE_SIGNAL

log = logging.getLogger(__name__)


def exit_after_done(master: Any, tap: Any) -> None:
    """Make mitmdump exit with ``tap.exit_status`` after its done hooks: raised in our hook, it would skip the
    hooks of the addons after us (a HAR dump, a flow file still to be closed)."""
    if getattr(master, "_rollouttap_exit_after_done", False):  # running again (a script reload): wrapped once
        return
    done = master.done

    async def done_then_exit() -> None:
        await done()
        if tap.parent_gone:
            discard_if_empty(ctx.options.rollouttap_log_file)
        if tap.exit_status:
            raise SystemExit(tap.exit_status)
    master.done = done_then_exit
    master._rollouttap_exit_after_done = True


def discard_if_empty(path: str, fd: int = 1) -> bool:
    """Remove ``path`` if it is the file ``fd`` (our output) writes to and nothing was written: the log of a
    proxy whose parent is gone, as the parent's ``ProxyProcess.stop`` would have. True if removed."""
    if not path:
        return False
    for stream in (sys.stdout, sys.stderr):  # a log line may still wait in a buffer (stdout is a file)
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    try:
        ours = os.fstat(fd)
        if not os.path.samestat(ours, os.stat(path)) or ours.st_size:
            return False  # a file we do not write to (set by hand), or one with something in it to read
        os.unlink(path)
    except OSError as exc:
        log.debug("rollouttap: log %s left: %s", path, exc)
        return False
    return True


def listen_for_nudges(callback: Any) -> None:
    """Answer a reader's NUDGE_SIGNAL on the event loop (``store/nudge.py``); None stops answering."""
    try:
        loop = asyncio.get_running_loop()
        if callback is None:
            loop.remove_signal_handler(NUDGE_SIGNAL)
        else:
            loop.add_signal_handler(NUDGE_SIGNAL, callback)
    except (RuntimeError, ValueError, NotImplementedError) as exc:
        # No loop in the main thread (embedded mitmproxy) or no signals here: readers then wait for the
        # writer's idle watermarks, which only takes longer.
        log.debug("rollouttap: store nudges not handled: %s", exc)


async def rebind_on_loopback() -> None:
    """Bind listeners again on loopback if they listen on every interface (mitmproxy's default host) while
    rollouttap_allow_remote is off.

    ``mitmdump -s addon/entry.py`` binds its listeners before the script's configure() sets listen_host to
    loopback, and mitmproxy re-binds only when ``mode`` changes: they were left open to every host.
    """
    if ctx.options.rollouttap_allow_remote:
        return
    proxyserver = ctx.master.addons.get("proxyserver")

    def wide() -> list[str]:
        return [f"{url_host(host)}:{port}"
                for server in proxyserver.servers for host, port, *_ in server.listen_addrs if not is_loopback(host)]
    if not (found := wide()):
        return
    log.warning("rollouttap: listening on %s: binding on %s instead (rollouttap_allow_remote is off)",
                ", ".join(found), ctx.options.listen_host)
    await proxyserver.servers.update([])
    bound = await proxyserver.setup_servers()
    if not bound or (found := wide()):  # refuse to run open to other hosts (or deaf) rather than go on
        log.error("rollouttap: could not listen on loopback only (%s); shutting down",
                  ", ".join(found) if bound else "binding failed")
        ctx.master.shutdown()


async def shutdown_when_gone(pid: int, interval: float = 1.0, on_gone: Callable[[], None] | None = None) -> None:
    """A proxy whose manager died (killed test run, crashed trainer) must not live on as an orphan."""
    try:
        parent = psutil.Process(pid)
        while parent.is_running() and parent.status() != psutil.STATUS_ZOMBIE:
            await asyncio.sleep(interval)
    except psutil.Error:
        pass
    log.warning("rollouttap: parent process %s is gone; shutting down", pid)
    if on_gone is not None:
        on_gone()
    ctx.master.shutdown()


def _client_transport(flow: Any) -> Any | None:
    """The asyncio transport of an HTTP/1 flow's client connection; None for HTTP/2 and later (the connection
    carries other streams) and in local or WireGuard mode (a stream of mitmproxy_rs)."""
    if not flow.request.http_version.startswith("HTTP/1"):
        return None
    handler = ctx.master.addons.get("proxyserver").connections.get(flow.client_conn.id)
    io = handler.transports.get(flow.client_conn) if handler is not None else None
    return getattr(getattr(io, "writer", None), "transport", None)


def pause_reading(flow: Any) -> None:
    """Read no more from an HTTP/1 flow's client for now (mitmproxy reads a request body on while a hook waits)."""
    if (transport := _client_transport(flow)) is not None and not transport.is_closing():
        transport.pause_reading()


def close_unanswered(flow: Any) -> None:
    """Kill a flow, its HTTP/1 client connection closed at once. mitmproxy 12.2 leaves a connection killed at its
    request headers open and unread while the body is still on its way (the client then waits until the proxy
    exits), and acts on no kill after http_connected; answering instead would mean reading the whole body first."""
    if flow.killable:  # not once already killed (a request refused after it was closed)
        flow.kill()  # HTTP/2: this resets that stream alone
    if (transport := _client_transport(flow)) is not None:
        transport.close()  # what it still has to write (an answer before this request) goes first


async def stop_listening() -> None:
    """Close every listener (connections already open stay open): a client that connects from now on is refused
    by the kernel instead of answered by a proxy that can no longer record it."""
    await ctx.master.addons.get("proxyserver").servers.update([])


def reverse_listeners() -> tuple[tuple[str, int, str, str, int], ...]:
    """(listen host, listen port, target scheme, target host, target port) of each reverse listener."""
    proxyserver = ctx.master.addons.get("proxyserver")
    return tuple((addr[0], addr[1], server.mode.scheme, server.mode.address[0], server.mode.address[1])
                 for server in proxyserver.servers if isinstance(server.mode, ReverseMode)
                 for addr in server.listen_addrs)


def listeners() -> list[dict[str, Any]]:
    """Each listener of this mitmproxy: mode, address and (for reverse mode) its target."""
    proxyserver = ctx.master.addons.get("proxyserver")
    out = []
    for server in proxyserver.servers:
        mode = server.mode
        for addr in server.listen_addrs:
            out.append({"mode": mode.type_name, "host": addr[0], "port": addr[1],
                        "target": getattr(mode, "data", None) or None, "spec": mode.full_spec})
    return out
