"""The request bodies in /openapi.json (FastAPI's convention), while the routes keep reading the raw body.

The routes parse their bodies themselves, on the preparer's thread and with OpenAI-shaped 400s (never FastAPI's
422), so FastAPI cannot infer the schemas from their signatures: each POST route declares its pydantic model with
`body(Model)` (`openapi_extra`), and `install(app)` adds the models' JSON schemas to the document's components.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, GenerateRequest,
                             TokenizeRequest)

REQUEST_MODELS: tuple[type[BaseModel], ...] = (ChatCompletionRequest, CompletionRequest, TokenizeRequest,
                                               DetokenizeRequest, GenerateRequest)
REF = "#/components/schemas/{model}"


def body(model: type[BaseModel]) -> dict:
    """`openapi_extra` for a route whose JSON body is `model`."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": REF.format(model=model.__name__)}}}}}


def install(app: FastAPI) -> None:
    """Makes app.openapi() carry every request model's schema under components/schemas."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            _, defs = models_json_schema([(m, "validation") for m in REQUEST_MODELS], ref_template=REF)
            doc.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi
