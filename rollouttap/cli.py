"""The ``rollouttap`` command: thin commands over the library. Results on stdout, logs on stderr."""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from rollouttap.errors import (
    AgentSpecError, ConfigError, NotFoundError, ProxyError, RolloutTapError, StoreError, StoreVersionError,
)

if TYPE_CHECKING:
    from rollouttap.manager.proxy import ProxyConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Capture whole agent conversations as exact token ids, for agentic RL.")

# One line per failure, naming the next step; the traceback only with --debug.
HINTS: dict[type[Exception], str] = {
    StoreVersionError: "use a store file written by this version, or a new --store path",
    StoreError: "check the --store path: a rollouttap SQLite file (writable, where a command records)",
    ProxyError: "the proxy's log (named in the message) says why",  # only where the message names one
    AgentSpecError: "check the --agent command template or module:function",
    NotFoundError: "`rollouttap flows --store PATH` lists the store's flows with their agents",
    ConfigError: "check the option named in the message",
}

_state = {"debug": False}
# Options `rollouttap proxy` sets itself (the store and identity it waits on, its parent watch and log, and the
# remote-listening switch its --allow-remote checks the address against), with what to do instead.
OWN_OPTIONS = {
    "rollouttap_store": "use --store", "rollouttap_allow_remote": "use --allow-remote",
    "rollouttap_proxy_id": "it sets it for each proxy it starts",
    "rollouttap_parent_pid": "it sets it for each proxy it starts",
    "rollouttap_log_file": "it sets it for each proxy it starts",
}


def _print_version(value: bool) -> None:
    if value:
        from rollouttap import __version__
        typer.echo(f"rollouttap {__version__}")
        raise typer.Exit()


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False,
          version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                help="Print rollouttap's version and exit.")] = False,
          ) -> None:
    _state["debug"] = debug
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")


@app.command()
def proxy(
    store: Annotated[Path, typer.Option(help="SQLite store every flow is recorded into.")] = Path("runs.db"),
    listen: Annotated[str, typer.Option(help="HOST:PORT to listen on; port 0 picks a free one.")]
        = "127.0.0.1:0",
    route: Annotated[Optional[list[str]], typer.Option(
        help="HOST[:PORT]=BASE_URL: send a hard-wired host to another server (repeatable).")] = None,
    model_host: Annotated[Optional[list[str]], typer.Option(
        help="HOST[:PORT] of a model server: ask it for token ids and logprobs (repeatable).")] = None,
    token_ids: Annotated[bool, typer.Option(help="Inject token-id requests for model hosts.")] = True,
    logprobs: Annotated[bool, typer.Option(
        help="With token ids, also ask for sampling logprobs (--no-logprobs: ~30x smaller answers).")] = True,
    reverse: Annotated[Optional[str], typer.Option(
        help="Also listen as a reverse proxy in front of this model URL (base-URL mode).")] = None,
    reverse_port: Annotated[int, typer.Option(
        help="Port of the --reverse listener (on --listen's host); 0 picks a free one. Give one, so that a "
             "restarted proxy keeps its agents' base URLs.")] = 0,
    confdir: Annotated[Optional[Path], typer.Option(help="mitmproxy config dir (its CA).")] = None,
    allow_remote: Annotated[bool, typer.Option(help="Allow a non-loopback listen address.")] = False,
    public_host: Annotated[Optional[str], typer.Option(
        help="The address agents are told to reach the proxy at (this host's, as agents on other hosts or in "
             "containers reach it); default: --listen's host, 127.0.0.1 for every address.")] = None,
    launcher: Annotated[str, typer.Option(
        help="fastdump: mitmdump with rollouttap's faster hook dispatch, under python -O; "
             "mitmdump: mitmproxy's own entry point.")] = "fastdump",
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", help="KEY=VALUE: a mitmproxy or rollouttap option (repeatable), e.g. "
                      "ssl_verify_upstream_trusted_ca=/path/ca.pem for a model server with its own CA.")] = None,
) -> None:
    """Run the capture proxy until Ctrl-C; print the environment agents need.

    Example: rollouttap proxy --store runs.db --model-host 127.0.0.1:8000
    """
    from rollouttap.addon.loopback import is_any_address
    from rollouttap.manager.proxy import ProxyConfig
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--listen {listen!r} is not HOST:PORT")
    extra = {}
    for pair in set_ or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r} is not KEY=VALUE")
        if key in OWN_OPTIONS:
            raise ConfigError(f"--set {key} is the command's own: {OWN_OPTIONS[key]}")
        extra[key] = value
    if reverse_port and not reverse:
        raise ConfigError(f"--reverse-port {reverse_port} needs --reverse (the model URL its listener serves)")
    config = ProxyConfig(store=store.resolve(), host=host.strip("[]"), port=int(port),
                         routes=tuple(route or ()), model_hosts=tuple(model_host or ()),
                         token_ids=token_ids, logprobs=logprobs, reverse_target=reverse, reverse_port=reverse_port,
                         confdir=confdir, public_host=public_host,
                         allow_remote=allow_remote, launcher=launcher, extra=extra)
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        _serve(config, is_any_address(config.host))
    finally:  # the caller's own handlers again (main() may be called again in the same process)
        for signum, handler in before.items():
            if handler is not None:  # None: not set from Python, nothing to put back
                signal.signal(signum, handler)


