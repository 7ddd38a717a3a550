"""Replay mode: answer an agent's requests from one agent's recorded flows, in order, never going upstream.

Loaded after the capture addon (``mitmdump -s entry.py -s replay.py``), so the replayed run is recorded like any
run: capture sees each request first (attribution, routes, token-id injection), then this addon answers it from
the recording. Request ``k`` must match recorded request ``k`` by method, path and body (JSON compared as data,
value and type; the body the agent sent, before capture added token-id fields; addon/replay_book.py); requests the recording made concurrently may
arrive in either order. The first request that does not match is the divergence: it and every later request
are answered ``599`` (a status no server sends, so it cannot pass for a recorded answer) with ``x-should-retry: false``.
An answer that broke off when recorded (a stream cut mid-way) is given as far as it came, then its connection
is closed before the end of the message, so the agent meets the same failure again.

What the agent sees is what it saw when recorded: a recorded body still holds the token ids the proxy asked
for, so it is stripped here unless capture injected the same fields again (then capture strips it, as live).
A streamed answer is handed over whole, as SSE; mitmproxy does not stream responses an addon sets, so its
body is fed once through the stream callable capture installed (which records it as it would record a stream).

Options: ``rollouttap_replay_store`` (the recorded store), ``rollouttap_replay_agent`` (whose flows),
``rollouttap_replay_report`` (a JSON file rewritten when ready, at the divergence and at shutdown).
"""

import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable
from typing import Any

from mitmproxy import ctx, exceptions, http

from rollouttap.addon import tokenids
from rollouttap.addon.answer_rewrite import stream_rewrite, strip_json_answer
from rollouttap.addon.flowcols import stored_target
from rollouttap.addon.injection import AGENT_BODY_KEY
from rollouttap.addon.replay_book import Recorded, ReplayBook, capture_injected, recorded_requests
from rollouttap.errors import StoreError
from rollouttap.store import Store, decode_body, header_value, is_redacted

log = logging.getLogger(__name__)

DIVERGED_STATUS = 599
NO_RESPONSE_STATUS = 502
_HOP_HEADERS = frozenset({"transfer-encoding", "content-length", "connection", "keep-alive", "proxy-connection"})


# -- answers ---------------------------------------------------------------------------------------------------

def agent_view(entry: Recorded) -> bytes:
    """The recorded answer's body as the agent received it (see ``as_the_agent_saw``)."""
    resp = http.Response.make(200, b"", _headers(entry.response_headers))
    resp.raw_content = entry.response_body
    as_the_agent_saw(entry, resp)
    return resp.raw_content or b""


REPLAY_READ = 64 << 10  # a recorded stream is fed to capture's rewrite in pieces of this size, as reads came live


def as_the_agent_saw(entry: Recorded, resp: http.Response) -> None:
    """Make ``resp`` (the recorded answer) what the agent received: the fields the recording proxy asked for
    stripped again, by the functions capture strips with live. An answer the server compressed all the same is
    decoded for it: a JSON answer is encoded again (as capture re-encoded it), a stream goes on plain, without
    its content-encoding (as capture passed it on)."""
    if not entry.injected:
        return
    injection = tokenids.plan_injection(entry.paths[0], entry.request_body,
                                        header_value(entry.request_headers, "content-type"),
                                        content_encoding=header_value(entry.request_headers, "content-encoding"),
                                        logprobs="logprobs" in entry.injected,  # as the recording proxy did
                                        usage="stream_options" in entry.injected)
    if injection is None or injection.added != entry.injected:
        log.warning("replay: cannot redo the injection of recorded flow %s; answering it unstripped", entry.flow_id)
        return
    if not resp.headers.get("content-type", "").lower().startswith("text/event-stream"):
        strip_json_answer(resp, injection)
        return
    rewrite = stream_rewrite(resp, injection, {})
    if rewrite is None:  # a coding it cannot undo (logged): as live, the stream goes on as it came
        return
    raw = memoryview(resp.raw_content or b"")
    try:  # read by read, as live (a decoder bounds each read's output, not the stream's)
        body = b"".join(rewrite(bytes(raw[at:at + REPLAY_READ])) for at in range(0, len(raw), REPLAY_READ)) + \
            rewrite(b"")
    except Exception as exc:  # zlib's, brotli's, zstd's errors: live, the agent met a broken stream
        log.warning("replay: the recorded stream of flow %s does not decode (%s); answering it as recorded",
                    entry.flow_id, exc)
        return
    resp.headers.pop("transfer-encoding", None)  # stream_rewrite's, for a live stream; this body is whole
    resp.raw_content = body
    resp.headers["content-length"] = str(len(body))


