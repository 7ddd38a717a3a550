"""The processes a benchmark measures: the scripted upstream, bare mitmdump and mitmdump + rollouttap.

Each runs as its own process, so the client, the proxy and the upstream never share a GIL.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import psutil

from rollouttap.manager.proxy import LAUNCHERS, ProxyConfig, ProxyProcess, free_port, launch_env

PY = sys.executable
QUICKACK_OPTION = "rollouttap_tcp_quickack"
COALESCE_OPTION = "rollouttap_coalesce_chunks"
ANSWER_CACHE = Path(__file__).with_name("answer_cache.py")


def tuning_script() -> Path:
    """Path of addon/tcp_tuning.py as installed."""
    spec = importlib.util.find_spec("rollouttap.addon.tcp_tuning")
    assert spec is not None and spec.origin is not None
    return Path(spec.origin)


@dataclass(frozen=True)
class Variant:
    """One way of reaching the upstream."""
    name: str
    proxy: str | None  # None: direct; "bare": mitmdump alone; "capture": mitmdump + rollouttap
    tuning: bool = False
    token_ids: bool = False
    stream_bodies: bool = False  # bare only: stream_large_bodies=1 (else mitmdump buffers SSE)
    answer_cache: bool = False  # bare only: answer from memory after the first request (bench/answer_cache.py)
    logprobs: bool = True  # with token_ids: also ask for sampling logprobs
    launcher: str = "fastdump"  # a key of manager.proxy.LAUNCHERS: how mitmdump starts
    coalesce_chunks: bool = True  # with tuning: the chunks one read brought pass as one (chunk_coalescing.py)


DIRECT = Variant("direct", None)
BARE = Variant("bare mitmdump", "bare", launcher="mitmdump")
BARE_STREAM = Variant("bare mitmdump, streaming on", "bare", stream_bodies=True, launcher="mitmdump")
BARE_TUNED = Variant("bare + tuning", "bare", tuning=True, launcher="mitmdump")
BARE_FAST_TUNED = Variant("bare fastdump + tuning", "bare", tuning=True)
BARE_FAST_STREAM = Variant("bare fastdump + tuning, streaming on", "bare", tuning=True, stream_bodies=True)
BARE_FAST_STREAM_UNCOALESCED = Variant("bare fastdump + tuning, streaming on, chunks not coalesced", "bare",
                                       tuning=True, stream_bodies=True, coalesce_chunks=False)
FLOOR = Variant("bare fastdump + tuning, answering from memory", "bare", tuning=True, answer_cache=True)
CAPTURE_STOCK_TUNED = Variant("capture + tuning, stock mitmdump", "capture", tuning=True, launcher="mitmdump")
CAPTURE_TUNED = Variant("capture + tuning", "capture", tuning=True)
CAPTURE_UNCOALESCED = Variant("capture + tuning, chunks not coalesced", "capture", tuning=True, coalesce_chunks=False)
TOKENS_TUNED = Variant("capture + token ids + tuning", "capture", tuning=True, token_ids=True)
TOKENS_UNCOALESCED = Variant("capture + token ids + tuning, chunks not coalesced", "capture", tuning=True,
                             token_ids=True, coalesce_chunks=False)
IDS_ONLY_TUNED = Variant("capture + token ids, no logprobs + tuning", "capture", tuning=True, token_ids=True,
                         logprobs=False)
LATENCY_VARIANTS = (DIRECT, BARE, BARE_TUNED, BARE_FAST_TUNED, CAPTURE_STOCK_TUNED, CAPTURE_UNCOALESCED,
                    CAPTURE_TUNED, TOKENS_TUNED)
# Each proxy variant against the bare proxy started the same way: what the addon itself costs.
BASES = {BARE_FAST_TUNED.name: BARE_TUNED, CAPTURE_STOCK_TUNED.name: BARE_TUNED,
         CAPTURE_TUNED.name: BARE_FAST_TUNED, CAPTURE_UNCOALESCED.name: BARE_FAST_TUNED,
         TOKENS_TUNED.name: BARE_FAST_TUNED, IDS_ONLY_TUNED.name: BARE_FAST_TUNED}


def base_of(variant: Variant, measured: tuple[Variant, ...]) -> Variant | None:
    """The bare variant ``variant`` is compared with, if it was measured too."""
    base = BASES.get(variant.name)
    return base if base in measured else None


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far, from its own counters."""
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Return once 127.0.0.1:port accepts connections; raise if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout:.0f}s")


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGINT (mitmdump flushes), then SIGKILL if it hangs; only this process."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGINT, timeout), (signal.SIGKILL, 5.0)):
        try:
            proc.send_signal(sig)
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


