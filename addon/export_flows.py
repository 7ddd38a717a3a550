"""Stored flows as mitmproxy flows: a flow file ``mitmweb -r FILE`` opens, and HAR via mitmproxy's own code.

Bodies go in exactly as stored (raw wire bytes, a streamed response's whole SSE text); headers stay redacted.
Each flow carries the store's view of it in ``flow.metadata["rollouttap"]`` (agent id, attribution, pid, ...).
"""

from __future__ import annotations

import base64
import gc
import json
import logging
import os
import re
import stat
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from mitmproxy import connection, flow, http

with warnings.catch_warnings():
    # mitmproxy 12.2's flowfilter (imported by its io and HAR code) calls pyparsing names pyparsing 3.3 deprecates.
    warnings.simplefilter("ignore", DeprecationWarning)
    from mitmproxy import io
    from mitmproxy.addons.savehar import SaveHar

from rollouttap.store import FlowRecord
from rollouttap.store.codings import DECODED_BODY_LIMIT, decodes_past

log = logging.getLogger(__name__)

METADATA_KEY = "rollouttap"
GC_EVERY_BYTES = 16 << 20  # of bodies exported between garbage collections (see _collected)

__all__ = [
    "METADATA_KEY", "flow_metadata", "har_document", "har_entries", "mark_error", "read_flow_file", "to_http_flow",
    "write_flow_file", "write_har",
]


def flow_metadata(record: FlowRecord) -> dict[str, Any]:
    """What the store knows of a flow beyond HTTP, for ``flow.metadata["rollouttap"]``."""
    return {
        "id": record.id,
        "agent_id": record.agent_id,
        "attribution": record.attribution,
        "pid": record.pid,
        "proxy_id": record.proxy_id,
        "client_conn_id": record.client_conn_id,
        "state": record.state,
        "error": record.error,
        "streamed": record.streamed,
        "t_first_byte": record.t_first_byte,
        # Store meta is free-form JSON; a round trip keeps it to types tnetstring can hold.
        "meta": json.loads(json.dumps(record.meta)),
    }


def _address(text: str | None) -> tuple[str, int]:
    if not text:
        return ("", 0)
    host, _, port = text.rpartition(":")
    return (host.strip("[]"), int(port)) if port.isdigit() else (text, 0)


def _headers(pairs: list[tuple[str, str]]) -> http.Headers:
    return http.Headers([(k.encode("utf-8", "surrogateescape"), v.encode("utf-8", "surrogateescape"))
                         for k, v in pairs])


def _http_version(record: FlowRecord) -> bytes:
    """The version the client spoke (recorded when not HTTP/1.1)."""
    return str(record.meta.get("http_version", "HTTP/1.1")).encode()


def _request(record: FlowRecord) -> http.Request:
    method = (record.method or "GET").upper()
    start = record.t_request or 0.0
    host, port = record.host or "", record.port or 0
    if method == "CONNECT":
        scheme, authority, path = "", f"{host}:{port}", ""
    else:
        scheme, authority, path = record.scheme or "http", "", record.path or "/"
    return http.Request(
        host=host, port=port, method=method.encode(), scheme=scheme.encode(), authority=authority.encode(),
        path=path.encode("utf-8", "surrogateescape"), http_version=_http_version(record),
        headers=_headers(record.request_headers), content=record.request_body or b"", trailers=None,
        # The store does not time the request body's end: count the whole wait as the server's.
        timestamp_start=start, timestamp_end=start)


def _response(record: FlowRecord) -> http.Response | None:
    if record.status_code is None:
        return None
    start = record.t_response_headers or record.t_end or record.t_request or 0.0
    return http.Response(
        http_version=_http_version(record), status_code=record.status_code, reason=b"",
        headers=_headers(record.response_headers), content=record.response_body or b"", trailers=None,
        timestamp_start=start, timestamp_end=record.t_end or start)


