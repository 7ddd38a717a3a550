"""The indexed hook dispatch: the same calls, in the same order, as mitmproxy's own walk.

The parity test runs both dispatches over mitmdump's real addon set (DumpMaster's ~35 addons) plus
addons that raise, halt, await and nest; the process test runs ``python -m rollouttap.addon.fastdump``
and changes a script under it, which mitmproxy reloads through the paths that must forget the plans.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import logging
import os
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path

import pytest
import requests
from mitmproxy import exceptions, hooks
from mitmproxy.proxy.layers.http import HttpRequestHeadersHook, HttpRequestHook, HttpResponseHook

from conftest import LISTENING_RE, output_lines, wait_line

with warnings.catch_warnings():
    # mitmproxy 12.2's flowfilter (imported by its addons) calls names pyparsing 3.3 deprecates.
    warnings.simplefilter("ignore", DeprecationWarning)
    from mitmproxy.test import tflow
    from mitmproxy.tools.dump import DumpMaster

    from mitmproxy.addonmanager import traverse
    from mitmproxy.addons import dumper, modifyheaders, save
    from rollouttap.addon.fastdump import IDLE_WHEN, IndexedAddonManager, IndexedDumpMaster, hook_args, hook_plan


class Hooked:
    def __init__(self, name: str, calls: list[str], *, raises: type[Exception] | None = None,
                 children: list[object] | None = None) -> None:
        self.name, self.calls, self.raises = name, calls, raises
        if children is not None:
            self.addons = children

    def request(self, flow: object) -> None:
        self.calls.append(f"{self.name}.request")
        if self.raises is not None:
            raise self.raises("boom from " + self.name)

    def response(self, flow: object) -> None:
        self.calls.append(f"{self.name}.response")


class AsyncHooked:
    def __init__(self, name: str, calls: list[str]) -> None:
        self.name, self.calls = name, calls

    async def request(self, flow: object) -> None:
        await asyncio.sleep(0)
        self.calls.append(f"{self.name}.request")


class Halts:
    name = "halts"

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def response(self, flow: object) -> None:
        self.calls.append("halts.response")
        raise exceptions.AddonHalt()


class ModuleNamedLikeAHook:
    name = "modattr"
    request = json  # mitmproxy skips a module under a hook's name


class NoHooks:
    name = "nohooks"


def _addons(calls: list[str]) -> list[object]:
    return [
        NoHooks(), ModuleNamedLikeAHook(),
        Hooked("first", calls),
        Hooked("raises", calls, raises=ValueError),
        Hooked("parent", calls, children=[Hooked("child", calls), AsyncHooked("async-child", calls)]),
        Halts(calls),
        Hooked("after-halt", calls),
    ]


def test_hook_plan_keeps_order_children_and_skips_addons_without_the_hook():
    calls: list[str] = []
    chain = _addons(calls)
    request = hook_plan(chain, "request")
    assert [top.name for top, _ in request] == ["first", "raises", "parent", "after-halt"]
    assert [len(funcs) for _, funcs in request] == [1, 1, 3, 1]
    assert [top.name for top, _ in hook_plan(chain, "response")] == ["first", "raises", "parent", "halts",
                                                                       "after-halt"]
    assert hook_plan(chain, "websocket_message") == []


def test_hook_plan_marks_a_non_callable_hook_for_mitmproxys_own_path():
    class Broken:
        request = 42
    broken = Broken()
    assert hook_plan([broken], "request") == [(broken, None)]


async def _dispatch(master_cls: type[DumpMaster], caplog: pytest.LogCaptureFixture) -> tuple[list[str], list[str]]:
    calls: list[str] = []
    master = master_cls(None, with_termlog=False, with_dumper=False)
    master.addons.add(*_addons(calls))
    flow = tflow.tflow(resp=True)
    caplog.clear()
    try:
        with caplog.at_level(logging.ERROR, logger="mitmproxy.addonmanager"):
            for hook in (HttpRequestHook(flow), HttpResponseHook(flow), hooks.UpdateHook([flow])):
                await master.addons.trigger_event(hook)
    finally:
        await master.done()  # takes the master's log handler off the root logger
    return calls, [r.getMessage() for r in caplog.records]


def test_indexed_dispatch_calls_what_mitmproxys_walk_calls(caplog):
    plain = asyncio.run(_dispatch(DumpMaster, caplog))
    indexed = asyncio.run(_dispatch(IndexedDumpMaster, caplog))
    assert indexed == plain
    calls, errors = indexed
    # The raising addon is logged and the rest go on; the halt stops the response hook where it is.
    assert calls == ["first.request", "raises.request", "parent.request", "child.request",
                     "async-child.request", "after-halt.request", "first.response", "raises.response", "parent.response",
                     "child.response", "halts.response"]
    assert errors == ["Addon error: boom from raises"]


class Updates:
    name = "updates"

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def update(self, flows: list[object]) -> None:
        self.calls.append(f"update {len(flows)}")


async def _lifecycle(master_cls: type[DumpMaster], with_update: bool) -> list[str]:
    calls: list[str] = []
    master = master_cls(None, with_termlog=False, with_dumper=False)
    master.addons.add(Hooked("first", calls), *([Updates(calls)] if with_update else []))
    flow = tflow.tflow(resp=True)
    try:
        for hook in (HttpRequestHook(flow), HttpResponseHook(flow)):
            await master.addons.handle_lifecycle(hook)
    finally:
        await master.done()
    return calls


@pytest.mark.parametrize("with_update", [True, False])
def test_flow_hooks_are_followed_by_update_as_in_mitmproxy(with_update):
    plain = asyncio.run(_lifecycle(DumpMaster, with_update))
    assert asyncio.run(_lifecycle(IndexedDumpMaster, with_update)) == plain
    assert plain == (["first.request", "update 1", "first.response", "update 1"] if with_update
                     else ["first.request", "first.response"])


def test_indexed_master_uses_the_indexed_manager():
    async def build() -> object:
        master = IndexedDumpMaster(None, with_termlog=False, with_dumper=False)
        await master.done()
        return master.addons
    assert isinstance(asyncio.run(build()), IndexedAddonManager)


def test_adding_and_removing_an_addon_changes_who_is_called():
    async def run() -> list[str]:
        calls: list[str] = []
        master = IndexedDumpMaster(None, with_termlog=False, with_dumper=False)
        flow = tflow.tflow()
        late = Hooked("late", calls)
        await master.addons.trigger_event(HttpRequestHook(flow))  # plans built without "late"
        master.addons.add(late)
        await master.addons.trigger_event(HttpRequestHook(flow))
        master.addons.remove(late)
        await master.addons.trigger_event(HttpRequestHook(flow))
        await master.done()
        return calls
    assert asyncio.run(run()) == ["late.request"]


# -- a real proxy process ------------------------------------------------------------------------------
SCRIPT = """
from mitmproxy import http

