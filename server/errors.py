"""Request-body parsing with errors a person can act on, and OpenAI-shaped error responses."""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from server.protocol import APIError


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def parse_json(raw: bytes) -> Any:
    """The decoded JSON body; APIError 400 saying where the JSON is broken (and naming a trailing comma)."""
    if not raw.strip():
        raise APIError("the request body is empty; send a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(f"the request body is not valid UTF-8: {e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        hint = _trailing_comma(text, e.pos)
        raise APIError(f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno} "
                       f"(char {e.pos}).{hint}") from None


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
