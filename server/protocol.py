"""Pydantic models of the request bodies (OpenAI's API plus vLLM's extra sampling fields) and their translation into
SamplingParams.

Only the bodies are modelled: responses are plain dicts built in serving.py, shaped as OpenAI's. A field left out of a
request stays out of the SamplingParams too, so the model's generation_config.json defaults fill it (vLLM's rule).
Unknown fields are accepted and ignored with a warning, as vLLM does.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from qwenjax.sampling_params import SamplingParams
from qwenjax.structured_outputs import StructuredOutputsParams

logger = logging.getLogger("qwenjax.server")

MAX_LOGPROBS = 20  # top logprobs per token, as vLLM's default max_logprobs (the server's --max-logprobs)


class APIError(Exception):
    """An error a client caused (or the server's state), answered as OpenAI's JSON error with `status`."""

    def __init__(self, message: str, *, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | int | None = None, headers: dict | None = None):
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# chat_template_kwargs that would change what rendering the template returns, or override what the request's own
# fields decide (the server needs the prompt as one string, rendered from `messages` with its own template).
RESERVED_TEMPLATE_KWARGS = ("tokenize", "return_dict", "return_tensors", "return_assistant_tokens_mask", "padding",
                            "truncation", "max_length", "tokenizer_kwargs", "chat_template", "conversation",
                            "messages", "add_generation_prompt", "tools", "documents")


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["function"] = "function"
    function: FunctionDefinition


class FunctionName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionName


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's extension: usage in every chunk


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    n: int = 1
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extra sampling fields
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    priority: int = 0
    truncate_prompt_tokens: int | None = None  # vLLM's: keep the prompt's last k tokens
    allowed_token_ids: list[int] | None = None  # vLLM's: only these ids may be generated
    bad_words: list[str] | None = None  # vLLM's: words never generated
    # output constraints (server/structured_outputs.py): OpenAI's, vLLM's extra field and its older names
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def warn_ignored(self, endpoint: str) -> None:
        if self.model_extra:
            logger.warning("%s: ignoring unknown request fields %s", endpoint, sorted(self.model_extra))

    def check_common(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise APIError("stream_options is only allowed when stream is true", param="stream_options")

    def sampling_params(self, *, max_tokens: int, logprobs: int | None,
                        structured_outputs: StructuredOutputsParams | None = None) -> SamplingParams:
        """The request's SamplingParams: only fields the client set, so generation defaults fill the others.

        Raises APIError (400) with SamplingParams' message, naming the field, on a value out of range.
        """
        given: dict[str, Any] = {"max_tokens": max_tokens}
        for name in ("n", "temperature", "top_p", "presence_penalty", "frequency_penalty", "seed", "stop", "top_k",
                     "min_p", "repetition_penalty", "stop_token_ids", "truncate_prompt_tokens", "logit_bias",
                     "allowed_token_ids", "bad_words"):
            value = getattr(self, name)
            if value is not None and name in self.model_fields_set:
                given[name] = value
        for name in ("ignore_eos", "min_tokens", "skip_special_tokens", "spaces_between_special_tokens",
                     "include_stop_str_in_output", "priority"):
            if name in self.model_fields_set:
                given[name] = getattr(self, name)
        if logprobs is not None:
            given["logprobs"] = logprobs
        if structured_outputs is not None:
            given["structured_outputs"] = structured_outputs
        if given.get("stop") is not None:
            stops = [given["stop"]] if isinstance(given["stop"], str) else list(given["stop"])
            if any(not s for s in stops):
                raise APIError(f"stop strings must be non-empty, got {stops!r}", param="stop")
        try:
            return SamplingParams(**given)
        except ValueError as e:
            raise APIError(str(e), param=param_of(str(e))) from None


class ChatCompletionRequest(_Request):
    messages: list[Any]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[ChatTool] | None = None
    tool_choice: Any = None  # "none" / "auto" / "required" / a NamedToolChoice, checked by server/tools.py
    parallel_tool_calls: bool | None = None  # None: true, as OpenAI's default

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def num_logprobs(self, max_logprobs: int = MAX_LOGPROBS) -> int | None:
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise APIError("top_logprobs needs logprobs set to true", param="top_logprobs")
            if not 0 <= self.top_logprobs <= max_logprobs:
                raise APIError(f"top_logprobs must be in [0, {max_logprobs}] (max_logprobs), got "
                               f"{self.top_logprobs}", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def check(self) -> None:
        self.check_common()
        if not self.messages:
            raise APIError("messages is empty; a chat needs at least one {'role': ..., 'content': ...} message",
                           param="messages")
        reserved = sorted(set(self.chat_template_kwargs or ()) & set(RESERVED_TEMPLATE_KWARGS))
        if reserved:
            raise APIError(f"chat_template_kwargs may not set {', '.join(map(repr, reserved))}: it changes what the "
                           f"chat template returns or what the request's own fields decide; template variables other "
                           f"than {', '.join(RESERVED_TEMPLATE_KWARGS)} are allowed (e.g. enable_thinking)",
                           param="chat_template_kwargs")
        if self.continue_final_message and self.add_generation_prompt:
            raise APIError("continue_final_message and add_generation_prompt cannot both be true",
                           param="continue_final_message")


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list of strings or token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise APIError("prompt is empty: send a string, a list of strings, or token ids", param="prompt")
        if isinstance(p[0], int):
            return [list(p)]
        return list(p)

    def check(self, max_logprobs: int = MAX_LOGPROBS) -> None:
        self.check_common()
        if self.suffix:
            raise APIError("suffix is not supported", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(f"best_of different from n is not supported yet, got best_of={self.best_of}, "
                           f"n={self.n}", param="best_of")
        if self.logprobs is not None and not 0 <= self.logprobs <= max_logprobs:
            raise APIError(f"logprobs must be in [0, {max_logprobs}] (max_logprobs), got {self.logprobs}",
                           param="logprobs")
        if self.echo and self.logprobs is not None:
            raise APIError("echo with logprobs needs prompt logprobs, which are not supported yet; drop one of "
                           "them", param="echo")
        if "prompt_logprobs" in (self.model_extra or {}):
            raise APIError("prompt_logprobs is not supported yet", param="prompt_logprobs")


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = None
    messages: list[Any] | None = None
    tools: list[ChatTool] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[int] = Field(...)


class GenerateRequest(BaseModel):
    """vLLM's demo /generate body: the prompt, `stream`, and SamplingParams' fields by name (its schema; the route
    validates through SamplingParams itself, see sampling_params_from_dict)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    stream: bool = False
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    detokenize: bool = True
    priority: int = 0


def param_of(message: str) -> str | None:
    """The field a SamplingParams error names (its messages start with the field name)."""
    word = message.split(" ", 1)[0]
    return word if word in {f for f in SamplingParams.__dataclass_fields__} else None


def sampling_params_from_dict(body: dict) -> SamplingParams:
    """SamplingParams from a /generate body's remaining fields (vLLM's demo server takes them as they are)."""
    fields = set(SamplingParams.__dataclass_fields__)
    unknown = sorted(set(body) - fields)
    if unknown:
        raise APIError(f"unknown sampling fields {unknown}; accepted: {sorted(fields)}", param=unknown[0])
    try:
        return SamplingParams(**body)
    except (ValueError, TypeError) as e:
        raise APIError(str(e), param=param_of(str(e))) from None


