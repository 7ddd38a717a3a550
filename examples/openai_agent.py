"""A small multi-turn, tool-using agent written with the openai SDK, streaming on.

    python examples/openai_agent.py "What is 17 * 23?"      # or the task on stdin; or a JSON list of messages

It offers one tool, ``calculator``, runs the model's tool calls locally, and loops until the model answers
without calling a tool (or MAX_TURNS is reached); then it prints the final answer. Nothing in it knows about
rollouttap: run it behind the proxy with
``rollouttap run --agent 'python examples/openai_agent.py {prompt}' --prompts p.jsonl --model-url URL``.

Environment: OPENAI_BASE_URL and OPENAI_API_KEY (the SDK's own), MODEL (default "policy"), MAX_TURNS (8),
TEMPERATURE (the server's default when unset).
"""

from __future__ import annotations

import ast
import json
import operator
import os
import sys
from typing import Any

# The demo's tiny model was warm-started with exactly this tool schema and system prompt
# (rollouttap.trainer_hooks.warm_start); the agent itself knows nothing of rollouttap.
TOOLS = [{
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression and return the result.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "The arithmetic expression."}},
            "required": ["expression"],
        },
    },
}]
SYSTEM = "You are a careful assistant. Use the calculator for arithmetic."

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.Mod: operator.mod, ast.Pow: operator.pow, ast.FloorDiv: operator.floordiv}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def calculate(expression: str) -> str:
    """The value of an arithmetic expression as text, or an error message the model can read."""
    try:
        value = _evaluate(ast.parse(expression.replace("^", "**"), mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError) as exc:
        return f"error: {exc}"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def _evaluate(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 64:
            raise ValueError("exponent too large")
        return _BINARY[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    raise ValueError(f"unsupported {type(node).__name__} in the expression")


def run_tool(name: str, arguments: str) -> str:
    """Execute one tool call locally."""
    try:
        args = json.loads(arguments or "{}")
    except ValueError:
        return f"error: arguments are not JSON: {arguments!r}"
    if name != "calculator":
        return f"error: unknown tool {name!r}"
    return calculate(str(args.get("expression", "")))


def stream_turn(client: Any, model: str, messages: list[dict[str, Any]]) -> dict[str, Any]:
    """One streamed model call; the assistant message rebuilt from its deltas."""
    content: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    sampling = {"temperature": float(os.environ["TEMPERATURE"])} if os.environ.get("TEMPERATURE") else {}
    stream = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, stream=True, **sampling)
    for chunk in stream:
        for choice in chunk.choices:
            delta = choice.delta
            if delta.content:
                content.append(delta.content)
            for part in delta.tool_calls or ():
                call = calls.setdefault(part.index, {"id": None, "type": "function",
                                                     "function": {"name": "", "arguments": ""}})
                call["id"] = part.id or call["id"]
                if part.function is not None:
                    call["function"]["name"] += part.function.name or ""
                    call["function"]["arguments"] += part.function.arguments or ""
    message: dict[str, Any] = {"role": "assistant", "content": "".join(content) or None}
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    return message


def opening(task: str) -> list[dict[str, Any]]:
    """The conversation a task opens: a chat-message prompt (a JSON list of messages, as rollouttap passes a
    conversational data set's prompt) as given, after the system prompt unless it has a system or developer
    message of its own; else the text as the user's message."""
    if task.startswith("["):
        try:
            given = json.loads(task)
        except ValueError:
            given = None
        if isinstance(given, list) and given and all(isinstance(m, dict) and "role" in m for m in given):
            own = any(m["role"] in ("system", "developer") for m in given)  # its own instructions stand
            return given if own else [{"role": "system", "content": SYSTEM}, *given]
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": task}]


def run(task: str, client: Any, model: str = "policy", max_turns: int = 8) -> str:
    """The agent loop: call the model, run its tool calls, repeat until it answers."""
    messages = opening(task)
    for _ in range(max_turns):
        reply = stream_turn(client, model, messages)
        messages.append(reply)
        if not reply.get("tool_calls"):
            return reply["content"] or ""
        for call in reply["tool_calls"]:
            result = run_tool(call["function"]["name"], call["function"]["arguments"])
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
    raise RuntimeError(f"no final answer within {max_turns} turns")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    task = " ".join(args) if args else sys.stdin.read()
    if not task.strip():
        print("usage: openai_agent.py TASK (or the task on stdin)", file=sys.stderr)
        return 2
    import openai
    client = openai.OpenAI(max_retries=2)
    print(run(task.strip(), client, os.environ.get("MODEL", "policy"), int(os.environ.get("MAX_TURNS", "8"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
