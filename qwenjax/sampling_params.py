"""SamplingParams: how one request's tokens are chosen and when its generation stops.

The fields, defaults and accepted ranges follow vLLM's ``SamplingParams``; a bad value raises ``ValueError`` naming
the field, the allowed range and the value received.

The object is frozen. The constructor remembers which fields the caller passed explicitly, so that
``apply_generation_defaults`` can fill the remaining ones from a model's ``generation_config.json`` the way vLLM
does (Qwen2-Instruct ships temperature 0.7, top_p 0.8, top_k 20, repetition_penalty 1.05).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

from qwenjax.structured_outputs import (  # noqa: F401 - re-exported where vLLM has them
    GuidedDecodingParams, StructuredOutputsParams, as_structured_outputs)

# Temperatures below this are greedy decoding (argmax), as in vLLM.
GREEDY_TEMPERATURE = 1e-5

# A seed is a signed 64-bit integer, as vLLM's protocol bounds it (torch.long).
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
# Most stop token ids and stop strings one request may have (vLLM sets none). Both are checked for every generated
# token on the engine's host loop, and stop ids are the sampler's banned-id array while min_tokens holds (its width
# picks a compiled variant): unbounded, one request's list would slow every step of the engine.
MAX_STOP_TOKEN_IDS = 1024
MAX_STOP_STRINGS = 1024

MAX_LOGIT_BIAS = 1024  # entries of one request's logit_bias (a padded per-row array of the sampler)

# Keys of a generation config that may supply defaults; every other key of generation_config.json (bos_token_id,
# do_sample, ...) is ignored. "max_new_tokens" is Hugging Face's name for max_tokens.
GENERATION_DEFAULT_KEYS = frozenset(
    {
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
        "max_tokens",
        "max_new_tokens",
    }
)


class SamplingType(enum.Enum):
    GREEDY = "greedy"  # argmax; the seed plays no part
    RANDOM = "random"  # the engine draws a seed for the request
    RANDOM_SEED = "random_seed"  # the user's seed: same prompt and parameters give the same tokens


class _Unset:
    """Marks a constructor argument the caller did not pass."""

    def __repr__(self) -> str:
        return "<unset>"


_UNSET: Any = _Unset()


@dataclasses.dataclass(frozen=True, init=False)
class SamplingParams:
    """Parameters for sampling one request's completion(s).

    Invariants after construction: stop is a list[str] and stop_token_ids a list[int] (never None); top_k is 0 when
    disabled (-1 is accepted and stored as 0); a greedy request (temperature < 1e-5) has top_p 1.0, top_k 0,
    min_p 0.0 and n 1. max_tokens None means "up to the model's context length", which the engine resolves.
    """

    n: int = 1  # completions returned for the prompt
    presence_penalty: float = 0.0  # subtracted once from every token already generated; [-2, 2]
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens; [-2, 2]
    repetition_penalty: float = 1.0  # divides positive / multiplies negative logits of prompt and output tokens
    temperature: float = 1.0
    top_p: float = 1.0  # smallest set of most likely tokens whose probability reaches top_p; 1 = off
    top_k: int = 0  # the k most likely tokens; 0 = off
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one; 0 = off
    seed: int | None = None  # None: the engine draws one per request
    stop: list[str] | None = None  # stop strings, matched in the detokenized output
    stop_token_ids: list[int] | None = None  # token ids that end generation, in addition to EOS
    ignore_eos: bool = False
    max_tokens: int | None = 16  # generated tokens at most; None = up to the context length
    min_tokens: int = 0  # EOS and stop_token_ids are suppressed until this many tokens exist
    logprobs: int | None = None  # number of top logprobs returned per generated token
    prompt_logprobs: int | None = None  # number of top logprobs returned per prompt token
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    detokenize: bool = True
    priority: int = 0  # for a priority scheduler; lower runs first; not validated beyond being an int
    truncate_prompt_tokens: int | None = None  # keep only the prompt's last k tokens (vLLM's); None = all
    logit_bias: dict[int, float] | None = None  # added to the token's logit before penalties; at most MAX_LOGIT_BIAS
    allowed_token_ids: list[int] | None = None  # only these ids may be drawn
    bad_words: list[str] | None = None  # words never generated (their last token is banned after the others)
    structured_outputs: StructuredOutputsParams | None = None  # JSON schema / regex / choice / grammar constraint

    # The constructor is written out so that it can tell a passed default from an omitted argument; every
    # parameter matches a field above (tests/test_sampling_params.py checks that they stay in step).
    def __init__(
        self,
        *,
        n: int = _UNSET,
        presence_penalty: float = _UNSET,
        frequency_penalty: float = _UNSET,
        repetition_penalty: float = _UNSET,
        temperature: float = _UNSET,
        top_p: float = _UNSET,
        top_k: int = _UNSET,
        min_p: float = _UNSET,
        seed: int | None = _UNSET,
        stop: str | Iterable[str] | None = _UNSET,
        stop_token_ids: Iterable[int] | None = _UNSET,
        ignore_eos: bool = _UNSET,
        max_tokens: int | None = _UNSET,
        min_tokens: int = _UNSET,
        logprobs: int | None = _UNSET,
        prompt_logprobs: int | None = _UNSET,
        skip_special_tokens: bool = _UNSET,
        spaces_between_special_tokens: bool = _UNSET,
        include_stop_str_in_output: bool = _UNSET,
        detokenize: bool = _UNSET,
        priority: int = _UNSET,
        truncate_prompt_tokens: int | None = _UNSET,
        logit_bias: Mapping[int, float] | None = _UNSET,
        allowed_token_ids: Iterable[int] | None = _UNSET,
        bad_words: Iterable[str] | None = _UNSET,
        structured_outputs: StructuredOutputsParams | Mapping[str, Any] | None = _UNSET,
        guided_decoding: StructuredOutputsParams | None = _UNSET,  # vLLM's older name for structured_outputs
    ) -> None:
        # Must stay the first statement: at this point locals() holds exactly the parameters.
        given = {name: value for name, value in locals().items() if name != "self" and value is not _UNSET}
        if "guided_decoding" in given:
            if given.get("structured_outputs") is not None:
                raise ValueError("pass structured_outputs or its older name guided_decoding, not both.")
            given["structured_outputs"] = given.pop("guided_decoding")
        self._assign(given, explicit=frozenset(given))

    def _assign(self, given: Mapping[str, Any], explicit: frozenset[str]) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, given.get(f.name, f.default))
        # Not a dataclass field: it takes no part in ==, repr or replace().
        object.__setattr__(self, "_explicit", explicit)
        self.__post_init__()

    def __post_init__(self) -> None:
        """Normalises the fields in place (the object is not yet shared) and validates them."""
        put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731

        for name in ("n", "min_tokens", "priority"):
            put(name, _as_int(name, getattr(self, name)))
        for name in ("max_tokens", "logprobs", "prompt_logprobs", "seed", "truncate_prompt_tokens"):
            value = getattr(self, name)
            put(name, None if value is None else _as_int(name, value))
        for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p", "min_p"):
            put(name, _as_float(name, getattr(self, name)))
        for name in ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens",
                     "include_stop_str_in_output", "detokenize"):
            put(name, _as_bool(name, getattr(self, name)))
        put("top_k", _as_int("top_k", self.top_k))
        put("stop", _as_stop_list(self.stop))
        put("stop_token_ids", _as_token_list(self.stop_token_ids))
        put("logit_bias", _as_logit_bias(self.logit_bias))
        put("allowed_token_ids", None if self.allowed_token_ids is None
            else _as_token_list(self.allowed_token_ids, "allowed_token_ids"))
        put("bad_words", None if self.bad_words is None else _as_strings("bad_words", self.bad_words))
        put("structured_outputs", as_structured_outputs(self.structured_outputs))

        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}.")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.")
        if not (0.0 < self.repetition_penalty and math.isfinite(self.repetition_penalty)):
            raise ValueError(f"repetition_penalty must be greater than zero, got {self.repetition_penalty}.")
        if not (0.0 <= self.temperature and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be non-negative, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disable), or at least 1, got {self.top_k}.")
        if self.top_k == -1:
            put("top_k", 0)
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.truncate_prompt_tokens is not None and self.truncate_prompt_tokens < 1:
            raise ValueError(f"truncate_prompt_tokens must be at least 1 (or None: the whole prompt), got "
                             f"{self.truncate_prompt_tokens}.")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be greater than or equal to 0, got {self.min_tokens}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, got {self.min_tokens}."
            )
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be non-negative, got {self.logprobs}.")
        if self.prompt_logprobs is not None and self.prompt_logprobs < 0:
            raise ValueError(f"prompt_logprobs must be non-negative, got {self.prompt_logprobs}.")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative token ids, got {self.stop_token_ids}.")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise ValueError(f"seed must be in [{SEED_MIN}, {SEED_MAX}] (a signed 64-bit integer), got {self.seed}.")
        bad_word = next((w for w in self.bad_words or () if not w.strip()), None)
        if bad_word is not None:
            raise ValueError(f"bad_words must be non-empty words, got {bad_word!r}.")
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise ValueError("allowed_token_ids must hold at least one token id (None: every token), got [].")
        if len(self.logit_bias or ()) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias may hold at most {MAX_LOGIT_BIAS} entries, got {len(self.logit_bias)}.")
        if self.stop and not self.detokenize:
            raise ValueError(f"stop strings need detokenize=True, got stop={self.stop} with detokenize=False.")

        if self.is_greedy:
            if self.n > 1:
                raise ValueError(f"n must be 1 when using greedy sampling (temperature 0), got {self.n}.")
            # Filters cannot change an argmax; clearing them keeps greedy rows out of the sampler's filter modes.
            put("top_p", 1.0)
            put("top_k", 0)
            put("min_p", 0.0)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def sampling_type(self) -> SamplingType:
        if self.is_greedy:
            return SamplingType.GREEDY
        return SamplingType.RANDOM if self.seed is None else SamplingType.RANDOM_SEED

    @property
    def explicitly_set(self) -> frozenset[str]:
        """Names of the fields the caller passed; generation defaults never override these."""
        return self._explicit  # type: ignore[attr-defined]

    def clone(self, **changes: Any) -> SamplingParams:
        """A validated copy with `changes` applied; the changed fields count as explicitly set.

        Prefer this to dataclasses.replace, which would mark every field explicit.
        """
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"SamplingParams has no field(s) {sorted(unknown)}.")
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        # Lists are copied so that the clone never shares mutable state with the original.
        values["stop"] = list(self.stop)
        values["stop_token_ids"] = list(self.stop_token_ids)
        values.update(changes)
        return _build(values, self.explicitly_set | frozenset(changes))

    def apply_generation_defaults(self, defaults: Mapping[str, Any]) -> SamplingParams:
        """A copy whose fields the caller did not set take their values from `defaults`.

        `defaults` is typically the model's generation_config.json; only keys in GENERATION_DEFAULT_KEYS are used
        and None values are skipped. The copy remembers the same explicit fields, so applying twice is harmless.
        """
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["stop"] = list(self.stop)
        values["stop_token_ids"] = list(self.stop_token_ids)
        for key, value in defaults.items():
            name = "max_tokens" if key == "max_new_tokens" else key
            if key in GENERATION_DEFAULT_KEYS and value is not None and name not in self.explicitly_set:
                values[name] = value
        return _build(values, self.explicitly_set)

    def verified(self, *, vocab_size: int, max_logprobs: int, max_n: int) -> SamplingParams:
        """These parameters checked against one model and engine: every field that reaches a fixed-width device
        array or a per-token table is bounded here, so no request can break a step.

        top_k at or above the vocabulary is clamped to it (it keeps every token: stored as 0, off), as vLLM does;
        stop_token_ids must be ids of the vocabulary, at most MAX_STOP_TOKEN_IDS of them (stop: MAX_STOP_STRINGS);
        logprobs and prompt_logprobs at most `max_logprobs` (-1: the vocabulary size), as vLLM's
        EngineArgs.max_logprobs; n at most `max_n`. Raises ValueError naming the field, the allowed range and the
        value. Returns self when nothing changes, else a clone.
        """
        limit = vocab_size if max_logprobs == -1 else max_logprobs
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value > limit:
                raise ValueError(f"{name} must be in [0, {limit}] (max_logprobs), got {value}.")
        if self.n > max_n:
            raise ValueError(f"n must be in [1, {max_n}] (max_n), got {self.n}.")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"stop_token_ids may hold at most {MAX_STOP_TOKEN_IDS} token ids, got "
                             f"{len(self.stop_token_ids)}.")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop may hold at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}.")
        for name, ids in (("stop_token_ids", self.stop_token_ids), ("allowed_token_ids", self.allowed_token_ids),
                          ("logit_bias", self.logit_bias)):
            bad = next((t for t in ids or () if not 0 <= t < vocab_size), None)
            if bad is not None:
                raise ValueError(f"{name} must be token ids in [0, {vocab_size}) (the vocabulary), got {bad}.")
        if self.top_k >= vocab_size:
            return self.clone(top_k=0)
        return self

    def stop_token_id_set(self, eos_token_ids: Iterable[int]) -> frozenset[int]:
        """Token ids that end this request: stop_token_ids, plus the model's EOS ids unless ignore_eos."""
        eos = () if self.ignore_eos else tuple(eos_token_ids)
        return frozenset(self.stop_token_ids) | frozenset(eos)

    def banned_token_ids(self, num_generated: int, eos_token_ids: Iterable[int]) -> tuple[int, ...]:
        """Token ids the sampler must not pick at this step: the stop ids, while fewer than min_tokens exist."""
        if num_generated >= self.min_tokens:
            return ()
        return tuple(sorted(self.stop_token_id_set(eos_token_ids)))


