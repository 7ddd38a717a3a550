"""``rollouttap demo``: the README's main job — real GRPO training on a CPU with agents behind the proxy."""

from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer


def demo(
    store: Annotated[Optional[Path], typer.Option(help="Store file (default: a new temp dir).")] = None,
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps.")] = 3,
    prompts: Annotated[int, typer.Option(min=1, help="Arithmetic prompts in the data set.")] = 12,
    generation: Annotated[str, typer.Option(
        help="'agents' (rollouts by agent processes through the proxy) or 'trl' (TRL's own generation), "
             "to compare both on the same prompts and reward.")] = "agents",
    vllm_url: Annotated[Optional[str], typer.Option(
        help="A `trl vllm-serve` URL (GPU): TRL syncs weights into it and the agents call it.")] = None,
    parallel: Annotated[int, typer.Option(help="Agents at once.")] = 4,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Train the tiny offline model with GRPO: a dozen prompts, an unmodified multi-turn tool-using agent
    per rollout, a reward from the agent's answer; then a summary.

    Example: rollouttap demo --steps 3
    """
    import json

    from rich.console import Console
    from rich.table import Table

    from rollouttap.errors import ConfigError
    from rollouttap.extras import require
    from rollouttap.trainer_hooks.demo import AGENT_MODULES, DEMO_MODULES, DemoConfig, run_demo

    if generation not in ("agents", "trl"):
        raise ConfigError(f"--generation must be 'agents' or 'trl', not {generation!r}")
    # Before minutes of model building; the agents run the openai SDK.
    require("rollouttap demo", *DEMO_MODULES, *(AGENT_MODULES if generation == "agents" else ()))
    if vllm_url is not None:  # TRL's own error would name its extra, after a traceback
        require("rollouttap demo --vllm-url", "vllm")
    store = store or Path(tempfile.mkdtemp(prefix="rollouttap-demo-")) / "runs.db"
    config = DemoConfig(store=store.resolve(), steps=steps, prompts=prompts, parallel=parallel,
                        generation=generation, vllm_url=vllm_url)  # type: ignore[arg-type]
    with contextlib.redirect_stdout(sys.stderr):  # the trainer's own step logs: stdout holds only the result
        summary = run_demo(config)
    rank = _rank()
    if json_out:
        typer.echo(json.dumps({**summary.__dict__, **({"rank": rank[0]} if rank else {})}, default=str))
        return
    table = Table(title=summary_title(generation, rank), show_header=False)
    table.add_row("optimizer steps", str(summary.steps))
    table.add_row("reward per step", ", ".join(f"{r:.2f}" for r in summary.rewards))
    table.add_row("weights changed", "yes" if summary.weights_changed else "no")
    if generation == "agents":
        table.add_row("agents", ", ".join(f"{k} {v}" for k, v in sorted(summary.agents.items())))
        table.add_row("model calls", str(summary.calls))
        table.add_row("trainable tokens", str(summary.trainable_tokens))
        flows = summary.flows
        table.add_row("flows captured", f"{flows.get('total', 0)} (done {flows.get('done', 0)}, "
                                        f"error {flows.get('error', 0)}, open {flows.get('open', 0)})")
        table.add_row("flows unattributed", str(flows.get("unattributed", 0)))
        table.add_row("store", str(store))
    Console().print(table)


def summary_title(generation: str, rank: tuple[int, int] | None) -> str:
    """The summary table's title; under torchrun each rank prints its own agents', so it names its rank."""
    of_rank = f", rank {rank[0]} of {rank[1]}" if rank else ""
    return f"rollouttap demo ({generation} generation{of_rank})"


def _rank() -> tuple[int, int] | None:
    """(rank, world size) of this process in a torchrun launch of several ranks (its RANK and WORLD_SIZE), else
    None."""
    import os
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except (KeyError, ValueError):
        return None
    return (rank, world) if world > 1 else None


def register(app: typer.Typer) -> None:
    app.command()(demo)
