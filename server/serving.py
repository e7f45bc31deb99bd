"""The generation endpoints: /v1/chat/completions, /v1/completions and the demo /generate.

Each request is validated here before the engine sees it (model name, prompt and max_tokens against max_model_len,
sampling values), so the engine's own validation is a second line. The handler then waits for the first output
while watching the connection: errors of the engine still become a proper HTTP error, and a client that leaves
gets its request aborted (its pages freed) at once. Streams then go out as SSE; Starlette cancels the body
iterator when the client disconnects, and its `finally` aborts whatever is unfinished.
"""

from __future__ import annotations

import json
import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from qwenjax.engine.async_llm import AsyncLLMEngine
from qwenjax.config import EngineArgs
from qwenjax.sampling_params import SamplingParams
from qwenjax.tokenizer import apply_chat_template
from server.errors import parse_json, parse_model
from server.jobs import Job, Prompt, race_disconnect, truncated
from server.formatting import ChatFormatter, CompletionFormatter, TokenText
from server.limits import Preparer
from server.metrics import ServerMetrics
from server.protocol import (APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest,
                             param_of, sampling_params_from_dict)
from server.structured_outputs import request_constraint
from server.tools import chat_constraints, has_tool_tags, template_tools


def sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n"


class OpenAIServing:
    def __init__(self, engine: AsyncLLMEngine, *, model_names: list[str], metrics: ServerMetrics,
                 chat_template: str | None, auto_tool_parser: str | None = None, loras=None):
        """auto_tool_parser: the --tool-call-parser of tool_choice "auto" when --enable-auto-tool-choice is set."""
        self.engine = engine
        llm = engine.engine
        self.tokenizer = llm.tokenizer
        self.max_model_len = llm.max_model_len
        self.vocab_size = llm.model_config.vocab_size
        args = getattr(llm, "args", None) or EngineArgs()
        self.max_logprobs = self.vocab_size if args.max_logprobs == -1 else args.max_logprobs
        self.max_n = args.max_n
        self.default_max_tokens = (getattr(llm, "generation_defaults", None) or {}).get("max_tokens")
        self.model_names = model_names
        self.metrics = metrics
        self.chat_template = chat_template
        self.token_text = TokenText(self.tokenizer)
        self.preparer = Preparer()
        self.auto_tool_parser = auto_tool_parser
        self.tool_tags = has_tool_tags(self.tokenizer)
        self.loras = loras  # server/lora.ServedLoRAs (--enable-lora) or None

    # ------------------------------------------------------------------ validation
    def check_model(self, name: str | None) -> str:
        """A request's `model`: a served name of the base model or a LoRA adapter's name; 404 naming them else."""
        if name is None or name in self.model_names:
            return name or self.model_names[0]
        if self.loras is not None and name in self.loras.by_name:
            return name
        known = self.model_names + (list(self.loras.by_name) if self.loras is not None else [])
        raise APIError(f"The model `{name}` does not exist. Served models: {', '.join(known)}.",
                       status=404, param="model", code="model_not_found")

    def lora_request(self, model: str):
        """The LoRARequest of a checked `model` (None: the base model)."""
        if model in self.model_names:
            return None
        self.check_model(model)  # unloaded since it was checked: 404
        return self.loras.by_name[model]

    def max_tokens(self, prompt_len: int, requested: int | None, *, what: str, param: str) -> int:
        """The completion budget: what the client asked, checked against max_model_len, or all that is left."""
        limit = self.max_model_len
        if requested is not None and requested < 1:
            raise APIError(f"{param} must be at least 1, got {requested}", param=param)
        if prompt_len >= limit:
            raise APIError(f"This model's maximum context length is {limit} tokens. However, your request has "
                           f"{prompt_len} input tokens in the {what}, which leaves no room to generate. Please reduce "
                           f"the length of the {what}.", param=what, code="context_length_exceeded")
        if requested is None:
            left = limit - prompt_len
            return left if self.default_max_tokens is None else min(left, self.default_max_tokens)
        if prompt_len + requested > limit:
            raise APIError(f"This model's maximum context length is {limit} tokens. However, you requested "
                           f"{prompt_len + requested} tokens ({prompt_len} in the {what}, {requested} in the "
                           f"completion). Please reduce the length of the {what} or completion.", param=param,
                           code="context_length_exceeded")
        return requested

    def verify(self, params: SamplingParams) -> SamplingParams:
        """The engine's own bounds (vocabulary, max_logprobs, max_n), checked here so they answer 400 at once."""
        try:
            return params.verified(vocab_size=self.vocab_size, max_logprobs=self.max_logprobs, max_n=self.max_n)
        except ValueError as e:
            raise APIError(str(e), param=param_of(str(e))) from None

    def check_ids(self, ids: list[int], param: str) -> None:
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise APIError(f"token id {bad} is out of range: ids must be in [0, {self.vocab_size})", param=param)

    def chat_prompt(self, req: ChatCompletionRequest) -> Prompt:
        kwargs = dict(req.chat_template_kwargs or {})
        if req.tools:
            kwargs["tools"] = template_tools(req.tools)
        if req.continue_final_message:
            kwargs["continue_final_message"] = True
        try:
            text = apply_chat_template(self.tokenizer, req.messages, add_generation_prompt=req.add_generation_prompt,
                                       chat_template=self.chat_template, **kwargs)
        except Exception as e:  # noqa: BLE001 - rendering fails only on what the request sent
            raise APIError(f"cannot apply the chat template to these messages: {type(e).__name__}: {e}",
                           param="messages") from None
        return Prompt(text, self.tokenizer.encode(text, add_special_tokens=False))

    # ------------------------------------------------------------------ endpoints
    # Each endpoint reads the raw body on the event loop, then parses, validates, templates and tokenizes it on the
    # preparer's thread (server/limits.py): the loop keeps serving everyone else while a large prompt is prepared.
    async def chat(self, request: Request) -> Response:
        arrival = time.monotonic()
        prepared = await self.preparer.run(self._prepare_chat, await request.body())
        return await self._respond(request, *prepared, arrival)

    async def completions(self, request: Request) -> Response:
        arrival = time.monotonic()
        prepared = await self.preparer.run(self._prepare_completions, await request.body())
        return await self._respond(request, *prepared, arrival)

    async def tokenize(self, request: Request) -> dict:
        return await self.preparer.run(self._tokenize, await request.body())

    async def detokenize(self, request: Request) -> dict:
        return await self.preparer.run(self._detokenize, await request.body())

    def _prepare_chat(self, raw: bytes):
        req = parse_model(ChatCompletionRequest, raw)
        req.warn_ignored("/v1/chat/completions")
        req.check()
        model = self.check_model(req.model)
        tools, constraint, constraint_param = chat_constraints(req, auto_parser=self.auto_tool_parser,
                                                               special_tags=self.tool_tags)
        prompt = truncated(self.chat_prompt(req), req.truncate_prompt_tokens)
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = self.max_tokens(len(prompt.ids), req.requested_max_tokens(), what="messages", param=param)
        num_lp = req.num_logprobs(self.max_logprobs)
        params = self.verify(req.sampling_params(max_tokens=max_tokens, logprobs=num_lp,
                                                 structured_outputs=constraint))
        so = req.stream_options
        fmt = ChatFormatter(request_id=f"chatcmpl-{uuid.uuid4().hex}", model=model, params=params,
                            prompt_lens=[len(prompt.ids)], token_text=self.token_text, num_logprobs=num_lp,
                            include_usage=bool(so and so.include_usage), tool_parser=tools.parser,
                            continuous_usage=bool(so and so.include_usage and so.continuous_usage_stats))
        return fmt, [prompt], params, req.stream, constraint_param

    def _prepare_completions(self, raw: bytes):
        req = parse_model(CompletionRequest, raw)
        req.warn_ignored("/v1/completions")
        req.check(self.max_logprobs)
        model = self.check_model(req.model)
        constraint, constraint_param = request_constraint(req)
        prompts = []
        for k, p in enumerate(req.prompts()):
            where = "prompt" if isinstance(req.prompt, str) or isinstance(req.prompt[0], int) else f"prompt[{k}]"
            if isinstance(p, str):
                ids = self.tokenizer.encode(p, add_special_tokens=False)
                if not ids:
                    raise APIError(f"{where} is empty: it must have at least 1 token", param="prompt")
                prompts.append(Prompt(p, ids))
            elif isinstance(p, list) and p and all(isinstance(t, int) for t in p):
                self.check_ids(p, "prompt")
                prompts.append(Prompt(None, p))
            else:
                raise APIError(f"{where} must be a non-empty string or a non-empty list of token ids", param="prompt")
        prompts = [truncated(p, req.truncate_prompt_tokens) for p in prompts]
        lens = [len(p.ids) for p in prompts]
        max_tokens = min(self.max_tokens(n, req.max_tokens, what="prompt", param="max_tokens") for n in lens)
        params = self.verify(req.sampling_params(max_tokens=max_tokens, logprobs=req.logprobs,
                                                 structured_outputs=constraint))
        echo = [p.text if p.text is not None else self.tokenizer.decode(p.ids) for p in prompts] if req.echo else None
        so = req.stream_options
        fmt = CompletionFormatter(request_id=f"cmpl-{uuid.uuid4().hex}", model=model, params=params,
                                  prompt_lens=lens, token_text=self.token_text, num_logprobs=req.logprobs,
                                  include_usage=bool(so and so.include_usage), echo_texts=echo,
                                  continuous_usage=bool(so and so.include_usage and so.continuous_usage_stats))
        return fmt, prompts, params, req.stream, constraint_param

    def _tokenize(self, raw: bytes) -> dict:
        req = parse_model(TokenizeRequest, raw)
        self.check_model(req.model)
        tok = self.tokenizer
        if (req.prompt is None) == (req.messages is None):
            raise APIError("send exactly one of prompt or messages", param="prompt")
        if req.messages is not None:
            if not req.messages:
                raise APIError("messages is empty", param="messages")
            try:
                text = apply_chat_template(tok, req.messages, add_generation_prompt=req.add_generation_prompt,
                                           chat_template=self.chat_template, tools=template_tools(req.tools))
            except Exception as e:  # noqa: BLE001 - rendering fails only on what the request sent
                raise APIError(f"cannot apply the chat template to these messages: {type(e).__name__}: {e}",
                               param="messages") from None
            ids = tok.encode(text, add_special_tokens=False)
        else:
            ids = tok.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        body = {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids}
        if req.return_token_strs:
            body["token_strs"] = tok.convert_ids_to_tokens(ids)
        return body

    def _detokenize(self, raw: bytes) -> dict:
        req = parse_model(DetokenizeRequest, raw)
        self.check_model(req.model)
        self.check_ids(req.tokens, "tokens")
        return {"prompt": self.tokenizer.decode(req.tokens)}

    def _prepare_generate(self, raw: bytes):
        body = parse_json(raw)
        if not isinstance(body, dict):
            raise APIError(f"the request body must be a JSON object, got {type(body).__name__}")
        prompt = body.pop("prompt", None)
        stream = body.pop("stream", False)
        if not isinstance(prompt, str) or not prompt:
            raise APIError("prompt must be a non-empty string", param="prompt")
        if not isinstance(stream, bool):
            raise APIError(f"stream must be true or false, got {stream!r}", param="stream")
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        params = self.verify(sampling_params_from_dict(body))
        self.max_tokens(len(ids), params.max_tokens, what="prompt", param="max_tokens")
        return Prompt(prompt, ids), params, stream

    async def generate(self, request: Request) -> Response:
        """vLLM's demo server: {"prompt": str, "stream": bool, <SamplingParams fields>} -> {"text": [prompt + out]}."""
        arrival = time.monotonic()
        prompt, params, stream = await self.preparer.run(self._prepare_generate, await request.body())
        job = Job(self.engine, self.metrics, [prompt], params, f"gen-{uuid.uuid4().hex}", arrival)
        texts = lambda out: {"text": [prompt.text + c.text for c in out.outputs]}  # noqa: E731
        if not stream:
            (final,) = await race_disconnect(request, job.collect(), job.abort)
            return JSONResponse(texts(final))
        outputs = job.outputs()
        first = await race_disconnect(request, outputs.__anext__(), job.abort)

        async def body_iter():
            try:
                yield (json.dumps(texts(first[1]), ensure_ascii=False) + "\0").encode("utf-8")
                async for _, out in outputs:
                    yield (json.dumps(texts(out), ensure_ascii=False) + "\0").encode("utf-8")
            finally:
                job.abort()

        return StreamingResponse(body_iter(), media_type="application/json")

    # ------------------------------------------------------------------ shared
    async def _respond(self, request: Request, fmt, prompts: list[Prompt], params, stream: bool,
                       constraint_param: str | None, arrival: float) -> Response:
        job = Job(self.engine, self.metrics, prompts, params, fmt.id, arrival, constraint_param,
                  lora_request=self.lora_request(fmt.model))
        if not stream:
            finals = await race_disconnect(request, job.collect(), job.abort)
            return JSONResponse(fmt.response(finals))
        outputs = job.outputs()
        first = await race_disconnect(request, outputs.__anext__(), job.abort)

        async def body_iter():
            try:
                for chunk in fmt.stream_sse(*first):
                    yield chunk
                async for i, out in outputs:
                    for chunk in fmt.stream_sse(i, out):
                        yield chunk
                for chunk in fmt.final_chunks():
                    yield sse(chunk)
            except APIError as e:  # the engine failed mid-stream: the status line is long gone
                yield sse(e.body())
            finally:
                job.abort()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(body_iter(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
