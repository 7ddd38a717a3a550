"""The proxy a manager's agents go through: one it started (restarted when it dies) or one it attached to."""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from rollouttap.addon.loopback import is_any_address, resolve_host
from rollouttap.errors import ConfigError, ProxyError, StoreError
from rollouttap.manager.launch import split_model_url
from rollouttap.manager.proxy import ProxyConfig, ProxyProcess, proxy_env
from rollouttap.store import Store

log = logging.getLogger(__name__)

RESTART_BACKOFF_S = 10.0


class ProxyLink:
    """The proxy agents go through: one this manager started (restarted when it dies) or one it attached to."""

    def __init__(self, url: str, ca_cert: str | None, reverse_url: str | None,
                 process: ProxyProcess | None, proxy_id: str | None = None) -> None:
        self.url, self.ca_cert, self.process = url, ca_cert, process
        # The store's ids of this proxy: a restarted process records under a new one.
        first = process.proxy_id if process is not None else proxy_id
        self.proxy_ids = [first] if first else []
        # Agents get the reverse listener as "localhost": requests (like curl) ignores the port of an IP
        # address in NO_PROXY, but honours host:port for a name.
        self.reverse_url = loopback_as_localhost(reverse_url) if reverse_url else None
        self.restarts = 0
        self._lock = threading.Lock()
        self._failed_at = -float("inf")  # time.monotonic() of the last restart that failed
        self.restart_timeout = 30.0

    @classmethod
    def open(cls, arg: str | ProxyConfig | None, count: int = 1, *, store: Store, store_path: Path,
             model_url: str | None, base_url_mode: bool, confdir: Path | None) -> list[ProxyLink]:
        """``count`` proxies from a config (the default one when None), each its own process and port, all
        recording into the store; or the running proxy at a URL."""
        if isinstance(arg, str):
            if count > 1:
                raise ConfigError("proxies > 1 starts its own proxies: it cannot attach to one by URL")
            return [cls.attach(arg, store, base_url_mode)]
        config = own_proxy_config(arg, store_path=store_path, model_url=model_url,
                                  base_url_mode=base_url_mode, confdir=confdir)
        if count > 1 and (config.port or config.reverse_port):
            raise ConfigError("proxies > 1 needs port 0 (and reverse_port 0): each proxy picks a free port")
        links: list[ProxyLink] = []
        errors: list[BaseException] = []

        def start() -> None:
            try:
                process = ProxyProcess(replace(config)).start()  # its own copy: start() pins its ports in it
                links.append(cls(process.url, process.ca_cert, process.reverse_url if base_url_mode else None,
                                 process))
            except BaseException as exc:  # re-raised below, after the others are stopped
                errors.append(exc)
        start()  # alone first: it creates the CA the others then share
        threads = [threading.Thread(target=start) for _ in range(count - 1)] if not errors else []
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        except BaseException as exc:  # a Ctrl-C: the proxies still starting are stopped too, once they are up
            errors.insert(0, exc)
            for thread in threads:
                if thread.ident is not None:  # started
                    thread.join()
        if errors:
            for link in links:
                link.close()
            raise errors[0]
        return links

    @classmethod
    def attach(cls, url: str, store: Store, base_url_mode: bool = False) -> ProxyLink:
        """The running proxy at ``url``, which must record into ``store`` and answer."""
        parts = urlsplit(url)
        if not parts.hostname or not parts.port:
            raise ConfigError(f"proxy URL {url!r} is not http://HOST:PORT")
        row = _live_at(url, store)
        if row is None:
            raise ProxyError(f"no running rollouttap proxy at {url} records into {store.path}; start one with "
                             f"`rollouttap proxy --store {store.path}` or let the manager start its own")
        host = parts.netloc.rpartition("@")[2].rsplit(":", 1)[0]  # as written: an IPv6 address keeps its brackets
        reverse = next((f"http://{host}:{x['port']}" for x in row["listen"] if x["mode"] == "reverse"), None)
        if base_url_mode and reverse is None:
            raise ConfigError(f"base_url_mode needs a reverse listener; the proxy at {url} has none "
                              "(start it with --reverse MODEL_URL)")
        try:
            socket.create_connection((parts.hostname, parts.port), timeout=5).close()
        except OSError as exc:
            raise ProxyError(f"the proxy at {url} does not answer: {exc}") from exc
        return cls(f"http://{host}:{parts.port}", row["ca_cert"], reverse if base_url_mode else None, None,
                   row["proxy_id"])

    def serving(self, store: Store) -> list[str]:
        """The proxy an agent started now reaches: this manager's own, or the one running at the attached URL
        (started again by hand since, maybe)."""
        if self.process is not None:
            return self.proxy_ids[-1:]
        try:
            row = _live_at(self.url, store)
        except (StoreError, OSError) as exc:  # the store cannot tell now: the one attached to
            log.debug("cannot tell which proxy runs at %s: %s", self.url, exc)
            row = None
        return [row["proxy_id"]] if row is not None else self.proxy_ids[-1:]

    def served_since(self, given: list[str], store: Store) -> list[str]:
        """The proxies an agent ``given`` these (when it started) may have gone through since: those, the ones this
        link started again after them (a restart while it ran), and the one serving now."""
        ids = list(given)
        if given and given[-1] in self.proxy_ids:
            ids += self.proxy_ids[self.proxy_ids.index(given[-1]) + 1:]
        return list(dict.fromkeys([*ids, *self.serving(store)]))

    def env(self, agent_id: str, token: str) -> dict[str, str]:
        """HTTP(S)_PROXY with the agent's credentials, CA bundle, agent tag, NO_PROXY cleared."""
        env = proxy_env(self.url, self.ca_cert, agent_id=agent_id, token=token)
        if self.reverse_url:
            # Spares the proxy a hop: a client that matches NO_PROXY by host only (aiohttp) or ignores its
            # ports (curl) sends the base URL through HTTP_PROXY instead, and the proxy serves it as the
            # reverse listener would (addon/routes.py own_reverse_routes). Exempting host:port (not the
            # host) keeps other loopback traffic captured.
            hostport = self.reverse_url.split("://", 1)[1]
            env.update({"NO_PROXY": hostport, "no_proxy": hostport})
        return env

    def revive_if_dead(self, closing: threading.Event, store: Store | None = None) -> None:
        """Restart a proxy this manager started if it died, or stopped (``store`` tells: a SIGTERM someone else
        sent; it no longer listens while it closes its store); committed flows stay in the store."""
        process = self.process
        if process is None or closing.is_set():
            return
        with self._lock:  # always: while a restart runs, the new process is alive before it listens
            # After a failed restart (its port taken, say), agent starts do not queue up behind a retry each.
            if closing.is_set() or time.monotonic() - self._failed_at < RESTART_BACKOFF_S:
                return
            if process.alive() and not self._stopped(process, store):
                return
            log.warning("proxy %s %s (log %s); restarting it on %s", process.proxy_id,
                        "stopped" if process.alive() else "died", process.log_path, self.url)
            try:
                process.restart(timeout=self.restart_timeout)
                self.restarts += 1
                self.proxy_ids.append(process.proxy_id)
            except ProxyError:
                self._failed_at = time.monotonic()
                log.exception("restarting the proxy failed; agents cannot reach the model meanwhile (next try "
                              "in %.0f s)", RESTART_BACKOFF_S)

    @staticmethod
    def _stopped(process: ProxyProcess, store: Store | None) -> bool:
        """Whether the proxy recorded its stop; not when the store cannot tell now (locked, say): then its
        process's end is waited for, as before there was a store to ask."""
        if store is None or process.proxy_id is None:
            return False
        try:
            return store.proxy_stopped(process.proxy_id)
        except StoreError as exc:
            log.debug("cannot tell whether proxy %s stopped: %s", process.proxy_id, exc)
            return False

    def close(self) -> None:
        if self.process is not None:
            with self._lock:
                self.process.stop()


