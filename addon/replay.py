"""Replay mode: answer an agent's requests from one agent's recorded flows, in order, never going upstream.

Loaded after the capture addon (``mitmdump -s entry.py -s replay.py``), so the replayed run is recorded like any
run: capture sees each request first (attribution, routes, token-id injection), then this addon answers it from
the recording. Request ``k`` must match recorded request ``k`` by method, path and body (JSON compared as data,
ignoring the fields rollouttap injected); requests the recording made concurrently may arrive in either order.
The first request that does not match is the divergence: it and every later request are answered
``599`` (a status no server sends, so it cannot pass for a recorded answer) with ``x-should-retry: false``.
An answer that broke off when recorded (a stream cut mid-way) is given as far as it came, then its connection
is closed before the end of the message, so the agent meets the same failure again.

What the agent sees is what it saw when recorded: a recorded body still holds the token ids the proxy asked
for, so it is stripped here unless capture injected the same fields again (then capture strips it, as live).
A streamed answer is handed over whole, as SSE; mitmproxy does not stream responses an addon sets, so its
body is fed once through the stream callable capture installed (which records it as it would record a stream).

Options: ``rollouttap_replay_store`` (the recorded store), ``rollouttap_replay_agent`` (whose flows),
``rollouttap_replay_report`` (a JSON file rewritten when ready, at the divergence and at shutdown).
"""
# No ``from __future__ import annotations``: mitmdump loads this file as a script module outside sys.modules,
# where dataclasses cannot resolve string annotations.

import difflib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

from mitmproxy import ctx, exceptions, http

from rollouttap.addon import tokenids
from rollouttap.errors import StoreError
from rollouttap.addon.flowcols import stored_target
from rollouttap.store import FlowRecord, Store, decode_body, header_value, map_secret_query
from rollouttap.store.redact import hide_agent_tokens

log = logging.getLogger(__name__)

DIVERGED_STATUS = 599
NO_RESPONSE_STATUS = 502
_HOP_HEADERS = frozenset({"transfer-encoding", "content-length", "connection", "keep-alive", "proxy-connection"})


@dataclass(frozen=True)
class Recorded:
    """One recorded request of the agent and the answer it got."""
    index: int  # position among the agent's replayable flows
    flow_id: str
    method: str
    paths: tuple[str, ...]  # as sent upstream, and as the agent wrote it when a route rewrote it
    request_body: bytes  # raw, as the agent sent it (before token-id injection)
    request_headers: list[tuple[str, str]]
    injected: dict[str, Any]
    status_code: int | None
    response_headers: list[tuple[str, str]]
    response_body: bytes
    error: str | None
    t_request: float | None
    t_end: float | None
    request_cut: bool = False  # the store kept only the request body's first part (an upload)
    request_size: int | None = None  # then its whole size, where known
    broke_off: bool = False  # the client got the status, headers and this body, then a broken connection

    @property
    def label(self) -> str:
        return f"{self.method} {self.paths[0]}"

    def body(self) -> bytes:
        return decode_body(self.request_body, header_value(self.request_headers, "content-encoding"))


def _path_of(url: str | None) -> str | None:
    if not url:
        return None
    parts = urlsplit(url)
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def recorded_requests(flows: Iterable[FlowRecord]) -> list[Recorded]:
    """The flows a replay answers: every request of the agent except CONNECT tunnels, in capture order."""
    out: list[Recorded] = []
    for f in flows:
        method = (f.method or "").upper()
        if not method or method == "CONNECT":
            continue
        paths = tuple(dict.fromkeys(p for p in (f.path or "/", _path_of(f.meta.get("routed_from"))) if p))
        status, error = f.status_code, f.error
        request_cut = f.meta.get("request_body_cut") or {}
        broke = broke_off(f)
        if cut := f.meta.get("body_cut"):  # answered as never answered: a short body would pass for the whole
            status, error, broke = None, (f"its response body was kept only in part ({cut.get('kept')} of "
                                          f"{cut.get('size')} bytes): record with rollouttap_body_keep_mb=0 to "
                                          "replay it"), False
        elif f.state == "error" and status is not None and not broke and not _whole(f):
            status = None  # a buffered answer that broke off: the client got the proxy's 502 instead
        out.append(Recorded(len(out), f.flow_id, method, paths, f.request_body or b"", list(f.request_headers),
                            dict(f.meta.get("injected") or {}), status, list(f.response_headers),
                            f.response_body or b"", error, f.t_request, f.t_end,
                            bool(request_cut), request_cut.get("size"), broke))
    return out