def to_http_flow(record: FlowRecord) -> http.HTTPFlow:
    """One stored flow as a mitmproxy HTTPFlow (not live), with the store's metadata attached."""
    start = record.t_request or 0.0
    client = connection.Client(id=record.client_conn_id or record.flow_id, peername=_address(record.client_addr),
                               sockname=("", 0), timestamp_start=start)
    server = connection.Server(address=(record.host or "", record.port or 0))
    result = http.HTTPFlow(client, server)
    result.id = record.flow_id
    result.timestamp_created = start
    result.request = _request(record)
    result.response = _response(record)
    if record.state == "error":
        result.error = flow.Error(record.error or "flow ended in error", record.t_end or start)
    # A body the store kept the first part of: a tool replaying the export must not wait for the rest.
    cuts = ((result.request, "request_body_cut", "request"), (result.response, "body_cut", "response"))
    for message, key, what in cuts:
        if message is None or not (cut := record.meta.get(key)):
            continue
        message.headers.pop("transfer-encoding", None)  # never beside a Content-Length (RFC 9112 6.2)
        message.headers["content-length"] = str(len(message.raw_content or b""))
        whole = "an unknown number of" if cut.get("size") is None else cut["size"]
        said = f"rollouttap kept only the first {cut.get('kept')} of {whole} bytes of this {what} body " + \
            ("(it never ended: answered or broken off first)" if cut.get("ended") is False else
             "(over SQLite's limit on a value)" if cut.get("store_limit") else "(rollouttap_body_keep_mb)")
        result.error = flow.Error(f"{result.error.msg}; {said}" if result.error else said, record.t_end or start)
    result.live = False
    result.metadata[METADATA_KEY] = flow_metadata(record)
    return result


def write_flow_file(records: Iterable[FlowRecord], out: IO[bytes] | str | Path) -> int:
    """Write flows in mitmproxy's flow-file format (``mitmproxy.io.FlowReader`` reads it); returns the count."""
    if isinstance(out, (str, Path)):
        with _replacing(out, "wb") as fo:
            return write_flow_file(records, fo)
    writer = io.FlowWriter(out)
    count = 0
    for record in _collected(records):
        writer.add(to_http_flow(record))
        count += 1
    return count


@contextmanager
def _replacing(path: str | Path, mode: str, **kwargs: Any) -> Iterator[IO[Any]]:
    """A file that becomes ``path`` only once written whole: it is written beside it under a temporary name and
    moved into place, so an export cut short (an error, Ctrl-C) leaves no file that reads as complete (a flow
    file cut between flows parses cleanly) and an existing ``path`` as it was. Created owner-only; an existing
    ``path`` keeps its mode."""
    path = Path(path)
    if path.exists() and not stat.S_ISREG(path.stat().st_mode):  # /dev/stdout, a FIFO: written through, as named
        with open(path, mode, **kwargs) as fo:
            yield fo
        return
    try:
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")  # mode 0600
    except OSError as exc:  # name the file asked for, not the temporary one
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    try:
        with os.fdopen(fd, mode, **kwargs) as fo:
            yield fo
        if path.exists():
            os.chmod(temp, stat.S_IMODE(path.stat().st_mode))
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _collected(records: Iterable[FlowRecord], every: int = GC_EVERY_BYTES) -> Iterator[FlowRecord]:
    """The records, with a garbage collection after every ``every`` bytes of bodies handed out: mitmproxy's
    flow objects hold reference cycles, freed only when the collector runs, and it runs by object counts,
    not bytes, so an export's flows with megabyte bodies would otherwise pile up (all of them, in a test)."""
    pending = 0
    for record in records:
        yield record
        pending += len(record.request_body or b"") + len(record.response_body or b"")
        if pending >= every:
            gc.collect()
            pending = 0


def read_flow_file(path: str | Path) -> list[flow.Flow]:
    """Every flow of a mitmproxy flow file (or HAR file), read by mitmproxy's own reader."""
    with open(path, "rb") as fo:
        return list(io.FlowReader(fo).stream())


def har_document(records: Iterable[FlowRecord]) -> dict[str, Any]:
    """A HAR 1.2 document made by mitmproxy's HAR exporter, each entry with a ``_rollouttap`` field."""
    har = SaveHar().make_har([])
    har["log"]["entries"] = list(har_entries(records))
    har["log"]["creator"]["comment"] = "exported by rollouttap"
    return har


def har_entries(records: Iterable[FlowRecord]) -> Iterator[dict[str, Any]]:
    """Each record's HAR entry, made one at a time by mitmproxy's HAR exporter."""
    exporter = SaveHar()
    for record in _collected(records):
        # Each record's flow has a server object of its own, never "seen" before: a fresh set, not one that
        # would keep every flow's server alive through the export.
        http_flow = to_http_flow(record)
        bombs = _take_bombs_coding(http_flow)
        entry = exporter.flow_entry(http_flow, set())
        entry["_rollouttap"] = flow_metadata(record)
        if http_flow.error is not None:  # with no response, mitmproxy's exporter writes _error alone
            mark_error(entry["response"], http_flow.error.msg)
        # mitmproxy writes `content: {}` for a flow that got no response; HAR 1.2 requires size and mimeType,
        # and viewers (Chrome, har-validator) reject the entry without them.
        entry["response"]["content"] = {"size": 0, "mimeType": "", **entry["response"]["content"]}
        keep_bytes(entry, http_flow)
        for part, name, coding in bombs:
            _note_left_coded(entry, part, name, coding)
        yield entry


