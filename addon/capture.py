"""The rollouttap mitmproxy addon: attribute every flow to its agent and record it in the store.

Hooks stay thin: they queue rows for the store's writer thread, and run /proc and SQLite lookups in a
small thread pool, so mitmproxy's event loop never waits on disk.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import psutil
from mitmproxy import ctx, exceptions, http
from mitmproxy.connection import Client
from mitmproxy.tls import TlsData
from mitmproxy.websocket import WebSocketData

from rollouttap.addon import capture_options, flowcols, tokenids
from rollouttap.addon.answer_rewrite import sse_finished, stream_rewrite, strip_json_answer
from rollouttap.addon.attribution import Attribution, host_addresses
from rollouttap.addon.flow_attribution import FlowAttribution
from rollouttap.addon.injection import AGENT_BODY_KEY
from rollouttap.addon.loopback import is_any_address
from rollouttap.addon.master_hooks import (
    close_unanswered, exit_after_done, listen_for_nudges, listeners, pause_reading, rebind_on_loopback,
    reverse_listeners, shutdown_when_gone, stop_listening,
)
from rollouttap.addon.routes import Route, find_route, own_reverse_routes
from rollouttap.addon.streamtap import StreamTap
from rollouttap.addon.websocket_log import ABNORMAL_CLOSURE, frames_jsonl
from rollouttap.store import StoreWriter
from rollouttap.store.codings import DECODED_BODY_LIMIT
from rollouttap.store.writer import EXIT_UNWRITTEN, HOLD_MARK_S
from rollouttap.errors import StoreError
from rollouttap.throttle import Throttle

log = logging.getLogger(__name__)

# At shutdown, flows in flight get this long to end before they are recorded as cut off; meanwhile mitmproxy
# still serves every connection, and new requests are answered 503.
DRAIN_S = 5.0
# Its listeners closed, requests that came on open connections while the proxy stopped are still being looked up:
# their rows are queued before the store closes, if their lookups end within this long.
LATE_ADMITS_S = 1.0
WRITER_CLOSE_S = 20.0  # then what the writer has not committed is reported lost (ProxyProcess.stop waits longer)
# Past the backlog limit by this much, refusals are no longer recorded either (a 503's row is ~1 KB): an outage
# of hours must not grow memory through them.
REFUSAL_ROWS_SLACK = 64 << 20


@dataclass
class _Live:
    """What the addon tracks of a flow between its request headers and its end."""
    conn_id: str
    tap: StreamTap | None = None
    request_tap: StreamTap | None = None  # a body sent upstream as it arrives (not a model request's)
    request_length: int | None = None  # that body's Content-Length (None: chunked)
    injection: tokenids.Injection | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    # Response columns held back until the flow ends (non-streamed: the end follows at once).
    pending: dict[str, Any] = field(default_factory=dict)
    opened_key: tuple[Any, ...] | None = None  # flowcols.request_key when the row was opened
    refused: Attribution | None = None  # answered 407 once its body is in (kept like any other)
    model: bool = False  # a request to a model host's API: its answer is kept whole, whatever its size
    websocket: WebSocketData | None = None  # an upgraded connection's frames, relayed until websocket_end


class RolloutTap:
    def __init__(self) -> None:
        self.writer: StoreWriter | None = None
        self.proxy_id = ""
        self.routes: tuple[Route, ...] = ()
        self.own_routes: tuple[Route, ...] = ()  # from our reverse listeners on to their targets
        self.model_hosts: frozenset[str] = frozenset()
        self.counts = {"flows": 0, "unattributed": 0, "rejected": 0, "errors": 0}
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="rollouttap-lookup")
        self._scan_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollouttap-scan")
        self.who = FlowAttribution(self._pool, self._scan_pool)
        self._live: dict[str, _Live] = {}
        self._tunnel_rows: dict[str, str] = {}  # client connection id -> the row of the CONNECT that opened it
        self._parent_watch: asyncio.Task[None] | None = None
        self._running = False
        self.drain_s = DRAIN_S
        # The process's exit status, once mitmproxy's done hooks have all run (master_hooks.exit_after_done).
        self.exit_status = 0
        self._stopping = False  # shutting down: new requests are refused, flows in flight may still end
        self._store_closed = False  # shut down: the writer takes no more rows
        self._drained = False  # the drain is over: every request from now on is refused
        self._retired: set[str] = set()  # flows still live when the drain ended, ended in the store as cut off
        self._late_admits = 0  # requests that came after the stop signal, still being looked up
        self._attributing = 0  # requests between their first hook and their row: the drain waits for them too
        self._arrivals: dict[int, float] = {}  # those requests' arrival times (see StoreWriter.unqueued_since)
        self._arrival_seq = 0
        self._refusals_said = Throttle(5.0)  # one log line per burst of 503s
        self._unanswered_said = Throttle(5.0)
        self.parent_gone = False  # the process that started the proxy ended first

    # -- options -----------------------------------------------------------------------------------
    def load(self, loader: Any) -> None:
        capture_options.declare(loader)

    def configure(self, updated: set[str]) -> None:
        opts = ctx.options
        capture_options.check(opts, updated)
        if "rollouttap_store" in updated or self.writer is None:
            self._open_store(opts.rollouttap_store)
        assert self.writer is not None
        self.writer.max_backlog_bytes = opts.rollouttap_store_backlog_mb << 20
        if "rollouttap_routes" in updated or "rollouttap_model_hosts" in updated:
            self.routes, self.model_hosts = capture_options.routes_and_model_hosts(opts)
        if {"listen_host", "rollouttap_allow_remote", "mode"} & updated:
            capture_options.loopback_only(opts)
        if "rollouttap_proxy_id" in updated or not self.proxy_id:
            self.proxy_id = opts.rollouttap_proxy_id or uuid.uuid4().hex
        if self.routes and opts.connection_strategy != "lazy":
            # A routed host may not exist (no network): never connect upstream before the request.
            opts.update(connection_strategy="lazy")

    def _open_store(self, path: str) -> None:
        if not path:
            raise exceptions.OptionsError(
                "rollouttap_store is not set: pass --set rollouttap_store=PATH/runs.db")
        if self.writer is not None:
            self._retire("the proxy switched to another store before the flow ended")
            self.writer.close()
        try:
            self.writer = StoreWriter(path)
            self.who.open(path)
        except StoreError as exc:
            raise exceptions.OptionsError(str(exc)) from exc
        self.writer.unqueued_since = next(iter(self._arrivals.values()), None)  # their rows go to this one
        if self._running:  # changed at run time: the new store learns of this proxy as a started one does
            self._announce()

    # -- lifecycle ---------------------------------------------------------------------------------
    async def running(self) -> None:
        exit_after_done(ctx.master, self)
        await rebind_on_loopback()  # before the proxy row: readers must never see a wide listener
        listen_for_nudges(self._nudge)  # before the proxy row: readers nudge only proxies they see
        servers = ctx.master.addons.get("proxyserver").servers
        servers.changed.connect(self._listeners_changed)  # fired once servers (re)started, ports bound
        self._listeners_changed()
        self._running = True
        self._announce()
        log.info("rollouttap: recording into %s as proxy %s", ctx.options.rollouttap_store,
                 self.proxy_id)
        if ctx.options.rollouttap_parent_pid:
            self._parent_watch = asyncio.create_task(
                shutdown_when_gone(ctx.options.rollouttap_parent_pid, on_gone=self._orphaned))

    def _listeners_changed(self) -> None:
        listeners = reverse_listeners()
        on_every_address = any(is_any_address(listener[0]) for listener in listeners)
        self.own_routes = own_reverse_routes(listeners, host_addresses() if on_every_address else ())

    def _announce(self) -> None:
        """This proxy's row in the store (readers find its pid and listeners there); enables the watermark."""
        assert self.writer is not None
        self.writer.proxy_id = self.proxy_id
        self.writer.upsert_proxy({
            "proxy_id": self.proxy_id,
            "pid": os.getpid(),
            "create_time": psutil.Process().create_time(),
            "listen": listeners(),
            "ca_cert": os.path.join(os.path.expanduser(ctx.options.confdir), "mitmproxy-ca-cert.pem"),
            "started_at": time.time(),
            "stopped_at": None,
        })

    async def done(self) -> None:
        writer = self.writer
        if writer is None:
            return
        # mitmproxy serves on while done hooks run: answers already on their way are recorded whole.
        self._stopping = True
        deadline = time.monotonic() + self.drain_s
        # Not for an open WebSocket, which may last hours: its frames so far are kept as the store closes.
        while (self._attributing or any(live.websocket is None for live in self._live.values())) \
                and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self._drained = True  # a lookup that ends later is refused (and recorded), never sent on unrecorded
        listen_for_nudges(None)
        # The store closes next: from then on a request cannot be recorded, so no new connection may come.
        await stop_listening()
        # No connection comes now; requests on those still open (HTTP/1: each 503 closes its connection) that are
        # being looked up get their 503's rows before the store closes, within this deadline.
        deadline = time.monotonic() + LATE_ADMITS_S
        while self._late_admits and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self._retire("proxy shut down before the flow ended", cut=True)
        self._store_closed = True  # set on the loop, before the thread starts: hooks then record nothing more
        await asyncio.to_thread(writer.close, WRITER_CLOSE_S)  # off the loop: it may take a while
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._scan_pool.shutdown(wait=False, cancel_futures=True)
        log.info("rollouttap: %s", self.counts)
        if writer.unwritten:  # whoever started the proxy must learn of it: the exit status, once every hook ran
            log.error("rollouttap: %d store events were never written to %s", writer.unwritten, writer.path)
            self.exit_status = EXIT_UNWRITTEN

    def _orphaned(self) -> None:
        self.parent_gone = True

    def _retire(self, reason: str, *, cut: bool = False) -> None:
        """End the flows in flight and mark this proxy stopped in the store (the caller closes the writer)."""
        writer = self.writer
        assert writer is not None
        for flow_id, live in list(self._live.items()):
            finished = live.tap is not None and sse_finished(live.tap.plain_tail)  # its row will say done
            self._abort(flow_id, live, reason)  # a stream keeps what had arrived from upstream
            if finished or not cut:  # a store switched at run time: the flow goes on, recorded in part
                continue
            # Its row says it was cut off: so it is, for its client too (nothing more is forwarded, see _kill_retired).
            self._retired.add(flow_id)
            # Not an upload's tap: mitmproxy would still end the request upstream, short (its answer is killed).
            if live.tap is not None and live.tap.failed is None:
                live.tap.failed = reason
        if writer.proxy_id is not None:  # a row exists only once the proxy has run
            writer.upsert_proxy({"proxy_id": writer.proxy_id, "pid": os.getpid(),
                                 "started_at": time.time(), "stopped_at": time.time()})

    def _nudge(self) -> None:
        if self.writer is not None:  # the writer in use now: a new store path replaces it
            self.writer.nudge()

    # -- connections -------------------------------------------------------------------------------
    def client_connected(self, client: Client) -> None:
        if ctx.options.rollouttap_pid_lookup == "eager" and not self._stopping:
            # Start now, while the client surely still runs; the request usually arrives after it.
            self.who.start_pid_lookup(client)

    def client_disconnected(self, client: Client) -> None:
        self.who.connection_closed(client)
        self._tunnel_rows.pop(client.id, None)
        for flow_id, live in list(self._live.items()):
            if live.conn_id == client.id:
                self._abort(flow_id, live, "client disconnected before the response completed")

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        if (who := await self._admit(flow)) is None:
            return
        self._record_new(flow, who)
        if who.method == "rejected":
            self._reject(flow, who)
            return
        if flow.client_conn.timestamp_end is not None:  # gone while it was looked up: no hook ends it now
            self._end(flow.id, "error", {"error": "client disconnected before the tunnel opened"})
            flow.kill()  # nor is the server connected for it (connection_strategy=eager)
            return
        self.who.tunnel_opened(flow.client_conn.id, who)
        # Ended by http_connected, or http_connect_error: with connection_strategy=eager (stock mitmdump's),
        # mitmproxy connects to the server first, and answers 502 if it cannot.

    def http_connected(self, flow: http.HTTPFlow) -> None:
        if flow.id in self._retired:  # mitmproxy checks no kill here: its 200 must not reach the client
            self._retired.discard(flow.id)
            close_unanswered(flow)
            return
        if flow.id in self._live:
            self._tunnel_rows[flow.client_conn.id] = flow.id
            self._end(flow.id, "done", {"status_code": flow.response.status_code if flow.response else 200})

    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        if flow.id not in self._live:  # refused by us (407, 503): ended then
            return
        resp = flow.response
        error = flow.error.msg if flow.error else (
            f"the tunnel was not opened: {resp.status_code} {resp.reason}" if resp else "the tunnel was not opened")
        self._end(flow.id, "error", {"status_code": resp.status_code if resp else None,
                                     "response_body": resp.raw_content if resp else None, "error": error})

    def tls_failed_client(self, data: TlsData) -> None:
        """The agent's TLS handshake inside a tunnel failed (it does not trust the proxy's CA, say): nothing of
        the tunnel reaches the store after its CONNECT, whose row says so."""
        flow_id = self._tunnel_rows.pop(data.context.client.id, None)
        if flow_id is not None and not self._store_closed:
            self.counts["errors"] += 1
            self._update(flow_id, {"state": "error",
                                   "error": f"the TLS handshake with the client failed: {data.conn.error}"})

    # -- flows -------------------------------------------------------------------------------------
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        req = flow.request
        flowcols.bracket_ipv6_host(req)  # reverse mode to an IPv6 target: as the upstream and the store should see it
        own = find_route(self.own_routes, req.host, req.port) if self.own_routes else None
        # mitmproxy reads a held body whole before any answer can go out, and reads on while the sender is looked
        # up: one too large to hold is not read further meanwhile (a request to our reverse listener is readdressed
        # first, below, and judged then).
        streamed = own is None and self._streamed(req)
        if own is None and not streamed and (too_large := self._held_too_large(req)):
            await self._close_too_large(flow, too_large)
            return
        if (who := await self._admit(flow, to_own_reverse=own is not None)) is None:
            return
        # Served as our reverse listener serves it (mitmproxy will not connect to its own listener).
        self._record_new(flow, who, routed_from=readdress(req, own) if own is not None else None)
        if own is not None:
            streamed = self._streamed(req)
        # Not judged above: readdressed, or a streamed one refused 407 (answered once its body is in: held after all).
        unjudged = own is not None or streamed
        if unjudged and (who.method == "rejected" or not streamed) and (too_large := self._held_too_large(req)):
            self._end(flow.id, "error", {"error": too_large, "t_end": time.time()})
            close_unanswered(flow)
            return
        if who.method == "rejected":  # answered once its body is in, so that the body is kept
            self._live[flow.id].refused = who
        elif streamed:
            live = self._live[flow.id]
            length = req.headers.get("content-length", "")
            live.request_tap = StreamTap(keep=ctx.options.rollouttap_body_keep_mb << 20)
            live.request_length = int(length) if length.isdigit() else None
            req.stream = live.request_tap

    async def _close_too_large(self, flow: http.HTTPFlow, too_large: str) -> None:
        """Record a request whose body is too large to hold, as its sender's, and close its connection unanswered
        (never a 503 as well); reading stops while the sender is looked up (its socket is what names it)."""
        pause_reading(flow)
        try:
            who, _ = await self._looked_up(flow, to_own_reverse=False)
            writer = self.writer
            if self._store_closed or writer is None or not writer.can_hold(REFUSAL_ROWS_SLACK):
                if self._refusals_said.due():
                    log.error("rollouttap: %s; the store takes no rows now, so it was not recorded", too_large)
                return
            self._record_new(flow, who)
            self._end(flow.id, "error", {"error": too_large, "t_end": time.time()})
        finally:
            close_unanswered(flow)

    @staticmethod
    def _held_too_large(req: http.Request) -> str | None:
        return held_too_large(req.headers.get("content-length", ""), ctx.options.rollouttap_held_body_max_mb)

    def _streamed(self, req: http.Request) -> bool:
        """Whether the request's body goes upstream as it arrives, the store keeping its first part: an upload
        larger than rollouttap_body_keep_mb (or of unknown size) to a host that is not a model host. Any other
        body is held whole until it is in: a body streamed to a server that cannot be reached is never read, so
        never kept."""
        keep = ctx.options.rollouttap_body_keep_mb << 20
        length = req.headers.get("content-length", "")
        if not keep or not may_have_body(req) or (length.isdigit() and int(length) <= keep):
            return False
        # A model API path (any host: conversations read those calls) is kept whole; a route readdresses the
        # request in the request hook, too late for a body already on its way.
        return tokenids.endpoint_for_path(req.path) is None and \
            not (self.routes and find_route(self.routes, req.pretty_host, req.port) is not None)

    async def _admit(self, flow: http.HTTPFlow, to_own_reverse: bool = False) -> Attribution | None:
        """Who sent the flow, or None when it was answered 503 instead (recorded as that agent's call, so that its
        views and replay have it)."""
        if self._store_closed:
            self._refuse(flow, "the proxy is shutting down")
            return None
        who, late = await self._looked_up(flow, to_own_reverse)
        if (why := self._refusal(late)) is not None:
            self._refuse(flow, why, who)
            return None
        return who

    async def _looked_up(self, flow: http.HTTPFlow, to_own_reverse: bool) -> tuple[Attribution, bool]:
        """Who sent the flow, and whether it came after the stop signal (then refused, and not waited for by the
        drain, but by the store's closing: see done())."""
        late = self._stopping
        self._late_admits += late
        try:
            return await self._attribute(flow, to_own_reverse=to_own_reverse, counted=not late), late
        finally:
            self._late_admits -= late  # its row is queued before this hook next yields

    def _refusal(self, late: bool) -> str | None:
        """Why a new request is answered 503 now, if it is (``late``: it arrived while the proxy shut down)."""
        writer = self.writer
        if late or self._drained or writer is None or self._store_closed:  # it could no longer be recorded whole
            return "the proxy is shutting down"
        if writer.detached:  # what it records now is lost: say so to every agent, not only in the log
            return writer.detached
        if writer.overloaded:  # memory is all that holds unwritten flows: do not take on more
            cause = f" ({writer.failing})" if writer.failing else ""
            return (f"the store is not taking rows fast enough{cause}: {writer.backlog_bytes >> 20} MiB wait in "
                    "memory, over rollouttap_store_backlog_mb")
        return None

    async def _attribute(self, flow: http.HTTPFlow, to_own_reverse: bool = False, counted: bool = True) -> Attribution:
        """``who.attribute``, counted (unless it arrived after the stop signal) for the shutdown drain to wait on.
        While it runs the store's watermark stays below the request's arrival: a reader waiting for "everything
        before my agent ended" must not read before the row of a request its agent sent just before it ended."""
        self._attributing += counted
        key = self._arrival_seq = self._arrival_seq + 1
        self._arrivals[key] = time.time()
        if self.writer is not None and self.writer.unqueued_since is None:
            self.writer.unqueued_since = self._arrivals[key]
        # Held a second at most, each on its own: a lookup queued behind hundreds must not hold every reader, nor
        # let go of the requests that came after it.
        release = asyncio.get_running_loop().call_later(HOLD_MARK_S, self._arrived, key)
        try:
            return await self.who.attribute(flow, to_own_reverse=to_own_reverse)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # the hook itself is cancelled
                raise
            # Its lookup was cancelled with the pool at shutdown: the request is refused (see _refusal).
            return Attribution(None, "none", None, "lookup cancelled: the proxy is shutting down")
        finally:
            self._attributing -= counted
            # Once the hook has queued the row (it does so before it next yields): then the mark may pass it.
            release.cancel()
            asyncio.get_running_loop().call_soon(self._arrived, key)

    def _arrived(self, key: int) -> None:
        self._arrivals.pop(key, None)
        if self.writer is not None:
            self.writer.unqueued_since = next(iter(self._arrivals.values()), None)  # the oldest: first in

    def request(self, flow: http.HTTPFlow) -> None:
        live = self._live.get(flow.id)
        if live is None:
            self._kill_retired(flow)
            return
        if flow.response is not None:
            return
        if live.refused is not None:
            self._update(flow.id, flowcols.request_sent(flow, live.opened_key))
            self._reject(flow, live.refused)
            return
        route = find_route(self.routes, flow.request.pretty_host, flow.request.port) if self.routes else None
        if route is not None:
            live.meta.setdefault("routed_from", readdress(flow.request, route))
        cols = flowcols.request_sent(flow, live.opened_key)
        # Sent upstream as it came (an upload): what the tap kept. Unless a later addon took the stream back (replay).
        if live.request_tap is not None and flow.request.stream is live.request_tap:
            cols["request_body"] = self._tapped_request(live, ended=True)
        live.request_tap = None  # recorded: an error from now on concerns the response
        live.model = tokenids.is_model_request(flow.request.host, flow.request.port, flow.request.path,
                                               self.model_hosts, method=flow.request.method)
        if ctx.options.rollouttap_token_ids and live.model:
            injection = tokenids.plan_injection(
                flow.request.path, flow.request.raw_content or b"",
                flow.request.headers.get("content-type"),
                content_encoding=flow.request.headers.get("content-encoding"),
                logprobs=ctx.options.rollouttap_logprobs)
            if injection is not None:
                live.injection = injection
                live.meta["injected"] = injection.added
                if _replaying():  # the replay matches what the agent sent (identity-coded: raw is it)
                    flow.metadata[AGENT_BODY_KEY] = flow.request.raw_content
                flow.request.content = injection.new_body
                # Stripping works on plain bytes: ask the model server not to compress its answer (no
                # header at all would allow any coding, RFC 9110 12.5.3).
                flow.request.headers["accept-encoding"] = "identity"
        cols["meta"] = dict(live.meta)
        self._update(flow.id, cols)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        live = self._live.get(flow.id)
        if live is None:
            self._kill_retired(flow)
            return
        if flow.response is None:
            return
        ctype = flow.response.headers.get("content-type", "")
        streamed = ctype[:17].lower() == "text/event-stream"
        keep = self._answer_keep(live)
        if streamed:
            cols = flowcols.response_started(flow, streamed)  # as the server sent them: the body kept is its bytes
            live.tap = StreamTap(stream_rewrite(flow.response, live.injection, live.meta), keep)
            flow.response.stream = live.tap
            # A stream may run for minutes: readers see its status and headers while it does.
            self._update(flow.id, cols)
            return
        live.pending = flowcols.response_started(flow, streamed)
        if keep is not None and flow.response.status_code != 101:  # 101: a websocket or other upgrade follows
            live.tap = StreamTap(keep=keep)
            flow.response.stream = live.tap

    def response(self, flow: http.HTTPFlow) -> None:
        live = self._live.get(flow.id)
        if live is None:
            self._kill_retired(flow)
            return
        if flow.response is None:
            return
        resp = flow.response
        if flow.websocket is not None:  # its frames follow: the row stays open until websocket_end keeps them
            live.websocket = flow.websocket
            self._update(flow.id, {**live.pending, "t_first_byte": resp.timestamp_start})
            return
        if live.tap is not None and live.tap.failed is not None:
            self._cut_stream(flow, live.tap)
            return
        if live.tap is not None and (live.tap.raw or not resp.raw_content):
            body, first = self._tapped(live), live.tap.first_byte_at
            if first is None and live.pending:  # not SSE, and bodiless (204, HEAD): as a buffered answer's
                first = resp.timestamp_start
        else:
            body, first = resp.raw_content or b"", resp.timestamp_start
            if live.injection is not None:
                strip_json_answer(resp, live.injection)
        self._end(flow.id, "done", {"response_body": body, "t_first_byte": first,
                                    "t_end": resp.timestamp_end or time.time(),
                                    "status_code": resp.status_code})

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        if flow.id in self._retired and flow.websocket is not None:  # ended at shutdown: nothing more goes on
            flow.websocket.messages[-1].drop()

    async def websocket_end(self, flow: http.HTTPFlow) -> None:
        """An upgraded connection closed (by either side, or broken: close code 1006, an error): its row ends with
        the messages it relayed, as JSON lines (addon/websocket_log.py), written out off the loop."""
        self._retired.discard(flow.id)
        live = self._live.get(flow.id)
        if live is None or live.websocket is None:
            return
        ws = live.websocket
        cols = await asyncio.to_thread(self._frames, live)  # the messages no longer change: the connection ended
        if ws.close_code == ABNORMAL_CLOSURE:
            cols["error"] = "WebSocket broken off: no close frame (code 1006)"
        self._end(flow.id, "error" if "error" in cols else "done", {**cols, "t_end": ws.timestamp_end or time.time()})

    @staticmethod
    def _answer_keep(live: _Live) -> int | None:
        """How many bytes of the flow's answer the store keeps; None: all of it. Only a model's answers are
        training data: another host's body (a package, a clone) goes to the client live, whatever its size, and
        the store keeps its first rollouttap_body_keep_mb."""
        return None if live.model or not ctx.options.rollouttap_body_keep_mb else \
            ctx.options.rollouttap_body_keep_mb << 20

    @staticmethod
    def _frames(live: _Live) -> dict[str, Any]:
        """The row's columns for the frames an upgraded connection relayed so far (its meta says how many): the
        first rollouttap_body_keep_mb of them (0, or to a model host: the first DECODED_BODY_LIMIT)."""
        ws = live.websocket
        assert ws is not None
        body, kept = frames_jsonl(ws.messages, RolloutTap._answer_keep(live) or DECODED_BODY_LIMIT)
        live.meta["websocket"] = {**kept, "closed_by_client": ws.closed_by_client, "close_code": ws.close_code}
        return {"response_body": body}

    @staticmethod
    def _tapped(live: _Live) -> bytes:
        """The response body its tap kept (see ``_kept``)."""
        assert live.tap is not None
        return _kept(live.tap, live.meta, "body_cut")

    @staticmethod
    def _tapped_request(live: _Live, *, ended: bool) -> bytes:
        """A streamed request body as kept (see ``_kept``), or the first part of one that never ``ended``
        (answered or broken off first; ``size`` is then the announced one, None for chunks)."""
        tap = live.request_tap
        assert tap is not None
        if ended:
            return _kept(tap, live.meta, "request_body_cut")
        size = max(live.request_length, tap.size) if live.request_length is not None else None
        live.meta["request_body_cut"] = {"size": size, "kept": len(tap.raw), "ended": False}
        return bytes(tap.raw)

    def _cut_stream(self, flow: http.HTTPFlow, tap: StreamTap) -> None:
        """A stream the agent could not be given whole: close its connection before the end of the message (the
        client sees a broken answer, not a short one), and keep what the server sent."""
        error = f"the proxy could not rewrite this stream for the client ({tap.failed}); its connection was closed"
        log.error("rollouttap: %s %s: %s", flow.request.method, flowcols.stored_target(flow.request.pretty_url), error)
        flow.kill()
        assert flow.response is not None
        self._live[flow.id].meta["rewrite_failed"] = tap.failed  # readers: the agent never got this answer whole
        self._end(flow.id, "error", {"response_body": bytes(tap.raw), "t_first_byte": tap.first_byte_at,
                                     "t_end": time.time(), "status_code": flow.response.status_code,
                                     "error": error})

    def _kill_retired(self, flow: http.HTTPFlow) -> None:
        """A flow retired at shutdown goes no further (mitmproxy checks for a kill after each of these hooks): its
        client must not get an answer its row says it never got."""
        if flow.id in self._retired:
            self._retired.discard(flow.id)
            if flow.killable:
                flow.kill()

    def error(self, flow: http.HTTPFlow) -> None:
        live = self._live.get(flow.id)
        if live is not None:
            self._abort(flow.id, live, flow.error.msg if flow.error else "unknown error")
        else:
            self._retired.discard(flow.id)

    def _abort(self, flow_id: str, live: _Live, reason: str) -> None:
        """End a flow that broke off, keeping what arrived; a stream that already sent its final
        ``[DONE]`` is complete (clients close as soon as they read it, often before the upstream's
        end of message reaches the proxy)."""
        cols: dict[str, Any] = {"error": reason}
        if live.request_tap is not None:  # an upload broken off: keep what came of it
            cols["request_body"] = self._tapped_request(live, ended=False)
        if live.websocket is not None:  # the proxy stops with the connection open: what it relayed is kept
            self._end(flow_id, "error", {**cols, **self._frames(live)})
            return
        if live.tap is None:
            self._end(flow_id, "error", cols)
            return
        cols.update(response_body=self._tapped(live), t_first_byte=live.tap.first_byte_at)
        if sse_finished(live.tap.plain_tail):  # decoded, where the server compressed it
            live.meta["closed_after_done"] = reason
            del cols["error"]
            self._end(flow_id, "done", cols)
        else:
            self._end(flow_id, "error", cols)

    def _reject(self, flow: http.HTTPFlow, who: Attribution) -> None:
        """Refuse a flow with a 407 (503 when it may be retried) and record why."""
        self.counts["rejected"] += 1
        if who.retry:
            error = f"refused for now: {who.detail}"
            self._answer(flow, 503, error, {"Retry-After": "1", "Connection": "close"}, error)
            return
        error = f"proxy credentials refused: {who.detail}"
        self._answer(flow, 407, f"proxy credentials refused ({who.detail})",
                     {"Proxy-Authenticate": 'Basic realm="rollouttap"'}, error)

    def _answer(self, flow: http.HTTPFlow, status: int, text: str, headers: dict[str, str], error: str) -> None:
        """Answer the flow here, never upstream, and end its row with that answer."""
        flow.response = http.Response.make(status, f"rollouttap: {text}\n", {"Content-Type": "text/plain", **headers})
        self._end(flow.id, "error", {**flowcols.response_started(flow, streamed=False),
                                     "response_body": flow.response.raw_content, "t_end": time.time(),
                                     "error": error})

    def _refuse(self, flow: http.HTTPFlow, why: str, who: Attribution | None = None) -> None:
        """Answer 503 without sending the request on, recorded (as ``who``'s) while the store still takes rows."""
        if self._store_closed:
            # Nothing can record it now, so nothing answers it: the client sees its connection close, as from a
            # proxy that is gone, never a 503 the store lacks.
            if self._unanswered_said.due():  # an error, kept by mitmdump -q: a request reached the proxy unrecorded
                log.error("rollouttap: a request came after the store closed: closed its connection unanswered")
            close_unanswered(flow)
            return
        if self._refusals_said.due():
            # An error, so that mitmdump -q (as the manager starts it) keeps it in its log, unless shutting down.
            log.log(logging.WARNING if self._stopping else logging.ERROR, "rollouttap: %s: answering 503", why)
        writer = self.writer
        # Past the slack not even a refusal's row is kept (memory must stay bounded; the log says why).
        if writer is not None and not self._store_closed and writer.can_hold(REFUSAL_ROWS_SLACK):
            self._record_new(flow, who or Attribution(None, "none", None, why))
        self._answer(flow, 503, why, {"Connection": "close"}, f"{why}: not sent upstream")  # ends the row, if any

    # -- store -------------------------------------------------------------------------------------
    def _record_new(self, flow: http.HTTPFlow, who: Attribution, routed_from: str | None = None) -> None:
        assert self.writer is not None
        self.counts["flows"] += 1
        if who.agent_id is None:
            self.counts["unattributed"] += 1
        live = _Live(flow.client_conn.id, opened_key=flowcols.request_key(flow.request))
        if who.detail:
            live.meta["attribution_detail"] = who.detail
        if flow.request.http_version != "HTTP/1.1":  # the client's (HTTP/2 over TLS, HTTP/1.0): for exports
            live.meta["http_version"] = flow.request.http_version
        if routed_from is not None:
            live.meta["routed_from"] = routed_from
        self._live[flow.id] = live
        cols = flowcols.opened(flow, self.proxy_id, who)
        cols["meta"] = dict(live.meta)
        self.writer.insert_flow(cols)

    def _update(self, flow_id: str, cols: dict[str, Any]) -> None:
        assert self.writer is not None
        self.writer.update_flow(flow_id, cols)

    def _end(self, flow_id: str, state: str, cols: dict[str, Any]) -> None:
        """Close a flow exactly once; later hooks for it find nothing to do."""
        live = self._live.pop(flow_id, None)
        if live is None:
            return
        if state == "error":
            self.counts["errors"] += 1
        else:  # a reader that gave up on the flow may have ended it as an error meanwhile (settle_flows)
            cols.setdefault("error", None)
        if live.request_tap is not None and "request_body" not in cols:
            # Answered before its upload ended (a 413, a 403): the request hook comes after this end.
            cols["request_body"] = self._tapped_request(live, ended=False)
        cols = {**live.pending, **cols, "state": state}
        cols.setdefault("t_end", time.time())
        if live.meta:
            cols["meta"] = dict(live.meta)
        self._update(flow_id, cols)


