"""Read and validate the sampling fields of OpenAI/vLLM request bodies."""

from __future__ import annotations

import logging
import threading
from typing import Any

from rollouttap.errors import RolloutTapError

from .generation import SamplingParams

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # vLLM's (and OpenAI's) default for /v1/completions

log = logging.getLogger(__name__)

# vLLM sampling fields this server does not honour, with the values at which they change nothing: an agent that
# sets one samples otherwise than under vLLM, and is told so in the log (once a field).
UNHONOURED: dict[str, tuple[Any, ...]] = {
    "min_tokens": (0,), "min_p": (0, 0.0), "repetition_penalty": (1, 1.0), "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0), "length_penalty": (1, 1.0), "use_beam_search": (False,), "best_of": (1,),
    "response_format": ({"type": "text"},), "guided_json": (), "guided_regex": (), "guided_choice": (),
    "guided_grammar": (), "structured_outputs": (), "bad_words": ([],), "prompt_logprobs": (),
    "truncate_prompt_tokens": (),
}
_said: set[str] = set()
_said_lock = threading.Lock()


def unhonoured(body: dict[str, Any]) -> list[str]:
    """The fields of ``body`` this server does not honour, set to a value that would change vLLM's sampling."""
    return [name for name, idle in UNHONOURED.items() if body.get(name) is not None and body[name] not in idle]


class BadRequest(RolloutTapError):
    """A request the policy server answers with an OpenAI-shaped 4xx error."""

    def __init__(self, message: str, status: int = 400, *, error_type: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        # Most routes answer vLLM's generic error; the Responses API names its own type and param.
        self.error_type = error_type
        self.param = param


def sampling_from_body(
    body: dict[str, Any],
    *,
    chat: bool,
    prompt_len: int,
    max_model_len: int,
    default_max_tokens: int,
    vocab_size: int,
) -> SamplingParams:
    """SamplingParams for a chat or completions body; BadRequest on values vLLM would refuse."""
    if body.get("n") not in (None, 1):
        raise BadRequest("only n=1 is supported by this server")
    temperature = _number(body, "temperature", 1.0)
    top_p = _number(body, "top_p", 1.0)
    if temperature < 0:
        raise BadRequest("temperature must be non-negative")
    if not 0 < top_p <= 1:
        raise BadRequest("top_p must be in (0, 1]")
    if ignored := unhonoured(body):
        with _said_lock:
            new = [name for name in ignored if name not in _said]
            _said.update(new)
        if new:
            log.warning("policy server: ignores %s (vLLM would honour %s): the agent samples otherwise than under "
                        "vLLM", ", ".join(new), "them" if len(new) > 1 else "it")
    return SamplingParams(
        max_tokens=max_tokens_for(
            body, chat=chat, prompt_len=prompt_len, max_model_len=max_model_len,
            default=default_max_tokens,
        ),
        temperature=temperature,
        top_p=top_p,
        top_k=int(_number(body, "top_k", -1)),
        seed=_optional_int(body, "seed"),
        stop=parse_stop(body.get("stop")),
        stop_token_ids=tuple(_int_list(body, "stop_token_ids")),
        logit_bias=parse_logit_bias(body.get("logit_bias"), vocab_size),
        num_logprobs=chat_logprobs(body) if chat else completion_logprobs(body),
        ignore_eos=bool(body.get("ignore_eos", False)),
        include_stop_str_in_output=bool(body.get("include_stop_str_in_output", False)),
    )


def max_tokens_for(
    body: dict[str, Any], *, chat: bool, prompt_len: int, max_model_len: int, default: int
) -> int:
    """The completion budget: the request's, else a default, never past the context window."""
    room = max_model_len - prompt_len
    if room <= 0:
        raise BadRequest(
            f"This model's maximum context length is {max_model_len} tokens. "
            f"However, your request has {prompt_len} input tokens."
        )
    keys = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
    asked = next((_optional_int(body, k) for k in keys if body.get(k) is not None), None)
    if asked is None:
        return min(room, default if chat else COMPLETIONS_DEFAULT_MAX_TOKENS)
    if asked < 1:
        raise BadRequest("max_tokens must be at least 1")
    if asked > room:
        raise BadRequest(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_len + asked} tokens ({prompt_len} in the messages, "
            f"{asked} in the completion). Please reduce the length of the messages or completion."
        )
    return asked


def chat_logprobs(body: dict[str, Any]) -> int | None:
    """Chat: logprobs is a flag and top_logprobs a count."""
    top = _optional_int(body, "top_logprobs")
    if not body.get("logprobs"):
        if top:
            raise BadRequest("when using `top_logprobs`, `logprobs` must be set to true")
        return None
    if top is not None and top < 0:
        raise BadRequest("top_logprobs must be non-negative")
    return top or 0


def completion_logprobs(body: dict[str, Any]) -> int | None:
    """Completions: logprobs is the count of alternatives (0 = the sampled token's only)."""
    count = _optional_int(body, "logprobs")
    if count is not None and count < 0:
        raise BadRequest("logprobs must be non-negative")
    return count


def parse_stop(value: Any) -> tuple[str, ...]:
    """The stop field: absent, one string, or a list of strings."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(value)
    raise BadRequest("stop must be a string or a list of strings")


def parse_logit_bias(value: Any, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """logit_bias maps token ids (JSON keys are strings) to additive biases."""
    if not value:
        return ()
    if not isinstance(value, dict):
        raise BadRequest("logit_bias must be an object of token id to bias")
    try:
        pairs = tuple((int(k), float(v)) for k, v in value.items())
    except (TypeError, ValueError) as exc:
        raise BadRequest("logit_bias keys must be token ids and values numbers") from exc
    for token_id, _ in pairs:
        if not 0 <= token_id < vocab_size:
            raise BadRequest(f"token_id {token_id} in logit_bias is out of vocabulary")
    return pairs


def _number(body: dict[str, Any], key: str, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"{key} must be a number")
    return float(value)


def _optional_int(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{key} must be an integer")
    return value


def _int_list(body: dict[str, Any], key: str) -> list[int]:
    value = body.get(key) or []
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise BadRequest(f"{key} must be a list of integers")
    return value
