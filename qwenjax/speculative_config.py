"""`SpeculativeConfig`: vLLM's `speculative_config` dict, validated into a frozen, hashable dataclass.

Plain Python (no JAX): core and the engine both read it. Accepted forms, as vLLM's:

    {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": n, "prompt_lookup_min": m}
    {"model": DRAFT, "num_speculative_tokens": k}      (method "draft_model"; "method" may be given too)

The draft is checked against the target (tokenizer, vocabulary) when the engine starts (engine/spec_step.py).

Defaults follow vLLM: with neither prompt_lookup bound given both are 5, with one given the other takes its value.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

METHODS = ("ngram", "draft_model")
MAX_SPECULATIVE_TOKENS = 8  # k: the verify step scores k + 1 positions a row; one compiled shape per decode bucket
KEYS = ("method", "model", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "disable_by_batch_size")
# A verify step scores B * (k + 1) positions, each with a [V] row of logits and sampler work: decode buckets B with
# B * (k + 1) above this run without speculation (at such batches decode is no longer bound by the weight read that
# speculation shares out, and the logits would outgrow the sampler memory the start-up profile measured).
MAX_VERIFY_ROWS = 512
DEFAULT_PROMPT_LOOKUP = 5  # vLLM's default for both n-gram bounds when neither is given


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    method: str                   # METHODS
    num_speculative_tokens: int   # k: tokens proposed a row a step, in [1, MAX_SPECULATIVE_TOKENS]
    prompt_lookup_max: int = 0    # ngram: longest suffix n-gram looked up in the row's prompt + outputs
    prompt_lookup_min: int = 0    # ngram: shortest one
    model: str | None = None      # draft_model: the draft checkpoint (a directory or hub id)
    disable_by_batch_size: int | None = None  # vLLM's: steps of more decode rows than this run without speculation

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"speculative_config method must be one of {', '.join(map(repr, METHODS))}, "
                             f"got {self.method!r}")
        k = self.num_speculative_tokens
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"speculative_config num_speculative_tokens must be an integer in "
                             f"[1, {MAX_SPECULATIVE_TOKENS}], got {k!r}")
        d = self.disable_by_batch_size
        if d is not None and (isinstance(d, bool) or not isinstance(d, int) or d < 1):
            raise ValueError(f"speculative_config disable_by_batch_size must be an integer >= 1, got {d!r}")
        if self.method == "ngram":
            for name in ("prompt_lookup_min", "prompt_lookup_max"):
                v = getattr(self, name)
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise ValueError(f"speculative_config {name} must be an integer >= 1, got {v!r}")
            if self.prompt_lookup_min > self.prompt_lookup_max:
                raise ValueError(f"speculative_config prompt_lookup_min ({self.prompt_lookup_min}) must be <= "
                                 f"prompt_lookup_max ({self.prompt_lookup_max})")
        elif not self.model or not isinstance(self.model, str):
            raise ValueError(f"speculative_config method 'draft_model' needs 'model': the draft checkpoint, got "
                             f"{self.model!r}")

    def verify_batches(self, decode_buckets) -> tuple[int, ...]:
        """The decode buckets whose steps may speculate (B * (k + 1) <= MAX_VERIFY_ROWS)."""
        return tuple(b for b in decode_buckets if b * (self.num_speculative_tokens + 1) <= MAX_VERIFY_ROWS)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SpeculativeConfig":
        """vLLM's dict -> the config; ValueError naming the key and what is allowed."""
        if not isinstance(d, dict):
            raise ValueError(f"speculative_config must be a dict (a JSON object), got {d!r}")
        unknown = sorted(set(d) - set(KEYS))
        if unknown:
            raise ValueError(f"speculative_config has unknown keys {unknown}; accepted: {list(KEYS)}")
        if "num_speculative_tokens" not in d:
            raise ValueError("speculative_config needs num_speculative_tokens (k, the tokens proposed a step)")
        method, model = d.get("method"), d.get("model")
        if method is None:
            method = "ngram" if model in ("ngram", "[ngram]") else ("draft_model" if model else None)
            if method is None:
                raise ValueError(f"speculative_config needs 'method' (one of {', '.join(map(repr, METHODS))}) "
                                 f"or a draft 'model'")
        if method == "ngram":
            lo, hi = d.get("prompt_lookup_min"), d.get("prompt_lookup_max")
            if lo is None and hi is None:
                lo = hi = DEFAULT_PROMPT_LOOKUP
            lo = hi if lo is None else lo
            hi = lo if hi is None else hi
            return cls(method, d["num_speculative_tokens"], prompt_lookup_max=hi, prompt_lookup_min=lo,
                       disable_by_batch_size=d.get("disable_by_batch_size"))
        return cls(method, d["num_speculative_tokens"], model=model,
                   disable_by_batch_size=d.get("disable_by_batch_size"))


def canonical_speculative_config(value: Any) -> str | None:
    """speculative_config (a dict, its JSON text, or a SpeculativeConfig) -> sorted-key JSON text (hashable, as
    EngineArgs keeps it), validated; None for None / {}."""
    if value is None:
        return None
    if isinstance(value, SpeculativeConfig):
        value = {k: v for k, v in dataclasses.asdict(value).items() if v not in (None, 0)}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"speculative_config must be a JSON object, got {value!r} ({e})") from None
    if value == {}:
        return None
    SpeculativeConfig.from_dict(value)
    return json.dumps(value, sort_keys=True)