class Answer:
    def request(self, flow):
        flow.response = http.Response.make(200, b"{word}")

addons = [Answer()]
"""


def test_fastdump_runs_a_script_and_follows_its_reload(tmp_path):
    script = tmp_path / "answer.py"
    script.write_text(SCRIPT.format(word="one"))
    proc = subprocess.Popen(
        [sys.executable, "-O", "-m", "rollouttap.addon.fastdump", "--listen-host", "127.0.0.1",
         "--listen-port", "0", "-s", str(script), "--set", f"confdir={tmp_path}",
         "--set", "termlog_verbosity=info", "--set", "flow_detail=0"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        proxies = {"http": f"http://127.0.0.1:{wait_line(output_lines(proc), LISTENING_RE, 60).group(1)}"}

        def answer() -> str:
            return requests.get("http://example.invalid/", proxies=proxies, timeout=10).text
        deadline = time.monotonic() + 30
        while (text := answer()) != "one" and time.monotonic() < deadline:
            time.sleep(0.05)  # the script loads on the event loop just after start-up
        assert text == "one"
        first_mtime = script.stat().st_mtime
        script.write_text(SCRIPT.format(word="two"))
        os.utime(script, (first_mtime + 2, first_mtime + 2))  # newer even on a coarse-clock file system
        deadline = time.monotonic() + 30
        while (text := answer()) == "one" and time.monotonic() < deadline:
            time.sleep(0.05)  # mitmproxy polls the script's mtime once a second
        assert text == "two"
    finally:
        proc.kill()
        proc.wait()


class AddLogUser:
    name = "addloguser"

    def add_log(self, entry: object) -> None:
        pass


@pytest.mark.parametrize("verbosity, extra, level", [
    ("error", None, logging.ERROR),
    ("info", None, logging.INFO),
    ("debug", None, logging.DEBUG),
    ("error", "debug handler", logging.DEBUG),  # a handler someone added still gets what it asks for
    ("error", "add_log addon", logging.DEBUG),  # so does an addon with the (deprecated) add_log hook
])
def test_records_no_handler_keeps_are_not_made(verbosity, extra, level):
    root = logging.getLogger()
    before, handlers = root.level, root.handlers[:]
    root.handlers = []  # pytest's own capture handlers take everything
    mine = logging.NullHandler(logging.DEBUG)

    async def run() -> int:
        master = IndexedDumpMaster(None, with_termlog=True, with_dumper=False)
        try:
            if extra == "debug handler":
                root.addHandler(mine)
            elif extra == "add_log addon":
                master.addons.add(AddLogUser())
            master.options.update(termlog_verbosity=verbosity)
            return root.level
        finally:
            await master.done()
    try:
        assert asyncio.run(run()) == level
    finally:
        root.handlers = handlers
        root.setLevel(before)


def test_an_addon_whose_hook_lookup_raises_is_reported_and_the_rest_run(caplog):
    class Raising:
        name = "raising"

    def broken(self: object) -> None:
        raise RuntimeError("lookup broke")

    async def run() -> list[str]:
        calls: list[str] = []
        master = IndexedDumpMaster(None, with_termlog=False, with_dumper=False)
        master.addons.add(Raising(), Hooked("after", calls))
        Raising.request = property(broken)  # after registering: mitmproxy reads every attribute then
        try:
            with caplog.at_level(logging.ERROR, logger="mitmproxy.addonmanager"):
                await master.addons.trigger_event(HttpRequestHook(tflow.tflow()))
        finally:
            await master.done()
        return calls
    assert asyncio.run(run()) == ["after.request"]
    assert "Addon error: lookup broke" in caplog.text


def test_hook_args_are_what_each_of_mitmproxys_hooks_gives():
    assert len(hooks.all_hooks) > 30  # mitmdump's hooks are imported
    for cls in hooks.all_hooks.values():
        values = [object() for _ in dataclasses.fields(cls)]
        event = cls(*values)
        assert hook_args(event) == event.args(), cls.__name__
        assert hook_args(event) == event.args()  # again, from the names looked up the first time
        if cls.args is hooks.Hook.args:
            assert hook_args(event) == values, cls.__name__


def test_a_hook_with_args_of_its_own_making_keeps_them():
    @dataclasses.dataclass
    class Custom(hooks.Hook):
        name = "rollouttap_test_custom"
        a: int

        def args(self):
            return ["made", self.a]

    assert hook_args(Custom(1)) == ["made", 1]


# -- mitmproxy's own hooks while their feature is off -------------------------------------------------
def _features(tmp_path) -> dict[str, tuple[object, set[tuple[str, str]]]]:
    """For each option that turns a built-in feature on: a value that does, and the hooks it brings back."""
    return {
        "proxyauth": ("any", {("ProxyAuth", "requestheaders")}),
        "upstream_auth": ("user:pass", {("UpstreamAuth", "requestheaders")}),
        "modify_headers": (["/~q/X-Rt-Test/on"], {("ModifyHeaders", "requestheaders"),
                                                  ("ModifyHeaders", "responseheaders")}),
        "block_list": (["/~u blocked.example/444"], {("BlockList", "request")}),
        "anticache": (True, {("AntiCache", "request")}),
        "anticomp": (True, {("AntiComp", "request")}),
        "map_remote": (["|~u nowhere.example|nowhere|elsewhere"], {("MapRemote", "request")}),
        "map_local": ([f"|nowhere.example|{tmp_path}"], {("MapLocal", "request")}),
        "modify_body": (["/~q/nothing-here/else"], {("ModifyBody", "request"), ("ModifyBody", "response")}),
        "stickyauth": ("~q", {("StickyAuth", "request")}),
        "stickycookie": ("~q", {("StickyCookie", "request"), ("StickyCookie", "response")}),
        "save_stream_file": (str(tmp_path / "flows.mitm"), {("Save", "request"), ("Save", "response")}),
        "hardump": (str(tmp_path / "flows.har"), {("SaveHar", "response")}),
        "flow_detail": (1, {("Dumper", "response")}),
    }


def _planned(master) -> set[tuple[str, str]]:
    """The IDLE_WHEN hooks in the master's plans now, as (class name, hook)."""
    return {(cls.__name__, hook) for cls, hook in IDLE_WHEN
            if any(type(addon) is cls for top, funcs in master.addons._plan(hook) for addon in traverse([top])
                   if funcs is None or getattr(addon, hook, None) in funcs)}


