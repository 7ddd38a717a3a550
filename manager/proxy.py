"""Running the capture proxy: a real ``mitmdump -s addon/entry.py`` subprocess, found through the store."""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

from rollouttap.addon.attribution import PID_LOOKUPS
from rollouttap.addon.loopback import (
    is_any_address, is_host_port, is_ip_address, is_loopback, mitmproxy_listen_host, url_host,
)
from rollouttap.addon.routes import RouteError, parse_route
from rollouttap.errors import ConfigError, ProxyError
from rollouttap.manager.proxy_ca import DEFAULT_CONFDIR, DEFAULT_KEY_SIZE, ensure_ca
from rollouttap.paths import cache_root
from rollouttap.store.writer import EXIT_UNWRITTEN
from rollouttap.store import Store

log = logging.getLogger(__name__)

CA_FILE = "mitmproxy-ca-cert.pem"
CA_ENV = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "CURL_CA_BUNDLE", "GIT_SSL_CAINFO")
# How mitmdump is started. "fastdump": addon/fastdump.py (indexed hook dispatch, no log records nobody
# keeps) under python -O, which drops mitmproxy's per-message type checks: bare, about half the proxy CPU
# per keep-alive request (bench/RESULTS.md). "mitmdump": mitmproxy's own entry point, as ``mitmdump -s``.
# Options ProxyProcess depends on being its own: it waits for its proxy id's row in this store, and names the
# file mitmdump's output goes to.
_OWN_EXTRA = {
    "rollouttap_store": "use ProxyConfig(store=...): the proxy is awaited in that store",
    "rollouttap_proxy_id": "ProxyProcess names each proxy it starts and waits for that name",
    "rollouttap_log_file": "ProxyProcess sets it (the file it sends mitmdump's output to)",
}
# -P: nothing from the working directory on sys.path (-m and -c would put it first): a file there named like a
# module mitmproxy imports (an agent's project folder's ``concurrent.py``, ``http.py``) would stop the proxy, or
# run inside it.
LAUNCHERS = {
    "fastdump": ["-P", "-O", "-m", "rollouttap.addon.fastdump"],
    "mitmdump": ["-P", "-c", "from mitmproxy.tools.main import mitmdump; mitmdump()"],
}


