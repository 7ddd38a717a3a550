"""The policy server's endpoints as plain functions of JSON bodies (no HTTP here)."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .generation import Delta, LogprobsMode, SamplingParams, generate
from .hermes import ParsedToolCall, parse_assistant_text, streamable_parts
from .openai_params import BadRequest, sampling_from_body
from .openai_shapes import (
    assistant_message, chat_chunk, chat_logprobs, chat_response, completion_chunk,
    completion_logprobs, completion_response, models_list, new_id, tool_call_deltas,
    tool_call_objects, usage,
)

logger = logging.getLogger(__name__)
Body = dict[str, Any]
Gone = Callable[[], bool]  # True once the client that asked has left
GONE_CHECK_EVERY = 8  # tokens between two checks that a non-streamed request's client is still there


class ClientGone(Exception):
    """The client left before its non-streamed answer was ready: generation stopped, nothing to send."""


@dataclass(frozen=True)
class ApiConfig:
    """Server-wide settings; logprobs_mode as vLLM's --logprobs-mode (TRL wants processed)."""

    model_name: str = "policy"
    max_new_tokens: int = 256
    max_model_len: int | None = None
    logprobs_mode: LogprobsMode = "raw_logprobs"


@dataclass(frozen=True)
class _Options:
    return_token_ids: bool
    as_ids: bool
    parse_tools: bool
    include_usage: bool


