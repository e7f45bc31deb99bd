"""The grammar of hermes tool calls (Lark, llguidance's dialect) for `tool_choice` "required" or a named function.

    start: call ("\\n" call)*            # "required" with parallel_tool_calls; otherwise `start: call`
    call: <tool_call> "\\n" body "\\n" </tool_call>
    body: %json {"anyOf": [{"type": "object", "properties": {"name": {"const": NAME},
                                                            "arguments": {"$ref": "#/$defs/tool0"}}, ...}, ...],
                 "$defs": {"tool0": PARAMETERS, ...}}

Each call is a JSON object whose "name" is one of the allowed functions and whose "arguments" follow that
function's parameters schema, so the arguments always parse and validate. The JSON is written as Qwen2.5's chat
template writes calls (`{"name": "f", "arguments": {"a": 1}}`: ", " and ": " between items, no other whitespace), and
"name" comes first so that a stream names the function before its arguments.

Each function's parameters sit under `$defs/tool<i>`, their own local `$ref`s rewritten to point there, so schemas
with `$defs` (pydantic's nested models) keep resolving. A function without parameters takes `{}` only.

The tags are the tokenizer's own `<tool_call>` / `</tool_call>` tokens where it has them (Qwen2.5's added tokens:
the model then writes the tokens it was trained on), else the literal text.
"""

from __future__ import annotations

import json
from typing import Any

from server.tool_parsers.hermes import END, START

# How Qwen2.5's template serializes calls (Jinja's tojson): no whitespace beyond these separators.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


def _relocated(node: Any, prefix: str) -> Any:
    """The schema with every local $ref ("#...") made relative to `prefix` (where the schema will sit)."""
    if isinstance(node, dict):
        return {k: (prefix + v[1:] if k == "$ref" and isinstance(v, str) and v.startswith("#") else
                    _relocated(v, prefix)) for k, v in node.items()}
    if isinstance(node, list):
        return [_relocated(v, prefix) for v in node]
    return node


def call_schema(functions: list[dict]) -> dict:
    """The JSON schema of one call to any of `functions` ({"name", "parameters"} each)."""
    defs, options = {}, []
    for i, fn in enumerate(functions):
        key = f"tool{i}"
        params = fn.get("parameters")
        defs[key] = _relocated(params, f"#/$defs/{key}") if params is not None else NO_PARAMETERS
        options.append({"type": "object", "properties": {"name": {"const": fn["name"]},
                                                         "arguments": {"$ref": f"#/$defs/{key}"}},
                        "required": ["name", "arguments"], "additionalProperties": False})
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return {**schema, "$defs": defs, "x-guidance": JSON_STYLE}


def tool_call_grammar(functions: list[dict], *, parallel: bool, special_tags: bool) -> str:
    """The Lark grammar of one call (or, with `parallel`, one or more calls) to any of `functions`."""
    start, end = (START, END) if special_tags else (json.dumps(START), json.dumps(END))
    calls = 'call ("\\n" call)*' if parallel else "call"
    return (f"start: {calls}\n"
            f'call: {start} "\\n" body "\\n" {end}\n'
            f"body: %json {json.dumps(call_schema(functions), ensure_ascii=False)}\n")