def addon_script() -> Path:
    """Path of the file ``mitmdump -s`` loads (found without importing mitmproxy here)."""
    spec = importlib.util.find_spec("rollouttap.addon.entry")
    if spec is None or spec.origin is None:
        raise ProxyError("rollouttap.addon.entry is not installed")
    return Path(spec.origin)


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (mitmproxy refuses two port-0 listeners on one host)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # "::" listens on every address, v4 and v6
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def proxy_env(proxy_url: str, ca_cert: str | None, *, agent_id: str | None = None,
              token: str | None = None) -> dict[str, str]:
    """Environment that sends a process's HTTP(S) through the proxy (with credentials if given)."""
    url = proxy_url
    if agent_id is not None and token is not None:
        scheme, _, rest = proxy_url.partition("://")
        url = f"{scheme}://{quote(agent_id, safe='')}:{quote(token, safe='')}@{rest}"
    env = {name: url for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")}
    # An inherited NO_PROXY=localhost would make every Python client bypass the proxy for local models.
    env.update({"NO_PROXY": "", "no_proxy": ""})
    # Node's built-in fetch (and, from Node 24, http/https) reads HTTP(S)_PROXY only when asked to
    # (Node 22.21 / 24 and later; older Node ignores both: use base-URL mode for it).
    env["NODE_USE_ENV_PROXY"] = "1"
    if ca_cert:
        env.update({name: ca_cert for name in CA_ENV})
    if agent_id is not None:
        env["ROLLOUTTAP_AGENT_ID"] = agent_id
    return env


def launch_env(launcher: str, environ: Mapping[str, str]) -> dict[str, str]:
    """The proxy's environment: the caller's, plus a bytecode cache for ``python -O`` where it has none.

    Under -O Python reads .opt-1.pyc files, which pip never writes. With PYTHONDONTWRITEBYTECODE set (as
    in many container images) every proxy start would compile mitmproxy again (~1 s here): the proxy
    keeps its bytecode in rollouttap's cache directory instead, never in site-packages.
    """
    env = dict(environ)
    if "-O" in LAUNCHERS[launcher] and env.get("PYTHONDONTWRITEBYTECODE"):
        del env["PYTHONDONTWRITEBYTECODE"]
        env.setdefault("PYTHONPYCACHEPREFIX", str(cache_root() / "pycache"))
    return env


@dataclass
class ProxyConfig:
    """How to start the proxy; every field but ``public_host`` maps to a mitmdump option."""
    store: Path
    host: str = "127.0.0.1"
    port: int = 0
    # The address agents are given for it (their HTTP_PROXY, the reverse listener's base URLs): this host's
    # address as agents on other hosts or in containers reach it. Default: ``host``, or 127.0.0.1 where that
    # is every address (agents on this host).
    public_host: str | None = None
    routes: tuple[str, ...] = ()
    model_hosts: tuple[str, ...] = ()
    token_ids: bool = True
    logprobs: bool = True  # with token ids: also each sampled token's logprob (off: ~30x smaller answers)
    pid_lookup: str = "eager"  # "fallback": find a connection's process only for requests without credentials
    reverse_target: str | None = None  # base-URL mode: a reverse listener in front of the model
    reverse_port: int = 0
    confdir: Path | None = None
    allow_remote: bool = False
    parent_pid: int | None = field(default_factory=os.getpid)  # the proxy ends when this process does
    launcher: str = "fastdump"  # a key of LAUNCHERS
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Refuse what mitmdump would only refuse with a traceback in its log, or accept and ignore."""
        if self.pid_lookup not in PID_LOOKUPS:
            raise ConfigError(f"pid_lookup must be {' or '.join(map(repr, PID_LOOKUPS))}, not {self.pid_lookup!r}")
        if self.launcher not in LAUNCHERS:
            raise ConfigError(f"unknown launcher {self.launcher!r}: use one of {', '.join(LAUNCHERS)}")
        if not 0 <= self.port <= 65535 or not 0 <= self.reverse_port <= 65535:
            raise ConfigError(f"port {self.port if not 0 <= self.port <= 65535 else self.reverse_port} is not "
                              "0-65535 (0 picks a free one)")
        if not self.allow_remote and not is_loopback(self.host):
            what = "is not loopback" if is_ip_address(self.host) or is_any_address(self.host) else \
                "is neither localhost nor a loopback address (a host name may resolve to any address)"
            raise ConfigError(f"listen host {self.host!r} {what}, so agents on other hosts could use "
                              "the proxy: allow it with allow_remote=True (--allow-remote)")
        if self.public_host is not None and not _reachable_host(self.public_host):
            raise ConfigError(f"public_host {self.public_host!r} is not an address agents can reach this host at "
                              "(a host name or an IP address, no port)")
        for spec in self.routes:
            try:
                parse_route(spec)
            except RouteError as exc:
                raise ConfigError(str(exc)) from exc
        for key, instead in _OWN_EXTRA.items():
            if key in self.extra:
                raise ConfigError(f"extra[{key!r}]: {instead}")
        try:
            int(self.extra.get("key_size", DEFAULT_KEY_SIZE))
        except ValueError:
            raise ConfigError(f"key_size must be a number of bits, not {self.extra['key_size']!r}") from None
        for host in self.model_hosts:
            if not is_host_port(host):
                raise ConfigError(f"model host {host!r} is not HOST[:PORT] (no scheme, no path), e.g. 127.0.0.1:8000")

    def argv(self, proxy_id: str) -> list[str]:
        def flag(value: bool) -> str:
            return "true" if value else "false"
        # One --set per scalar option, ``extra`` overriding the fields: mitmdump 12.2 hangs at start-up
        # when a script's option is set twice with different values.
        scalars = {"rollouttap_store": str(self.store), "rollouttap_proxy_id": proxy_id,
                   "rollouttap_token_ids": flag(self.token_ids), "rollouttap_logprobs": flag(self.logprobs),
                   "rollouttap_pid_lookup": self.pid_lookup, "rollouttap_allow_remote": flag(self.allow_remote),
                   "connection_strategy": "lazy"}
        if self.confdir is not None:
            scalars["confdir"] = str(self.confdir)
        if self.parent_pid:
            scalars["rollouttap_parent_pid"] = str(self.parent_pid)
        scalars.update(self.extra)
        # "::" means IPv4 too, as on most servers; kept as it is where the addon is to refuse it (not remote).
        listen_host = mitmproxy_listen_host(self.host) if scalars["rollouttap_allow_remote"] == "true" else self.host
        args = [sys.executable, *LAUNCHERS[self.launcher],
                "-q", "-s", str(addon_script()), "--listen-host", listen_host]
        modes = [f"regular@{self.port}"]
        if self.reverse_target:
            modes.append(f"reverse:{self.reverse_target}@{self.reverse_port}")
        for mode in modes:
            args += ["--mode", mode]
        for route in self.routes:  # list options: each --set adds one
            args += ["--set", f"rollouttap_routes={route}"]
        for host in self.model_hosts:
            args += ["--set", f"rollouttap_model_hosts={host}"]
        for key, value in scalars.items():
            args += ["--set", f"{key}={value}"]
        return args


class ProxyProcess:
    """One mitmdump with the rollouttap addon; ``start()`` returns once it listens."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.proxy_id = uuid.uuid4().hex
        self.proc: subprocess.Popen[bytes] | None = None
        self.listen: list[dict[str, Any]] = []
        self.ca_cert: str | None = None
        self._log = _new_log()
        self.log_path = Path(self._log.name)

    def __enter__(self) -> ProxyProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return next(int(x["port"]) for x in self.listen if x["mode"] == "regular")

    @property
    def url(self) -> str:
        return f"http://{self._reach()}:{self.port}"

    @property
    def reverse_url(self) -> str | None:
        ports = [int(x["port"]) for x in self.listen if x["mode"] == "reverse"]
        return f"http://{self._reach()}:{ports[0]}" if ports else None

    def _reach(self) -> str:
        """The host of the URLs agents are given (``ProxyConfig.public_host``)."""
        config = self.config
        if config.public_host:
            return url_host(config.public_host.strip("[]"))
        return "127.0.0.1" if is_any_address(config.host) else url_host(config.host)

    def env(self, agent_id: str | None = None, token: str | None = None) -> dict[str, str]:
        """The variables an agent needs to go through this proxy."""
        return proxy_env(self.url, self.ca_cert, agent_id=agent_id, token=token)

    def start(self, timeout: float = 30.0) -> ProxyProcess:
        """Start mitmdump and wait until it listens; a proxy already running is left as it is."""
        if self.alive():
            return self  # `with ProxyProcess(...).start() as p` must not start a second one
        if self._log.closed:  # started again after a clean stop removed the log
            self._log = _new_log()
            self.log_path = Path(self._log.name)
        if self.config.reverse_target and self.config.reverse_port == 0 and self.config.port == 0:
            self.config.reverse_port = free_port(self.config.host)
        with Store(self.config.store) as store:  # a proxy killed before (SIGKILL, OOM) left them open for ever
            store.close_flows_of_dead_proxies()
        self._ensure_ca(timeout)
        argv = [*self.config.argv(self.proxy_id), "--set", f"rollouttap_log_file={self.log_path}"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env=launch_env(self.config.launcher, os.environ))
        try:
            listening = self._await_listening(self.proc, timeout)
        except ProxyError:  # it exited: nothing to stop, and restart()'s next try goes on with its log
            raise
        except BaseException:  # a Ctrl-C: a proxy nobody holds would run on, alive in the store
            self.stop()
            raise
        if not listening:
            self.stop(keep_log=True)
            raise ProxyError(f"mitmdump did not start within {timeout:.0f}s (log {self.log_path}):\n"
                             f"{self.log_tail()}")
        # Pin the ports, so that a restart comes back where the agents expect it.
        self.config.port = self.port
        if self.reverse_url:
            self.config.reverse_port = int(self.reverse_url.rsplit(":", 1)[1])
        log.info("proxy %s listening at %s (log %s)", self.proxy_id, self.url, self.log_path)
        return self

    def _await_listening(self, proc: subprocess.Popen[bytes], timeout: float) -> bool:
        """Wait for the proxy's row in the store to say where it listens: False after ``timeout`` seconds,
        ProxyError if it exits first."""
        with Store(self.config.store) as store:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                row = store.proxy(self.proxy_id)
                if row is not None and row["listen"] and row["stopped_at"] is None:
                    self.listen, self.ca_cert = row["listen"], row["ca_cert"]
                    return True
                if proc.poll() is not None:
                    raise ProxyError(f"mitmdump exited with {proc.returncode} (log {self.log_path}):\n"
                                     f"{self.log_tail()}")
                time.sleep(0.02)
        return False

    def _ensure_ca(self, timeout: float) -> None:
        """The CA made before mitmdump starts, so proxies starting together share one (manager/proxy_ca.py)."""
        confdir = self.config.extra.get("confdir") or self.config.confdir or DEFAULT_CONFDIR
        try:
            ensure_ca(confdir, int(self.config.extra.get("key_size", DEFAULT_KEY_SIZE)), timeout=timeout)
        except ProxyError:
            self._discard_log()
            raise
        except OSError as exc:
            self._discard_log()
            raise ProxyError(f"cannot make mitmproxy's CA in {confdir}: {exc}") from exc

    def _discard_log(self) -> None:
        """A start that ends before mitmdump runs: its log would only be left behind."""
        self._log.close()
        self.log_path.unlink(missing_ok=True)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def restart(self, timeout: float = 30.0) -> ProxyProcess:
        """Start again on the same ports after the process died; committed flows stay in the store."""
        self.stop()
        self.proxy_id = uuid.uuid4().hex
        deadline = time.monotonic() + timeout
        while True:  # the old socket may linger for a moment
            try:
                return self.start(timeout=max(1.0, deadline - time.monotonic()))
            except ProxyError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self, timeout: float = 30.0, *, keep_log: bool = False) -> bool:
        """Stop gracefully (every queued flow committed), killing only if it hangs; True when it ended cleanly
        (status 0), False otherwise, logged where rows it had queued never reached the store (exit status 3).
        The log file goes with a clean stop when empty (mitmdump runs with -q: what it logs is a warning or an
        error, such as a hook exception it swallowed); it stays otherwise, or with ``keep_log``."""
        proc, self.proc = self.proc, None
        if proc is None:
            return True
        for sig, wait in ((signal.SIGINT, timeout), (signal.SIGKILL, 5.0)):
            if proc.poll() is not None:  # ended by itself, or meanwhile
                break
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                log.warning("mitmdump did not stop on %s (log %s)", sig.name, self.log_path)
        status = proc.poll()
        self._log.close()  # a later start() begins a new log
        if status == 0 and not keep_log and _is_empty(self.log_path):
            self.log_path.unlink(missing_ok=True)
        if status == EXIT_UNWRITTEN:
            log.error("the proxy stopped with rows it could not write to the store %s (log %s)",
                      self.config.store, self.log_path)
        return status == 0  # None: not even SIGKILL ended it

    def log_tail(self, chars: int = 3000) -> str:
        if not self._log.closed:
            self._log.flush()
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:  # removed after a clean stop with nothing in it
            return ""


def _is_empty(path: Path) -> bool:
    try:
        return path.stat().st_size == 0
    except OSError:  # removed meanwhile (a tmp cleaner): nothing to keep either
        return False


def _new_log() -> IO[bytes]:
    return tempfile.NamedTemporaryFile(prefix="rollouttap-proxy-", suffix=".log", delete=False)


def _reachable_host(text: str) -> bool:
    """A host name or an IP address (IPv6 with or without brackets) other than every address; no port."""
    bare = text.strip("[]")
    if is_ip_address(bare):
        return not is_any_address(bare)
    return ":" not in bare and is_host_port(bare)