def _build(values: Mapping[str, Any], explicit: frozenset[str]) -> SamplingParams:
    params = object.__new__(SamplingParams)
    params._assign(values, explicit)
    return params


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}.")
    return int(value)


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}.")
    return float(value)


def _as_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}.")
    return value


def _as_stop_list(stop: Any) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    stops = list(stop) if isinstance(stop, Iterable) else None
    if stops is None or not all(isinstance(s, str) for s in stops):
        raise ValueError(f"stop must be a string or a list of strings, got {stop!r}.")
    return stops


def _as_token_list(ids: Any, name: str = "stop_token_ids") -> list[int]:
    if ids is None:
        return []
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise ValueError(f"{name} must be a list of integers, got {ids!r}.")
    return [_as_int(name, i) for i in ids]


def _as_strings(name: str, values: Any) -> list[str]:
    if isinstance(values, str) or not isinstance(values, Iterable) or not all(isinstance(v, str) for v in values):
        raise ValueError(f"{name} must be a list of strings, got {values!r}.")
    return list(values)


def _as_logit_bias(bias: Any) -> dict[int, float] | None:
    """{token id: bias}, ids as ints (the server's JSON keys are strings), biases finite and clamped to [-100, 100]
    as OpenAI and vLLM do."""
    if bias is None:
        return None
    if not isinstance(bias, Mapping):
        raise ValueError(f"logit_bias must map token ids to numbers, got {bias!r}.")
    out = {}
    for k, v in bias.items():
        try:
            tid = int(k)
        except (TypeError, ValueError):
            raise ValueError(f"logit_bias keys must be token ids (integers), got {k!r}.") from None
        value = _as_float("logit_bias", v)
        if not math.isfinite(value):
            raise ValueError(f"logit_bias values must be finite numbers, got {v!r} for token {tid}.")
        out[tid] = min(100.0, max(-100.0, value))
    return out
