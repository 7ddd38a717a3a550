"""``rollouttap agent start|end``: credentials for an agent run by hand, on this host or another one.

A client on another host is attributed by proxy credentials only (its process cannot be looked up): ``start``
registers an agent with a token and prints the environment that sends its calls through the proxy with them;
``end`` voids them. The manager does the same for every agent it runs.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Optional

import typer

from rollouttap.errors import ConfigError, NotFoundError

BY_HAND = "run by hand (rollouttap agent start)"  # its meta's "agent" (the manager writes its command there)
agent_app = typer.Typer(no_args_is_help=True, help="Credentials for an agent run by hand (e.g. on another host).")


@agent_app.command()
def start(
    proxy: Annotated[str, typer.Option(help="The running proxy's URL as the agent reaches it, e.g. "
                                            "http://10.0.0.5:8080 (it must record into --store).")],
    store: Annotated[Path, typer.Option(help="The store the proxy records into.")] = Path("runs.db"),
    agent_id: Annotated[Optional[str], typer.Option("--id", help="The agent's id; default: a new one.")] = None,
) -> None:
    """Register an agent and print the export lines that send its calls through the proxy as that agent.

    Example: eval "$(rollouttap agent start --store runs.db --proxy http://10.0.0.5:8080)"; my_agent ...;
    rollouttap agent end "$ROLLOUTTAP_AGENT_ID" --store runs.db
    """
    from rollouttap.manager.manager import new_agent_id
    from rollouttap.manager.proxy_link import ProxyLink
    from rollouttap.store import Store, new_token
    from rollouttap.store.records import CREDENTIALS_ONLY
    agent_id = agent_id or new_agent_id()
    if not agent_id.isprintable() or not agent_id.strip() or agent_id != agent_id.strip():
        raise ConfigError(f"--id {agent_id!r} is not a printable name")
    with Store(store.resolve(), create=False) as opened:
        link = ProxyLink.attach(proxy, opened)  # a proxy at that URL records into this store, and answers
        if opened.agent(agent_id) is not None:
            raise ConfigError(f"agent {agent_id!r} is already in {store}: give another --id")
        token = new_token()
        opened.register_agent(agent_id, token=token, meta={"agent": BY_HAND, CREDENTIALS_ONLY: True})
    typer.echo(f"# agent {agent_id}: its calls through {link.url} are its own until "
               f"`rollouttap agent end {agent_id} --store {shlex.quote(str(store))}`; for HTTPS on another host, "
               "copy the CA file SSL_CERT_FILE names there", err=True)
    for key, value in link.env(agent_id, token).items():
        typer.echo(f"export {key}={shlex.quote(value)}")


@agent_app.command()
def end(
    agent_id: Annotated[str, typer.Argument(help="The agent `rollouttap agent start` registered.")],
    store: Annotated[Path, typer.Option(help="The store it is registered in.")] = Path("runs.db"),
    status: Annotated[str, typer.Option(help="How it ended: ok, failed or error.")] = "ok",
) -> None:
    """End an agent run by hand: its credentials stop working, and it counts as ended in stats and show."""
    from rollouttap.store import LIVE_STATUSES, Store
    if status not in ("ok", "failed", "error"):
        raise ConfigError(f"--status {status!r} is not ok, failed or error")
    with Store(store.resolve(), create=False) as opened:
        agent = opened.agent(agent_id)
        if agent is None:
            raise NotFoundError(f"no agent {agent_id!r} in {store}")
        if not agent.credentials_only:  # a manager's agent ends with its process, never by this
            raise ConfigError(f"agent {agent_id!r} was not started by `rollouttap agent start`")
        if agent.status not in LIVE_STATUSES:
            raise ConfigError(f"agent {agent_id!r} has already ended ({agent.status})")
        opened.agent_exited(agent_id)
        opened.agent_ended(agent_id, status)
    typer.echo(f"# agent {agent_id} ended ({status}); its credentials no longer work", err=True)


def register(app: typer.Typer) -> None:
    app.add_typer(agent_app, name="agent")