def _headers(pairs: Iterable[tuple[str, str]]) -> http.Headers:
    return http.Headers([(k.encode("utf-8", "surrogateescape"), v.encode("utf-8", "surrogateescape"))
                         for k, v in pairs])


def recorded_response(entry: Recorded, body: bytes) -> http.Response:
    """The recorded status and headers with ``body`` (raw bytes, content-encoding kept)."""
    if entry.status_code is None:
        return error_response(NO_RESPONSE_STATUS, f"the recorded request #{entry.index} got no response: "
                                                  f"{entry.error or 'unknown error'}", "rollouttap_replay_no_response")
    # A redacted header (Set-Cookie: <redacted ...>) holds a fingerprint, not the value: no client should keep it.
    resp = http.Response.make(entry.status_code, b"", _headers(
        (k, v) for k, v in entry.response_headers if k.lower() not in _HOP_HEADERS and not is_redacted(v)))
    resp.raw_content = body
    resp.headers["content-length"] = str(len(body))
    return resp


def error_response(status: int, message: str, kind: str) -> http.Response:
    """An OpenAI-shaped error that SDKs show and do not retry."""
    body = json.dumps({"error": {"message": f"rollouttap replay: {message}", "type": kind, "code": status}})
    return http.Response.make(status, body.encode(), {"content-type": "application/json", "x-should-retry": "false"})


def break_off(resp: http.Response) -> None:
    """Announce one byte more than the body holds and close the connection after it: the client reads the
    kept bytes, then meets a connection closed mid-message, as when the answer was recorded. (mitmproxy sends
    an addon's response whole and ends it cleanly; killing the flow would send nothing at all.)"""
    resp.headers.pop("transfer-encoding", None)  # capture's stream rewrite adds it; chunks would end cleanly
    resp.headers["content-length"] = str(len(resp.raw_content or b"") + 1)
    resp.headers["connection"] = "close"


def feed_stream(resp: http.Response) -> None:
    """Pass an addon-set body through the response's stream callable, as mitmproxy does for upstream bytes."""
    stream = resp.stream
    if not callable(stream):
        return
    out = bytearray()
    for data in (resp.raw_content or b"", b""):
        chunks = stream(data)
        out += chunks if isinstance(chunks, bytes) else b"".join(chunks)
    resp.stream = False
    resp.raw_content = bytes(out)
    resp.headers["content-length"] = str(len(out))


def write_report(path: str, report: dict[str, Any]) -> None:
    """Replace the report file atomically (the manager may read it at any moment)."""
    directory = os.path.dirname(os.path.abspath(path))
    with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, suffix=".tmp", encoding="utf-8") as tmp:
        json.dump(report, tmp)
    os.replace(tmp.name, path)


# -- the addon -------------------------------------------------------------------------------------------------

