"""The offline API, as vLLM's: `LLM(model=...)`, `generate(prompts, sampling_params)`, `chat(messages, ...)`."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

from qwenjax.config import EngineArgs
from qwenjax.engine.llm_engine import LLMEngine
from qwenjax.outputs import RequestOutput
from qwenjax.sampling_params import SamplingParams
from qwenjax.tokenizer import apply_chat_template, load_chat_template

_ARG_NAMES = {f.name for f in dataclasses.fields(EngineArgs)}


class LLM:
    """An engine for offline batched generation.

    Takes vLLM's engine arguments (model, tokenizer, dtype, seed, max_model_len, gpu_memory_utilization,
    max_num_seqs, max_num_batched_tokens, block_size, tensor_parallel_size, quantization, kv_cache_dtype, ...).
    `model=None` serves the built-in default model (random weights, real Qwen2 tokenizer). An argument whose feature
    is not built yet raises NotImplementedError naming it; an unknown argument raises TypeError.
    """

    def __init__(self, model: str | None = None, **kwargs: Any):
        unknown = sorted(set(kwargs) - _ARG_NAMES - {"memory_source"})
        if unknown:
            raise TypeError(f"LLM() got unknown arguments {unknown}; accepted: {sorted(_ARG_NAMES)}")
        memory_source = kwargs.pop("memory_source", None)
        if isinstance(kwargs.get("served_model_name"), str):
            kwargs["served_model_name"] = (kwargs["served_model_name"],)
        for key in ("decode_buckets", "prefill_token_buckets"):
            if kwargs.get(key) is not None:
                kwargs[key] = tuple(kwargs[key])
        self.engine_args = EngineArgs(model=model, **kwargs)
        self.llm_engine = LLMEngine(self.engine_args, memory_source=memory_source)
        self._next_id = 0
        if not self.llm_engine.is_leader:
            # Several hosts: this process serves process 0's steps, then returns once process 0 shuts down.
            self.llm_engine.follow()
        elif self.engine_args.num_processes > 1:
            import atexit

            atexit.register(self.llm_engine.shutdown)

    def shutdown(self) -> None:
        """Releases the other processes of a multi-host run (also done at exit)."""
        self.llm_engine.shutdown()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def reset_prefix_cache(self) -> int:
        """Forgets the prefix cache's free pages (vLLM's `LLM.reset_prefix_cache`), e.g. between benchmark runs.
        Returns how many pages it dropped."""
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
        ids = []
        try:
            for i, ((text, toks), p) in enumerate(zip(items, params)):
                rid = f"offline-{self._next_id}"
                self._next_id += 1
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