def _serve(config: ProxyConfig, on_every_address: bool) -> None:
    """Start the proxy, print its environment, run it until a signal, stop it with every row committed."""
    from rollouttap.manager.proxy import ProxyProcess

    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")  # start() stops a proxy it started; this command then ends
    signal.signal(signal.SIGINT, signal.default_int_handler)  # inherited as ignored by a script's background job
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupt)
    proc = ProxyProcess(config).start()
    stop = {"now": False}
    try:
        def stop_now(*_: object) -> None:
            stop["now"] = True
            # A second Ctrl-C breaks off the wait for the proxy's last commits (below). Inherited as ignored
            # (started in the background by a script) Ctrl-C would do nothing at all; a hang-up would kill this
            # command and leave the proxy to notice on its own, its exit status unread.
            signal.signal(signal.SIGINT, signal.default_int_handler)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, stop_now)  # before the exports go out: whoever reads them may signal at once
        typer.echo(f"# rollouttap proxy at {proc.url}, recording into {config.store}", err=True)
        if on_every_address:
            every = "every address, IPv4 and IPv6" if ":" in config.host else "every IPv4 address"
            where = (f"use {config.public_host} as below" if config.public_host else "put this host's address in "
                     "place of 127.0.0.1 below (or start it with --public-host ADDRESS)")
            typer.echo(f"# it listens on {every}: agents on other hosts {where}, and present their agent's "
                       "credentials", err=True)
        if config.allow_remote:
            url = proc.url if config.public_host or not on_every_address else f"http://ADDRESS:{proc.port}"
            typer.echo(f"# agents on other hosts: `rollouttap agent start --store {shlex.quote(str(config.store))} "
                       f"--proxy {url}` prints an agent's credentials, with the proxy as they reach it", err=True)
        if proc.reverse_url:
            typer.echo(f"# base-URL mode: OPENAI_BASE_URL={proc.reverse_url}/agents/<id>/<token>/v1 for agents a "
                       f"manager registers: AgentManager(proxy={proc.url!r}, base_url_mode=True, store=...)",
                       err=True)
        for key, value in proc.env().items():
            typer.echo(f"export {key}={shlex.quote(value)}")
        while not stop["now"] and proc.alive():
            time.sleep(0.2)
    except KeyboardInterrupt:  # a signal before stop_now took over
        pass
    finally:
        died = proc.proc.poll() if proc.proc is not None else None  # its status, when it ended by itself
        try:
            clean = proc.stop()
        except KeyboardInterrupt:  # a second Ctrl-C: this command goes, the proxy finishes on its own
            typer.echo(f"# interrupted: the proxy is still committing and stops by itself (log {proc.log_path})",
                       err=True)
            raise
    if died is not None:
        raise ProxyError(f"mitmdump exited unexpectedly with status {died} (log {proc.log_path}):\n"
                         f"{proc.log_tail()}")
    if not clean:
        raise ProxyError(f"the proxy stopped without writing every row to {config.store}:\n{proc.log_tail()}")
    typer.echo("# proxy stopped; every flow is committed", err=True)


def _register_optional_commands() -> None:
    """Commands whose modules may pull heavier imports register themselves lazily."""
    import importlib
    for name in ("rollouttap.cli_run", "rollouttap.cli_agent", "rollouttap.cli_inspect", "rollouttap.cli_demo"):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(app)


def debug_first(argv: list[str]) -> list[str]:
    """``--debug`` is the root's option; users put it after the command too (not after ``--``, where an
    agent's own command line begins)."""
    end = argv.index("--") if "--" in argv else len(argv)
    if "--debug" not in argv[:end]:
        return list(argv)
    return ["--debug", *(a for a in argv[:end] if a != "--debug"), *argv[end:]]


def _pipe_closed() -> int:
    """The exit status of a command whose reader closed stdout: 141, as a shell reports a SIGPIPE death (what
    `head` expects of its writer). stdout goes to /dev/null so that the interpreter's last flush stays quiet."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 141


def hint_for(exc: RolloutTapError) -> str:
    """The next step to print under an error's line, or "" where its message says it already."""
    if isinstance(exc, ProxyError) and "(log " not in str(exc):
        return ""
    return next((hint for cls, hint in HINTS.items() if isinstance(exc, cls)), "")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``rollouttap`` console script."""
    _register_optional_commands()
    try:
        code = app(args=debug_first(sys.argv[1:] if argv is None else argv), standalone_mode=False)
    except RolloutTapError as exc:
        if _state["debug"]:
            raise
        hint = hint_for(exc)
        typer.echo(f"rollouttap: {exc}" + (f"\n  next: {hint}" if hint else ""), err=True)
        return 1
    except BrokenPipeError:  # stdout closed early (`rollouttap flows --json | head`): quietly, as a SIGPIPE would
        return _pipe_closed()
    except OSError as exc:  # a path that is not there or not writable, a command that cannot start
        if _state["debug"]:
            raise
        if exc.filename:
            typer.echo(f"rollouttap: {exc.strerror or exc}: {exc.filename}\n  next: check that path", err=True)
        else:
            typer.echo(f"rollouttap: {exc}\n  next: --debug shows where it failed", err=True)
        return 1
    except typer.Abort:
        return 130
    except SystemExit as exc:
        # typer meets a broken pipe first and exits 1 from inside its `except OSError`, leaving the pipe's error
        # as the exit's context: read, it is the same early close of stdout as above.
        if isinstance(exc.__context__, BrokenPipeError):
            return _pipe_closed()
        return int(exc.code or 0)
    except Exception as exc:
        # Usage errors come from the click that typer vendors, so test by shape, not by class.
        if hasattr(exc, "show") and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            return exc.exit_code
        raise
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
