"""ChatML chat templates with hermes tool calls for the tiny offline model (Qwen2.5 style)."""

# One Jinja source, two variants: the default keeps every assistant turn verbatim so a rendered
# prefix plus the model's completion is a token prefix of the longer conversation; the other drops
# reasoning from assistant turns before the last user message, as Qwen3's template does, which
# breaks that property on purpose (tests of realignment need such a template).
_TEMPLATE = r"""{%- set drop_old_reasoning = __DROP__ -%}
{%- macro render_content(content) -%}
{%- if content is string -%}{{- content -}}
{%- elif content is mapping -%}{{- content.text if content.text is defined else '' -}}
{%- elif content is iterable -%}{%- for part in content -%}{%- if part.type == 'text' -%}{{- part.text -}}{%- endif -%}{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- if messages and messages[0].role == 'system' -%}
{%- set system_text = render_content(messages[0].content) -%}
{%- set rest = messages[1:] -%}
{%- else -%}
{%- set system_text = 'You are a helpful assistant.' -%}
{%- set rest = messages -%}
{%- endif -%}
{{- '<|im_start|>system\n' + system_text -}}
{%- if tools -%}
{{- '\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>' -}}
{%- for tool in tools -%}{{- '\n' + (tool | tojson) -}}{%- endfor -%}
{{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' -}}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- set ns = namespace(last_query=-1) -%}
{%- for message in rest -%}{%- if message.role == 'user' -%}{%- set ns.last_query = loop.index0 -%}{%- endif -%}{%- endfor -%}
{%- for message in rest -%}
{%- if message.role == 'user' or message.role == 'system' -%}
{{- '<|im_start|>' + message.role + '\n' + render_content(message.content) + '<|im_end|>\n' -}}
{%- elif message.role == 'assistant' -%}
{%- set keep_reasoning = not drop_old_reasoning or loop.index0 > ns.last_query -%}
{%- set content = render_content(message.content) -%}
{%- if not keep_reasoning and content.startswith('<think>') and '</think>' in content -%}
{%- set content = content.split('</think>', 1)[1] -%}
{%- endif -%}
{{- '<|im_start|>assistant\n' -}}
{%- set reasoning = message.reasoning_content if message.reasoning_content is string else message.reasoning -%}
{%- if keep_reasoning and reasoning is string -%}{{- '<think>' + reasoning + '</think>' -}}{%- endif -%}
{{- content -}}
{%- for call in (message.tool_calls or []) -%}
{%- set fn = call.function if call.function is defined else call -%}
{%- if not loop.first -%}{{- '\n' -}}{%- endif -%}
{{- '<tool_call>\n{"name": ' + (fn.name | tojson) + ', "arguments": ' -}}
{%- if fn.arguments is string -%}{{- fn.arguments -}}{%- else -%}{{- fn.arguments | tojson -}}{%- endif -%}
{{- '}\n</tool_call>' -}}
{%- endfor -%}
{{- '<|im_end|>\n' -}}
{%- elif message.role == 'tool' -%}
{%- if loop.first or rest[loop.index0 - 1].role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}
{{- '\n<tool_response>\n' + render_content(message.content) + '\n</tool_response>' -}}
{%- if loop.last or rest[loop.index0 + 1].role != 'tool' -%}{{- '<|im_end|>\n' -}}{%- endif -%}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"""


def chat_template() -> str:
    """The prefix-preserving ChatML template with hermes tool calls."""
    return _TEMPLATE.replace("__DROP__", "false")


def reasoning_dropping_template() -> str:
    """A variant that drops <think> reasoning of assistant turns before the last user message."""
    return _TEMPLATE.replace("__DROP__", "true")
