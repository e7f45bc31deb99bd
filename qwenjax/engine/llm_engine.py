"""LLMEngine: requests in, RequestOutputs out, one scheduler step at a time.

Host loop per step: Scheduler.schedule() -> build_step_input -> ModelRunner.execute (one jitted model step and one
jitted sampling call) -> read the sampled ids (the only device sync) -> append, detokenize, check stops, free pages.
With async scheduling (default) the reading is one step behind: step N+1 is on the device while the host reads and
handles step N's tokens, so the host's work hides under the device's.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from typing import Callable, Iterable

import jax
import numpy as np

from qwenjax import compat
from qwenjax.config import EngineArgs, compilation_cache_path
from qwenjax.core.admission import new_sequences
from qwenjax.core.block_manager import BlockManager
from qwenjax.core.constraints import Constraints
from qwenjax.core.output_processor import OutputProcessor, request_output
from qwenjax.core.scheduler import Scheduler
from qwenjax.core.scheduler_output import SchedulerOutput
from qwenjax.core.sequence import PENDING, Request, Sequence
from qwenjax.engine.in_flight import InFlight, Prepared, freeze_gc_heap
from qwenjax.engine.lora import EngineLoRA
from qwenjax.engine.request_failures import RequestFailures
from qwenjax.engine.sampling_inputs import needs_known_outputs, row_constraints, sampler_inputs, sampling_row, step_rows
from qwenjax.engine.spec_step import SpecDecoder
from qwenjax.engine.stats import EngineStats
from qwenjax.outputs import RequestOutput
from qwenjax.sampling_params import SamplingParams
from qwenjax.scheduler_config import SchedulerConfig
from qwenjax.worker import lockstep
from qwenjax.worker.lockstep import to_host
from qwenjax.worker.model_runner import ModelRunner
from qwenjax.worker.model_setup import LoadedModel, load_model
from qwenjax.worker.sampler import WARMUP_MODES
from qwenjax.worker.step_input import build_step_input

logger = logging.getLogger("qwenjax")


class LLMEngine(RequestFailures):
    def __init__(self, args: EngineArgs, *, memory_source=None):
        missing = args.unsupported()
        if missing:
            raise NotImplementedError(f"not implemented yet in qwenjax: {', '.join(missing)}")
        if not compat.set_gpu_memory_fraction(args.gpu_memory_utilization):
            logger.warning("JAX was initialised before the engine, so gpu_memory_utilization=%.2f cannot set its "
                           "memory pool; start the engine before other JAX work", args.gpu_memory_utilization)
        self.args = args
        if args.num_processes > 1:
            lockstep.initialize(args.distributed_coordinator, args.num_processes, args.process_id)
        if args.compilation_cache_dir:
            where = compat.enable_compilation_cache(compilation_cache_path(args.compilation_cache_dir))
            logger.info("compiled programs are cached in %s (compilation_cache_dir=None turns it off)", where)
        self.model: LoadedModel = load_model(args, memory_source=memory_source)
        self.model_config = self.model.config
        self.tokenizer = self.model.tokenizer
        self.eos_token_ids = self.model.eos_token_ids
        self.generation_defaults = self.model.sampling_defaults
        sc: SchedulerConfig = self.model.scheduler_config
        self.scheduler_config = sc
        self.max_model_len = sc.max_model_len
        self.blocks = BlockManager(self.model.num_pages, sc.block_size,
                                   enable_prefix_caching=args.enable_prefix_caching)
        # Multi-LoRA (enable_lora): adapters on the host, their device slots in the scheduler (engine/lora.py).
        self.lora = EngineLoRA(args.lora_config, self.model_config) if args.enable_lora else None
        self.scheduler = Scheduler(sc, self.blocks, policy=args.scheduling_policy,
                                   loras=self.lora.slots if self.lora else None)
        self.runner: ModelRunner = self.model.runner
        self.stats = EngineStats()
        self.output_processor = OutputProcessor(self.tokenizer, self.eos_token_ids, self.scheduler, self.stats)
        self.constraints = Constraints(self.tokenizer, self.model_config.vocab_size, self.eos_token_ids)
        self.requests: dict[str, Request] = {}
        self._rng = np.random.default_rng(args.seed)
        self._ids = itertools.count()
        self.final_only = False  # True: step() reports only requests that finished (offline generate)
        self.raw_outputs = False  # True: step() returns the advanced Request objects themselves (the engine core)
        self._in_flight: InFlight | None = None  # async scheduling: the dispatched step whose tokens are unread
        self._masks = None  # a Future of the late step's bitmask, started when the tokens before it were read
        # Requests a step failed alone (an exception building or finishing their rows): (request id, exception),
        # drained by the loop that runs step() (take_failed) and reported to their callers.
        self.failed: list[tuple[str, BaseException]] = []
        # Several processes: process 0 leads (schedules, announces each step); the others replay its steps.
        self.is_leader = jax.process_index() == 0
        self._leader = lockstep.Leader() if jax.process_count() > 1 and self.is_leader else None
        spec = args.speculative()  # speculative decoding's verify steps (engine/spec_step.py), or None
        self.spec = SpecDecoder(self, spec) if spec is not None else None
        freeze_gc_heap()

    def follow(self) -> int:
        """On a process other than 0: run process 0's steps until it shuts down. Returns the steps run."""
        if self.is_leader:
            raise RuntimeError("follow() is for processes other than 0; process 0 schedules and steps")
        return lockstep.follow(self.runner)

    def shutdown(self) -> None:
        """On process 0 of several: releases the followers (their follow() returns)."""
        if self._leader is not None:
            self._leader.stop()
            self._leader = None

    # ------------------------------------------------------------------ requests
    def add_request(self, request_id: str | None, prompt: str | None, params: SamplingParams | None = None, *,
                    prompt_token_ids: list[int] | None = None, arrival_time: float | None = None,
                    priority: int = 0, client: str | None = None, lora_request=None) -> Request:
        """Validates and queues a request. Raises ValueError (nothing queued, nothing allocated) on bad input.
        `lora_request` (a LoRARequest, with enable_lora): the adapter it runs with."""
        if lora_request is not None and self.lora is None:
            raise ValueError(f"lora_request {getattr(lora_request, 'lora_name', lora_request)!r} given, but the "
                             f"engine was started without LoRA: pass enable_lora=True (--enable-lora)")
        params = (params or SamplingParams()).apply_generation_defaults(self.generation_defaults) \
            if self.generation_defaults else (params or SamplingParams())
        params = params.verified(vocab_size=self.model_config.vocab_size, max_logprobs=self.args.max_logprobs,
                                 max_n=self.args.max_n)
        if prompt_token_ids is None:
            if prompt is None:
                raise ValueError("a request needs a prompt or prompt_token_ids")
            if not isinstance(prompt, str):
                raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
            prompt_token_ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        prompt_token_ids = [int(t) for t in prompt_token_ids]
        if params.truncate_prompt_tokens is not None:  # vLLM's: the prompt's last k tokens only
            prompt_token_ids = prompt_token_ids[-params.truncate_prompt_tokens:]
        if not prompt_token_ids:
            raise ValueError("the prompt is empty: it must have at least 1 token")
        n = len(prompt_token_ids)
        if n >= self.max_model_len:  # vLLM's rule: the prompt and at least one output token must fit
            limit = self.model_config.derived_max_model_len  # max_position_embeddings, or what rope_scaling reaches
            how = "longer than" if n > self.max_model_len else "as long as"
            raise ValueError(f"the prompt has {n} tokens, {how} max_model_len={self.max_model_len}, which leaves no "
                             f"room for an output token; shorten it or raise max_model_len (at most the model's "
                             f"{limit})")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is out of range: ids must be in [0, {vocab})")
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        constraint = self.constraints.prepare(params)  # compiles a grammar; raises ValueError for a bad one
        arrival = time.monotonic() if arrival_time is None else arrival_time
        # Ends by length at max_tokens outputs, or when prompt + outputs reach max_model_len.
        room = self.max_model_len - n
        seqs = new_sequences(request_id, prompt_token_ids, params, rng=self._rng, arrival=arrival, priority=priority,
                             client=client, max_output_tokens=room if params.max_tokens is None
                             else min(params.max_tokens, room), constraints=self.constraints, constraint=constraint,
                             forkable=self._leader is None and jax.process_count() == 1)
        req = Request(request_id=request_id, prompt=prompt, prompt_token_ids=prompt_token_ids, params=params,
                      seqs=seqs, arrival_time=arrival, lora_request=lora_request)
        if lora_request is not None:
            if params.prompt_logprobs is not None:
                raise NotImplementedError("prompt_logprobs with a lora_request is not implemented yet")
            self.lora.admit(lora_request, seqs)
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = self._prompt_logprobs(prompt_token_ids, params.prompt_logprobs)
        self.requests[request_id] = req
        for seq in seqs:
            self.scheduler.add(seq)
        return req

    def _prompt_logprobs(self, ids: list[int], k: int) -> list:
        return self.output_processor.prompt_logprobs(ids, k, *self.runner.prompt_logprobs(ids, k))

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        """Ends requests now (finish_reason 'abort') and returns their pages."""
        for rid in [request_ids] if isinstance(request_ids, str) else list(request_ids):
            req = self.requests.pop(rid, None)
            if req is None:
                continue
            for seq in req.seqs:
                if not seq.finished:
                    self.output_processor.finish(seq, "abort")

    def reset_prefix_cache(self) -> int:
        """Drops the names of every free cached page (running sequences' pages keep theirs); returns how many."""
        return self.blocks.reset_prefix_cache()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ------------------------------------------------------------------ the step
    def step(self, on_dispatch: Callable[[], None] | None = None) -> list[RequestOutput]:
        """Runs one scheduler step and returns the outputs of the requests it advanced.

        With async scheduling (the default) the step schedules and dispatches step N+1, then reads step N's tokens
        and returns N's outputs, so the host's bookkeeping runs while the device computes N+1. Rows whose sequence
        ended at step N (a stop token, an abort) are computed once more by N+1 and discarded. `on_dispatch` is called
        once a step is on the device, before any tokens are awaited (a server hands the previous step's outputs to
        its event loop there). A step with constrained rows dispatches its model call first and its sampler once the
        previous step's tokens are read (a late sampler, core/constraints.py). Speculation: engine/spec_step.py."""
        if self.spec is not None and (drained := self.spec.drain(on_dispatch)) is not None:
            return drained  # a row would get proposals: the in-flight step read, nothing new dispatched
        sched = self.scheduler.schedule()
        if sched is not None and sched.lora_loads:  # adapters given a slot: written before any step reads them
            self.lora.load(self.runner, sched.lora_loads, self._fail_lora)
        if self.spec is not None and sched is not None and self._in_flight is None:  # verify: every token known
            if (outputs := self.spec.step(sched, on_dispatch)) is not None:
                return outputs
        prepared = self._prepare(sched) if sched is not None else None
        launched = self._launch(prepared) if prepared is not None else None
        if launched is not None and on_dispatch is not None:
            on_dispatch()
        done, self._in_flight = (self._in_flight, launched) if self.args.async_scheduling else (launched, None)
        late = launched if launched is not None and launched.late is not None else None
        outputs = [] if done is None else self._process(done, late)
        if late is not None:  # its sampler needed the tokens just read
            self._in_flight = self._sample_late(late)
        elif done is None and sched is None and self.scheduler.has_work():
            raise RuntimeError("scheduler made no progress with work queued (a bug: please report)")
        return outputs

    def _prepare(self, out: SchedulerOutput) -> Prepared | None:
        """A scheduled step's numpy inputs (host work only; None when a request's rows failed to build)."""
        now = time.monotonic()
        # A row whose mask needs its unread newest output: the model call now, the sampler after reading it.
        late = self.args.async_scheduling and needs_known_outputs(out)
        try:
            inp = build_step_input(out, page_size=self.blocks.page_size, num_pages=self.blocks.num_pages,
                                   max_pages_per_seq=self.scheduler_config.max_pages_per_seq,
                                   scratch_slot=self.runner.scratch_slot)
            if not late:
                rows = step_rows(out, self._sampling_row)
                mode, tensors, wants_lp = sampler_inputs(out, rows, self.constraints, self.model_config.vocab_size)
        except Exception as e:  # noqa: BLE001 - one request's rows must not end the loop
            self._fail_culprits(out, e)
            return None
        for r in out.rows:
            req = self.requests[r.seq.request_id]
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
        if late:
            mode = tensors = wants_lp = None
        return Prepared(out, inp, late, mode, tensors, wants_lp)

    def _launch(self, p: Prepared) -> InFlight:
        """Puts a prepared step on the device and does the bookkeeping that does not need its tokens: computed
        counts advance, and each sampling row gets a PENDING output (its value arrives in `_process`)."""
        out, inp, late, mode, tensors, wants_lp = p
        self.stats.steps += 1
        self.stats.async_steps += self._in_flight is not None  # dispatched while the step before is unread
        self.stats.preemptions = self.scheduler.num_preemptions
        self.stats.prefix_cache_queries = self.blocks.query_tokens
        self.stats.prefix_cache_hits = self.blocks.hit_tokens
        if out.forks:  # copies started this step: their pages and penalty rows, before the step reads them
            self.runner.fork(out.forks)
        K = out.num_steps
        if K > 1 and (late or mode not in WARMUP_MODES):
            K = 1  # a multi-step program per sampler mode compiles the whole model: only the warmed-up modes get one
        t0 = time.perf_counter()
        if late:  # the sampler follows in _sample_late; several processes replay whole steps, so theirs waits too
            res = ranks = None
            logits = self.runner.forward(inp, out.has_context) if self._leader is None else None
        elif K > 1:
            res, ranks = self.runner.execute_steps(inp, tensors, mode, K), None
            self.stats.multi_steps += 1
        else:
            if self._leader is not None:
                self._leader.send_step(inp, tensors, mode, out.has_context)
            res, ranks = self.runner.execute(inp, out.has_context, tensors, mode)
            if self.spec is not None:  # a draft model's cache follows the target's steps
                self.spec.mirror(out, inp)
        self.stats.host_dispatch_s += time.perf_counter() - t0
        self.stats.mixed_steps += out.kind == "mixed"
        self.stats.prefill_steps += out.kind == "prefill"
        self.stats.decode_steps += out.kind == "decode"
        self.stats.step_rows += len(out.rows)
        if out.kind != "prefill":
            self.stats.max_decode_batch = max(self.stats.max_decode_batch, len(out.rows) - (out.kind == "mixed"))
        samples = []
        pending = [PENDING] * K
        num_outputs = {r.seq.seq_id: len(r.seq.output_token_ids) for r in out.rows} if late else None
        for i, r in enumerate(out.rows):
            seq = r.seq
            seq.num_computed += r.num_new_tokens
            if seq.num_computed <= len(seq.prompt_token_ids):
                self.stats.prompt_tokens += r.num_new_tokens
            if r.samples:  # every row of a multi-step dispatch: it decodes
                samples.append((out.row_index(i), seq, len(seq.output_token_ids)))
                seq.output_token_ids.extend(pending)
                seq.num_pending += K
                seq.num_computed += K - 1  # steps 1..K-1 compute the tokens steps 0..K-2 drew
        return InFlight(res, ranks, wants_lp, samples, K, late=(out, inp, logits, num_outputs) if late else None,
                        out=out)

    def _sampling_row(self, r, num_outputs: int | None = None):
        return sampling_row(r, self.eos_token_ids, num_outputs)

    def _sample_late(self, step: InFlight) -> InFlight:
        """Dispatches a late step's sampler, now that the outputs its rows' masks need are known."""
        out, inp, logits, num_outputs = step.late
        self.stats.late_samplers += 1
        t0 = time.perf_counter()
        masks, self._masks = self._masks, None
        try:
            rows = step_rows(out, lambda r: self._sampling_row(r, num_outputs.get(r.seq.seq_id)))
            mode, tensors, wants_lp = sampler_inputs(out, rows, self.constraints, self.model_config.vocab_size,
                                                     None if masks is None else masks.result())
        except Exception as e:  # noqa: BLE001 - the model call is on the device: fail the constrained rows'
            for r in out.rows:     # requests (where the new work is) and sample the step without their masks
                if r.seq.constraint is not None:
                    r.seq.constraint = None
                    self.fail_request(r.seq.request_id, e)
            rows = step_rows(out, lambda r: self._sampling_row(r, num_outputs.get(r.seq.seq_id)))
            mode, tensors, wants_lp = sampler_inputs(out, rows, self.constraints, self.model_config.vocab_size)
        if logits is None:
            self._leader.send_step(inp, tensors, mode, out.has_context)
            res, ranks = self.runner.execute(inp, out.has_context, tensors, mode)
        else:
            res, ranks = self.runner.sample(logits, inp, tensors, mode)
        self.stats.late_sampler_s += time.perf_counter() - t0
        return dataclasses.replace(step, result=res, ranks=ranks, wants_lp=wants_lp, late=None)

    def _process(self, step: InFlight, late: InFlight | None = None) -> list[RequestOutput]:
        """Reads a dispatched step's tokens (the only device sync), fills in its PENDING outputs, detokenizes, checks
        stops and lengths, and frees the pages of sequences that ended. With `late` (a step whose sampler waits for
        these tokens), its masks are started as soon as the tokens are read (Constraints.bitmask_async)."""
        res = step.result
        t0 = time.perf_counter()
        ids = to_host(res.token_ids).reshape(step.num_steps, -1)  # [K, B]: [B] tokens a step
        t1 = time.perf_counter()
        self.stats.host_wait_s += t1 - t0
        B = ids.shape[1]
        by_row = ids.T.tolist()  # row b's K tokens, as Python ints in one pass
        self.constraints.advance(step.samples, by_row, lambda seq, e: self.fail_request(seq.request_id, e))
        if late is not None:
            self._masks = self.constraints.bitmask_async(row_constraints(late.late[0]))
        if step.wants_lp:
            lps, ranks = to_host(res.logprobs).reshape(-1), to_host(step.ranks)
            top_ids, top_lps = to_host(res.top_ids), to_host(res.top_logprobs)
        touched: dict[str, Request] = {}
        for b, seq, index in step.samples:
            if seq.finished:
                continue  # ended (stop, abort, error) after this step was dispatched: its tokens are discarded
            try:
                if step.wants_lp or self._needs_text(seq):
                    for k, token in enumerate(by_row[b]):
                        if seq.finished:
                            break
                        seq.output_token_ids[index + k] = token
                        seq.num_pending -= 1
                        i = k * B + b
                        lp = (float(lps[i]), int(ranks[i]), top_ids[i], top_lps[i]) if step.wants_lp else None
                        self.output_processor.append_token(seq, token, index + k, lp,
                                                          text=self._needs_text(seq))
                else:
                    self.output_processor.append_tokens(seq, by_row[b], index)
            except Exception as e:  # noqa: BLE001 - finishing one request's row must not end the loop
                touched.pop(seq.request_id, None)
                self.fail_request(seq.request_id, e)
                continue
            touched[seq.request_id] = self.requests[seq.request_id]
        outputs = self._outputs(touched.values())
        self.stats.host_process_s += time.perf_counter() - t1
        return outputs

    def _needs_text(self, seq: Sequence) -> bool:
        """Its text is needed as it grows (stop strings, streaming), so tokens go one by one through the
        detokenizer; offline without stop strings decodes once at the end instead."""
        p = seq.params
        return p.detokenize and (bool(p.stop) or not self.final_only)

    def _outputs(self, reqs: Iterable[Request]) -> list[RequestOutput]:
        outs = []
        for req in reqs:
            finished = req.finished
            if finished:
                req.finished_time = time.monotonic()
                self.requests.pop(req.request_id, None)
            elif self.final_only:
                continue
            outs.append(req if self.raw_outputs else self.request_output(req))
        return outs

    def request_output(self, req: Request) -> RequestOutput:
        return request_output(req)