class PolicyAPI:
    """Chat, completions, tokenize: vLLM's semantics over a live model, one generation at a time."""

    def __init__(self, model: Any, tokenizer: Any, config: ApiConfig, lock: threading.Lock) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        # Generation is serialised: one request at a time owns the model (and its train/eval mode).
        self.lock = lock
        # Requests being served (queued for the lock, generating, streaming): wait_idle() waits them out.
        self._in_flight = 0
        self._idle = threading.Condition()
        model_config = getattr(model, "config", None)
        self.max_model_len = config.max_model_len or getattr(
            model_config, "max_position_embeddings", None) or 2048
        self.vocab_size = getattr(model_config, "vocab_size", None) or len(tokenizer)
        self.eos_ids = eos_token_ids(model, tokenizer)
        self._names: dict[int, str] = {}

    # ----------------------------------------------------------------- chat
    def chat(self, body: Body, gone: Gone | None = None) -> Body | Iterator[Body]:
        """POST /v1/chat/completions: a response dict, or an iterator of chunks when streaming.

        ``gone``: polled while a non-streamed answer is generated; it stops with ClientGone (vLLM too stops
        a request whose client left, and the generation lock would otherwise be held to max_tokens)."""
        self.check_model(body)
        prompt_ids = self.render_chat(body)
        params = self.sampling(body, chat=True, prompt_len=len(prompt_ids))
        tools_on = bool(body.get("tools")) and body.get("tool_choice") != "none"
        opts = _options(body, parse_tools=tools_on)
        if body.get("stream"):
            return self._chat_stream(prompt_ids, params, opts)
        deltas = self.run_to_end(prompt_ids, params, gone)
        text = "".join(d.text for d in deltas)
        parsed = parse_assistant_text(text, tools=opts.parse_tools)
        call_ids = [new_id("chatcmpl-tool") for _ in parsed.tool_calls]
        calls = tool_call_objects(parsed.tool_calls, call_ids)
        content = parsed.content
        if content is None and not calls and parsed.reasoning is None:
            content = ""
        last = deltas[-1]
        choice = {
            "index": 0,
            "message": assistant_message(content, parsed.reasoning, calls),
            "logprobs": self._chat_logprobs(deltas, params, opts),
            "finish_reason": "tool_calls" if calls else last.finish_reason,
            "stop_reason": last.stop_reason,
            "token_ids": [d.choice.token_id for d in deltas] if opts.return_token_ids else None,
        }
        return chat_response(
            rid=new_id("chatcmpl"), model=self.config.model_name, choice=choice,
            prompt_ids=prompt_ids if opts.return_token_ids else None,
            prompt_tokens=len(prompt_ids), completion_tokens=len(deltas),
        )

    def _chat_stream(
        self, prompt_ids: list[int], params: SamplingParams, opts: _Options
    ) -> Iterator[Body]:
        rid, name = new_id("chatcmpl"), self.config.model_name
        first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None}
        extra = {"prompt_token_ids": prompt_ids} if opts.return_token_ids else {}
        yield chat_chunk(rid, name, [first], **extra)
        splitter = StreamSplitter(opts.parse_tools)
        count = 0
        # closing: a client that leaves mid-stream must release the lock now, not at collection.
        with contextlib.closing(self.locked_stream(prompt_ids, params)) as deltas:
            for delta in deltas:
                count += 1
                yield chat_chunk(rid, name, [self._chat_stream_choice(delta, splitter, params, opts)])
        if opts.include_usage:
            yield chat_chunk(rid, name, [], usage=usage(len(prompt_ids), count))

    def _chat_stream_choice(
        self, delta: Delta, splitter: StreamSplitter, params: SamplingParams, opts: _Options
    ) -> Body:
        payload, called = splitter.push(delta.text, final=delta.finish_reason is not None)
        choice: Body = {"index": 0, "delta": payload, "finish_reason": None,
                        "logprobs": self._chat_logprobs([delta], params, opts)}
        if delta.finish_reason:
            choice["finish_reason"] = "tool_calls" if called else delta.finish_reason
            choice["stop_reason"] = delta.stop_reason
        if opts.return_token_ids:
            choice["token_ids"] = [delta.choice.token_id]
        return choice

    def _chat_logprobs(self, deltas: list[Delta], params: SamplingParams, opts: _Options) -> Body | None:
        if params.num_logprobs is None:
            return None
        return chat_logprobs([d.choice for d in deltas], self.token_name, opts.as_ids)

    # ---------------------------------------------------------- completions
    def completions(self, body: Body, gone: Gone | None = None) -> Body | Iterator[Body]:
        """POST /v1/completions: text or token-id prompts (a batch gives one choice per prompt)."""
        self.check_model(body)
        if body.get("echo") or body.get("suffix"):
            raise BadRequest("echo and suffix are not supported by this server")
        prompts = self._completion_prompts(body.get("prompt"))
        jobs = [(p, self.sampling(body, chat=False, prompt_len=len(p))) for p in prompts]
        opts = _options(body, parse_tools=False)
        if body.get("stream"):
            return self._completion_stream(jobs, opts)
        choices, produced = [], 0
        for index, (prompt_ids, params) in enumerate(jobs):
            deltas = self.run_to_end(prompt_ids, params, gone)
            produced += len(deltas)
            choices.append(self._completion_choice(index, prompt_ids, deltas, params, opts))
        return completion_response(
            rid=new_id("cmpl"), model=self.config.model_name, choices=choices,
            prompt_tokens=sum(len(p) for p in prompts), completion_tokens=produced,
        )

    def _completion_choice(
        self, index: int, prompt_ids: list[int], deltas: list[Delta], params: SamplingParams,
        opts: _Options, *, offset: int = 0, first: bool = True,
    ) -> Body:
        last = deltas[-1]
        logprobs = None
        if params.num_logprobs is not None:
            logprobs = completion_logprobs(
                [d.choice for d in deltas], self.token_name, opts.as_ids,
                first_offset=offset, with_top=params.num_logprobs > 0,
            )
        return {
            "index": index,
            "text": "".join(d.text for d in deltas),
            "logprobs": logprobs,
            "finish_reason": last.finish_reason,
            "stop_reason": last.stop_reason,
            "token_ids": [d.choice.token_id for d in deltas] if opts.return_token_ids else None,
            "prompt_logprobs": None,
            "prompt_token_ids": prompt_ids if opts.return_token_ids and first else None,
        }

    def _completion_stream(
        self, jobs: list[tuple[list[int], SamplingParams]], opts: _Options
    ) -> Iterator[Body]:
        rid, name, produced = new_id("cmpl"), self.config.model_name, 0
        for index, (prompt_ids, params) in enumerate(jobs):
            offset = 0
            with contextlib.closing(self.locked_stream(prompt_ids, params)) as deltas:
                for number, delta in enumerate(deltas):
                    produced += 1
                    choice = self._completion_choice(
                        index, prompt_ids, [delta], params, opts, offset=offset, first=number == 0)
                    offset += len(self.token_name(delta.choice.token_id))
                    yield completion_chunk(rid, name, [choice])
        if opts.include_usage:
            prompt_tokens = sum(len(p) for p, _ in jobs)
            yield completion_chunk(rid, name, [], usage=usage(prompt_tokens, produced))

    def _completion_prompts(self, prompt: Any) -> list[list[int]]:
        """One token-id list per prompt: a string, a list of ids, or a batch of either."""
        if isinstance(prompt, str) or _is_ids(prompt):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise BadRequest("prompt must be a string, a list of token ids, or a batch of them")
        out = []
        for item in prompt:
            ids = self.tokenizer.encode(item) if isinstance(item, str) else item
            if not _is_ids(ids) or not ids:
                raise BadRequest("each prompt must be a non-empty string or list of token ids")
            if any(not 0 <= t < self.vocab_size for t in ids):
                raise BadRequest("prompt has token ids outside the vocabulary")
            out.append(list(ids))
        return out

    # ------------------------------------------------------------ tokenizer
    def tokenize(self, body: Body) -> Body:
        """POST /tokenize: a prompt or chat messages to ids (vLLM's fields)."""
        self.check_model(body)
        if "messages" in body:
            ids = self.render_chat(body)
        elif isinstance(body.get("prompt"), str):
            special = body.get("add_special_tokens", True)
            ids = self.tokenizer.encode(body["prompt"], add_special_tokens=special)
        else:
            raise BadRequest("tokenize needs a string prompt or messages")
        strs = self.tokenizer.convert_ids_to_tokens(ids) if body.get("return_token_strs") else None
        return {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids,
                "token_strs": strs}

    def detokenize(self, body: Body) -> Body:
        """POST /detokenize: ids back to text, special tokens kept."""
        self.check_model(body)
        tokens = body.get("tokens")
        if not _is_ids(tokens):
            raise BadRequest("tokens must be a list of token ids")
        return {"prompt": self.tokenizer.decode(tokens, clean_up_tokenization_spaces=False)}

    def check_model(self, body: Body) -> None:
        """vLLM's 404 for a model name it does not serve; a request naming none is served."""
        name = body.get("model")
        if name is not None and name != "" and name != self.config.model_name:
            raise BadRequest(f"The model `{name}` does not exist.", status=404)

    def models(self) -> Body:
        """GET /v1/models."""
        return models_list(self.config.model_name, self.max_model_len)

    def render_chat(self, body: Body) -> list[int]:
        """The prompt ids the chat template gives for a request's messages and tools."""
        return self.render_prompt(body)[1]

    def render_prompt(self, body: Body) -> tuple[str, list[int]]:
        """(prompt text, prompt ids) of a chat request: the template's rendering and its encoding."""
        messages = body.get("messages")
        if not (isinstance(messages, list) and messages
                and all(isinstance(m, dict) for m in messages)):
            raise BadRequest("messages must be a non-empty list of message objects")
        kwargs = body.get("chat_template_kwargs") or {}
        if not isinstance(kwargs, dict):
            raise BadRequest("chat_template_kwargs must be an object")
        try:
            text = self.tokenizer.apply_chat_template(
                normalise_messages(messages), tools=body.get("tools") or None, tokenize=False,
                add_generation_prompt=body.get("add_generation_prompt", True),
                continue_final_message=body.get("continue_final_message", False),
                chat_template=body.get("chat_template"), **kwargs,
            )
        except Exception as exc:  # jinja and transformers raise many types for a bad conversation
            raise BadRequest(f"cannot apply the chat template: {exc}") from exc
        return text, self.tokenizer.encode(text, add_special_tokens=body.get("add_special_tokens", False))

    # -------------------------------------------------------------- helpers
    def token_name(self, token_id: int) -> str:
        """A token's own text, as vLLM names it in logprobs."""
        name = self._names.get(token_id)
        if name is None:
            name = self.tokenizer.decode([token_id], clean_up_tokenization_spaces=False)
            self._names[token_id] = name
        return name

    def sampling(self, body: Body, *, chat: bool, prompt_len: int) -> SamplingParams:
        """A chat or completions body's sampling settings, checked against this model."""
        return sampling_from_body(
            body, chat=chat, prompt_len=prompt_len, max_model_len=self.max_model_len,
            default_max_tokens=self.config.max_new_tokens, vocab_size=self.vocab_size,
        )

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        """Counts a request as served for its whole span (wait_idle)."""
        with self._idle:
            self._in_flight += 1
        try:
            yield
        finally:
            with self._idle:
                self._in_flight -= 1
                if not self._in_flight:
                    self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is served (none queued for the lock either); False past ``timeout``."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._in_flight, timeout)

    def run_to_end(self, prompt_ids: list[int], params: SamplingParams, gone: Gone | None = None) -> list[Delta]:
        """Every delta of one generation; ClientGone when ``gone`` says the client left."""
        deltas: list[Delta] = []
        with contextlib.closing(self.locked_stream(prompt_ids, params, gone)) as stream:
            for delta in stream:
                deltas.append(delta)
                if gone is not None and len(deltas) % GONE_CHECK_EVERY == 0 and gone():
                    raise ClientGone(f"client left after {len(deltas)} tokens")
        return deltas

    def locked_stream(self, prompt_ids: list[int], params: SamplingParams,
                      gone: Gone | None = None) -> Iterator[Delta]:
        """Deltas generated under the lock, held until the last token or until closed; ClientGone if ``gone``
        says, once the lock is taken, that the client left while its request waited for it."""
        with self.lock:
            if gone is not None and gone():
                raise ClientGone("client left before its request's turn to generate")
            yield from self._generated(prompt_ids, params)

    def _generated(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[Delta]:
        with contextlib.closing(generate(
            self.model, self.tokenizer, prompt_ids, params,
            eos_ids=self.eos_ids, mode=self.config.logprobs_mode,
        )) as deltas:
            yield from deltas


class StreamSplitter:
    """Turns released text into chat deltas (reasoning, content, tool calls at the end).

    Sends only what the final parse cannot take back, so the streamed pieces add up to the
    one-shot message."""

    def __init__(self, parse_tools: bool) -> None:
        self.parse_tools = parse_tools
        self.text = self.reasoning = self.content = ""

    def push(self, piece: str, *, final: bool) -> tuple[Body, bool]:
        """(delta payload, whether tool calls were made) after piece of new text."""
        self.text += piece
        calls: tuple[ParsedToolCall, ...] = ()
        if final:
            parsed = parse_assistant_text(self.text, tools=self.parse_tools)
            reasoning, content = parsed.reasoning or "", parsed.content or ""
            calls = parsed.tool_calls
        else:
            reasoning, content = streamable_parts(self.text, tools=self.parse_tools)
        payload: Body = {}
        if more := _extension(self.reasoning, reasoning):
            payload["reasoning_content"] = payload["reasoning"] = more
            self.reasoning = reasoning
        if more := _extension(self.content, content):
            payload["content"] = more
            self.content = content
        if calls:
            payload["tool_calls"] = tool_call_deltas(calls, [new_id("chatcmpl-tool") for _ in calls])
        return payload, bool(calls)


def _options(body: Body, *, parse_tools: bool) -> _Options:
    stream_options = body.get("stream_options") or {}
    return _Options(
        return_token_ids=bool(body.get("return_token_ids")),
        as_ids=bool(body.get("return_tokens_as_token_ids")),
        parse_tools=parse_tools,
        include_usage=bool(body.get("stream") and stream_options.get("include_usage")),
    )


def _extension(sent: str, now: str) -> str:
    """What now adds to what was already streamed (the parse only ever extends it)."""
    if not now.startswith(sent):
        logger.warning("streamed text diverged from the final parse; sending no more of it")
        return ""
    return now[len(sent):]


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def normalise_messages(messages: list[Body]) -> list[Body]:
    """Copies with tool-call arguments decoded from JSON strings, as vLLM hands them to templates."""
    out = copy.deepcopy(messages)
    for message in out:
        for call in message.get("tool_calls") or []:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                decoded = _json_object(function["arguments"])
                if decoded is not None:  # otherwise the template renders the string as it is
                    function["arguments"] = decoded
    return out


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def eos_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """The tokenizer's eos plus every eos id of the model's generation config."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, (list, tuple)):
        ids.update(i for i in configured if isinstance(i, int))
    return frozenset(ids)
