"""Request-body parsing with errors a person can act on, and OpenAI-shaped error responses."""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from server.protocol import APIError


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


MAX_JSON_DEPTH = 64  # nesting levels of objects and lists a body may have (OpenAI's own bodies need < 10)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def parse_json(raw: bytes) -> Any:
    """The decoded JSON body; APIError 400 saying where the JSON is broken (and naming a trailing comma), or where
    it holds what no handler can take: nesting past MAX_JSON_DEPTH, a lone UTF-16 surrogate in a string (JSON
    escapes allow one; no tokenizer or UTF-8 encoder does), NaN or Infinity (not JSON)."""
    if not raw.strip():
        raise APIError("the request body is empty; send a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(f"the request body is not valid UTF-8: {e}") from None
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        hint = _trailing_comma(text, e.pos)
        raise APIError(f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno} "
                       f"(char {e.pos}).{hint}") from None
    except RecursionError:
        raise APIError(f"the request body is nested too deeply: at most {MAX_JSON_DEPTH} levels of objects and "
                       f"lists are allowed") from None
    _check_structure(data, surrogates=_SURROGATE_ESCAPE.search(text) is not None)
    return data


def _no_constant(name: str):
    raise APIError(f"the request body is not valid JSON: {name} is not a JSON number; send a finite number")


def _check_structure(data: Any, *, surrogates: bool) -> None:
    """Depth and (when the text has a surrogate escape) lone surrogates, walking the value without recursion."""
    stack = [(data, (), 1)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise APIError(f"the request body is nested too deeply at {_where(path)}: at most {MAX_JSON_DEPTH} "
                               f"levels of objects and lists are allowed", param=_param(path))
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for k, v in items:
                if surrogates and isinstance(k, str):
                    _check_text(k, path + (k,), what="key")
                stack.append((v, path + (k,), depth + 1))
        elif surrogates and isinstance(value, str):
            _check_text(value, path, what="string")


def _check_text(s: str, path: tuple, *, what: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(f"{_where(path)}: the {what} holds a lone UTF-16 surrogate {ascii(s[e.start])[1:-1]} at "
                       f"character {e.start}; text must be valid Unicode (a surrogate escape needs its pair, "
                       f"e.g. \\ud83d\\ude00)", param=_param(path)) from None


def _where(path: tuple) -> str:
    out = ""
    for k in path:
        out += f"[{k}]" if isinstance(k, int) else (f".{ascii(k)[1:-1]}" if out else ascii(k)[1:-1])
    out = out or "the body"
    return out if len(out) <= 80 else out[:80] + "..."


def _param(path: tuple) -> str | None:
    return ascii(path[0])[1:-1] if path and isinstance(path[0], str) else None


def _trailing_comma(text: str, pos: int) -> str:
    """A hint when the error sits right after a comma that is followed only by a closing bracket."""
    before = text[:pos].rstrip()
    after = text[pos:].lstrip()
    if before.endswith(",") and after[:1] in ("}", "]"):
        i = len(before) - 1
        line = text.count("\n", 0, i) + 1
        col = i - (text.rfind("\n", 0, i) + 1) + 1
        return (f" There is a trailing comma at line {line} column {col}, before '{after[0]}': JSON does not allow "
                f"a comma after the last element of a list or object; remove it.")
    return ""


def parse_model(model: type[BaseModel], raw: bytes) -> BaseModel:
    """Parses and validates a body into `model`; APIError 400 (never FastAPI's 422) naming the first bad field."""
    data = parse_json(raw)
    if not isinstance(data, dict):
        raise APIError(f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e.errors()) from None


def validation_error(errors) -> APIError:
    first = errors[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    where = ".".join(loc) or "body"
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    got = first.get("input")
    got_s = "" if first.get("type") == "missing" else f", got {json.dumps(got)[:200] if _jsonable(got) else got!r}"
    return APIError(f"{where}: {first.get('msg')}{got_s}{more}", param=loc[0] if loc else None)


def _jsonable(x) -> bool:
    try:
        json.dumps(x)
        return True
    except (TypeError, ValueError):
        return False
