"""Refuse a rollouttap option value mitmproxy would drop the whole addon over, without a word.

mitmproxy holds back the ``--set`` values of a script's options until the script's addons have declared
them, then parses them all at once; when one does not parse (``rollouttap_token_ids=maybe``) it drops the
script and runs on as a plain proxy: nothing is recorded and nothing says so. This addon comes last in
``entry.py``, so every rollouttap option is declared by its ``load()``: it logs each bad value as an error,
and mitmdump exits on an error logged during startup.
"""

from __future__ import annotations

import logging
from typing import Any

from mitmproxy import exceptions

log = logging.getLogger(__name__)

OPTION_PREFIX = "rollouttap_"

__all__ = ["CheckDeferredOptions", "deferred_problems"]


class CheckDeferredOptions:
    def load(self, loader: Any) -> None:
        for problem in deferred_problems(loader.master.options, OPTION_PREFIX):
            log.error("rollouttap: %s", problem)


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
