"""An embedded OpenAI-compatible (vLLM-shaped) HTTP server over the trainer's live model."""

from __future__ import annotations

import json
import logging
import select
import socket
import sys
import threading
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from rollouttap.responses_shapes import sse_event

from .generation import LogprobsMode
from .openai_params import BadRequest
from .openai_shapes import error_body
from .policy_api import ApiConfig, ClientGone, PolicyAPI
from .policy_check import same_server
from .policy_responses import NamedEvents, ResponsesRoute

logger = logging.getLogger(__name__)
_MAX_BODY = 64 * 1024 * 1024


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client (or the proxy) dropping an idle keep-alive connection is normal, not an error.
        if isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            return
        super().handle_error(request, client_address)


# The PolicyServers running in this process, by port: agent_rollout waits for theirs to serve no request.
_RUNNING: dict[int, PolicyServer] = {}
_RUNNING_LOCK = threading.Lock()
IDLE_WAIT_S = 300.0  # a generation runs max_tokens at most; past this a client that never leaves holds one


def wait_for_generation(base_url: str | None, timeout: float = IDLE_WAIT_S) -> bool:
    """Wait until the PolicyServer of this process that ``base_url`` names (by any of its addresses) serves no
    request, queued for its generation lock or generating; whether there is one. Calls of agents killed at their
    timeout go on a while after deploy() returned (the server sees a client gone only between tokens, and a
    queued call only once it has the lock), with the trainer's own model in eval mode meanwhile."""
    port = urlsplit(base_url).port if base_url else None
    with _RUNNING_LOCK:
        server = _RUNNING.get(port) if port is not None else None
    if server is None or base_url is None or same_server(server.url, base_url) is False:
        return False
    if not server.api.wait_idle(timeout):
        logger.warning("policy server %s still serves a request after %.0fs: training goes on", server.url, timeout)
    return True


class PolicyServer:
    """Serves the very model object it is given, so in-place weight updates are live at once.

    Generation is serialised by ``lock`` (a threading.Lock): requests are accepted concurrently
    but generate one at a time. A trainer may hold ``lock`` to keep requests out while it steps.
    During a generation the model is in eval mode under no_grad; each submodule's train/eval flag
    is restored afterwards.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        model_name: str = "policy",
        max_new_tokens: int = 256,
        max_model_len: int | None = None,
        logprobs_mode: LogprobsMode = "raw_logprobs",
    ) -> None:
        if logprobs_mode not in ("raw_logprobs", "processed_logprobs"):
            raise ValueError(f"unknown logprobs_mode {logprobs_mode!r}")
        self.lock = threading.Lock()
        config = ApiConfig(model_name, max_new_tokens, max_model_len, logprobs_mode)
        self.api = PolicyAPI(model, tokenizer, config, self.lock)
        self._address = (host, port)
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """http://host:port of the running server."""
        if self._httpd is None:
            raise RuntimeError("the policy server is not started")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def base_url(self) -> str:
        """The OpenAI base URL (…/v1)."""
        return f"{self.url}/v1"

    def start(self) -> PolicyServer:
        """Bind and serve in a background thread; returns once the socket is listening."""
        if self._httpd is not None:
            return self
        httpd = _QuietServer(self._address, _handler_for(self.api))
        httpd.daemon_threads = True
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, name="rollouttap-policy-server", daemon=True)
        self._thread.start()
        with _RUNNING_LOCK:
            _RUNNING[httpd.server_address[1]] = self
        logger.info("policy server listening on %s", self.url)
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket (idempotent)."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        with _RUNNING_LOCK:
            if _RUNNING.get(httpd.server_address[1]) is self:
                del _RUNNING[httpd.server_address[1]]
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join()
        self._thread = None

    def __enter__(self) -> PolicyServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _handler_for(api: PolicyAPI) -> type[BaseHTTPRequestHandler]:
    routes_get = {"/health": lambda: {}, "/v1/models": api.models, "/ping": lambda: {}}
    routes_post: dict[str, Callable[[dict[str, Any], Callable[[], bool]], Any]] = {
        "/v1/chat/completions": api.chat,
        "/v1/completions": api.completions,
        "/v1/responses": ResponsesRoute(api),
        "/tokenize": lambda body, _gone: api.tokenize(body),
        "/detokenize": lambda body, _gone: api.detokenize(body),
    }

    class Handler(_JsonHandler):
        def do_GET(self) -> None:
            route = routes_get.get(self.path.split("?", 1)[0])
            if route is None:
                self.send_json(error_body(f"no route {self.path}", 404), 404)
            else:
                self.send_json(route(), 200)

        def do_POST(self) -> None:
            route = routes_post.get(self.path.split("?", 1)[0])
            if route is None:
                self.send_json(error_body(f"no route {self.path}", 404), 404)
                return
            with api.serving():  # queued, generating, streaming: agent_rollout waits it out (wait_for_generation)
                self._serve(route)

        def _serve(self, route: Callable[[dict[str, Any], Callable[[], bool]], Any]) -> None:
            try:
                result = route(self.read_json(), self.client_gone)
            except ClientGone as exc:
                self.close_connection = True
                logger.info("%s", exc)
                return
            except BadRequest as exc:
                self.send_json(error_body(str(exc), exc.status, exc.error_type, exc.param), exc.status)
                return
            except Exception as exc:  # the server must answer, not drop the connection
                logger.exception("policy server failed on %s", self.path)
                self.send_json(error_body(f"internal error: {exc}", 500), 500)
                return
            if isinstance(result, dict):
                self.send_json(result, 200)
            else:
                self.send_sse(result, named=isinstance(result, NamedEvents))

    return Handler