def held_too_large(content_length: str, limit_mb: int) -> str | None:
    """Why a body of ``content_length`` bytes (the header's value) is too large to hold, if it is."""
    if not limit_mb or not content_length.isdigit() or int(content_length) <= limit_mb << 20:
        return None
    return (f"a request body of {int(content_length)} bytes, over rollouttap_held_body_max_mb ({limit_mb} MiB) of one "
            "the proxy holds whole before sending it on: not read, its connection closed")


def _replaying() -> bool:
    """Whether the replay addon runs after this one (it reads the body the agent sent: kept for it alone)."""
    return "rollouttap_replay_store" in ctx.options and bool(ctx.options.rollouttap_replay_store)


def _kept(tap: StreamTap, meta: dict[str, Any], key: str) -> bytes:
    """The body ``tap`` kept; where it kept only the first part, ``meta[key]`` says how much came."""
    if tap.size > len(tap.raw):
        meta[key] = {"size": tap.size, "kept": len(tap.raw)}
    return bytes(tap.raw)


def may_have_body(req: http.Request) -> bool:
    """Whether a request's headers announce a body (a length above 0, or chunks)."""
    length = req.headers.get("content-length", "0")
    return "chunked" in req.headers.get("transfer-encoding", "").lower() or not (length.isdigit() and int(length) == 0)


def readdress(req: http.Request, route: Route) -> str:
    """Send a request where ``route`` says; the URL it was addressed to (query secrets redacted)."""
    was = flowcols.stored_target(flowcols.pretty_where(req)[0])
    req.scheme, req.host, req.port, req.path = route.target(req.path)
    flowcols.bracket_ipv6_host(req)  # mitmproxy's host setter writes an IPv6 Host header without brackets
    return was
