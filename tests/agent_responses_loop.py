"""A multi-turn tool-using agent on the Responses API, for tests: the openai SDK's ``client.responses``, a
calculator function tool, the whole input sent again each turn, until an answer.
Usage: python agent_responses_loop.py BASE_URL TASK [--stream] [--max-turns N]"""

from __future__ import annotations

import argparse
import json

import openai

from agent_tool_loop import calculate

TOOL = {"type": "function", "name": "calculator", "description": "Evaluate an arithmetic expression.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                       "required": ["expression"]}}


def ask(client: openai.OpenAI, items: list, stream: bool):
    """The final response object of one call."""
    if not stream:
        return client.responses.create(model="policy", input=items, tools=[TOOL])
    final = None
    for event in client.responses.create(model="policy", input=items, tools=[TOOL], stream=True):
        if event.type == "response.completed":
            final = event.response
    if final is None:
        raise SystemExit("the stream ended without response.completed")
    return final


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("base")
    parser.add_argument("task")
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--max-turns", type=int, default=6)
    args = parser.parse_args()
    client = openai.OpenAI(base_url=args.base, api_key="sk-test", max_retries=0)
    items: list = [{"role": "user", "content": args.task}]
    for _ in range(args.max_turns):
        response = ask(client, items, args.stream)
        calls = [item for item in response.output if item.type == "function_call"]
        if not calls:
            print(response.output_text)
            return
        for call in calls:
            items.append({"type": "function_call", "call_id": call.call_id, "name": call.name,
                          "arguments": call.arguments})
            result = calculate(json.loads(call.arguments).get("expression", ""))
            items.append({"type": "function_call_output", "call_id": call.call_id, "output": result})
    raise SystemExit("no answer within the turn limit")


if __name__ == "__main__":
    main()