def _quiet_master() -> IndexedDumpMaster:
    master = IndexedDumpMaster(None, with_termlog=False, with_dumper=True)
    master.options.update(flow_detail=0)  # -q, as rollouttap starts it
    return master


def test_every_idle_hook_is_one_an_option_brings_back(tmp_path):
    assert IDLE_WHEN, "the table is empty: this mitmproxy's addons were not found"
    assert set().union(*(hooks for _, hooks in _features(tmp_path).values())) == {
        (cls.__name__, hook) for cls, hook in IDLE_WHEN}


# mitmproxy 12.2's filter parser calls names pyparsing 3.3 deprecates; an addon's configure that raised would only
# be logged (mitmproxy catches it), leaving its feature off.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("option", list(_features(Path("/tmp"))))
def test_an_option_brings_back_exactly_the_hooks_of_its_feature(tmp_path, option):
    value, hooks = _features(tmp_path)[option]

    async def run():
        master = _quiet_master()
        try:
            assert _planned(master) == set()
            # Hooks that act on what a request holds stay, whatever the options.
            for kept in ("DisableH2C", "Onboarding", "TlsConfig", "ServerPlayback"):
                assert any(type(top).__name__ == kept for top, _ in master.addons._plan("request")), kept
            master.options.update(**{option: value})
            assert _planned(master) == hooks
            master.options.reset()  # back to mitmproxy's defaults: flow_detail 1 keeps the Dumper
            master.options.update(flow_detail=0)
            assert _planned(master) == set()
        finally:
            await master.done()
    asyncio.run(run())


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_rule_turned_on_acts_through_the_rebuilt_plan():
    async def run():
        master = _quiet_master()
        try:
            flow = tflow.tflow()
            await master.addons.trigger_event(HttpRequestHeadersHook(flow))
            assert "X-Rt-Test" not in flow.request.headers
            master.options.update(modify_headers=["/~q/X-Rt-Test/on"])
            flow = tflow.tflow()
            await master.addons.trigger_event(HttpRequestHeadersHook(flow))
            assert flow.request.headers["X-Rt-Test"] == "on"
        finally:
            await master.done()
    asyncio.run(run())


