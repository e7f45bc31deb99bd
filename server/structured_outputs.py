"""A request's output constraint (qwenjax.structured_outputs) from the fields clients send, as vLLM takes them:

- `response_format` (OpenAI's): {"type": "text"} (none), {"type": "json_object"} (any JSON object), or
  {"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}} (the schema; `strict` and the
  rest change nothing: the schema is always enforced);
- `structured_outputs` (vLLM's extra field): {"json" | "regex" | "choice" | "grammar" | "json_object": ...};
- vLLM's older extra fields `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`.

At most one of them may constrain a request. What the server checks here is the shape; whether a schema, regex or
grammar compiles is for the engine (llguidance), whose ValueError the server answers with a 400 naming the field
(see `constraint_error`).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from qwenjax.structured_outputs import StructuredOutputsParams, as_structured_outputs
from server.protocol import APIError

logger = logging.getLogger("qwenjax.server")

GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                 "guided_grammar": "grammar"}
# Options of vLLM's StructuredOutputsParams that tune its own backends; accepted and ignored (logged).
IGNORED_OPTIONS = ("disable_fallback", "disable_any_whitespace", "disable_additional_properties",
                   "whitespace_pattern")
RESPONSE_FORMATS = ("text", "json_object", "json_schema")


def _params(field: str, **kwargs) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(**kwargs)
    except ValueError as e:
        raise APIError(f"{field}: {e}", param=field) from None


def from_response_format(rf: Any) -> StructuredOutputsParams | None:
    if not isinstance(rf, dict):
        raise APIError(f"response_format must be an object like {{'type': 'json_object'}}, got {rf!r}"[:300],
                       param="response_format")
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return _params("response_format", json_object=True)
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict) or spec.get("schema") is None:
            raise APIError("response_format of type 'json_schema' needs json_schema.schema, the JSON schema the "
                           "output must follow: {'type': 'json_schema', 'json_schema': {'name': ..., 'schema': "
                           "{...}}}", param="response_format")
        return _params("response_format", json=spec["schema"])
    raise APIError(f"response_format.type must be one of {', '.join(map(repr, RESPONSE_FORMATS))}, got {kind!r}",
                   param="response_format")


def from_structured_outputs(value: Any) -> StructuredOutputsParams:
    if isinstance(value, dict):
        ignored = sorted(set(value) & set(IGNORED_OPTIONS))
        if ignored:
            logger.warning("structured_outputs: ignoring vLLM backend options %s", ignored)
            value = {k: v for k, v in value.items() if k not in ignored}
    try:
        return as_structured_outputs(value)
    except ValueError as e:
        raise APIError(f"structured_outputs: {e}", param="structured_outputs") from None


def request_constraint(req) -> tuple[StructuredOutputsParams | None, str | None]:
    """(constraint, the field that set it) of a chat or completions request; APIError 400 for a bad or a second
    one."""
    found: list[tuple[str, StructuredOutputsParams]] = []
    if req.response_format is not None:
        so = from_response_format(req.response_format)
        if so is not None:
            found.append(("response_format", so))
    if req.structured_outputs is not None:
        found.append(("structured_outputs", from_structured_outputs(req.structured_outputs)))
    for field, kind in GUIDED_FIELDS.items():
        value = getattr(req, field)
        if value is not None:
            found.append((field, _params(field, **{kind: value})))
    if len(found) > 1:
        names = [f for f, _ in found]
        raise APIError(f"a request takes one output constraint, got {' and '.join(names)}; send only one of "
                       f"response_format, structured_outputs, {', '.join(GUIDED_FIELDS)}", param=names[1])
    return (found[0][1], found[0][0]) if found else (None, None)


def constraint_error(message: str, param: str | None) -> APIError:
    """The engine refused a request (ValueError): a 400, naming the constraint's field when it was about it. For
    tools (tool_choice "required" / named: a grammar the server built), the schema's own error, not the grammar."""
    if not param or "structured outputs" not in message:
        return APIError(message)
    if param == "tools":
        found = re.search(r"failed to compile JSON schema: ([^\n]*)", message)
        message = (f"tools: a function's parameters are not a JSON schema the server can enforce for tool_choice "
                   f"'required' or a named function: {found.group(1) if found else message}")
    return APIError(message, param=param)
