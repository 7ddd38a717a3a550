"""A multi-turn tool-using agent for tests: the openai SDK, a calculator tool, loop until an answer; on chat
completions, or with ``--responses`` on the Responses API (``client.responses``, the whole input sent each turn).
Usage: python agent_tool_loop.py BASE_URL TASK [--stream] [--responses] [--max-turns N]"""

from __future__ import annotations

import argparse
import ast
import json
import operator

import openai

TOOL = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                   "required": ["expression"]}}}
RESPONSES_TOOL = {"type": "function", **TOOL["function"]}
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def calculate(expression: str) -> str:
    def ev(node):
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        raise ValueError("unsupported expression")
    try:
        return str(ev(ast.parse(expression, mode="eval").body))
    except (ValueError, SyntaxError):
        return "error"


def ask(client, messages, stream):
    if not stream:
        msg = client.chat.completions.create(model="policy", messages=messages, tools=[TOOL]).choices[0].message
        calls = [{"id": c.id, "type": "function", "function": {"name": c.function.name,
                                                              "arguments": c.function.arguments}}
                 for c in msg.tool_calls or []]
        return msg.content, calls
    content, calls = "", {}
    for chunk in client.chat.completions.create(model="policy", messages=messages, tools=[TOOL], stream=True):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for frag in choice.delta.tool_calls or []:
                call = calls.setdefault(frag.index, {"id": "", "type": "function",
                                                     "function": {"name": "", "arguments": ""}})
                call["id"] = frag.id or call["id"]
                call["function"]["name"] += (frag.function.name or "") if frag.function else ""
                call["function"]["arguments"] += (frag.function.arguments or "") if frag.function else ""
    return (content or None), [calls[i] for i in sorted(calls)]


def ask_responses(client, items, stream):
    """The final response object of one Responses call."""
    if not stream:
        return client.responses.create(model="policy", input=items, tools=[RESPONSES_TOOL])
    final = None
    for event in client.responses.create(model="policy", input=items, tools=[RESPONSES_TOOL], stream=True):
        if event.type == "response.completed":
            final = event.response
    if final is None:
        raise SystemExit("the stream ended without response.completed")
    return final


def responses_loop(client, task, stream, max_turns):
    items = [{"role": "user", "content": task}]
    for _ in range(max_turns):
        response = ask_responses(client, items, stream)
        calls = [item for item in response.output if item.type == "function_call"]
        if not calls:
            print(response.output_text)
            return
        for call in calls:
            items.append({"type": "function_call", "call_id": call.call_id, "name": call.name,
                          "arguments": call.arguments})
            result = calculate(json.loads(call.arguments).get("expression", ""))
            items.append({"type": "function_call_output", "call_id": call.call_id, "output": result})
    print("no answer")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("base")
    parser.add_argument("task")
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--responses", action="store_true")
    parser.add_argument("--max-turns", type=int, default=6)
    args = parser.parse_args()
    client = openai.OpenAI(base_url=args.base, api_key="sk-test", max_retries=0)
    if args.responses:
        responses_loop(client, args.task, args.stream, args.max_turns)
        return
    messages = [{"role": "user", "content": args.task}]
    for _ in range(args.max_turns):
        content, calls = ask(client, messages, args.stream)
        messages.append({"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})})
        if not calls:
            print(content)
            return
        for call in calls:
            result = calculate(json.loads(call["function"]["arguments"]).get("expression", ""))
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
    print("no answer")


if __name__ == "__main__":
    main()
