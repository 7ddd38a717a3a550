"""The addon's options: declared for mitmproxy's loader, and checked when they change (OptionsError, which
mitmdump reports at start-up, or refuses at run time, leaving the old values)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mitmproxy import exceptions
from mitmproxy.proxy import mode_specs

from rollouttap.addon.attribution import PID_LOOKUPS
from rollouttap.addon.loopback import is_host_port, is_loopback, url_host
from rollouttap.addon.routes import Route, RouteError, parse_routes
from rollouttap.store.writer import MAX_BACKLOG_BYTES


def declare(loader: Any) -> None:
    """Every rollouttap_* option, with the help text ``mitmdump --options`` shows."""
    loader.add_option("rollouttap_store", str, "", "SQLite store file every flow is recorded into.")
    loader.add_option("rollouttap_proxy_id", str, "",
                      "Id this proxy records itself under in the store (default: random).")
    loader.add_option("rollouttap_routes", Sequence[str], [],
                      "Send requests for a host elsewhere: HOST[:PORT]=BASE_URL, e.g. "
                      "api.openai.com=http://127.0.0.1:8000. Route targets count as model hosts.")
    loader.add_option("rollouttap_model_hosts", Sequence[str], [],
                      "Model servers (HOST or HOST:PORT) whose chat/completion requests get "
                      "token ids and logprobs added (and stripped from what the agent sees).")
    loader.add_option("rollouttap_token_ids", bool, True,
                      "Ask model hosts for exact token ids and logprobs.")
    loader.add_option("rollouttap_logprobs", bool, True,
                      "With token ids, also ask for each sampled token's logprob (TRL's "
                      "importance-sampling correction uses them); off keeps answers ~30x smaller.")
    loader.add_option("rollouttap_pid_attribution", bool, True,
                      "Attribute connections by the process that owns the client socket (off: credentials "
                      "and headers alone name agents, and no token is checked against its sender).")
    loader.add_option("rollouttap_pid_lookup", str, "eager",
                      "When to look up a connection's process: 'eager' (as it connects, for every "
                      "connection: flows also record the pid of credentialed clients) or 'fallback' "
                      "(only when a request carries no credentials: saves ~0.3-1 ms of CPU per new "
                      "connection of managed agents).", choices=PID_LOOKUPS)
    loader.add_option("rollouttap_allow_remote", bool, False,
                      "Allow listening on non-loopback addresses (agents on other hosts).")
    loader.add_option("rollouttap_remote_anonymous", bool, False,
                      "Serve clients on other hosts that present no proxy credentials (recorded as "
                      "unattributed, whatever X-Agent-ID they send); off, they get 407: nothing names their "
                      "agent, and the proxy would relay them to this host's loopback services.")
    loader.add_option("rollouttap_store_backlog_mb", int, MAX_BACKLOG_BYTES >> 20,
                      "Flow data (MiB) kept in memory while the store cannot take it (a full disk, a lock "
                      "held by another process); beyond it, new requests are answered 503 until it can.")
    loader.add_option("rollouttap_body_keep_mb", int, 32,
                      "Of a body from or to a host that is not a model host (a package download, a git fetch, an "
                      "upload), keep at most this many MiB in the store; the other side still gets every byte, live. "
                      "0 keeps every byte (and holds an upload whole before sending it on). Requests to and answers "
                      "from a model host's chat, completions and responses paths are kept whole.")
    loader.add_option("rollouttap_held_body_max_mb", int, 256,
                      "A request body the proxy holds whole before sending it on (to a model host's chat, "
                      "completions and responses paths, routed, refused 407, or any with rollouttap_body_keep_mb 0) "
                      "whose Content-Length is over this many MiB is not read: its connection is closed and the flow "
                      "recorded with why, so that one agent cannot take the memory every agent's calls go through. "
                      "0: no limit.")
    loader.add_option("rollouttap_parent_pid", int, 0,
                      "Shut down cleanly when this process ends (the manager that started us).")
    loader.add_option("rollouttap_log_file", str, "",
                      "The file this proxy's output already goes to (set by the manager that starts it; it does "
                      "not choose where output goes): removed at exit if empty once rollouttap_parent_pid's "
                      "process is gone, as that process would have.")


def check(opts: Any, updated: set[str]) -> None:
    """Refuse values no hook could work with."""
    if "rollouttap_pid_lookup" in updated and opts.rollouttap_pid_lookup not in PID_LOOKUPS:
        raise exceptions.OptionsError(f"rollouttap_pid_lookup must be one of {', '.join(PID_LOOKUPS)}, "
                                      f"not {opts.rollouttap_pid_lookup!r}")
    if "rollouttap_body_keep_mb" in updated and opts.rollouttap_body_keep_mb < 0:
        raise exceptions.OptionsError("rollouttap_body_keep_mb must be 0 (keep every byte) or more (MiB), not "
                                      f"{opts.rollouttap_body_keep_mb}")
    if "rollouttap_held_body_max_mb" in updated and opts.rollouttap_held_body_max_mb < 0:
        raise exceptions.OptionsError("rollouttap_held_body_max_mb must be 0 (no limit) or more (MiB), not "
                                      f"{opts.rollouttap_held_body_max_mb}")
    if "stream_large_bodies" in updated and opts.stream_large_bodies:
        # mitmproxy streams a body past that size whatever a hook says, before the addon can see it.
        raise exceptions.OptionsError(
            "stream_large_bodies cannot be used with rollouttap: model requests and answers past that size would "
            "go through unrecorded, without token ids. rollouttap streams bodies itself (SSE answers, and "
            "bodies to and from hosts that are not model hosts, keeping rollouttap_body_keep_mb of each)")
    if "rollouttap_store_backlog_mb" in updated and opts.rollouttap_store_backlog_mb < 1:
        raise exceptions.OptionsError("rollouttap_store_backlog_mb must be at least 1 (MiB), not "
                                      f"{opts.rollouttap_store_backlog_mb}")


def routes_and_model_hosts(opts: Any) -> tuple[tuple[Route, ...], frozenset[str]]:
    """The routes, and the model hosts they and ``rollouttap_model_hosts`` name."""
    try:
        routes = parse_routes(opts.rollouttap_routes)
    except RouteError as exc:
        raise exceptions.OptionsError(str(exc)) from exc
    bad = [h for h in opts.rollouttap_model_hosts if h.strip() and not is_host_port(h)]
    if bad:
        raise exceptions.OptionsError(f"rollouttap_model_hosts: {bad[0]!r} is not HOST[:PORT] (no scheme, "
                                      "no path), e.g. 127.0.0.1:8000")
    return routes, model_host_set(opts.rollouttap_model_hosts, routes)


def loopback_only(opts: Any) -> None:
    """Listen on loopback unless ``rollouttap_allow_remote``: mitmproxy's default of every interface becomes
    127.0.0.1, any other address is refused."""
    if opts.rollouttap_allow_remote:
        return
    if opts.listen_host == "":
        # mitmproxy's default is every interface; ours is loopback unless told otherwise.
        opts.update(listen_host="127.0.0.1")
    elif not is_loopback(opts.listen_host):
        raise exceptions.OptionsError(
            f"refusing to listen on {opts.listen_host}: agents' traffic (and API keys) would be "
            "reachable from other hosts. Set rollouttap_allow_remote=true to allow it.")
    for spec in opts.mode:
        try:
            host = mode_specs.ProxyMode.parse(spec).custom_listen_host  # None: the listen_host above
        except ValueError:
            continue  # mitmproxy refuses the spec itself, with its own message
        if host is not None and (host == "" or not is_loopback(host)):  # "" (``regular@:8080``): every address
            raise exceptions.OptionsError(
                f"refusing mode {spec!r} on a non-loopback address; set rollouttap_allow_remote=true")


def model_host_set(hosts: Sequence[str], routes: tuple[Route, ...]) -> frozenset[str]:
    """Model hosts as ``host`` and ``host:port`` strings; every route target is one."""
    found = {h.strip().lower() for h in hosts if h.strip()}
    found |= {f"{url_host(r.host)}:{r.port}" for r in routes}  # as is_model_request matches them
    return frozenset(found)
