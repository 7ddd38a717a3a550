"""A scripted OpenAI-compatible model server that answers in vLLM's exact JSON, for tests and benchmarks.

In-process::

    with ScriptedUpstream(script=default_script, chunk_delay=0.01) as up:
        client = openai.OpenAI(base_url=up.base_url, api_key="x")

As a process: ``python -m rollouttap.testing.upstream --port 0 [--chunk-delay S] [--script NAME]``
prints ``LISTENING http://127.0.0.1:PORT`` and serves until killed.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``POST /v1/responses`` (each streamed or not;
the Responses API as in vllm_responses_api), ``GET /v1/models``,
``GET /health``, ``GET /version``, ``POST /tokenize``, ``POST /detokenize``, ``GET /slow?seconds=S``
and ``POST /echo`` (the request's method, path, headers and body back as JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import itertools
import json
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterable

from aiohttp import web

from rollouttap.testing.fake_tokenizer import FakeTokenizer
from rollouttap.testing.replies import Reply, Script, default_script, named_script
from rollouttap.responses_input import input_error, store_error
from rollouttap.testing.vllm_format import (
    SSE_DONE, Options, dumps, error_body, generate_chat, generate_completion, sse,
)
from rollouttap.testing.vllm_responses import (
    ResponseMeta, chat_body, chat_chunks, completion_body, completion_chunks,
)
from rollouttap.testing.vllm_responses_api import (
    ResponsesMeta, response_body, response_events, responses_turn, sse_event,
)

log = logging.getLogger(__name__)

DEFAULT_MODEL = "scripted-model"


@dataclass(frozen=True)
class ReceivedRequest:
    """One request as the upstream received it."""
    method: str
    path: str
    query: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    json: Any
    t_received: float

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)


@dataclass(frozen=True)
class UpstreamConfig:
    script: Script = default_script
    tokenizer: Any = field(default_factory=FakeTokenizer)
    chunk_delay: float = 0.0
    tokens_per_chunk: int = 4
    model: str = DEFAULT_MODEL
    ignore_token_ids: bool = False
    skip_swallowed: bool = False  # as vLLM before PR #29074: no chunk for text a parser swallowed, ids and all
    reasoning_field: str = "reasoning_content"
    max_model_len: int = 32768
    record: bool = True
    deterministic: bool = False  # ids and timestamps from the request, so equal requests get equal bytes
    # A repeated request (same path, same body bytes) gets the bytes of its first answer: the cheapest
    # possible model server, for benchmarks that measure a proxy (building a logprobs answer costs more
    # CPU than a proxy's whole request path). Ids and timestamps repeat with the bytes.
    memo: bool = False


def _digest(asked: Any) -> str:
    return hashlib.sha256(json.dumps(asked, sort_keys=True).encode()).hexdigest()[:24]


def _stable_calls(gen: Any, digest: str) -> Any:
    def stable_ids(calls: Any) -> tuple[Any, ...]:
        return tuple(dataclasses.replace(c, id=f"chatcmpl-tool-{digest}{i}") for i, c in enumerate(calls))
    return dataclasses.replace(gen, tool_calls=stable_ids(gen.tool_calls),
                               calls_in_text=stable_ids(gen.calls_in_text))


def _stable(meta: ResponseMeta, gen: Any, payload: dict[str, Any]) -> tuple[ResponseMeta, Any]:
    """Response and tool-call ids derived from what the agent asked (not from fields a proxy added)."""
    digest = _digest([payload.get("messages"), payload.get("prompt"), payload.get("tools")])
    return (ResponseMeta(f"{meta.id.split('-')[0]}-{digest}", meta.model, created=1_700_000_000),
            _stable_calls(gen, digest))


def _loads(body: bytes) -> Any:
    try:
        return json.loads(body) if body else None
    except ValueError:
        return None


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=dumps(obj), status=status, content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    return _json(error_body(status, message), status)


MEMO_SIZE = 4096


class _Handlers:
    """The routes; every handler is a thin shell around the pure builders."""

    def __init__(self, config: UpstreamConfig, sink: list[ReceivedRequest] | None) -> None:
        self.config = config
        self.sink = sink
        # (path, body) -> a JSON answer's bytes, or a stream's events
        self._memo: dict[tuple[str, bytes], bytes | list[bytes]] = {}

    async def _read(self, request: web.Request) -> Any:
        body = await request.read()
        payload = _loads(body)
        if self.sink is not None:
            self.sink.append(ReceivedRequest(request.method, request.path, request.query_string,
                                             tuple(request.headers.items()), body, payload, time.time()))
        return payload

    async def _remembered(self, request: web.Request) -> web.StreamResponse | None:
        """The first answer to this very request again, if memo is on and there was one."""
        if not self.config.memo:
            return None
        answer = self._memo.get((request.path, await request.read()))
        if answer is None:
            return None
        if isinstance(answer, bytes):
            return web.Response(body=answer, content_type="application/json")
        return await self._send_events(request, _paced(answer, self.config.chunk_delay), None)

    async def _remember(self, request: web.Request, answer: bytes | list[bytes]) -> None:
        if self.config.memo:
            if len(self._memo) >= MEMO_SIZE:
                self._memo.clear()
            self._memo[(request.path, await request.read())] = answer

    def _reply(self, payload: dict[str, Any]) -> Reply:
        try:
            return self.config.script(payload)
        except Exception as exc:  # a broken script must show up in the test, not hang the client
            log.exception("scripted upstream: the script failed")
            return Reply(status=500, error_message=f"script failed: {exc!r}")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        payload = await self._read(request)
        if (remembered := await self._remembered(request)) is not None:
            return remembered
        if not isinstance(payload, dict) or not isinstance(payload.get("messages"), list):
            return _error(400, "request body must be a JSON object with a 'messages' list")
        return await self._answer(request, payload, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        payload = await self._read(request)
        if (remembered := await self._remembered(request)) is not None:
            return remembered
        if not isinstance(payload, dict) or not _valid_prompt(payload.get("prompt")):
            return _error(400, "request body must be a JSON object with a string or token-id 'prompt'")
        return await self._answer(request, payload, chat=False)

    async def responses(self, request: web.Request) -> web.StreamResponse:
        payload = await self._read(request)
        if (remembered := await self._remembered(request)) is not None:
            return remembered
        if (problem := input_error(payload)) is not None:
            return _error(400, problem)
        if (refused := store_error(payload)) is not None:  # this server keeps no responses, as vLLM by default
            status, message, param = refused
            return _json(error_body(status, message, "invalid_request_error", param), status)
        reply = self._reply(payload)
        if reply.status != 200:
            return _error(reply.status, reply.error_message or "scripted error")
        cfg, tok = self.config, self.config.tokenizer
        try:
            turn = responses_turn(payload, reply, tok)
        except Exception as exc:  # e.g. a chat template rejecting the messages, as vLLM answers 400
            log.warning("scripted upstream: cannot render the request: %r", exc)
            return _error(400, f"cannot render the request: {exc}")
        asked = [payload.get("instructions"), payload.get("input"), payload.get("tools")]
        seed = _digest(asked) if cfg.deterministic else None
        meta = ResponsesMeta.new(payload.get("model") or cfg.model, cfg.max_model_len, seed=seed)
        if seed is not None:
            turn = dataclasses.replace(turn, gen=_stable_calls(turn.gen, seed))
        if not payload.get("stream"):
            body = dumps(response_body(turn, meta, tok))
            await self._remember(request, body)
            return web.Response(body=body, content_type="application/json")
        events: Iterable[bytes] = map(sse_event, response_events(turn, meta, tok,
                                                                 tokens_per_chunk=cfg.tokens_per_chunk))
        if cfg.memo and reply.abort_after_chunks is None:
            events = list(events)
            await self._remember(request, events)
        return await self._send_events(request, _paced(events, cfg.chunk_delay), reply.abort_after_chunks)

    async def _answer(self, request: web.Request, payload: dict[str, Any], *, chat: bool) -> web.StreamResponse:
        reply = self._reply(payload)
        if reply.status != 200:
            return _error(reply.status, reply.error_message or "scripted error")
        cfg, tok = self.config, self.config.tokenizer
        try:
            gen = (generate_chat if chat else generate_completion)(payload, reply, tok)
        except Exception as exc:  # e.g. a chat template rejecting the messages, as vLLM answers 400
            log.warning("scripted upstream: cannot render the request: %r", exc)
            return _error(400, f"cannot render the request: {exc}")
        meta = ResponseMeta.new(payload.get("model") or cfg.model, chat=chat)
        if cfg.deterministic:
            meta, gen = _stable(meta, gen, payload)
        opts = Options.from_request(payload, ignore_token_ids=cfg.ignore_token_ids,
                                    reasoning_field=cfg.reasoning_field, chat=chat,
                                    skip_swallowed=cfg.skip_swallowed)
        if not payload.get("stream"):
            body = dumps((chat_body if chat else completion_body)(gen, meta, opts, tok))
            await self._remember(request, body)
            return web.Response(body=body, content_type="application/json")
        if chat:
            parsers = bool(payload.get("tools")) or bool(reply.reasoning)
            chunks = chat_chunks(gen, meta, opts, tok, tokens_per_chunk=cfg.tokens_per_chunk, parsers=parsers)
        else:
            chunks = completion_chunks(gen, meta, opts, tok, tokens_per_chunk=cfg.tokens_per_chunk)
        events: Iterable[bytes] = itertools.chain(map(sse, chunks), [SSE_DONE])  # built as they are sent
        if cfg.memo and reply.abort_after_chunks is None:
            events = list(events)
            await self._remember(request, events)
        return await self._send_events(request, _paced(events, cfg.chunk_delay), reply.abort_after_chunks)

    async def _send_events(self, request: web.Request, paced: AsyncIterator[tuple[int, bytes]],
                           abort_after: int | None) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await response.prepare(request)
        async for index, data in paced:
            if abort_after is not None and index >= abort_after:
                # Simulates a model server dying mid-stream: no [DONE], no chunked terminator.
                if request.transport is not None:
                    request.transport.abort()
                return response
            await response.write(data)
        await response.write_eof()
        return response

    async def models(self, request: web.Request) -> web.Response:
        model = self.config.model
        card = {"id": model, "object": "model", "created": int(time.time()), "owned_by": "vllm", "root": model,
                "parent": None, "max_model_len": self.config.max_model_len, "permission": []}
        return _json({"object": "list", "data": [card]})

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def version(self, request: web.Request) -> web.Response:
        return _json({"version": "0.11.0+scripted"})

    async def tokenize(self, request: web.Request) -> web.Response:
        payload = await self._read(request)
        if not isinstance(payload, dict):
            return _error(400, "request body must be a JSON object")
        tok = self.config.tokenizer
        if "messages" in payload:
            text = tok.apply_chat_template(payload["messages"], tools=payload.get("tools") or None,
                                           add_generation_prompt=payload.get("add_generation_prompt", True),
                                           tokenize=False, **(payload.get("chat_template_kwargs") or {}))
            ids = tok.encode(text, add_special_tokens=bool(payload.get("add_special_tokens", False)))
        else:
            ids = tok.encode(payload.get("prompt") or "", add_special_tokens=bool(payload.get("add_special_tokens", True)))
        strs = tok.convert_ids_to_tokens(ids) if payload.get("return_token_strs") else None
        return _json({"count": len(ids), "max_model_len": self.config.max_model_len, "tokens": ids,
                      "token_strs": strs})

    async def detokenize(self, request: web.Request) -> web.Response:
        payload = await self._read(request)
        if not isinstance(payload, dict) or not isinstance(payload.get("tokens"), list):
            return _error(400, "request body must be a JSON object with a 'tokens' list")
        return _json({"prompt": self.config.tokenizer.decode(payload["tokens"])})

    async def slow(self, request: web.Request) -> web.Response:
        await self._read(request)
        seconds = float(request.query.get("seconds", "1"))
        await asyncio.sleep(seconds)
        return _json({"slept": seconds})

    async def echo(self, request: web.Request) -> web.Response:
        payload = await self._read(request)
        body = await request.read()  # aiohttp keeps the body read by _read
        headers: dict[str, str] = {}
        for key, value in request.headers.items():
            key = key.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        peer = request.transport.get_extra_info("peername") if request.transport is not None else None
        return _json({"method": request.method, "path": request.path, "query": request.query_string,
                      "peer": list(peer[:2]) if peer else None,
                      "headers": headers, "raw_headers": [[k, v] for k, v in request.headers.items()],
                      "body": body.decode("utf-8", "replace"), "json": payload})


async def _paced(events: Iterable[bytes], delay: float) -> AsyncIterator[tuple[int, bytes]]:
    """SSE events (``[DONE]`` last), ``delay`` seconds apart; ``[DONE]`` always after a pause. A usage-only chunk
    follows the last one at once, as vLLM sends it (no token is generated in between)."""
    for index, data in enumerate(events):
        if delay and (index or data == SSE_DONE) and _USAGE_ONLY not in data:
            await asyncio.sleep(delay)
        yield index, data


_USAGE_ONLY = b'"choices":[],"usage":'  # how vllm_responses writes a stream's usage chunk


def _valid_prompt(prompt: Any) -> bool:
    return isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt))


def build_app(config: UpstreamConfig, sink: list[ReceivedRequest] | None = None) -> web.Application:
    """The aiohttp application serving ``config``; received requests are appended to ``sink``."""
    h = _Handlers(config, sink)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/chat/completions", h.chat)
    app.router.add_post("/v1/completions", h.completions)
    app.router.add_post("/v1/responses", h.responses)
    app.router.add_get("/v1/models", h.models)
    app.router.add_get("/health", h.health)
    app.router.add_get("/version", h.version)
    app.router.add_post("/tokenize", h.tokenize)
    app.router.add_post("/detokenize", h.detokenize)
    app.router.add_get("/slow", h.slow)
    app.router.add_route("*", "/echo", h.echo)
    return app


async def start_site(config: UpstreamConfig, sink: list[ReceivedRequest] | None, host: str,
                     port: int) -> tuple[web.AppRunner, int]:
    """Start serving on ``host:port`` in the running loop; returns the runner and the bound port."""
    runner = web.AppRunner(build_app(config, sink), access_log=None, shutdown_timeout=0.5,
                           keepalive_timeout=75)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    return runner, int(runner.addresses[0][1])


class ScriptedUpstream:
    """The scripted upstream served from a background thread with its own event loop."""

    def __init__(self, script: Script | str | None = None, *, tokenizer: Any = None, chunk_delay: float = 0.0,
                 tokens_per_chunk: int = 4, model: str = DEFAULT_MODEL, ignore_token_ids: bool = False,
                 reasoning_field: str = "reasoning_content", host: str = "127.0.0.1", port: int = 0,
                 record: bool = True, deterministic: bool = False, memo: bool = False,
                 skip_swallowed: bool = False) -> None:
        if isinstance(script, str):
            script = named_script(script)
        self.config = UpstreamConfig(script=script or default_script, tokenizer=tokenizer or FakeTokenizer(),
                                     chunk_delay=chunk_delay, tokens_per_chunk=tokens_per_chunk, model=model,
                                     ignore_token_ids=ignore_token_ids, reasoning_field=reasoning_field,
                                     record=record, deterministic=deterministic, memo=memo,
                                     skip_swallowed=skip_swallowed)
        self.host = host
        self.port = port
        self.requests: list[ReceivedRequest] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """``http://HOST:PORT`` of the running server."""
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI base URL (``url + "/v1"``)."""
        return self.url + "/v1"

    @property
    def tokenizer(self) -> Any:
        return self.config.tokenizer

    def start(self) -> ScriptedUpstream:
        """Start serving; returns once the port is bound."""
        if self._thread is not None:
            raise RuntimeError("ScriptedUpstream already started")
        ready = threading.Event()
        errors: list[BaseException] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, args=(ready, errors), name="scripted-upstream",
                                        daemon=True)
        self._thread.start()
        if not ready.wait(30):
            raise RuntimeError("scripted upstream did not start within 30 s")
        if errors:
            self._thread.join()
            self._thread = None
            raise errors[0]
        return self

    def _serve(self, ready: threading.Event, errors: list[BaseException]) -> None:
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        try:
            sink = self.requests if self.config.record else None
            self._runner, self.port = loop.run_until_complete(start_site(self.config, sink, self.host, self.port))
        except BaseException as exc:  # reported to start()'s caller
            errors.append(exc)
            ready.set()
            loop.close()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._runner.cleanup())
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def stop(self) -> None:
        """Stop serving and close every connection."""
        if self._thread is None or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._thread = None

    def __enter__(self) -> ScriptedUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_for_requests(self, count: int, timeout: float = 10.0, *, path: str | None = None) -> list[ReceivedRequest]:
        """Poll until ``count`` requests (to ``path``, if given) arrived; raises TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            got = [r for r in self.requests if path is None or r.path == path]
            if len(got) >= count:
                return got
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(got)} of {count} requests arrived within {timeout} s")
            time.sleep(0.005)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m rollouttap.testing.upstream",
        description="Scripted vLLM-shaped model server. Example: --port 0 --chunk-delay 0.01 --script default")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed on stdout)")
    parser.add_argument("--chunk-delay", type=float, default=0.0, help="seconds between stream chunks")
    parser.add_argument("--tokens-per-chunk", type=int, default=4)
    parser.add_argument("--script", default="default", help="default, echo, reasoning or flaky")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--ignore-token-ids", action="store_true",
                        help="behave like a server without return_token_ids/logprobs")
    parser.add_argument("--skip-swallowed", action="store_true",
                        help="behave like vLLM before PR #29074: no stream chunk for text a parser swallowed")
    parser.add_argument("--reasoning-field", default="reasoning_content")
    parser.add_argument("--memo", action="store_true",
                        help="answer a repeated request (same path and body) with its first answer's bytes")
    return parser.parse_args(argv)


async def _serve_until_signalled(config: UpstreamConfig, host: str, port: int) -> None:
    runner, bound = await start_site(config, None, host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"LISTENING http://{host}:{bound}", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT; the first stdout line is ``LISTENING <url>``."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    config = UpstreamConfig(script=named_script(args.script), chunk_delay=args.chunk_delay,
                            tokens_per_chunk=args.tokens_per_chunk, model=args.model,
                            ignore_token_ids=args.ignore_token_ids, skip_swallowed=args.skip_swallowed,
                            reasoning_field=args.reasoning_field,
                            record=False, memo=args.memo)
    asyncio.run(_serve_until_signalled(config, args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
