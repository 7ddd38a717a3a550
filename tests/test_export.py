"""Export of stored flows to mitmproxy's flow file and to HAR, read back with mitmproxy's own readers.

The store is made by a real run (mitmdump + capture addon, ScriptedUpstream, agent processes), plus a refused
upstream connection and an unattributed request.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
import threading
from contextlib import closing

import pytest

from rollouttap.addon.export_flows import read_flow_file, write_flow_file, write_har
from rollouttap.errors import ConfigError
from rollouttap.manager.export import export_flows, format_for
from rollouttap.store import Store
from test_replay import extra_traffic, record


@pytest.fixture(scope="module")
def recording(tmp_path_factory, confdir):
    return record(tmp_path_factory.mktemp("export"), confdir, {"plain": False, "streamer": True},
                  extra=extra_traffic)


def _read(path) -> list:
    """mitmproxy.io.FlowReader's flows (through the helper that keeps mitmproxy's pyparsing warning quiet)."""
    return read_flow_file(path)


def test_flow_file_reads_back_equal_to_the_store(recording, tmp_path):
    out = tmp_path / "all.flows"
    result = export_flows(recording.store, out)
    with Store(recording.store) as s:
        stored = s.flows()
    flows = _read(out)
    assert result.flows == len(stored) == len(flows) and result.format == "mitm"
    for rec, flow in zip(stored, flows, strict=True):
        meta = flow.metadata["rollouttap"]
        assert flow.id == rec.flow_id and meta["agent_id"] == rec.agent_id and meta["id"] == rec.id
        assert meta["attribution"] == rec.attribution and meta["pid"] == rec.pid
        assert flow.request.method == rec.method and flow.request.pretty_url == rec.url
        assert flow.request.raw_content == (rec.request_body or b"")
        assert flow.request.timestamp_start == rec.t_request
        assert list(flow.request.headers.items(multi=True)) == rec.request_headers
        if rec.status_code is None:
            assert flow.response is None
        else:
            assert flow.response.status_code == rec.status_code
            assert flow.response.raw_content == (rec.response_body or b"")
        assert (flow.error is not None) == (rec.state == "error")


def test_streamed_response_is_exported_with_its_sse_body(recording, tmp_path):
    out = tmp_path / "streamer.flows"
    export_flows(recording.store, out, agent_id="streamer")
    flows = _read(out)
    assert len(flows) == 3 and {f.metadata["rollouttap"]["agent_id"] for f in flows} == {"streamer"}
    for flow in flows:
        assert flow.metadata["rollouttap"]["streamed"] is True
        assert flow.response.headers["content-type"].startswith("text/event-stream")
        text = flow.response.get_text()
        assert text.startswith("data: ") and text.rstrip().endswith("data: [DONE]")
        assert '"token_ids"' in text  # the ids the proxy asked for are part of the recorded body
        assert flow.metadata["rollouttap"]["meta"]["injected"]["return_token_ids"] is True


def test_error_and_unattributed_flows_are_exported(recording, tmp_path):
    out = tmp_path / "all.flows"
    export_flows(recording.store, out)
    flows = _read(out)
    broken = [f for f in flows if f.metadata["rollouttap"]["agent_id"] == "broken"]
    assert broken and broken[0].error is not None and broken[0].metadata["rollouttap"]["state"] == "error"
    assert any(f.metadata["rollouttap"]["attribution"] == "none" and f.request.path == "/health" for f in flows)


def test_redacted_headers_stay_redacted(recording, tmp_path):
    out = tmp_path / "plain.flows"
    export_flows(recording.store, out, agent_id="plain")
    flows = _read(out)
    assert all(f.request.headers["authorization"].startswith("Bearer <redacted sha256:") for f in flows)
    assert b"sk-agent" not in out.read_bytes()


def test_run_selection(recording, tmp_path):
    result = export_flows(recording.store, tmp_path / "run.flows", run_id=recording.run_id)
    flows = _read(tmp_path / "run.flows")
    assert result.flows == 6 and {f.metadata["rollouttap"]["agent_id"] for f in flows} == {"plain", "streamer"}


def test_har_is_valid_and_mitmproxy_reads_it_back(recording, tmp_path):
    out = tmp_path / "streamer.har"
    result = export_flows(recording.store, out, agent_id="streamer")
    har = json.loads(out.read_text())
    entries = har["log"]["entries"]
    assert result.format == "har" and har["log"]["version"] == "1.2" and len(entries) == 3
    with Store(recording.store) as s:
        stored = s.flows(agent_id="streamer")
    for entry, rec in zip(entries, stored, strict=True):
        assert entry["_rollouttap"]["agent_id"] == "streamer"
        assert entry["request"]["url"] == rec.url and entry["request"]["postData"]["text"] == rec.request_text()
        assert entry["response"]["status"] == 200
        assert entry["response"]["content"]["text"] == rec.response_text()
    back = _read(out)  # mitmproxy's FlowReader also reads HAR
    assert [f.request.pretty_url for f in back] == [r.url for r in stored]


def test_har_written_entry_by_entry_holds_mitmproxys_entries_for_the_flows(recording, tmp_path):
    from mitmproxy.addons.savehar import SaveHar

    from rollouttap.addon.export_flows import har_document, to_http_flow, write_har
    with Store(recording.store) as s:
        assert write_har(s.iter_flows(batch=2), tmp_path / "all.har") == len(s.flows())
        whole, records = har_document(s.flows()), s.flows()
    written = json.loads((tmp_path / "all.har").read_text())
    assert written == whole  # the framing: one valid document
    mitmproxys = SaveHar().make_har([to_http_flow(r) for r in records])["log"]["entries"]
    for entry, theirs, rec in zip(written["log"]["entries"], mitmproxys, records, strict=True):
        assert entry.pop("_rollouttap")["id"] == rec.id
        # What HAR 1.2 requires and mitmproxy leaves out for a flow without a response: size and mimeType.
        assert entry["response"].pop("content") == {"size": 0, "mimeType": "", **theirs["response"].pop("content")}
        if "_error" in entry["response"] and "comment" not in theirs["response"]:  # HAR 1.2's field for the error
            assert entry["response"].pop("comment") == f"ended in error: {entry['response']['_error']}"
        assert entry == theirs
    assert write_har([], tmp_path / "none.har") == 0
    assert json.loads((tmp_path / "none.har").read_text())["log"]["entries"] == []


def test_one_agent_or_one_run_not_both_and_no_file_written(recording, tmp_path):
    with pytest.raises(ConfigError, match="one agent or one run, not both"):
        export_flows([recording.store, recording.store], tmp_path / "x.har", agent_id="plain", run_id="r")
    assert not (tmp_path / "x.har").exists()


@pytest.mark.parametrize("name", ["out.har", "out.flows"])
def test_exports_are_readable_by_their_owner_only(recording, tmp_path, name):
    export_flows(recording.store, tmp_path / name, agent_id="plain")
    assert (tmp_path / name).stat().st_mode & 0o777 == 0o600


def test_har_entry_without_a_response_is_valid(recording, tmp_path):
    out = tmp_path / "broken.har"
    export_flows(recording.store, out, agent_id="broken")
    [entry] = json.loads(out.read_text())["log"]["entries"]
    response = entry["response"]
    assert response["status"] == 0 and response["_error"] and entry["_rollouttap"]["state"] == "error"
    assert response["comment"] == f"ended in error: {response['_error']}"  # HAR 1.2's own field, as with one
    assert response["content"]["size"] == 0 and response["content"]["mimeType"] == ""  # HAR 1.2 requires both


def test_mitmdump_opens_the_flow_file(recording, tmp_path):
    out = tmp_path / "plain.flows"
    export_flows(recording.store, out, agent_id="plain")
    proc = subprocess.run([sys.executable, "-c", "from mitmproxy.tools.main import mitmdump; mitmdump()",
                           "-n", "-r", str(out)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("POST http://") == 3 and "<< 200" in proc.stdout


@pytest.mark.parametrize("path, fmt, expected", [
    ("x.flows", None, "mitm"), ("x.har", None, "har"), ("x.HAR", None, "har"), ("x.json", None, "har"),
    ("x.bin", "har", "har"), ("x.har", "mitm", "mitm"),
])
def test_format_for(path, fmt, expected):
    assert format_for(path, fmt) == expected


def test_unknown_format_and_double_selection_are_refused(recording, tmp_path):
    from rollouttap.errors import ConfigError
    with pytest.raises(ConfigError, match="unknown export format"):
        format_for("x", "pcap")
    with pytest.raises(ConfigError, match="not both"):
        export_flows(recording.store, tmp_path / "x.flows", agent_id="plain", run_id=recording.run_id)


def _copy(store, to):
    with closing(sqlite3.connect(store)) as src, closing(sqlite3.connect(to)) as dst:
        src.backup(dst)
    return to


@pytest.mark.parametrize("out, message", [
    ("{store}", "would destroy the store"), ("{store}-wal", "would destroy the store"),
    ("{store}-shm", "would destroy the store"), ("{other}", "is a SQLite database"), ("-", "not stdout"),
    ("{dir}", "is a directory"),
])
def test_export_refuses_an_output_that_is_a_store_or_not_a_file(recording, tmp_path, monkeypatch, out, message):
    # A copy: an export written over the store it reads truncates it.
    store, other = _copy(recording.store, tmp_path / "runs.db"), _copy(recording.store, tmp_path / "other.db")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    target = out.format(store=store, other=other, dir=tmp_path / "sub")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match=message):
        export_flows(store, target)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    with Store(store, readonly=True) as s, Store(recording.store, readonly=True) as original:
        assert len(s.flows()) == len(original.flows())


@pytest.mark.parametrize("write, name", [(write_flow_file, "x.flows"), (write_har, "x.har")])
@pytest.mark.parametrize("existing", [None, b"the previous export"])
def test_an_export_cut_short_leaves_no_file_and_an_existing_one_as_it_was(recording, tmp_path, write, name, existing):
    out = tmp_path / "out" / name
    out.parent.mkdir()
    if existing is not None:
        out.write_bytes(existing)

    def interrupted():  # Ctrl-C after two flows: what was written so far would read as a whole (shorter) export
        with Store(recording.store, readonly=True) as s:
            yield from s.flows()[:2]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write(interrupted(), out)
    assert [p.name for p in out.parent.iterdir()] == ([name] if existing is not None else [])
    if existing is not None:
        assert out.read_bytes() == existing
    with Store(recording.store, readonly=True) as s:
        assert write(s.iter_flows(), out) == len(s.flows())
    assert [p.name for p in out.parent.iterdir()] == [name]  # written whole, then moved into place


def test_an_export_to_a_fifo_is_written_through_it(recording, tmp_path):
    # /dev/stdout piped into another program is such a file: it was read (the SQLite check waited for ever on it)
    # and then replaced by a temporary file, not written to.
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    result = export_flows(recording.store, fifo, agent_id="streamer", fmt="har")
    reader.join(30)
    assert stat.S_ISFIFO(fifo.lstat().st_mode) and result.flows == 3
    assert len(json.loads(got[0])["log"]["entries"]) == 3


def test_a_body_kept_only_in_part_is_exported_with_its_own_length_and_marked(recording):
    from dataclasses import replace

    from rollouttap.addon.export_flows import to_http_flow
    with Store(recording.store) as s:
        record = s.flows(agent_id="plain")[0]
    cut = replace(record, meta={**record.meta, "body_cut": {"size": 300 << 20, "kept": 10}},
                  response_body=(record.response_body or b"")[:10])
    exported = to_http_flow(cut)
    assert exported.response is not None and exported.response.headers["content-length"] == "10"
    assert exported.error is not None and "first 10 of 314572800 bytes" in exported.error.msg


def test_an_upload_kept_only_in_part_is_exported_with_its_own_length_and_marked(recording):
    from dataclasses import replace

    from rollouttap.addon.export_flows import to_http_flow
    with Store(recording.store) as s:
        record = s.flows(agent_id="plain")[0]
    cut = replace(record, meta={**record.meta, "request_body_cut": {"size": 300 << 20, "kept": 7}},
                  request_body=(record.request_body or b"")[:7], state="error", error="client went away",
                  request_headers=[*record.request_headers, ("Transfer-Encoding", "chunked")])
    exported = to_http_flow(cut)
    assert exported.request.headers["content-length"] == "7" and exported.request.raw_content == cut.request_body
    assert "transfer-encoding" not in exported.request.headers  # never beside a Content-Length
    assert exported.error is not None and exported.error.msg.startswith("client went away; ")
    assert "first 7 of 314572800 bytes of this request body" in exported.error.msg
    unended = replace(cut, meta={**record.meta, "request_body_cut": {"size": None, "kept": 7, "ended": False}})
    assert "first 7 of an unknown number of bytes of this request body (it never ended" in \
        to_http_flow(unended).error.msg


def test_a_har_keeps_the_bytes_of_bodies_and_headers_that_are_not_text(recording):
    # mitmproxy's exporter wrote them as Latin-1 text (read back as other bytes) and lone surrogates (strict
    # JSON parsers refuse them).
    import base64
    from dataclasses import replace

    from rollouttap.addon.export_flows import har_document
    with Store(recording.store) as s:
        record = next(r for r in s.flows(agent_id="plain") if r.method == "POST" and r.response_body)
    upload, answer = b"\x00\x01binary\xff" * 10, b"data: \xff\xfe not utf-8\n\n"
    odd = replace(record, request_body=upload, response_body=answer,
                  request_headers=[*record.request_headers, ("X-Odd", "\udce9t\udce9")],
                  response_headers=[(k, v) for k, v in record.response_headers if k.lower() != "content-type"]
                  + [("Content-Type", "text/event-stream")])
    [entry] = har_document([odd])["log"]["entries"]
    content, post = entry["response"]["content"], entry["request"]["postData"]
    assert content["encoding"] == "base64" and base64.b64decode(content["text"]) == answer
    assert post["_encoding"] == "base64" and base64.b64decode(post["text"]) == upload
    [value] = [h["value"] for h in entry["request"]["headers"] if h["name"] == "X-Odd"]
    assert value.encode("latin-1") == b"\xe9t\xe9"
    json.dumps(entry, ensure_ascii=False).encode("utf-8")  # no lone surrogate left: strict UTF-8 takes it
    [plain] = har_document([record])["log"]["entries"]  # text stays text
    assert "encoding" not in plain["response"]["content"] and "_encoding" not in plain["request"]["postData"]


def test_a_har_gives_a_body_that_decodes_past_the_limit_as_stored_without_decoding_it_whole(recording):
    # mitmproxy's exporter decodes a body without a bound: 32 KB of zstd (1 GiB of zeros) would take 1 GiB.
    import base64
    import tracemalloc
    from dataclasses import replace

    import zstandard

    from rollouttap.addon.export_flows import har_document
    from rollouttap.store.codings import DECODED_BODY_LIMIT
    with Store(recording.store) as s:
        record = next(r for r in s.flows(agent_id="plain") if r.method == "POST" and r.response_body)
    packer = zstandard.ZstdCompressor(level=1).compressobj()
    bomb = b"".join(packer.compress(bytes(1 << 20)) for _ in range(1024)) + packer.flush()
    coded = replace(record, response_body=bomb, response_headers=[
        *[(k, v) for k, v in record.response_headers if k.lower() != "content-length"], ("Content-Encoding", "zstd")])
    tracemalloc.start()
    try:
        [entry] = har_document([coded])["log"]["entries"]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < DECODED_BODY_LIMIT + (128 << 20), f"{peak >> 20} MiB held"
    content = entry["response"]["content"]
    assert base64.b64decode(content["text"]) == bomb and f"decodes past {DECODED_BODY_LIMIT >> 20} MiB" in content["comment"]
    assert {"name": "Content-Encoding", "value": "zstd"} in entry["response"]["headers"]
