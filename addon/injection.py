"""What the proxy adds to a model request so that vLLM returns token ids and logprobs (``plan_injection``).

Pure functions over bytes and dicts; ``tokenids`` hides the added fields from the answer again.

Decisions (see ``plan_injection``): a value the agent set itself is kept as sent (an explicit
``null`` counts as unset); ``logprobs: false`` from the agent means the row has no logprobs;
``return_tokens_as_token_ids`` is only added together with our own ``logprobs``;
``/v1/completions`` with ``echo`` is left alone because vLLM blanks the echoed prompt text
when ``return_token_ids`` is set.

Usage. vLLM before PR #29074 (merged 2025-11-20) sent no stream chunk for text a tool or reasoning parser
swallowed, token ids and logprobs with it: the ids a stream carries then have holes, as many as the logprobs, so no
length check sees them. A stream's usage does: its ``completion_tokens`` counts every sampled token, and the
manager sets aside ids that do not add up to it (``chat_stream.ids_problem``). So a streamed chat or completions
request that carries ids (ours, or the agent's own) and sets no ``stream_options`` also gets ``"stream_options":
{"include_usage": true}``; the usage-only chunk vLLM then sends last (``"choices":[]``, before ``[DONE]``) is
dropped for the agent, which would not have got it. A ``stream_options`` the agent set is left alone: vLLM defaults
its ``include_usage`` to true, adding it beside ``continuous_usage_stats`` would put usage on every chunk, and
``include_usage: false`` is the agent's (that call goes unchecked). The store keeps the server's bytes, usage chunk
included.

The Responses API gets vLLM's ``enable_response_messages`` instead (see ``tokenids``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

Endpoint = Literal["chat", "completions", "responses"]

__all__ = ["ENDPOINT_SUFFIXES", "Endpoint", "Injection", "USAGE_OPTIONS", "dumps_json", "endpoint_for_path",
           "is_model_request", "plan_injection"]


@dataclass(frozen=True, slots=True)
class Injection:
    """What ``plan_injection`` added to one request, and the rewritten request body."""

    added: dict[str, Any]  # only the fields we set: what must be hidden from the agent later
    new_body: bytes
    stream: bool  # the request asked for SSE; the response content-type is authoritative
    endpoint: Endpoint
    upstream_logprobs: bool = False  # the upstream response carries per-token logprobs

    @property
    def strips_token_ids(self) -> bool:
        """True when the token ids (``prompt_token_ids``/``token_ids``, or a Responses answer's
        ``input_messages``/``output_messages``) must be hidden from the agent."""
        return "return_token_ids" in self.added or "enable_response_messages" in self.added

    @property
    def strips_logprobs(self) -> bool:
        """True when ``choices[i].logprobs`` must be hidden from the agent."""
        return "logprobs" in self.added

    @property
    def drops_usage(self) -> bool:
        """True when a stream's usage-only chunk (``choices: []``) must be hidden from the agent: we asked for it."""
        return "stream_options" in self.added


# The path each completion endpoint ends in, after the base URL.
ENDPOINT_SUFFIXES: dict[Endpoint, str] = {
    "chat": "/chat/completions", "completions": "/completions", "responses": "/responses"}
_CHAT, _COMPLETIONS, _RESPONSES = (ENDPOINT_SUFFIXES[e] for e in ("chat", "completions", "responses"))


def endpoint_for_path(path: str) -> Endpoint | None:
    """Which completion endpoint a request path (any prefix, query allowed) addresses."""
    bare = path.split("?", 1)[0].rstrip("/")
    # Chat first: its path ends in /completions too. Unrolled: on every request, a loop over the table costs more.
    if bare.endswith(_CHAT):
        return "chat"
    if bare.endswith(_COMPLETIONS):
        return "completions"
    if bare.endswith(_RESPONSES):
        return "responses"
    return None


def is_model_request(
    host: str, port: int, path: str, model_hosts: frozenset[str], *, method: str = "POST"
) -> bool:
    """True for a POST to a completion endpoint on a configured model host.

    ``model_hosts`` holds lower-case ``host`` or ``host:port`` entries (IPv6 as ``[::1]:8000``).
    """
    if method.upper() != "POST" or endpoint_for_path(path) is None:
        return False
    name = host.lower()
    if name in model_hosts:
        return True
    if ":" in name and not name.startswith("["):
        name = f"[{name}]"
    return name in model_hosts or f"{name}:{port}" in model_hosts


def plan_injection(
    path: str, body: bytes, content_type: str | None, *, content_encoding: str | None = None,
    logprobs: bool = True, usage: bool = True,
) -> Injection | None:
    """Decide which token-id fields to add to a completion request; None leaves it untouched.

    ``logprobs=False`` asks for token ids only: answers stay small (per-token logprob objects make a
    chat answer ~30× larger) and rows carry no sampling logprobs. ``usage=False`` does not ask a stream for its
    usage (redoing an injection recorded before the proxy asked for it).
    """
    endpoint = endpoint_for_path(path)
    if endpoint is None or not _is_json(content_type) or not _is_identity(content_encoding):
        return None
    obj = _load_object(body)
    if obj is None:
        return None
    added = _fields_to_add(obj, endpoint, logprobs, usage)
    if not added:
        return None
    agent_logprobs = obj.get("logprobs")
    upstream_logprobs = "logprobs" in added or (
        bool(agent_logprobs) if endpoint == "chat" else agent_logprobs is not None
    )
    return Injection(
        added=added,
        new_body=_with_fields(body, obj, added),
        stream=_streams(obj),
        endpoint=endpoint,
        upstream_logprobs=upstream_logprobs,
    )


