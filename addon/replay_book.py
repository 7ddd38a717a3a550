"""A replay's recording and how each replayed request is matched to it (no mitmproxy: see addon/replay.py).

``recorded_requests`` turns an agent's stored flows into the requests a replay answers; ``ReplayBook`` hands
out the recorded request answering each replayed one, in order (requests the recording made concurrently may
arrive in either order), and keeps the first that matches none: the divergence, with a diff.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

from rollouttap.store import FlowRecord, decode_body, header_value, map_secret_query
from rollouttap.store.redact import hide_agent_tokens


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
    # Why the answer the agent got cannot be given again (answered 502 instead), or None
    unreplayable: str | None = None

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
        unreplayable = None
        if cut := f.meta.get("body_cut"):  # answered as never answered: a short body would pass for the whole
            unreplayable = f"its response body was kept only in part ({cut.get('kept')} of {cut.get('size')} bytes)"
            unreplayable += (": it was over SQLite's limit on a value" if cut.get("store_limit") else
                             ": record with rollouttap_body_keep_mb=0 to replay it")
        elif f.state == "open":  # what it got after the store was read is unknown: a short answer would pass
            unreplayable = "it was still in flight when the recording was read (a running agent, or a killed proxy)"
        elif f.state == "error" and status is None and hung_up(f.error):
            unreplayable = "the agent hung up before it was answered (a timeout, say): no answer to give it"
        elif f.state == "error" and status is not None and not broke and not _whole(f):
            status = None  # a buffered answer that broke off: the client got the proxy's 502 instead
        if unreplayable is not None:
            status, error, broke = None, unreplayable, False
        out.append(Recorded(len(out), f.flow_id, method, paths, f.request_body or b"", list(f.request_headers),
                            dict(f.meta.get("injected") or {}), status, list(f.response_headers),
                            f.response_body or b"", error, f.t_request, f.t_end,
                            bool(request_cut), request_cut.get("size"), broke, unreplayable))
    return out


# How a flow ends when its client goes before the answer: mitmproxy's words (HTTP/1, HTTP/2), and capture's.
_HANG_UPS = ("client disconnected", "stream reset by client")


def hung_up(error: str | None) -> bool:
    """Whether a flow's error says its client went away before it was answered."""
    return (error or "").lower().startswith(_HANG_UPS)


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
    """Why a request does not match a recorded one, or None when it does. ``body`` is what the agent sent (before
    the proxy added token-id fields to it), as the recording keeps it; ``raw`` the same before content decoding,
    for a recorded body kept only in part."""
    if method.upper() != entry.method or _keyless(path) not in map(_keyless, entry.paths):
        return f"expected {entry.label}, got {method.upper()} {path}"
    if entry.request_cut:  # an upload kept in part: its first part and its size (where known) must match
        same = raw is not None and raw.startswith(entry.request_body) and \
            entry.request_size in (None, len(raw))
        return None if same else "request body differs (the recording kept only its first part)"
    recorded = _loads(entry.body())
    live = _loads(body)
    if recorded is not None and live is not None:
        same = same_json(live, recorded)
    else:
        same = body == entry.body()
    return None if same else "request body differs"


def same_json(a: Any, b: Any) -> bool:
    """Whether two parsed JSON values are the same value: Python's ``==`` takes ``true`` for ``1`` and ``1`` for
    ``1.0``, which a server may well not (a changed type is a changed request)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_json(value, b[key]) for key, value in a.items())
    if isinstance(a, list):
        return len(a) == len(b) and all(map(same_json, a, b))
    return a == b or (a != a and b != b)  # NaN (json reads it) is not equal to itself


def _keyless(path: str) -> str:
    """A path with secret query and path parameter values and a base-URL path token blanked: stored ones are
    fingerprints, and a replay may use any key."""
    return hide_agent_tokens(map_secret_query(path, lambda _value: ""), lambda _value: "")


def request_diff(entry: Recorded | None, method: str, path: str, body: bytes) -> str:
    """A unified diff of the recorded request against the replayed one (request line, then body)."""
    old: list[str] = []
    old_name = "recorded (nothing left)"
    if entry is not None:
        old = [entry.label] + canonical(entry.body(), _loads(entry.body()))
        old_name = f"recorded #{entry.index}"
    new = [f"{method.upper()} {path}"] + canonical(body, _loads(body))
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

    def take(self, method: str, path: str, body: bytes, raw: bytes | None = None) -> Recorded | None:
        """The recorded request answering this one (``body``: what the agent sent, see ``mismatch``); None once
        the replay has diverged."""
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
                                     request_diff(expected, method, path, body))
        return None

    @property
    def answered(self) -> int:
        return sum(self.used)

    @property
    def unreplayable(self) -> list[int]:
        """The recorded requests the agent made whose answer could not be given again (answered 502)."""
        return [e.index for e in self.entries if self.used[e.index] and e.unreplayable is not None]

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
                "answered": self.answered, "unreplayable": self.unreplayable, "after_divergence": self.after_divergence,
                "divergence": asdict(final) if final is not None else None}