def loopback_as_localhost(url: str) -> str:
    """``http://127.0.0.1:9`` -> ``http://localhost:9``; other hosts unchanged. Not ``[::1]``: where localhost
    names 127.0.0.1 alone (many hosts), a listener on ::1 is not there."""
    parts = urlsplit(url)
    if parts.hostname in ("127.0.0.1", "localhost") and parts.port:
        return f"{parts.scheme}://localhost:{parts.port}{parts.path}"
    return url


def own_proxy_config(config: ProxyConfig | None, *, store_path: Path, model_url: str | None,
                     base_url_mode: bool, confdir: Path | None) -> ProxyConfig:
    """The config of the proxy a manager starts: the caller's (copied) plus the model server's settings."""
    if config is None:
        # pid_lookup "eager": a token must come from its own agent's processes (agents run as one user and can
        # read each other's from /proc/PID/environ).
        config = ProxyConfig(store=store_path, confdir=confdir)
    elif Path(config.store).resolve() != store_path:
        raise ConfigError(f"the proxy config records into {config.store}, the manager reads {store_path}")
    elif confdir is not None:
        theirs = config.extra.get("confdir") or config.confdir  # extra wins, as mitmdump gets it
        if theirs is not None and Path(theirs).expanduser().resolve() != Path(confdir).expanduser().resolve():
            raise ConfigError(f"confdir {confdir} differs from the proxy config's {theirs}: give one")
        config = replace(config, confdir=confdir)
    config = replace(config, store=store_path, routes=tuple(config.routes), extra=dict(config.extra))
    if model_url is not None:
        root, hostport, _ = split_model_url(model_url)
        if hostport not in config.model_hosts:
            config = replace(config, model_hosts=(*config.model_hosts, hostport))
        if base_url_mode and not config.reverse_target:
            config = replace(config, reverse_target=root)
    return config


def _live_at(url: str, store: Store) -> dict[str, Any] | None:
    """The store's running proxy whose regular listener is at ``url`` (http://HOST:PORT)."""
    parts = urlsplit(url)
    if not parts.hostname or not parts.port:
        return None
    addresses = resolve_host(parts.hostname, parts.port)
    return next((p for p in store.proxies(alive_only=True)
                 if any(x["mode"] == "regular" and _listens_at(x, addresses, parts.port) for x in p["listen"])), None)


def _listens_at(listener: dict[str, Any], addresses: set[str], port: int) -> bool:
    """Whether a proxy's listener (as its store row lists it) is the one at one of ``addresses``:``port``.
    A port alone is not enough: another proxy, recording elsewhere, may hold it on another address."""
    return int(listener["port"]) == port and (is_any_address(listener["host"]) or listener["host"] in addresses)
