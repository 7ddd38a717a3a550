"""mitmdump as rollouttap starts it: the same master, addons and options, with less work per event.

- Hook dispatch: mitmproxy's AddonManager walks its whole chain (~35 addons in mitmdump) for every hook,
  entering a context manager and a generator for each, and runs the ``update`` hook after every flow
  hook the same way. IndexedAddonManager looks each hook's callables up once per addon set and option
  change, leaving out mitmproxy's own hooks that return at once while their feature is off (no header
  rules, no map_local, no save file, ...: ``IDLE_WHEN``), 18 of the 23 built-in calls of every request.
- Logging: mitmproxy keeps the root logger at DEBUG, so every record (six per connection) is formatted
  and relayed as an ``add_log`` event before the terminal drops it; here the root logger sits at the
  lowest level a handler takes.
- Run under ``python -O`` (manager/proxy.py does), mitmproxy also skips its per-message type checks.

Together about half of bare mitmdump's CPU per keep-alive request (bench/RESULTS.md, section 1c).
Run it as ``python -O -m rollouttap.addon.fastdump`` with mitmdump's own arguments.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import sys
import types
from collections.abc import Callable, Sequence
from typing import Any, cast

from mitmproxy import exceptions, flow, hooks
from mitmproxy.addonmanager import AddonManager, cut_traceback, traverse
from mitmproxy.tools import cmdline
from mitmproxy.tools.dump import DumpMaster
from mitmproxy.tools.main import run

logger = logging.getLogger("mitmproxy.addonmanager")

# One entry per top-level addon that has the hook: the addon and its (and its children's) callables,
# or None where looking them up went wrong (an attribute of the hook's name that is not callable, a
# property that raises): mitmproxy's own path then runs and reports it, as it would have.
Plan = list[tuple[Any, list[Callable[..., Any]] | None]]


def _idle_when() -> dict[tuple[type, str], tuple[Callable[..., Any], Callable[[Any, Any], bool]]]:
    """mitmproxy's own hooks that do nothing while their addon has nothing to do, as mitmproxy 12.2 writes them
    (``pyproject.toml`` pins it): the hook's function, and when it is idle (given the addon and the options,
    True when a call would return without a change or a side effect). What they test is set from options (in
    the addon's configure), and plans are rebuilt after every option change. Not here: hooks that act on what a
    request holds whatever the options (h2c upgrades, the CA's CRL path, mitm.it, an Alt-Svc in reverse mode) and server
    replay (its flows load by command too)."""
    try:
        from mitmproxy.addons import (
            anticache, anticomp, blocklist, dumper, maplocal, mapremote, modifybody, modifyheaders, proxyauth, save,
            savehar, stickyauth, stickycookie, upstream_auth,
        )
    except ImportError:  # pragma: no cover - another mitmproxy: every hook runs
        return {}
    no_rules = lambda addon, options: not addon.replacements  # noqa: E731
    no_filter = lambda addon, options: not addon.flt  # noqa: E731
    no_stream = lambda addon, options: addon.stream is None  # noqa: E731
    idle: dict[tuple[type, str], Callable[[Any, Any], bool]] = {
        (proxyauth.ProxyAuth, "requestheaders"): lambda addon, options: not addon.validator,
        (modifyheaders.ModifyHeaders, "requestheaders"): no_rules,
        (modifyheaders.ModifyHeaders, "responseheaders"): no_rules,
        (upstream_auth.UpstreamAuth, "requestheaders"): lambda addon, options: not addon.auth,
        (blocklist.BlockList, "request"): lambda addon, options: not addon.items,
        (anticache.AntiCache, "request"): lambda addon, options: not options.anticache,
        (anticomp.AntiComp, "request"): lambda addon, options: not options.anticomp,
        (mapremote.MapRemote, "request"): no_rules,
        (maplocal.MapLocal, "request"): no_rules,
        (modifybody.ModifyBody, "request"): no_rules,
        (modifybody.ModifyBody, "response"): no_rules,
        (stickyauth.StickyAuth, "request"): no_filter,
        (stickycookie.StickyCookie, "request"): no_filter,
        (stickycookie.StickyCookie, "response"): no_filter,
        (save.Save, "request"): no_stream,
        (save.Save, "response"): no_stream,
        (savehar.SaveHar, "response"): lambda addon, options: not options.hardump,
        (dumper.Dumper, "response"): lambda addon, options: options.flow_detail == 0,
    }
    # With the function read: a hook replaced since (on the class or the instance) is not the one judged idle.
    return {(cls, name): (getattr(cls, name), when) for (cls, name), when in idle.items() if hasattr(cls, name)}


IDLE_WHEN = _idle_when()


def hook_plan(chain: Sequence[Any], name: str, options: Any = None) -> Plan:
    """For each addon in ``chain`` (children included), the callables a hook called ``name`` runs; given the
    options, without the built-in ones that would do nothing under them (``IDLE_WHEN``)."""
    plan: Plan = []
    for top in chain:
        try:
            funcs = _callables(top, name, options)
        except Exception:  # reported by invoke_addon when the hook runs
            funcs = None
        if funcs is None or funcs:
            plan.append((top, funcs))
    return plan


def _callables(top: Any, name: str, options: Any) -> list[Callable[..., Any]] | None:
    funcs: list[Callable[..., Any]] = []
    for addon in traverse([top]):
        func = getattr(addon, name, None)
        if func is None or isinstance(func, types.ModuleType):
            continue  # mitmproxy skips a module imported under a hook's name too
        if not callable(func):
            return None
        if options is not None and _idle(addon, name, func, options):
            continue
        funcs.append(func)
    return funcs


def _idle(addon: Any, name: str, func: Any, options: Any) -> bool:
    entry = IDLE_WHEN.get((type(addon), name))  # the class itself: a subclass may do more
    if entry is None or getattr(func, "__func__", None) is not entry[0]:
        return False
    try:
        return entry[1](addon, options)
    except Exception:  # state it does not have (yet): let the hook run
        return False


class IndexedAddonManager(AddonManager):
    """AddonManager whose trigger_event visits only the addons that implement the hook.

    trigger_event is the per-flow path; the rarer sync ``trigger`` (configure) keeps mitmproxy's walk.
    Plans are rebuilt when the chain changes through register/add/remove/clear or an option changes (the
    ways mitmproxy and its script loader change it). An addon that grows its ``addons`` list or rebinds a
    hook attribute by itself, outside those, is not seen until the next such change; nor is code that turns
    a built-in feature on by writing the addon's state instead of its option (``IDLE_WHEN``).
    """

    _plans: dict[str, Plan]

    def _plan(self, name: str) -> Plan:
        plans = self._plans  # an option changed while the plan is built (another thread) drops it, not the new dict
        plan = plans.get(name)
        if plan is None:
            plan = plans[name] = hook_plan(self.chain, name, self.master.options)
        return plan

    def _forget(self, updated: object = None) -> None:
        # The chain changes through register/add/remove/clear (scripts load and reload through them), and
        # options can reorder scripts: every one of those forgets the plans.
        self._plans = {}

    def clear(self) -> None:
        try:
            super().clear()
        finally:
            self._forget()

    def register(self, addon: Any) -> Any:
        try:
            return super().register(addon)
        finally:
            self._forget()

    def add(self, *addons: Any) -> None:
        super().add(*addons)
        self._forget()

    def remove(self, addon: Any) -> None:
        try:
            super().remove(addon)
        finally:
            self._forget()

    async def handle_lifecycle(self, event: hooks.Hook) -> None:
        # mitmproxy follows every flow hook with an ``update`` hook; most runs have no addon for it.
        await self.trigger_event(event)
        if self._plan("update"):
            message = hook_args(event)[0]
            if isinstance(message, flow.Flow):
                await self.trigger_event(hooks.UpdateHook([message]))

    async def trigger_event(self, event: hooks.Hook) -> None:
        args: list[Any] | None = None
        for top, funcs in self._plan(event.name):
            try:
                if funcs is None:
                    await self.invoke_addon(top, event)
                    continue
                if args is None:
                    args = hook_args(event)
                for func in funcs:
                    res = func(*args)
                    if res is not None and inspect.isawaitable(res):
                        await res
            except exceptions.AddonHalt:
                return
            except exceptions.OptionsError:
                raise
            except Exception as exc:
                _report(exc)


_ARG_NAMES: dict[type, tuple[str, ...]] = {}


def hook_args(event: hooks.Hook) -> list[Any]:
    """``event.args()``, with the hook class's field names looked up once: ``Hook.args`` asks
    ``dataclasses.fields`` for them on every call, a few µs on every hook of every flow."""
    cls = type(event)
    if cls.args is not hooks.Hook.args:  # a hook with arguments of its own making
        return event.args()
    names = _ARG_NAMES.get(cls)
    if names is None:
        names = _ARG_NAMES[cls] = tuple(field.name for field in dataclasses.fields(cast(Any, cls)))
    return [getattr(event, name) for name in names]


def _report(exc: Exception) -> None:
    """Log an addon's exception the way mitmproxy's safecall does."""
    tb = cut_traceback(cut_traceback(exc.__traceback__, "trigger_event"), "invoke_addon")
    logger.error(f"Addon error: {exc}", exc_info=(type(exc), exc, tb))


class IndexedDumpMaster(DumpMaster):
    """DumpMaster with the indexed hook dispatch."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Master builds its AddonManager itself; the subclass only adds a cache, so swap the class.
        self.addons.__class__ = IndexedAddonManager
        addons = cast(IndexedAddonManager, self.addons)
        addons._forget()
        # Both after the manager's own receiver, which runs the addons' configure first.
        self.options.changed.connect(addons._forget)
        self.options.changed.connect(self._follow_handler_levels)

    async def running(self) -> None:
        await super().running()
        self._follow_handler_levels()  # scripts may have added log handlers meanwhile

    def _follow_handler_levels(self, updated: object = None) -> None:
        # mitmproxy sets the root logger to DEBUG and lets each handler drop what is below its own level;
        # each record still costs a format and an add_log event on the loop (six per connection: connect,
        # disconnect, ...). The root logger is kept at the lowest level any handler takes, so records no
        # handler would keep are not made at all. The add_log relay counts only if an addon has that hook.
        root = logging.getLogger()
        relay = self._legacy_log_events
        wants_relay = bool(hook_plan(self.addons.chain, "add_log"))
        levels = [h.level for h in root.handlers if h is not relay or wants_relay]
        root.setLevel(max(logging.DEBUG, min(levels, default=logging.DEBUG)))


def main(argv: Sequence[str] | None = None) -> None:
    """mitmdump, with the indexed dispatch."""
    def extra(args: Any) -> dict[str, str]:  # mitmproxy.tools.main.mitmdump's, which names DumpMaster itself
        if args.filter_args:
            v = " ".join(args.filter_args)
            return {"save_stream_filter": v, "readfile_filter": v, "dumper_filter": v}
        return {}

    run(IndexedDumpMaster, cmdline.mitmdump, sys.argv[1:] if argv is None else argv, extra)


if __name__ == "__main__":
    main()
