"""The embedded training corpus of the tiny tokenizer: prose, code, JSON, arithmetic, tool calls."""

from __future__ import annotations

import json
from collections.abc import Iterator

_PROSE = """\
The quick brown fox jumps over the lazy dog.
You are a helpful assistant. Answer the question as briefly as you can.
What is the weather like in Paris today? It is sunny and warm, about twenty degrees.
Please read the file and tell me how many lines it has.
The agent calls a tool, reads the result, and then answers the user.
I will search the web for the latest news about the project.
Thank you! Let me know if there is anything else I can help with.
Sorry, I could not find that file. Could you check the path and try again?
The capital of France is Paris. The capital of Japan is Tokyo.
Water boils at one hundred degrees Celsius at sea level.
A function returns a value; a procedure performs an action.
Let me think step by step before I give the final answer.
First, add the numbers. Then, divide the sum by the count.
The model was trained with reinforcement learning on many small tasks.
Each conversation has a system message, user turns, assistant turns and tool results.
This is a test. This is only a test. Nothing here is important.
She said hello, and he said goodbye. They never met again.
The meeting starts at ten in the morning and ends at noon.
Open the door, walk to the window, and look outside.
Numbers like 3.14, 2.71 and 1.41 appear in many formulas.
"""

_CODE = """\
def add(a, b):
    return a + b


def main() -> None:
    for i in range(10):
        print(f"value {i}: {add(i, i)}")


if __name__ == "__main__":
    main()

import json
import os
from pathlib import Path

class Counter:
    def __init__(self):
        self.count = 0

    def increment(self, step=1):
        self.count += step
        return self.count

with open("data.txt") as f:
    lines = [line.strip() for line in f if line]

function greet(name) {
  return `Hello, ${name}!`;
}
const items = [1, 2, 3].map((x) => x * 2);
if (items.length > 0) { console.log(items); }
SELECT id, name FROM users WHERE age > 30 ORDER BY name;
$ ls -la /tmp && cat README.md | grep -i error
"""

_JSON = """\
{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
{"type": "function", "function": {"name": "search", "description": "Search the web", "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}
{"id": 42, "ok": true, "items": [1, 2, 3], "error": null}
{"role": "assistant", "content": "Hello!", "tool_calls": []}
{"temperature": 0.7, "max_tokens": 128, "stream": false}
"""

_CHAT = """\
<|im_start|>system
You are a helpful assistant.<|im_end|>
<|im_start|>user
What is 2 + 2?<|im_end|>
<|im_start|>assistant
<think>Two plus two is four.</think>The answer is 4.<|im_end|>
<|im_start|>assistant
<tool_call>
{"name": "calculator", "arguments": {"expression": "12 * 7"}}
</tool_call><|im_end|>
<|im_start|>user
<tool_response>
84
</tool_response><|im_end|>
"""

_TOOLS = ("get_weather", "search", "calculator", "read_file", "write_file", "run_shell")
_ARGS = (
    {"city": "Paris"},
    {"query": "rollouttap tokens"},
    {"expression": "3 + 4 * 5"},
    {"path": "/tmp/notes.txt"},
    {"path": "out.txt", "content": "done"},
    {"command": "ls -la"},
)


def corpus_documents() -> Iterator[str]:
    """Every document of the corpus, in a fixed order (the tokenizer must train deterministically)."""
    # Whole blocks, not lines: the newlines are part of what the tokenizer must learn.
    yield from (_PROSE, _CODE, _JSON, _CHAT)
    for a in range(0, 40, 3):
        for b in range(1, 30, 7):
            yield f"{a} + {b} = {a + b}; {a} * {b} = {a * b}; {a} - {b} = {a - b}"
    for name, args in zip(_TOOLS, _ARGS, strict=True):
        call = json.dumps({"name": name, "arguments": args})
        yield f"<tool_call>\n{call}\n</tool_call>"
        yield f"<tool_response>\n{json.dumps({'result': 'ok', 'tool': name})}\n</tool_response>"
