"""A WebSocket's frames as the store keeps them: one JSON line per message, in the order the proxy relayed them.

The 101 flow's ``response_body`` holds them (``meta.websocket`` says so), so that what crossed an upgraded
connection is kept like any other answer: its first ``limit`` bytes, whole messages, a prefix with no gap (a
message that does not fit ends the log, as a cut body ends). Pure: it reads only the fields below.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from typing import Any, Protocol

ABNORMAL_CLOSURE = 1006  # RFC 6455: the connection closed without a close frame (a peer killed, a network cut)


class Message(Protocol):  # mitmproxy.websocket.WebSocketMessage's fields read here
    from_client: bool
    is_text: bool
    content: bytes
    timestamp: float
    dropped: bool


def frames_jsonl(messages: Sequence[Message], limit: int) -> tuple[bytes, dict[str, int]]:
    """(the messages as JSON lines, as many from the first as fit in ``limit`` bytes; how many there were, how
    many were kept). A text message's line holds ``text``; a binary one's, or text that is not UTF-8, ``base64``.
    Work stops with the first message that does not fit: its cost is bounded by ``limit``, whatever the traffic."""
    lines: list[bytes] = []
    size = 0
    for message in messages:
        # Encoded, a message takes at least its own length (text) or 4/3 of it (base64): most that cannot fit are
        # known so before they are encoded.
        if size + (len(message.content) if message.is_text else len(message.content) * 4 // 3) > limit:
            break
        line: dict[str, Any] = {"from": "client" if message.from_client else "server", "t": message.timestamp}
        if message.dropped:
            line["dropped"] = True  # an addon dropped it: never relayed
        text = _text(message)
        if text is not None:
            line["text"] = text
        else:
            line["base64"] = base64.b64encode(message.content).decode()
        encoded = json.dumps(line, ensure_ascii=False).encode() + b"\n"
        if size + len(encoded) > limit:
            break
        lines.append(encoded)
        size += len(encoded)
    return b"".join(lines), {"messages": len(messages), "kept": len(lines)}


def _text(message: Message) -> str | None:
    if not message.is_text:
        return None
    try:
        return message.content.decode()
    except UnicodeDecodeError:
        return None