def _take_bombs_coding(http_flow: http.HTTPFlow) -> list[tuple[str, str, str]]:
    """Take the Content-Encoding off each body that decodes past the store's limit (mitmproxy's exporter decodes
    without one: a few KB of zstd would take the exporter's memory); (part, header name, coding) of each."""
    taken = []
    for part, message in (("request", http_flow.request), ("response", http_flow.response)):
        if message is None:
            continue
        coded = [(name, coding) for name, coding in message.headers.items() if name.lower() == "content-encoding"]
        for name, coding in coded:
            if decodes_past(message.raw_content, coding):
                del message.headers[name]
                taken.append((part, name, coding))
    return taken


def _note_left_coded(entry: dict[str, Any], part: str, name: str, coding: str) -> None:
    """Give back the header ``_take_bombs_coding`` took, and say why the body is as stored."""
    entry[part].setdefault("headers", []).append({"name": name, "value": coding})
    body = entry[part].get("content" if part == "response" else "postData")
    if body is not None:
        said = f"the body as stored, still {coding}-coded: it decodes past {DECODED_BODY_LIMIT >> 20} MiB"
        body["comment"] = f"{body['comment']}; {said}" if body.get("comment") else said


def keep_bytes(entry: dict[str, Any], http_flow: http.HTTPFlow) -> None:
    """A HAR entry whose bodies and headers come back as the bytes recorded: mitmproxy's exporter gives a body
    its declared charset cannot decode as Latin-1 text (a reader writes that back as other bytes), and a header
    that is not UTF-8 as lone surrogates (strict JSON parsers refuse them)."""
    response = http_flow.response
    content = entry["response"]["content"]
    if response is not None and content.get("encoding") != "base64" and (body := _undecodable(response)) is not None:
        content.update(text=base64.b64encode(body).decode(), encoding="base64")
    post = entry["request"].get("postData")
    if post is not None and (body := _undecodable(http_flow.request)) is not None:
        # HAR 1.2 gives postData no encoding: the one Chrome and mitmproxy's reader leave alone, and a comment.
        post.update(text=base64.b64encode(body).decode(), _encoding="base64",
                    comment="text: the body's bytes in base64 (not text in its charset)")
    for part in (entry["request"], entry["response"]):
        for header in part.get("headers", ()):
            for key in ("name", "value"):
                if isinstance(header.get(key), str) and _SURROGATE.search(header[key]):
                    header[key] = header[key].encode("utf-8", "surrogateescape").decode("latin-1")


_SURROGATE = re.compile("[\udc80-\udcff]")


def _undecodable(message: http.Message) -> bytes | None:
    """The message's body (content-decoded) when the charset it declares, else UTF-8 (HAR's, and SSE's), cannot
    decode it; else None. (mitmproxy guesses Latin-1 for a text type that declares none: it decodes anything.)"""
    body = message.get_content(strict=False)  # not strict: a coding that does not undo leaves the bytes as sent
    if not body:
        return None
    declared = _CHARSET.search(message.headers.get("content-type", ""))
    try:
        body.decode(declared.group(1).strip('"') if declared else "utf-8")
        return None
    except (UnicodeDecodeError, LookupError):
        return body


_CHARSET = re.compile(r"charset=([^;\s]+)", re.IGNORECASE)


def mark_error(response: dict[str, Any], error: str) -> None:
    """Say in a HAR response that its flow ended in error (a stream cut mid-way): its status alone may read as a
    success. ``_error`` is where Chrome and mitmproxy put a failed request's error; ``comment`` is HAR 1.2's own."""
    response["_error"] = error
    response["comment"] = f"ended in error: {error}"


_ENTRIES = "\0entries\0"  # a stand-in no HAR header holds


def write_har(records: Iterable[FlowRecord], out: str | Path) -> int:
    """Write a HAR file, one entry at a time (an export of any size holds one flow in memory); returns the
    number of entries."""
    head = SaveHar().make_har([])
    head["log"]["creator"]["comment"] = "exported by rollouttap"
    head["log"]["entries"] = _ENTRIES
    before, after = json.dumps(head, indent=2).split(json.dumps(_ENTRIES))  # the document around its entries
    count = 0
    with _replacing(out, "w", encoding="utf-8") as fo:
        fo.write(before + "[")
        for entry in har_entries(records):
            fo.write(("," if count else "") + "\n" + json.dumps(entry, indent=2))
            count += 1
        fo.write("\n]" + after)
    return count