def _whole(f: FlowRecord) -> bool:
    """Whether a recorded body is all its Content-Length announced (the proxy's own answers, a 407 or a 503,
    end in error but reached the client whole)."""
    length = header_value(f.response_headers, "content-length")
    return length is not None and length.strip().isdigit() and int(length) == len(f.response_body or b"")


def broke_off(f: FlowRecord) -> bool:
    """Whether the client got this answer's status, headers and kept body, then a broken connection: a
    stream (or a body passed on as it came) cut mid-way. A buffered answer that broke off never reached it."""
    if f.state != "error" or f.status_code is None or _whole(f):
        return False
    return bool(f.streamed or f.response_body)


# -- comparing a request with the recording --------------------------------------------------------------------

def _loads(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None


def without_injected(live: Any, recorded: Any, injected: dict[str, Any]) -> Any:
    """The live JSON body less the fields the proxy injected (those the agent's recorded body lacks)."""
    if not isinstance(live, dict) or not injected:
        return live
    # A recording made before the proxy asked streams for their usage: today's capture adds it to the live body.
    injected = {"stream_options": tokenids.USAGE_OPTIONS, **injected}
    own = recorded if isinstance(recorded, dict) else {}
    return {k: v for k, v in live.items() if not (k in injected and k not in own and v == injected[k])}


def capture_injected(entry: Recorded, live_body: bytes) -> bool:
    """Whether capture injected the recorded fields into this request again (then it strips the answer too)."""
    if not entry.injected:
        return False
    live = _loads(live_body)
    return isinstance(live, dict) and all(k in live and live[k] == v for k, v in entry.injected.items())


def canonical(body: bytes, parsed: Any = None) -> list[str]:
    """Lines to compare and diff: JSON pretty-printed with sorted keys, other bodies as text."""
    if parsed is not None:
        return json.dumps(parsed, indent=2, sort_keys=True, ensure_ascii=False).splitlines()
    return body.decode("utf-8", "replace").splitlines()


def mismatch(entry: Recorded, method: str, path: str, body: bytes, raw: bytes | None = None) -> str | None:
    """Why a request does not match a recorded one, or None when it does (``raw``: the body as sent, before
    content decoding, for a recorded body kept only in part)."""
    if method.upper() != entry.method or _keyless(path) not in map(_keyless, entry.paths):
        return f"expected {entry.label}, got {method.upper()} {path}"
    if entry.request_cut:  # an upload kept in part: its first part and its size (where known) must match
        same = raw is not None and raw.startswith(entry.request_body) and \
            entry.request_size in (None, len(raw))
        return None if same else "request body differs (the recording kept only its first part)"
    recorded = _loads(entry.body())
    live = _loads(body)
    if recorded is not None and live is not None:
        same = without_injected(live, recorded, entry.injected) == recorded
    else:
        same = body == entry.body()
    return None if same else "request body differs"


def _keyless(path: str) -> str:
    """A path with secret query and path parameter values and a base-URL path token blanked: stored ones are
    fingerprints, and a replay may use any key."""
    return hide_agent_tokens(map_secret_query(path, lambda _value: ""), lambda _value: "")


def request_diff(entry: Recorded | None, method: str, path: str, body: bytes,
                 injected: dict[str, Any] | None = None) -> str:
    """A unified diff of the recorded request against the replayed one (request line, then body).

    ``injected``: what the proxy adds to requests, left out of the replayed body where no recorded request
    tells what the agent itself sent (the recording ran out)."""
    live = _loads(body)
    old: list[str] = []
    old_name = "recorded (nothing left)"
    if entry is None:
        live = without_injected(live, None, injected or {})
    else:
        recorded = _loads(entry.body())
        if recorded is not None:
            live = without_injected(live, recorded, entry.injected)
        old = [entry.label] + canonical(entry.body(), recorded)
        old_name = f"recorded #{entry.index}"
    new = [f"{method.upper()} {path}"] + canonical(body, live)
    return "\n".join(difflib.unified_diff(old, new, old_name, "replayed", lineterm=""))


@dataclass(frozen=True)
class Divergence:
    """The first replayed request that the recording does not hold (or the first recorded one never made)."""
    index: int  # 0-based position among the replayed agent's requests
    recorded_index: int | None  # the recorded request expected there, None when the recording ran out
    method: str | None
    path: str | None
    expected: str | None
    reason: str
    diff: str


class ReplayBook:
    """Which recorded request answers each replayed request; the first mismatch stops the replay."""

    def __init__(self, entries: Sequence[Recorded]) -> None:
        self.entries = list(entries)
        self.used = [False] * len(self.entries)
        self.requests = 0
        self.after_divergence = 0
        self.divergence: Divergence | None = None

    def _candidates(self) -> list[Recorded]:
        """The next unused request, and later ones the recording made while it was in flight."""
        unused = [e for e in self.entries if not self.used[e.index]]
        if not unused:
            return []
        first = unused[0]
        if first.t_end is None:
            return [first]
        return [first] + [e for e in unused[1:] if e.t_request is not None and e.t_request < first.t_end]

    def _injected(self) -> dict[str, Any]:
        """The fields the recording proxy injected (the latest request's that had any)."""
        return next((e.injected for e in reversed(self.entries) if e.injected), {})

    def take(self, method: str, path: str, body: bytes, raw: bytes | None = None) -> Recorded | None:
        """The recorded request answering this one; None once the replay has diverged."""
        index = self.requests
        self.requests += 1
        if self.divergence is not None:
            self.after_divergence += 1
            return None
        candidates = self._candidates()
        for entry in candidates:
            if mismatch(entry, method, path, body, raw) is None:
                self.used[entry.index] = True
                return entry
        expected = candidates[0] if candidates else None
        reason = (mismatch(expected, method, path, body, raw) if expected is not None
                  else f"the recording holds only {len(self.entries)} requests")
        self.divergence = Divergence(index, expected.index if expected else None, method.upper(), path,
                                     expected.label if expected else None, reason or "",
                                     request_diff(expected, method, path, body, self._injected()))
        return None

    @property
    def answered(self) -> int:
        return sum(self.used)

    def final_divergence(self) -> Divergence | None:
        """The divergence, or (when every request matched) the first recorded request the agent never made."""
        if self.divergence is not None:
            return self.divergence
        missing = next((e for e in self.entries if not self.used[e.index]), None)
        if missing is None:
            return None
        return Divergence(self.requests, missing.index, None, None, missing.label,
                          f"the agent stopped after {self.requests} requests; the recording holds "
                          f"{len(self.entries)}", "")

    def report(self, agent_id: str, state: str) -> dict[str, Any]:
        """The JSON the manager reads back."""
        final = self.final_divergence() if state == "done" else self.divergence
        return {"agent_id": agent_id, "state": state, "recorded": len(self.entries), "requests": self.requests,
                "answered": self.answered, "after_divergence": self.after_divergence,
                "divergence": asdict(final) if final is not None else None}


# -- answers ---------------------------------------------------------------------------------------------------

def agent_view(entry: Recorded) -> bytes:
    """The recorded answer as the agent received it: the fields asked for by the proxy stripped again."""
    body = entry.response_body
    if not entry.injected or header_value(entry.response_headers, "content-encoding"):
        return body
    injection = tokenids.plan_injection(entry.paths[0], entry.request_body,
                                        header_value(entry.request_headers, "content-type"),
                                        content_encoding=header_value(entry.request_headers, "content-encoding"),
                                        logprobs="logprobs" in entry.injected,  # as the recording proxy did
                                        usage="stream_options" in entry.injected)
    if injection is None or injection.added != entry.injected:
        log.warning("replay: cannot redo the injection of recorded flow %s; answering it unstripped", entry.flow_id)
        return body
    if (header_value(entry.response_headers, "content-type") or "").startswith("text/event-stream"):
        stripper = tokenids.StreamStripper(injection)
        return stripper.feed(body) + stripper.feed(b"")
    return tokenids.strip_response_json(body, injection)


def _headers(pairs: Iterable[tuple[str, str]]) -> http.Headers:
    return http.Headers([(k.encode("utf-8", "surrogateescape"), v.encode("utf-8", "surrogateescape"))
                         for k, v in pairs])


def recorded_response(entry: Recorded, body: bytes) -> http.Response:
    """The recorded status and headers with ``body`` (raw bytes, content-encoding kept)."""
    if entry.status_code is None:
        return error_response(NO_RESPONSE_STATUS, f"the recorded request #{entry.index} got no response: "
                                                  f"{entry.error or 'unknown error'}", "rollouttap_replay_no_response")
    resp = http.Response.make(entry.status_code, b"",
                              _headers((k, v) for k, v in entry.response_headers if k.lower() not in _HOP_HEADERS))
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
        body = req.get_content(strict=False) or b""
        diverged = self.book.divergence is not None
        # Reports never hold a key in clear.
        entry = self.book.take(req.method, stored_target(req.path), body, req.raw_content)
        if entry is None:
            div = self.book.divergence
            assert div is not None
            flow.response = error_response(DIVERGED_STATUS, f"request #{div.index} diverged from the recording "
                                                            f"({div.reason})", "rollouttap_replay_divergence")
            if not diverged:
                log.warning("replay: request #%d diverged: %s\n%s", div.index, div.reason, div.diff)
                self._report("diverged")
            return
        answer = entry.response_body if capture_injected(entry, body) else agent_view(entry)
        flow.response = recorded_response(entry, answer)
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
