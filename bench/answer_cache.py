"""mitmdump addon for the benchmarks: mitmproxy's client side alone, with no upstream connection.

The first request goes to the upstream; every later request is answered with a copy of that first
response, from memory, in the ``request`` hook, so mitmproxy never opens (or reuses) a server
connection. What a proxy spends per request this way is the floor of mitmproxy's accepting, parsing
and answering: the part of the "bare" rows that no addon and no upstream pooling could remove.
"""

from __future__ import annotations

from mitmproxy import http

HEADER = "x-bench-answered-from-memory"  # on copies only: shows that no upstream answered


class AnswerCache:
    def __init__(self) -> None:
        self.answer: http.Response | None = None

    def request(self, flow: http.HTTPFlow) -> None:
        if self.answer is not None:
            flow.response = self.answer.copy()
            flow.response.headers[HEADER] = "1"

    def response(self, flow: http.HTTPFlow) -> None:
        if self.answer is None and flow.response is not None:
            self.answer = flow.response.copy()


addons = [AnswerCache()]