def _is_json(content_type: str | None) -> bool:
    return content_type is None or "json" in content_type.lower()


def _is_identity(content_encoding: str | None) -> bool:
    return content_encoding is None or content_encoding.strip().lower() in ("", "identity")


def _load_object(body: bytes) -> dict[str, Any] | None:
    try:
        obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def _fields_to_add(obj: dict[str, Any], endpoint: Endpoint, logprobs: bool = True,
                   usage: bool = True) -> dict[str, Any]:
    if endpoint == "responses":
        if obj.get("background") or obj.get("enable_response_messages") is not None:
            return {}
        return {"enable_response_messages": True}
    if endpoint == "completions" and obj.get("echo"):
        return {}  # vLLM replaces the echoed prompt text by "" when return_token_ids is set
    added: dict[str, Any] = {}
    if obj.get("return_token_ids") is None:
        added["return_token_ids"] = True
    # top_logprobs / logprob_token_ids without logprobs is an error in vLLM: keep it one.
    agent_wants_top = bool(obj.get("top_logprobs")) or obj.get("logprob_token_ids") is not None
    if logprobs and obj.get("logprobs") is None and not agent_wants_top:
        # Completions: logprobs=0 returns the sampled token's logprob only.
        added["logprobs"] = True if endpoint == "chat" else 0
        if endpoint == "chat" and "top_logprobs" in obj:  # an explicit null: vLLM reads logprobs as top_logprobs
            added["top_logprobs"] = 0  # (None: no logprobs at all), so the sampled token's alone is set
        if obj.get("return_tokens_as_token_ids") is None:
            added["return_tokens_as_token_ids"] = True
    if usage and _asks_no_usage(obj) and (added or _asks_ids(obj)):
        added["stream_options"] = dict(USAGE_OPTIONS)
    return added


def _asks_ids(obj: dict[str, Any]) -> bool:
    """Whether the agent asked for the token ids (or logprobs) itself: its rows are trained on them too."""
    logprobs = obj.get("logprobs")
    return bool(obj.get("return_token_ids")) or (logprobs is not None and logprobs is not False)


# What pydantic's lax bool reads as true, as vLLM parses the request's ``stream``.
_TRUE_WORDS = frozenset(("true", "1", "yes", "on", "t", "y"))


def _streams(obj: dict[str, Any]) -> bool:
    stream = obj.get("stream")
    if isinstance(stream, str):
        return stream.strip().lower() in _TRUE_WORDS
    return stream is True or (type(stream) is int and stream == 1)


# Where capture leaves the body the agent sent, in ``flow.metadata``, when it adds fields to it: the addons after it
# (replay) compare what the agent sent, not what went on.
AGENT_BODY_KEY = "rollouttap_agent_body"
USAGE_OPTIONS = {"include_usage": True}  # a stream's usage tells how many tokens the ids must add up to


def _asks_no_usage(obj: dict[str, Any]) -> bool:
    """A stream whose request sets no ``stream_options``: vLLM then sends no usage (an explicit null counts as
    unset). One the agent set is left as sent: vLLM's ``StreamOptions`` defaults ``include_usage`` to true, so an
    object without it already gets usage, and adding it to one with ``continuous_usage_stats`` would put usage
    on every chunk; ``include_usage`` false (or null) is the agent's choice, and that call goes unchecked. vLLM
    refuses ``stream_options`` without ``stream: true``."""
    return _streams(obj) and obj.get("stream_options") is None


_COMPACT = json.JSONEncoder(separators=(",", ":"))  # one encoder: json.dumps with separators builds one a call


def _with_fields(body: bytes, obj: dict[str, Any], added: dict[str, Any]) -> bytes:
    if any(key in obj for key in added):
        # An explicit null is replaced where it stands; appending would duplicate the key.
        return dumps_json({**obj, **added}).encode("utf-8")
    # Append before the closing brace so every byte the agent sent stays as sent.
    end = len(body.rstrip()) - 1
    extra = _COMPACT.encode(added)[1:-1]  # the members, without the braces
    return body[:end] + (("," if obj else "") + extra).encode("ascii") + body[end:]


def dumps_json(doc: Any) -> str:
    """Compact JSON, non-ASCII kept as is unless it cannot be encoded (a lone surrogate)."""
    try:
        text = json.dumps(doc, ensure_ascii=False, separators=(",", ":"))
        text.encode("utf-8")  # a lone surrogate from a \ud800 escape cannot be encoded
        return text
    except UnicodeEncodeError:
        return json.dumps(doc, separators=(",", ":"))
