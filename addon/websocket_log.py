"""A WebSocket's frames as the store keeps them: one JSON line per message, in the order the proxy relayed them.

The 101 flow's ``response_body`` holds them (``meta.websocket`` says so), so that what crossed an upgraded
connection is kept like any other answer. Pure: no mitmproxy import beyond the message's fields it reads.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from typing import Any, Protocol


class Message(Protocol):  # mitmproxy.websocket.WebSocketMessage's fields read here
    from_client: bool
    is_text: bool
    content: bytes
    timestamp: float
    dropped: bool


def frames_jsonl(messages: Iterable[Message], limit: int) -> tuple[bytes, dict[str, Any]]:
    """(the messages as JSON lines, at most ``limit`` bytes of them; what meta records: how many there were, how
    many were kept). A text message's line holds ``text``; a binary one's, or text that is not UTF-8, ``base64``."""
    lines: list[bytes] = []
    size = count = 0
    for message in messages:
        count += 1
        line: dict[str, Any] = {"from": "client" if message.from_client else "server", "t": message.timestamp}
        if message.dropped:
            line["dropped"] = True  # an addon dropped it: never relayed
        try:
            if not message.is_text:
                raise UnicodeDecodeError("utf-8", b"", 0, 1, "binary")
            line["text"] = message.content.decode()
        except UnicodeDecodeError:
            line["base64"] = base64.b64encode(message.content).decode()
        encoded = json.dumps(line, ensure_ascii=False).encode() + b"\n"
        if size + len(encoded) > limit:
            continue  # counted, not kept: the meta says how many are missing
        lines.append(encoded)
        size += len(encoded)
    return b"".join(lines), {"messages": count, "kept": len(lines)}
