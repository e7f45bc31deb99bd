"""StructuredOutputsParams: constrain a request's output to a JSON schema, a regex, a choice or a grammar (vLLM's).

Exactly one constraint is set. The engine compiles it with llguidance (core/grammar.py) when the request is added,
so a bad schema, regex or grammar raises ValueError there and nothing is queued; during generation the sampler sets
every token the constraint forbids to -inf.

Decisions where vLLM leaves room: JSON is generated compact (no whitespace between tokens: `{"a":1}` rather than
`{ "a" : 1 }`), since flexible whitespace lets a weak model pad forever; `json_object=True` is any JSON object;
`grammar` is Lark (llguidance's syntax) or GBNF / EBNF as llama.cpp and xgrammar write it.
"""

from __future__ import annotations

import dataclasses
import json as _json
from typing import Any

KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclasses.dataclass(frozen=True)
class StructuredOutputsParams:
    """One output constraint. `json` may be a dict or its JSON text (stored as compact text, so params hash and
    compare by value); `choice` a list of strings (stored as a tuple)."""

    json: str | dict | None = None  # a JSON schema
    regex: str | None = None
    choice: list[str] | tuple[str, ...] | None = None
    grammar: str | None = None  # Lark or GBNF / EBNF
    json_object: bool | None = None  # any JSON object

    def __post_init__(self):
        set_ = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(set_) != 1:
            raise ValueError(f"structured outputs take exactly one of {', '.join(KINDS)}; got "
                             f"{'none' if not set_ else ', '.join(set_)}.")
        if self.json is not None:
            schema = self.json
            if isinstance(schema, str):
                try:
                    schema = _json.loads(schema)
                except ValueError as e:
                    raise ValueError(f"structured outputs json must be a JSON schema (an object, or its JSON text); "
                                     f"the text does not parse: {e}") from None
            if not isinstance(schema, (dict, bool)):
                raise ValueError(f"structured outputs json must be a JSON schema object, got "
                                 f"{type(schema).__name__}.")
            # Compact text, key order kept (properties are generated in the schema's order).
            object.__setattr__(self, "json", _json.dumps(schema, separators=(",", ":")))
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured outputs {name} must be a non-empty string, got {value!r}.")
        if self.choice is not None:
            if isinstance(self.choice, str) or not all(isinstance(c, str) for c in self.choice) or not self.choice:
                raise ValueError(f"structured outputs choice must be a non-empty list of strings, got "
                                 f"{self.choice!r}.")
            object.__setattr__(self, "choice", tuple(self.choice))
        if self.json_object not in (None, True, False):
            raise ValueError(f"structured outputs json_object must be True or False, got {self.json_object!r}.")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    @property
    def schema(self) -> Any:
        """The JSON schema as an object (json), {"type": "object"} (json_object), else None."""
        if self.json is not None:
            return _json.loads(self.json)
        return {"type": "object"} if self.json_object else None


class GuidedDecodingParams(StructuredOutputsParams):
    """vLLM's older name (SamplingParams(guided_decoding=...)); the same fields."""


def as_structured_outputs(value: Any) -> StructuredOutputsParams | None:
    """None, a StructuredOutputsParams, or a dict of its fields (the server's extra field) -> the params."""
    if value is None or isinstance(value, StructuredOutputsParams):
        return value
    if isinstance(value, dict):
        unknown = set(value) - {f.name for f in dataclasses.fields(StructuredOutputsParams)}
        if unknown:
            raise ValueError(f"structured outputs have no field(s) {sorted(unknown)}; the fields are "
                             f"{', '.join(KINDS)}.")
        return StructuredOutputsParams(**value)
    raise ValueError(f"structured_outputs must be a StructuredOutputsParams (or a dict of its fields), got "
                     f"{type(value).__name__}.")
