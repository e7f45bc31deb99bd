"""create_app(engine, ...): the FastAPI app of the OpenAI-compatible server.

Routes: POST /v1/chat/completions, /v1/completions, /tokenize, /detokenize, /generate (vLLM's demo server);
GET /v1/models, /health, /version, /metrics; with LoRA runtime updating, POST /v1/load_lora_adapter and
/v1/unload_lora_adapter (server/lora.py). Every error is OpenAI's JSON shape
{"error": {"message", "type", "param", "code"}}; bad input is a 400 (never FastAPI's 422). With `api_key`, every
route except /health, /version and /metrics needs `Authorization: Bearer <key>`.

The app does not own the engine unless `shutdown_engine=True` (python -m server): several apps may share one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from typing import Callable

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

import qwenjax
from qwenjax.engine.async_llm import AsyncLLMEngine
from qwenjax.tokenizer import load_chat_template
from server.errors import error_response, parse_json, validation_error
from server.limits import DEFAULT_MAX_REQUEST_BODY_BYTES, BodyLimit
from server.lora import request_body, runtime_updating_allowed, served_loras
from server.metrics import ServerMetrics
from server.openapi import body, install
from server.protocol import (APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, GenerateRequest,
                             TokenizeRequest)
from server.jobs import ClientGone
from server.serving import OpenAIServing
from server.tool_parsers import check_tool_options

logger = logging.getLogger("qwenjax.server")

OPEN_PATHS = ("/health", "/version", "/metrics")
ENGINE_WATCH_INTERVAL_S = 0.2  # how often the server looks whether the engine loop is still alive
ENGINE_DEATH_GRACE_S = 1.0     # from noticing the engine's death to on_engine_death: streams send their errors


def create_app(engine: AsyncLLMEngine, *, served_model_names: list[str] | tuple[str, ...] | None = None,
               api_key: str | None = None, chat_template: str | None = None, model_root: str | None = None,
               shutdown_engine: bool = False,
               max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES,
               on_engine_death: Callable[[], None] | None = None, enable_auto_tool_choice: bool = False,
               tool_call_parser: str | None = None, lora_modules: list[str] | tuple[str, ...] = (),
               allow_runtime_lora_updating: bool = False) -> FastAPI:
    """The server's app over a running AsyncLLMEngine.

    served_model_names: the names clients may send as `model` (the first is the one reported); default: the
    engine's served_model_name or model argument. chat_template: a Jinja template or a path to one, overriding the
    tokenizer's (default: the engine arguments' chat_template). max_request_body_bytes: larger bodies get 413
    before anything reads them. on_engine_death: called on the event loop ENGINE_DEATH_GRACE_S after the engine
    loop died (streams in flight have had their error events by then); python -m server stops there and exits
    non-zero, as vLLM does, unless --keep-alive-on-engine-death (then: None, and every request answers 503).
    `app.state.engine_died` is True once it was called. enable_auto_tool_choice and tool_call_parser (vLLM's
    --enable-auto-tool-choice --tool-call-parser hermes): tool_choice "auto" parses the model's text into tool calls
    (without them it is a 400); "required" and named choices need neither. lora_modules (`name=path`, with the
    engine's enable_lora) and allow_runtime_lora_updating: see server/lora.py; a bad adapter raises ValueError.
    """
    check_tool_options(enable_auto_tool_choice, tool_call_parser)
    llm = engine.engine
    args = getattr(llm, "args", None)
    names = list(served_model_names or (args.served_model_name if args is not None else None)
                 or [getattr(args, "model", None) or "qwenjax/tiny-random-qwen2"])
    template = chat_template if chat_template is not None else getattr(args, "chat_template", None)
    template = load_chat_template(template) if template is not None else None
    metrics = ServerMetrics(llm, names[0])
    loras = served_loras(llm, args, names, lora_modules)
    serving = OpenAIServing(engine, model_names=names, metrics=metrics, chat_template=template,
                            auto_tool_parser=tool_call_parser if enable_auto_tool_choice else None, loras=loras)
    root = model_root or getattr(args, "model", None) or names[0]
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        watcher = asyncio.ensure_future(watch_engine()) if on_engine_death is not None else None
        yield
        if watcher is not None:
            watcher.cancel()
        serving.preparer.shutdown()
        if shutdown_engine:
            engine.shutdown()

    async def watch_engine():
        while not engine.dead:
            await asyncio.sleep(ENGINE_WATCH_INTERVAL_S)
        logger.error("the engine loop died (%s); the server stops in %.0f s (pass --keep-alive-on-engine-death to "
                     "keep it answering 503 instead)", engine.error, ENGINE_DEATH_GRACE_S)
        await asyncio.sleep(ENGINE_DEATH_GRACE_S)
        app.state.engine_died = True
        on_engine_death()

    app = FastAPI(title="qwenjax OpenAI-compatible server", version=qwenjax.__version__, lifespan=lifespan)
    app.state.engine, app.state.metrics, app.state.serving = engine, metrics, serving
    app.state.engine_died = False
    app.add_middleware(BodyLimit, max_bytes=max_request_body_bytes)
    install(app)

    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        auth = request.headers.get("authorization", "")
        if not auth:
            raise APIError("You didn't provide an API key. Send it in an 'Authorization: Bearer <key>' header.",
                           status=401, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        scheme, _, given = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError("Incorrect API key provided.", status=401, code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    auth = [Depends(check_key)]

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone):
        return Response(status_code=499)  # nobody reads it: the connection is closed

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return error_response(validation_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
        return error_response(APIError(f"{exc.detail}: {request.method} {request.url.path}", status=exc.status_code,
                                       type=kind, code=exc.status_code))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        return error_response(APIError(f"internal server error: {type(exc).__name__}: {exc}", status=500,
                                       type="server_error", code=500))

    @app.get("/health")
    async def health():
        if engine.dead:
            return error_response(APIError(f"the engine loop is not running: {engine.error}", status=503,
                                           type="server_error", code=503))
        replicas = getattr(engine, "health", None)  # data parallel: each replica's state (200 while one is up)
        if replicas is not None:
            states = replicas()
            return JSONResponse({"engines": states}, status_code=200 if any(r["healthy"] for r in states) else 503)
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        return {"version": qwenjax.__version__}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=auth)
    async def models():
        data = [{"id": n, "object": "model", "created": created, "owned_by": "qwenjax", "root": root,
                 "parent": None, "max_model_len": serving.max_model_len, "permission": []} for n in names]
        if loras is not None:
            data += loras.model_cards(created, serving.max_model_len)
        return {"object": "list", "data": data}

    if loras is not None and runtime_updating_allowed(allow_runtime_lora_updating):
        @app.post("/v1/load_lora_adapter", dependencies=auth)
        async def load_lora_adapter(request: Request):
            name, path = request_body(parse_json(await request.body()), "lora_name", "lora_path")
            try:
                await asyncio.to_thread(loras.add, name, path)
            except ValueError as e:
                raise APIError(str(e), param="lora_path") from None
            return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

        @app.post("/v1/unload_lora_adapter", dependencies=auth)
        async def unload_lora_adapter(request: Request):
            (name,) = request_body(parse_json(await request.body()), "lora_name")
            loras.remove(name)
            return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    @app.post("/v1/chat/completions", dependencies=auth, openapi_extra=body(ChatCompletionRequest))
    async def chat(request: Request):
        return await serving.chat(request)

    @app.post("/v1/completions", dependencies=auth, openapi_extra=body(CompletionRequest))
    async def completions(request: Request):
        return await serving.completions(request)

    @app.post("/generate", dependencies=auth, openapi_extra=body(GenerateRequest))
    async def generate(request: Request):
        return await serving.generate(request)

    @app.post("/tokenize", dependencies=auth, openapi_extra=body(TokenizeRequest))
    async def tokenize(request: Request):
        return await serving.tokenize(request)

    @app.post("/detokenize", dependencies=auth, openapi_extra=body(DetokenizeRequest))
    async def detokenize(request: Request):
        return await serving.detokenize(request)

    return app

