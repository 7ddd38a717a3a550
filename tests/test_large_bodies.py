"""Bodies from and to hosts that are not model hosts (downloads, clones, uploads) go on live and are kept in the
store only up to rollouttap_body_keep_mb; model requests and answers are kept whole. Real mitmdump, sockets, clients."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
from collections.abc import Callable

import pytest
import requests

from conftest import settled_flows, start_proxy, wait_for
from rollouttap.store import Store

MIB = 1 << 20


def _accept_one(handle: Callable[[socket.socket], None]) -> tuple[socket.socket, threading.Thread]:
    """A listening socket whose first connection ``handle`` serves, on a thread of its own."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            handle(conn)
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return server, thread


def _read_head(conn: socket.socket) -> tuple[bytes, bytes, int]:
    """(request head, the body bytes read with it, its Content-Length or 0)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length")), 0)
    return head, body, length


def _server(answer: Callable[[socket.socket, bytes], None]) -> tuple[socket.socket, threading.Thread]:
    """Accepts one connection, reads the request head (and a Content-Length body), lets ``answer`` reply."""
    def handle(conn: socket.socket) -> None:
        head, body, length = _read_head(conn)
        while len(body) < length:
            body += conn.recv(65536)
        answer(conn, head)
    return _accept_one(handle)


def test_a_download_reaches_the_client_whole_and_live_while_the_store_keeps_its_first_part(tmp_path, confdir):
    first, rest = os.urandom(3 * MIB), os.urandom(3 * MIB)
    client_has_first_part = threading.Event()

    def answer(conn: socket.socket, _head: bytes) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                     b"Content-Length: %d\r\n\r\n" % (len(first) + len(rest)) + first)
        # The rest only once the client read the first part through the proxy: a proxy that held the body
        # until its end would never pass it on (the test then fails on the wait below).
        if client_has_first_part.wait(20):
            conn.sendall(rest)
    server, thread = _server(answer)
    url = f"http://127.0.0.1:{server.getsockname()[1]}/wheel.whl"
    with server, start_proxy(tmp_path / "s.db", confdir, extra={"rollouttap_body_keep_mb": "1"}) as proxy:
        resp = requests.get(url, headers={"X-Agent-ID": "dl"}, proxies={"http": proxy.url}, stream=True, timeout=30)
        got = resp.raw.read(len(first))
        client_has_first_part.set()
        got += resp.raw.read()
        thread.join(10)
        [flow] = settled_flows(proxy.config.store, agent_id="dl")
    assert got == first + rest
    assert flow.state == "done" and flow.status_code == 200
    assert flow.response_body == first[:MIB]
    assert flow.meta["body_cut"] == {"size": len(first) + len(rest), "kept": MIB}


def test_a_model_answer_is_kept_whole_whatever_its_size(tmp_path, confdir):
    answer_body = json.dumps({"id": "c1", "object": "chat.completion", "model": "m", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "x" * (2 * MIB)}, "finish_reason": "stop"}]}).encode()

    def answer(conn: socket.socket, _head: bytes) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(answer_body) + answer_body)
    server, thread = _server(answer)
    host = f"127.0.0.1:{server.getsockname()[1]}"
    with server, start_proxy(tmp_path / "s.db", confdir, model_hosts=(host,), token_ids=False,
                             extra={"rollouttap_body_keep_mb": "1"}) as proxy:
        resp = requests.post(f"http://{host}/v1/chat/completions", json={"model": "m", "messages": []},
                             headers={"X-Agent-ID": "big-answer"}, proxies={"http": proxy.url}, timeout=30)
        thread.join(10)
        [flow] = settled_flows(proxy.config.store, agent_id="big-answer")
    assert resp.content == answer_body
    assert flow.response_body == answer_body and "body_cut" not in flow.meta


def test_bodiless_answers_pass_through_the_tap(tmp_path, confdir):
    answers = iter([b"HTTP/1.1 204 No Content\r\n\r\n",
                    b"HTTP/1.1 200 OK\r\nContent-Length: 12345\r\nContent-Type: text/plain\r\n\r\n"])
    servers = [_server(lambda conn, _head, a=a: conn.sendall(a)) for a in answers]
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    with start_proxy(tmp_path / "s.db", confdir) as proxy:
        for (server, thread), method in zip(servers, ("GET", "HEAD")):
            with server:
                out = subprocess.run(
                    ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-x", proxy.url, "-H", "X-Agent-ID: nb",
                     *(["-I"] if method == "HEAD" else []), f"http://127.0.0.1:{server.getsockname()[1]}/x"],
                    env=env, capture_output=True, text=True, timeout=30)
                thread.join(10)
            assert out.returncode == 0 and out.stdout in ("204", "200"), out.stderr
        with Store(proxy.config.store) as store:
            flows = wait_for(lambda: [f for f in store.flows(agent_id="nb") if f.state != "open"][1:] and
                             store.flows(agent_id="nb"), what="both flows ended")
    assert [(f.method, f.status_code, f.state) for f in flows] == [("GET", 204, "done"), ("HEAD", 200, "done")]
    assert all(not f.response_body for f in flows)
    assert all(f.t_first_byte == f.t_response_headers for f in flows)  # as for any buffered answer


def _upload_server(first_part: int, seen_first: threading.Event) -> tuple[socket.socket, threading.Thread, list[bytes]]:
    """Accepts one request with a Content-Length body; sets ``seen_first`` once ``first_part`` body bytes are in."""
    got: list[bytes] = []

    def handle(conn: socket.socket) -> None:
        _, body, length = _read_head(conn)
        while len(body) < length:
            if len(body) >= first_part:
                seen_first.set()
            body += conn.recv(65536)
        got.append(body)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    server, thread = _accept_one(handle)
    return server, thread, got


def test_an_upload_goes_upstream_as_it_arrives_while_the_store_keeps_its_first_part(tmp_path, confdir):
    first, rest = os.urandom(2 * MIB), os.urandom(2 * MIB)
    seen_first = threading.Event()
    server, thread, got = _upload_server(len(first), seen_first)
    url = f"http://127.0.0.1:{server.getsockname()[1]}/upload"
    with server, start_proxy(tmp_path / "s.db", confdir, extra={"rollouttap_body_keep_mb": "1"}) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as client:
            client.sendall(f"POST {url} HTTP/1.1\r\nHost: {url.split('/')[2]}\r\nX-Agent-ID: up\r\n"
                           f"Content-Length: {len(first) + len(rest)}\r\n\r\n".encode() + first)
            # The rest only once the server has the first part: a proxy holding the body until its end never
            # passes it on, and the server never sees it.
            streamed = seen_first.wait(20)
            client.sendall(rest)
            answer = b""
            while chunk := client.recv(65536):
                answer += chunk
        thread.join(10)
        [flow] = settled_flows(proxy.config.store, agent_id="up")
    assert streamed
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"ok") and got == [first + rest]
    assert flow.state == "done" and flow.request_body == first[:MIB]
    assert flow.meta["request_body_cut"] == {"size": len(first) + len(rest), "kept": MIB}


def test_stream_large_bodies_is_refused_as_it_would_stream_model_calls_past_the_store(tmp_path, confdir):
    from rollouttap.errors import ProxyError
    # mitmproxy streams a body past that size before any hook can keep it: a model call would go unrecorded.
    with pytest.raises(ProxyError, match="stream_large_bodies cannot be used with rollouttap"):
        start_proxy(tmp_path / "s.db", confdir, extra={"stream_large_bodies": "1k"})


def test_a_body_within_the_keep_limit_is_held_whole_and_kept_though_its_server_cannot_be_reached(tmp_path, confdir):
    with start_proxy(tmp_path / "s.db", confdir, extra={"rollouttap_body_keep_mb": "1"}) as proxy:
        resp = requests.post("http://127.0.0.1:9/upload", data=b"y" * 300_000, headers={"X-Agent-ID": "dead"},
                             proxies={"http": proxy.url}, timeout=30)
        [flow] = settled_flows(proxy.config.store, agent_id="dead")
    assert resp.status_code == 502 and flow.state == "error"
    assert flow.request_body == b"y" * 300_000 and "request_body_cut" not in flow.meta


@pytest.mark.parametrize("chunked", [False, True])
def test_an_upload_answered_before_it_ended_keeps_its_first_part_marked_unended(tmp_path, confdir, chunked):
    """A server refusing an upload at once (a 413), then reading the rest: the answer ends the flow before the
    request hook comes."""
    first, rest = os.urandom(2 * MIB), os.urandom(2 * MIB)
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(first) + len(rest)}"

    def framed(data: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(data), data) if chunked else data
    answered = threading.Event()

    def refuse_at_once(conn: socket.socket) -> None:
        _read_head(conn)
        conn.sendall(b"HTTP/1.1 413 Too Large\r\nContent-Length: 2\r\n\r\nno")
        answered.set()
        while conn.recv(65536):
            pass
    server, thread = _accept_one(refuse_at_once)
    url = f"http://127.0.0.1:{server.getsockname()[1]}/upload"
    with server, start_proxy(tmp_path / "s.db", confdir, extra={"rollouttap_body_keep_mb": "1"}) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as client:
            client.sendall(f"POST {url} HTTP/1.1\r\nHost: {url.split('/')[2]}\r\nX-Agent-ID: early\r\n"
                           f"{framing}\r\n\r\n".encode() + framed(first))
            assert answered.wait(20)
            answer = b""
            while not answer.endswith(b"no"):
                answer += client.recv(65536)
            client.sendall(framed(rest) + (b"0\r\n\r\n" if chunked else b""))
        [flow] = settled_flows(proxy.config.store, agent_id="early")
    assert answer.startswith(b"HTTP/1.1 413") and flow.status_code == 413
    assert flow.request_body == first[:MIB]  # a first part, and said to be one: never a short body passing for whole
    size = None if chunked else len(first) + len(rest)
    assert flow.meta["request_body_cut"] == {"size": size, "kept": MIB, "ended": False}


def test_a_body_the_proxy_would_hold_whole_past_its_limit_is_not_read_and_recorded_with_why(tmp_path, confdir,
                                                                                          upstream):
    # mitmproxy reads a held body whole, whatever a hook answers: one agent's 20 GB prompt would take the memory
    # every agent's calls go through. An upload it streams on is not held: no limit.
    host = upstream.url.split("://", 1)[1]
    with start_proxy(tmp_path / "s.db", confdir, model_hosts=(host,),
                     extra={"rollouttap_held_body_max_mb": "1", "rollouttap_body_keep_mb": "1"}) as proxy:
        over = {"model": "m", "messages": [{"role": "user", "content": "x" * (2 * MIB)}]}
        with pytest.raises(requests.ConnectionError):
            requests.post(upstream.url + "/v1/chat/completions", json=over, headers={"X-Agent-ID": "big"},
                          proxies={"http": proxy.url}, timeout=30)
        small = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        assert requests.post(upstream.url + "/v1/chat/completions", json=small, headers={"X-Agent-ID": "big"},
                             proxies={"http": proxy.url}, timeout=30).status_code == 200
        upload = requests.post(upstream.url + "/echo", data=b"y" * (2 * MIB), headers={"X-Agent-ID": "big"},
                               proxies={"http": proxy.url}, timeout=30)
        flows = settled_flows(proxy.config.store, agent_id="big")
    assert upload.status_code == 200 and len(upload.json()["body"]) == 2 * MIB
    [refused] = [f for f in flows if f.state == "error"]
    assert refused.path == "/v1/chat/completions" and "over rollouttap_held_body_max_mb (1 MiB)" in refused.error
    assert sorted(f.status_code for f in flows if f.state == "done") == [200, 200]


@pytest.mark.parametrize("length, limit_mb, too_large", [
    ("1048577", 1, True), ("1048576", 1, False), ("", 1, False), ("12x", 1, False), ("99999999999", 0, False),
])
def test_held_too_large(length, limit_mb, too_large):
    from rollouttap.addon.capture import held_too_large
    said = held_too_large(length, limit_mb)
    assert (said is not None) == too_large
    assert said is None or f"a request body of {length} bytes" in said


@pytest.mark.parametrize("name", ["rollouttap_held_body_max_mb", "rollouttap_body_keep_mb"])
def test_a_negative_size_is_refused(name):
    from types import SimpleNamespace

    from mitmproxy import exceptions

    from rollouttap.addon.capture_options import check
    opts = SimpleNamespace(rollouttap_pid_lookup="eager", rollouttap_body_keep_mb=1, rollouttap_held_body_max_mb=1,
                           stream_large_bodies=None, rollouttap_store_backlog_mb=1)
    setattr(opts, name, -1)
    with pytest.raises(exceptions.OptionsError, match=f"{name} must be 0"):
        check(opts, {name})
