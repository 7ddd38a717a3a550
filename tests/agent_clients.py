"""Small agent programs for tests: one chat call with a given HTTP client, through whatever proxy the
environment names. Usage: python agent_clients.py CLIENT BASE_URL [--stream] [--marker TEXT] [--calls N]
Prints the reply text of each call on its own line."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import urllib.request


def _body(marker: str, stream: bool) -> dict:
    return {"model": "policy", "stream": stream,
            "messages": [{"role": "user", "content": f"say {marker}"}]}


def _text_of(raw: str, stream: bool) -> str:
    if not stream:
        return json.loads(raw)["choices"][0]["message"]["content"] or ""
    out = []
    for line in raw.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            for choice in json.loads(line[6:]).get("choices", []):
                out.append(choice.get("delta", {}).get("content") or "")
    return "".join(out)


def call_requests(base: str, marker: str, stream: bool, session) -> str:
    resp = session.post(f"{base}/chat/completions", json=_body(marker, stream), stream=stream,
                        headers={"Authorization": "Bearer sk-test-key"}, timeout=30)
    resp.raise_for_status()
    return _text_of(resp.text, stream)


def call_openai(base: str, marker: str, stream: bool, client) -> str:
    kwargs = dict(model="policy", messages=[{"role": "user", "content": f"say {marker}"}])
    if not stream:
        return client.chat.completions.create(**kwargs).choices[0].message.content or ""
    parts = []
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
    return "".join(parts)


def call_urllib(base: str, marker: str, stream: bool) -> str:
    req = urllib.request.Request(f"{base}/chat/completions", data=json.dumps(_body(marker, stream)).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return _text_of(resp.read().decode(), stream)


def call_curl(base: str, marker: str, stream: bool) -> str:
    out = subprocess.run(["curl", "-sS", "--fail", "-N", "-H", "Content-Type: application/json",
                          "-d", json.dumps(_body(marker, stream)), f"{base}/chat/completions"],
                         check=True, capture_output=True, text=True, timeout=30)
    return _text_of(out.stdout, stream)


async def call_aiohttp(base: str, marker: str, stream: bool, calls: int) -> list[str]:
    import aiohttp
    out = []
    async with aiohttp.ClientSession(trust_env=True) as session:
        for _ in range(calls):
            async with session.post(f"{base}/chat/completions", json=_body(marker, stream)) as resp:
                resp.raise_for_status()
                out.append(_text_of(await resp.text(), stream))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("client")
    parser.add_argument("base")
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--marker", default=os.environ.get("ROLLOUTTAP_AGENT_ID", "x"))
    parser.add_argument("--calls", type=int, default=1)
    args = parser.parse_args()
    if args.client == "aiohttp":
        replies = asyncio.run(call_aiohttp(args.base, args.marker, args.stream, args.calls))
    elif args.client == "requests":
        import requests
        with requests.Session() as session:
            replies = [call_requests(args.base, args.marker, args.stream, session) for _ in range(args.calls)]
    elif args.client == "openai":
        import openai
        client = openai.OpenAI(base_url=args.base, api_key="sk-test-key", max_retries=0)
        replies = [call_openai(args.base, args.marker, args.stream, client) for _ in range(args.calls)]
    elif args.client == "urllib":
        replies = [call_urllib(args.base, args.marker, args.stream) for _ in range(args.calls)]
    elif args.client == "curl":
        replies = [call_curl(args.base, args.marker, args.stream) for _ in range(args.calls)]
    else:
        sys.exit(f"unknown client {args.client}")
    for reply in replies:
        print(reply, flush=True)


if __name__ == "__main__":
    main()
