"""An agent's chat answers read with their prompt ids decoded once, not once per call that resends them.

With token ids on, vLLM's chat answer (and a stream's first chunk) carries its whole prompt's ids, and an agent's
next prompt resends the one before it: a 50-call agent whose context grows to 100,000 tokens brings back 2.5
million ids, and decoding them (and making each a list of ints) was most of the CPU its conversation cost to build.
Where a list's text begins with the text of the list read before, only the ids past it are decoded; the list
then holds the very int objects of the one before, as ``conversation.share_prompt_prefix`` would make it (that
conversation: 0.29-0.31 s of CPU before, 0.046-0.051 s so).
The answer is what ``json.loads`` gives, and the ids what ``chat_stream`` would make of them: any other shape
(whitespace, the key twice or nested, a list that is not compact integers) is decoded the plain way.
"""

from __future__ import annotations

import json
from typing import Any

from rollouttap.addon.jsonspans import id_list_end, with_markers  # pure: no mitmproxy

KEY = '"prompt_token_ids"'


class PromptIdsReader:
    """Decodes an agent's answers in capture order, remembering the prompt ids of the last one that had some."""

    def __init__(self) -> None:
        self._open: str | None = None  # the last list's text without its "]"
        self._ids: list[int] = []
        # The ids returned last, and the list before them whose int objects they begin with (None: decoded whole).
        self.shares: tuple[list[int], list[int] | None] | None = None

    def loads(self, text: str) -> tuple[Any, list[int] | None]:
        """``json.loads(text)`` (ValueError as it raises it), and its top-level ``prompt_token_ids`` as a new list of
        ints when they are a compact list of integers; None otherwise (then read them from the document)."""
        at = text.find(KEY)
        if at == -1 or not text.startswith(":[", at + len(KEY)):
            return json.loads(text), None
        start = at + len(KEY) + 1
        found = self._after_last(text, start)
        extended = found is not None
        if found is None:
            end = id_list_end(text, start)
            if end == -1:
                return json.loads(text), None
            found = end, json.loads(text[start:end])
        end, ids = found
        try:
            reduced = with_markers(text, [(start, end)])  # the document, the list a marker number
        except ValueError:
            return json.loads(text), None  # raises as it does for the whole text
        # The marker must be the top-level key's value: the key once as written may still come twice, escaped.
        doc, marks = reduced if reduced is not None else (None, frozenset())
        value = doc.get("prompt_token_ids") if isinstance(doc, dict) else None
        if type(value) is not int or value not in marks:
            return json.loads(text), None
        assert isinstance(doc, dict)
        doc["prompt_token_ids"] = ids
        self.shares = ids, (self._ids if extended else None)
        self._open, self._ids = text[start:end - 1], ids
        return doc, ids

    def _after_last(self, text: str, start: int) -> tuple[int, list[int]] | None:
        """(end, ids) of the list at ``start`` where it begins with the last one read, else None."""
        last = self._open
        if not last or not self._ids or not text.startswith(last, start):
            return None
        past = start + len(last)
        following = text[past:past + 1]
        if following == "]":  # the same prompt again (a retry)
            return past + 1, list(self._ids)
        close = text.find("]", past)
        if following != "," or close <= past + 1:
            return None
        rest = "[" + text[past + 1:close + 1]  # the ids past the last list's, as a list of their own
        if id_list_end(rest, 0) != len(rest):
            return None
        return close + 1, self._ids + json.loads(rest)
