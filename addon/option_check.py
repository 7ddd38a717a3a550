"""Refuse a rollouttap option value mitmproxy would drop the whole addon over, without a word.

mitmproxy holds back the ``--set`` values of a script's options until the script's addons have declared
them, then parses them all at once; when one does not parse (``rollouttap_token_ids=maybe``) it drops the
script and runs on as a plain proxy: nothing is recorded and nothing says so. This addon comes last in
``entry.py``, so every rollouttap option is declared by its ``load()``: it logs each bad value as an error,
and mitmdump exits on an error logged during startup.

A ``--set`` of a name no addon declares is held back the same way and never applied, also without a word: a
typo (``rollouttap_token_id=false``) or an option since removed would leave the proxy running with the default.
Once every script has loaded (``running``), a ``rollouttap_`` name still held back is logged as an error too.
"""

from __future__ import annotations

import logging
from typing import Any

from mitmproxy import ctx, exceptions

log = logging.getLogger(__name__)

OPTION_PREFIX = "rollouttap_"

__all__ = ["CheckDeferredOptions", "deferred_problems", "undeclared"]


class CheckDeferredOptions:
    def load(self, loader: Any) -> None:
        for problem in deferred_problems(loader.master.options, OPTION_PREFIX):
            log.error("rollouttap: %s", problem)

    def running(self) -> None:
        for name in undeclared(ctx.options, OPTION_PREFIX):
            log.error("rollouttap: unknown option %s: no loaded addon declares it (a typo, or an option since "
                      "removed; `mitmdump -s addon/entry.py --options` lists them)", name)


def undeclared(options: Any, prefix: str) -> list[str]:
    """Names starting with ``prefix`` given to ``--set`` that no addon has declared (once all have loaded)."""
    return sorted(name for name in options.deferred if name.startswith(prefix))


def deferred_problems(options: Any, prefix: str) -> list[str]:
    """Why held-back ``--set`` values of options named ``prefix...`` will not apply: mitmproxy's own parse
    (true/false, an integer), then the option's declared choices (which mitmproxy does not check there)."""
    problems = []
    for name, raw in options.deferred.items():
        option = options._options.get(name) if name.startswith(prefix) else None
        if option is None or not hasattr(raw, "val"):
            continue
        try:
            value = options._parse_setval(option, raw.val)
        except exceptions.OptionsError as exc:
            problems.append(str(exc))
            continue
        if option.choices and value not in option.choices:
            problems.append(f"{name} must be one of {', '.join(option.choices)}, not {value!r}")
    return problems