def peer_closed(sock: socket.socket) -> bool:
    """True once the peer closed its side of ``sock`` (a pipelined next request does not count)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


class _JsonHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive JSON and SSE plumbing."""

    protocol_version = "HTTP/1.1"
    server_version = "rollouttap-policy"

    def setup(self) -> None:
        super().setup()
        # Many small writes per response (headers, body, one SSE event per token): without
        # TCP_NODELAY each waits for the client's delayed ACK.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def read_json(self) -> dict[str, Any]:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            raw = self._read_chunked()
        else:
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = 0
            if length <= 0 or length > _MAX_BODY:
                self.close_connection = True  # an unread body would be taken for the next request
                raise BadRequest("a JSON body with a Content-Length (or chunked) is required")
            raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise BadRequest(f"the body is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        return body

    def _read_chunked(self) -> bytes:
        """A body in chunked transfer encoding (clients that stream their request, e.g. from a generator)."""
        parts: list[bytes] = []
        size = 0
        while True:
            try:
                chunk = int(self.rfile.readline(64).split(b";", 1)[0], 16)
            except ValueError as exc:
                self.close_connection = True
                raise BadRequest("a malformed chunked body") from exc
            if chunk == 0:
                while self.rfile.readline(1024).strip():  # trailer fields, up to the blank line
                    pass
                return b"".join(parts)
            size += chunk
            if size > _MAX_BODY:
                self.close_connection = True
                raise BadRequest("the body is too large")
            parts.append(self.rfile.read(chunk))
            self.rfile.readline(8)  # the CRLF after each chunk

    def client_gone(self) -> bool:
        return peer_closed(self.connection)

    def send_json(self, obj: dict[str, Any], status: int) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_sse(self, chunks: Iterable[dict[str, Any]], *, named: bool = False) -> None:
        """Stream chunks as SSE events in chunked transfer encoding, ending with [DONE].

        ``named``: the Responses API's framing, ``event: <type>`` before each ``data:`` and no [DONE]."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for chunk in chunks:
                self._write_chunk(sse_event(chunk) if named else f"data: {json.dumps(chunk)}\n\n".encode())
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            logger.info("client left a stream early")
            return
        except Exception as exc:  # headers are sent: report in-band as vLLM does, then end
            logger.exception("policy server failed while streaming")
            if not named:  # a Responses stream says it in its own error event (responses_shapes.stream_events)
                self._write_chunk(f"data: {json.dumps(error_body(str(exc), 500))}\n\n".encode())
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()  # releases the generation lock when the client left early
        if not named:
            self._write_chunk(b"data: [DONE]\n\n")
        self._write_chunk(b"")

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib's name)
        logger.debug("%s " + format, self.address_string(), *args)