def test_a_hook_left_out_as_idle_would_have_done_nothing(caplog, capsys):
    """Each hook IDLE_WHEN leaves out, called anyway under the options it was left out for on flows its feature
    would act on, changes no flow and no state of its addon, and logs and prints nothing."""
    async def run():
        master = _quiet_master()
        try:
            addons = {type(addon): addon for addon in traverse(master.addons.chain)}
            for (cls, hook), (_, idle) in IDLE_WHEN.items():
                addon = addons[cls]
                assert idle(addon, master.options), cls.__name__
                flows = [tflow.tflow(resp=True)] + ([] if hook.startswith("response") else [tflow.tflow()])
                for flow in flows:
                    flow.request.headers.update({"Cookie": "a=b", "Authorization": "Basic dTpw"})
                    if flow.response:
                        flow.response.headers["Set-Cookie"] = "c=d; Path=/"
                    before, state = flow.get_state(), {k: repr(v) for k, v in vars(addon).items()}
                    caplog.clear()
                    result = getattr(addon, hook)(flow)
                    if inspect.isawaitable(result):
                        await result
                    assert flow.get_state() == before, (cls.__name__, hook)
                    assert {k: repr(v) for k, v in vars(addon).items()} == state, (cls.__name__, hook)
                    assert not caplog.records, (cls.__name__, hook)
        finally:
            await master.done()
    asyncio.run(run())
    assert capsys.readouterr().out == ""


def test_a_builtin_hook_replaced_on_its_instance_or_class_is_kept(monkeypatch):
    options = types.SimpleNamespace(flow_detail=0)
    saver = save.Save()
    assert saver.stream is None and hook_plan([saver], "response", options) == []
    saver.response = lambda flow: None
    assert hook_plan([saver], "response", options) == [(saver, [saver.response])]
    monkeypatch.setattr(dumper.Dumper, "response", lambda self, flow: None)
    printer = dumper.Dumper()
    assert hook_plan([printer], "response", options) == [(printer, [printer.response])]


def test_a_subclass_of_a_builtin_addon_keeps_its_hooks():
    class MyHeaders(modifyheaders.ModifyHeaders):
        pass
    mine = MyHeaders()
    mine.replacements = []
    assert hook_plan([mine], "requestheaders", object()) == [(mine, [mine.requestheaders])]
