"""rollouttap benchmarks: what the proxy costs and how it scales. Writes bench/RESULTS.md (and a .json beside it).

Examples:
  .venv/bin/python bench/run.py --full                      # everything, minutes; writes bench/RESULTS.md
  .venv/bin/python bench/run.py --smoke --out /tmp/r.md     # tiny sizes, about a minute; what the test suite runs
  .venv/bin/python bench/run.py --full --only latency,streaming   # a partial report, in the temp dir
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import attribution_cost  # noqa: E402
import concurrency  # noqa: E402
import deploy  # noqa: E402
import findings  # noqa: E402
import latency  # noqa: E402
import long_context  # noqa: E402
import peer_proxies  # noqa: E402
import proxy_cpu  # noqa: E402
import scale  # noqa: E402
import store_speed  # noqa: E402
import stream_cpu  # noqa: E402
import streaming  # noqa: E402
from context import FULL, SMOKE, Context, Shared, progress  # noqa: E402
from report import Section, document, header, machine_facts, with_end_probe  # noqa: E402

BENCHMARKS = {
    "latency": latency,
    "concurrency": concurrency,
    "cpu": proxy_cpu,
    "long_context": long_context,
    "peers": peer_proxies,
    "streaming": streaming,
    "stream_cpu": stream_cpu,
    "attribution": attribution_cost,
    "scale": scale,
    "deploy": deploy,
    "store": store_speed,
    "findings": findings,
}
DEFAULT_OUT = Path(__file__).parent / "RESULTS.md"


def default_out(smoke: bool, only: str) -> Path:
    """bench/RESULTS.md for the full run of every section; a smoke or partial report goes to the temp dir."""
    if not smoke and not only.strip():
        return DEFAULT_OUT
    return Path(tempfile.gettempdir()) / "rollouttap-bench" / f"RESULTS-{'smoke' if smoke else 'partial'}.md"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--smoke", action="store_true", help="tiny sizes, about a minute (used by the tests)")
    size.add_argument("--full", action="store_true", help="the real sizes (default)")
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--out", type=Path, default=None,
                        help="markdown report path (default: bench/RESULTS.md for a full run of every section, "
                             "else a file in the temp dir, so a smoke or partial run never replaces it)")
    parser.add_argument("--note", default=None, help="a note printed at the top of the report")
    parser.add_argument("--list", action="store_true", help="print each benchmark's name and title, run nothing")
    return parser.parse_args(argv)


def selected(only: str) -> list[str]:
    names = [n.strip() for n in only.split(",") if n.strip()] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    return names


def run_one(name: str, ctx: Context) -> Section:
    module = BENCHMARKS[name]
    started = time.monotonic()
    progress(f"{name}: start")
    try:
        section = module.run(ctx)
    except Exception as exc:  # one broken benchmark must not hide the others' figures
        progress(f"{name}: failed: {exc!r}")
        return Section(name, module.TITLE, f"Failed:\n\n```\n{traceback.format_exc()[-3000:]}\n```",
                       {"error": repr(exc)}, "error")
    progress(f"{name}: done in {time.monotonic() - started:.1f}s")
    return section


def _interrupted(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Run the selected benchmarks and write the report; 1 when one of them failed."""
    args = parse_args(argv)
    # `kill RUNNER` reaches no child: unwinding as from Ctrl-C stops the proxies, upstreams and clients it started.
    signal.signal(signal.SIGTERM, _interrupted)
    if args.list:
        for name, module in BENCHMARKS.items():
            print(f"{name}\t{module.TITLE}")
        return 0
    plan = SMOKE if args.smoke else FULL
    names = selected(args.only)
    out: Path = args.out or default_out(args.smoke, args.only)
    command = "cd " + shlex.quote(os.getcwd()) + " && " + shlex.join(
        [".venv/bin/python" if sys.executable.endswith(".venv/bin/python") else sys.executable,
         *sys.argv[0:1], *(argv if argv is not None else sys.argv[1:])])
    facts = machine_facts()
    sections = []
    with tempfile.TemporaryDirectory(prefix="rollouttap-bench-") as tmp:
        shared = Shared(plan, Path(tmp))
        try:
            ctx = Context(plan, Path(tmp), shared)
            sections = [run_one(name, ctx) for name in names]
        finally:
            shared.close()
    facts = with_end_probe(facts)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(document(header(command, plan.name, facts, args.note), sections))
    out.with_suffix(".json").write_text(json.dumps(
        {"plan": plan.name, "facts": facts, "command": command,
         "sections": {s.key: {"title": s.title, "status": s.status, "data": s.data} for s in sections}},
        indent=1, default=str))
    progress(f"wrote {out}")
    return 1 if any(s.status == "error" for s in sections) else 0


if __name__ == "__main__":
    raise SystemExit(main())