class ReplayAddon:
    def __init__(self) -> None:
        self.book: ReplayBook | None = None
        self.agent_id = ""
        self.answered_flows: set[str] = set()  # flows this addon answered whose response is not over yet
        self.breaking_flows: set[str] = set()  # ... of which those whose recorded answer broke off

    def load(self, loader: Any) -> None:
        loader.add_option("rollouttap_replay_store", str, "", "Store holding the recorded run to replay.")
        loader.add_option("rollouttap_replay_agent", str, "", "Agent whose recorded flows answer the requests.")
        loader.add_option("rollouttap_replay_report", str, "",
                          "JSON file reporting the replay (ready, first divergence, final counts).")

    def configure(self, updated: set[str]) -> None:
        if not {"rollouttap_replay_store", "rollouttap_replay_agent"} & updated:
            return
        store, agent = ctx.options.rollouttap_replay_store, ctx.options.rollouttap_replay_agent
        if not store or not agent:
            raise exceptions.OptionsError("replay needs rollouttap_replay_store and rollouttap_replay_agent")
        try:
            with Store(store, readonly=True) as recorded:
                flows, known = recorded.flows(agent_id=agent), recorded.agent(agent) is not None
        except StoreError as exc:
            raise exceptions.OptionsError(f"cannot read the recording: {exc}") from exc
        if not flows and not known:
            raise exceptions.OptionsError(f"no agent {agent!r} in {store}")
        entries = recorded_requests(flows)  # none for an agent that made no request: any request diverges
        self.book, self.agent_id = ReplayBook(entries), agent
        log.info("replay: %d recorded requests of %s", len(entries), agent)

    def running(self) -> None:
        self._report("ready")

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # Answered in the request hook, never sent on: a body capture would stream upstream is read here instead.
        flow.request.stream = False

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or flow.request.method == "CONNECT":
            return  # already answered (e.g. credentials refused)
        if self.book is None:  # never let a replay reach a real server
            flow.response = error_response(NO_RESPONSE_STATUS, "no recording loaded", "rollouttap_replay_error")
            return
        req = flow.request
        # Decoded as the recorded side is (ReplayBook: every coding of a list, within the same bound).
        sent_on = decode_body(req.raw_content, req.headers.get("content-encoding"))
        # What the agent itself sent (before capture added the fields the replay proxy asks for): as recorded.
        own = flow.metadata.pop(AGENT_BODY_KEY, None)
        body = own if own is not None else sent_on
        diverged = self.book.divergence is not None
        # Reports never hold a key in clear.
        entry = self.book.take(req.method, stored_target(req.path), body, own if own is not None else req.raw_content)
        if entry is None:
            div = self.book.divergence
            assert div is not None
            flow.response = error_response(DIVERGED_STATUS, f"request #{div.index} diverged from the recording "
                                                            f"({div.reason})", "rollouttap_replay_divergence")
            if not diverged:
                log.warning("replay: request #%d diverged: %s\n%s", div.index, div.reason, div.diff)
                self._report("diverged")
            return
        flow.response = recorded_response(entry, entry.response_body)
        if entry.status_code is not None and not capture_injected(entry, sent_on):  # else capture strips it, as live
            as_the_agent_saw(entry, flow.response)
        self.answered_flows.add(flow.id)
        if entry.broke_off and entry.status_code is not None:
            self.breaking_flows.add(flow.id)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.id in self.answered_flows and flow.response is not None:
            feed_stream(flow.response)
            if flow.id in self.breaking_flows:  # after feed_stream, which sets the length of what it fed
                break_off(flow.response)

    def response(self, flow: http.HTTPFlow) -> None:
        self._forget(flow.id)

    def error(self, flow: http.HTTPFlow) -> None:
        self._forget(flow.id)

    def _forget(self, flow_id: str) -> None:
        self.answered_flows.discard(flow_id)
        self.breaking_flows.discard(flow_id)

    def done(self) -> None:
        self._report("done")

    def _report(self, state: str) -> None:
        path = ctx.options.rollouttap_replay_report
        if path and self.book is not None:
            report = self.book.report(self.agent_id, state)
            report["t"] = time.time()
            write_report(path, report)


# ``mitmdump -s .../addon/replay.py`` loads the addons this list names.
addons = [ReplayAddon()]