class Upstream:
    """``python -m rollouttap.testing.upstream`` in its own process."""

    def __init__(self, chunk_delay: float = 0.0, tokens_per_chunk: int = 4, memo: bool = True) -> None:
        self.chunk_delay = chunk_delay
        self.tokens_per_chunk = tokens_per_chunk
        self.memo = memo  # a repeated request gets its first answer's bytes: the model costs next to nothing
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""

    def __enter__(self) -> Upstream:
        self.proc = subprocess.Popen(
            [PY, "-m", "rollouttap.testing.upstream", "--port", "0", "--chunk-delay", str(self.chunk_delay),
             "--tokens-per-chunk", str(self.tokens_per_chunk), *(["--memo"] if self.memo else [])],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("LISTENING "):
            self.__exit__()
            raise RuntimeError(f"upstream did not start: {line!r}")
        self.url = line.split()[1]
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def hostport(self) -> str:
        return self.url.split("://", 1)[1]

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class BareProxy:
    """mitmdump without rollouttap (optionally with only the TCP tuning script)."""

    def __init__(self, variant: Variant, confdir: Path) -> None:
        self.variant = variant
        self.port = free_port()
        args = [PY, *LAUNCHERS[variant.launcher], "-q", "--listen-host", "127.0.0.1", "--listen-port", str(self.port),
                "--set", f"confdir={confdir}"]
        if variant.tuning:
            args += ["-s", str(tuning_script())]
            if not variant.coalesce_chunks:
                args += ["--set", f"{COALESCE_OPTION}=false"]
        if variant.stream_bodies:
            args += ["--set", "stream_large_bodies=1"]
        if variant.answer_cache:
            args += ["-s", str(ANSWER_CACHE)]
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> BareProxy:
        self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, env=launch_env(self.variant.launcher, os.environ))
        wait_port(self.port, self.proc)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


def capture_config(variant: Variant, store: Path, confdir: Path, model_hosts: tuple[str, ...]) -> ProxyConfig:
    """The mitmdump + rollouttap configuration of a capture variant."""
    config = ProxyConfig(store=store, confdir=confdir, model_hosts=model_hosts, token_ids=variant.token_ids,
                         logprobs=variant.logprobs, launcher=variant.launcher)
    if not variant.tuning:
        config.extra[QUICKACK_OPTION] = "false"
    if not (variant.tuning and variant.coalesce_chunks):
        config.extra[COALESCE_OPTION] = "false"
    return config


class CaptureProxy:
    """mitmdump + rollouttap recording into its own store."""

    def __init__(self, variant: Variant, workdir: Path, confdir: Path, model_hosts: tuple[str, ...]) -> None:
        self.variant = variant
        self.store = workdir / f"{variant.name.replace(' ', '_').replace('+', '')}.db"
        self.process = ProxyProcess(capture_config(variant, self.store, confdir, model_hosts))

    def start(self) -> CaptureProxy:
        self.process.start(timeout=60)
        return self

    @property
    def url(self) -> str:
        return self.process.url

    @property
    def pid(self) -> int:
        assert self.process.proc is not None
        return self.process.proc.pid

    def stop(self) -> None:
        self.process.stop()


Proxy = BareProxy | CaptureProxy


def make_proxy(variant: Variant, workdir: Path, confdir: Path, model_hosts: tuple[str, ...]) -> Proxy:
    if variant.proxy == "bare":
        return BareProxy(variant, confdir)
    return CaptureProxy(variant, workdir, confdir, model_hosts)


class ProxyStack:
    """Every variant's proxy, started once (the first alone: it creates the CA), stopped together."""

    def __init__(self, variants: tuple[Variant, ...], workdir: Path, model_hosts: tuple[str, ...]) -> None:
        self.variants = variants
        self.workdir = workdir
        self.confdir = workdir / "mitmproxy-conf"
        self.model_hosts = model_hosts
        self.proxies: dict[str, Proxy] = {}
        self._stack = ExitStack()

    def __enter__(self) -> ProxyStack:
        wanted = [v for v in self.variants if v.proxy is not None]
        built = [make_proxy(v, self.workdir, self.confdir, self.model_hosts) for v in wanted]
        try:
            if built:
                self._started(built[0].start())
            errors: list[BaseException] = []
            threads = [threading.Thread(target=self._start_one, args=(p, errors)) for p in built[1:]]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            if errors:
                raise errors[0]
        except BaseException:
            self.__exit__()
            for proxy in built:
                proxy.stop()
            raise
        return self

    def _start_one(self, proxy: Proxy, errors: list[BaseException]) -> None:
        try:
            self._started(proxy.start())
        except BaseException as exc:  # re-raised in __enter__
            errors.append(exc)

    def _started(self, proxy: Proxy) -> None:
        self.proxies[proxy.variant.name] = proxy
        self._stack.callback(proxy.stop)

    def url(self, variant: Variant) -> str | None:
        """The proxy URL of a variant; None for direct."""
        return None if variant.proxy is None else self.proxies[variant.name].url

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


def proxy_environ(proxy_url: str | None, base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with proxy variables set, or removed for direct."""
    env = dict(os.environ if base is None else base)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        env.pop(name, None)
    env.update({"NO_PROXY": "", "no_proxy": ""})
    if proxy_url:
        env.update({name: proxy_url for name in ("HTTP_PROXY", "http_proxy")})
    return env
