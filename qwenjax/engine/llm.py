"""The offline API, as vLLM's: `LLM(model=...)`, `generate(prompts, sampling_params)`, `chat(messages, ...)`."""

from __future__ import annotations

import dataclasses
import time
import weakref
from typing import Any, Sequence

from qwenjax.config import EngineArgs
from qwenjax.engine.llm_engine import LLMEngine
from qwenjax.engine.offline_data_parallel import OfflineDataParallel
from qwenjax.outputs import RequestOutput
from qwenjax.sampling_params import SamplingParams
from qwenjax.tokenizer import apply_chat_template, load_chat_template

_ARG_NAMES = {f.name for f in dataclasses.fields(EngineArgs)}
# LLM's arguments for data parallel replicas (the server's --data-parallel-routing, --ray-address,
# --data-parallel-max-restarts) -> OfflineDataParallel's.
_REPLICA_ARGS = {"data_parallel_routing": "routing", "ray_address": "ray_address",
                 "data_parallel_max_restarts": "max_restarts"}


class LLM:
    """An engine for offline batched generation.

    Takes vLLM's engine arguments (model, tokenizer, dtype, seed, max_model_len, gpu_memory_utilization,
    max_num_seqs, max_num_batched_tokens, block_size, tensor_parallel_size, quantization, kv_cache_dtype, ...).
    `model=None` serves the built-in default model (random weights, real Qwen2 tokenizer). An argument whose feature
    is not built yet raises NotImplementedError naming it; an unknown argument raises TypeError.

    `data_parallel_size=N` (vLLM's; optionally `data_parallel_routing`, `distributed_executor_backend="ray"`,
    `ray_address`, `data_parallel_max_restarts`) runs N engine replicas, each in its own process on its own devices,
    and spreads each generate() call's prompts over them (qwenjax/engine/offline_data_parallel.py).
    """

    def __init__(self, model: str | None = None, **kwargs: Any):
        unknown = sorted(set(kwargs) - _ARG_NAMES - {"memory_source"} - set(_REPLICA_ARGS))
        if unknown:
            raise TypeError(f"LLM() got unknown arguments {unknown}; accepted: "
                            f"{sorted(_ARG_NAMES | set(_REPLICA_ARGS))}")
        memory_source = kwargs.pop("memory_source", None)
        replica_options = {_REPLICA_ARGS[k]: kwargs.pop(k) for k in list(kwargs) if k in _REPLICA_ARGS}
        if isinstance(kwargs.get("served_model_name"), str):
            kwargs["served_model_name"] = (kwargs["served_model_name"],)
        for key in ("decode_buckets", "prefill_token_buckets"):
            if kwargs.get(key) is not None:
                kwargs[key] = tuple(kwargs[key])
        self.engine_args = args = EngineArgs(model=model, **kwargs)
        self._next_id = 0
        if args.data_parallel_size > 1 or args.distributed_executor_backend == "ray":
            # N replicas, each an engine core process (or Ray actor); see qwenjax/engine/offline_data_parallel.py.
            if memory_source is not None:
                raise NotImplementedError("memory_source with data_parallel_size > 1 (each replica process "
                                          "measures its own devices)")
            self.llm_engine = OfflineDataParallel(args, **replica_options)
            weakref.finalize(self, self.llm_engine.shutdown)  # also at exit: the replicas' processes stop
            return
        if replica_options:
            raise ValueError(f"{sorted(k for k, v in _REPLICA_ARGS.items() if v in replica_options)} only apply "
                             f"with data_parallel_size > 1 or distributed_executor_backend='ray'")
        self.llm_engine = LLMEngine(args, memory_source=memory_source)
        if not self.llm_engine.is_leader:
            # Several hosts: this process serves process 0's steps, then returns once process 0 shuts down.
            self.llm_engine.follow()
        elif self.engine_args.num_processes > 1:
            import atexit

            atexit.register(self.llm_engine.shutdown)

    def shutdown(self) -> None:
        """Releases the other processes of a multi-host run, or stops the data parallel replicas (also done at
        exit)."""
        self.llm_engine.shutdown()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def reset_prefix_cache(self) -> int:
        """Forgets the prefix cache's free pages (vLLM's `LLM.reset_prefix_cache`), e.g. between benchmark runs.
        Returns how many pages it dropped (over every replica with data_parallel_size > 1)."""
        return self.llm_engine.reset_prefix_cache()

    def generate(self, prompts: Any = None, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 *, prompt_token_ids: Sequence[Sequence[int]] | None = None, use_tqdm: bool = True,
                 priority: Sequence[int] | None = None, lora_request=None) -> list[RequestOutput]:
        """Generates for every prompt; returns one RequestOutput per prompt, in input order.

        A prompt is a string, a dict with `prompt` or `prompt_token_ids`, or (through `prompt_token_ids=`) a list of
        token ids. If any prompt is invalid, nothing is queued and the error says which one. `lora_request`: a
        LoRARequest for every prompt, or a list with one per prompt (None: the base model); needs enable_lora=True.
        """
        if not self.llm_engine.is_leader:
            raise RuntimeError("generate() runs on process 0; the other processes replay its steps inside LLM()")
        items = _normalise_prompts(prompts, prompt_token_ids)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = list(sampling_params) if isinstance(sampling_params, (list, tuple)) else \
            [sampling_params] * len(items)
        if len(params) != len(items):
            raise ValueError(f"got {len(params)} sampling_params for {len(items)} prompts; pass one or one per prompt")
        loras = list(lora_request) if isinstance(lora_request, (list, tuple)) else [lora_request] * len(items)
        if len(loras) != len(items):
            raise ValueError(f"got {len(loras)} lora_request for {len(items)} prompts; pass one or one per prompt")
        engine = self.llm_engine
        if isinstance(engine, OfflineDataParallel):
            return engine.generate([dict(request_id=self._new_id(), prompt=text, params=p, prompt_token_ids=toks,
                                         priority=priority[i] if priority is not None else 0, lora_request=loras[i])
                                    for i, ((text, toks), p) in enumerate(zip(items, params))], use_tqdm)
        ids = []
        try:
            for i, ((text, toks), p) in enumerate(zip(items, params)):
                rid = self._new_id()
                try:
                    engine.add_request(rid, text, p, prompt_token_ids=toks,
                                       priority=priority[i] if priority is not None else 0, lora_request=loras[i])
                except (ValueError, TypeError) as e:
                    raise type(e)(f"prompt {i}: {e}") from None
                ids.append(rid)
            return self._run(ids, use_tqdm)
        except BaseException:
            engine.abort_request(ids)  # nothing of this call stays queued, every page comes back
            raise

    def chat(self, messages, sampling_params=None, *, use_tqdm: bool = True, chat_template: str | None = None,
             add_generation_prompt: bool = True, **template_kwargs) -> list[RequestOutput]:
        """Applies the chat template to one conversation (a list of messages) or several, then generates."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        template = chat_template or self.engine_args.chat_template
        if template is not None:
            template = load_chat_template(template)
        tok = self.get_tokenizer()
        prompts = [apply_chat_template(tok, c, add_generation_prompt=add_generation_prompt, chat_template=template,
                                       **template_kwargs) for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _new_id(self) -> str:
        self._next_id += 1
        return f"offline-{self._next_id - 1}"

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        engine.final_only = True
        done: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), desc="Processed prompts", dynamic_ncols=True)
        t0, tokens = time.perf_counter(), 0
        pending = set(ids)
        while pending:
            for out in engine.step():
                if out.finished and out.request_id in pending:
                    done[out.request_id] = out
                    pending.discard(out.request_id)
                    tokens += sum(len(c.token_ids) for c in out.outputs)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix_str(f"output {tokens / max(time.perf_counter() - t0, 1e-9):.1f} tok/s")
            failed = [(rid, e) for rid, e in engine.take_failed() if rid in pending]
            if failed:  # a request the engine could not run (the others were unharmed; generate aborts them)
                rid, e = failed[0]
                raise RuntimeError(f"prompt {ids.index(rid)} failed in the engine: {type(e).__name__}: {e}") from e
            if pending and not engine.has_unfinished_requests():
                raise RuntimeError(f"requests {sorted(pending)[:3]} vanished from the engine")
        if bar is not None:
            bar.close()
        return [done[i] for i in ids]


def _normalise_prompts(prompts, prompt_token_ids) -> list[tuple[str | None, list[int] | None]]:
    if prompts is None and prompt_token_ids is None:
        raise ValueError("generate() needs prompts or prompt_token_ids")
    items: list[tuple[str | None, list[int] | None]] = []
    if prompt_token_ids is not None:
        if prompt_token_ids and isinstance(prompt_token_ids[0], int):
            prompt_token_ids = [prompt_token_ids]
        return [(None, list(t)) for t in prompt_token_ids]
    if isinstance(prompts, (str, dict)):
        prompts = [prompts]
    for p in prompts:
        if isinstance(p, str):
            items.append((p, None))
        elif isinstance(p, dict):
            if "prompt_token_ids" in p:
                items.append((p.get("prompt"), list(p["prompt_token_ids"])))
            elif "prompt" in p:
                items.append((p["prompt"], None))
            else:
                raise ValueError(f"a prompt dict needs 'prompt' or 'prompt_token_ids', got keys {sorted(p)}")
        else:
            raise TypeError(f"a prompt must be a string or a dict, got {type(p).__name__}")
    return items
