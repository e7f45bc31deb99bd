"""The simulator: the engine's real Scheduler and BlockManager, a trace's requests, and a step-time model for a clock.

Each simulated step does the host bookkeeping `LLMEngine.step` does, in the same order, with the device replaced by
`StepTimeModel.time`: schedule(); the step's rows count their new tokens and each row that samples gets an output
token (a fixed id that is never EOS, as with `ignore_eos`); the step ends `model.time(shape)` later. With async
scheduling (the engine's default) a step's tokens are handled after the next step has been scheduled, as the engine
reads step N's tokens only once step N + 1 is on the device: a sequence whose outputs reach its length limit is
then removed from the scheduler (which returns its pages), one schedule() later than without. An idle engine jumps
to the next arrival. Nothing is random: a trace, a model, a config and a policy give the same report every time.

Times (the device's timeline): a step runs from the end of the previous one, and its tokens are known when it ends.
A request joins the waiting queue before the first schedule() it arrived in time for: with async scheduling the
engine schedules step N + 1 while step N still runs, `model.schedule_ahead` of N's time before N ends (see
step_model); one step at a time, when N ends. TTFT = first token - arrival; TPOT = (last token - first token) /
(output tokens - 1); ITL = gaps between a request's consecutive tokens; output_tok_s = output tokens / (last
finish - first arrival).
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Callable, Iterable

import numpy as np

from qwenjax.config import SchedulerConfig
from qwenjax.core.block_manager import BlockManager
from qwenjax.core.policies import POLICIES, SchedulingPolicy
from qwenjax.core.scheduler import Scheduler
from qwenjax.core.scheduler_output import SchedulerOutput
from qwenjax.core.sequence import SeqStatus, Sequence
from qwenjax.sampling_params import SamplingParams
from qwenjax.sim.step_model import StepTimeModel, step_shape
from qwenjax.sim.traces import NUM_REGULAR_TOKENS, Trace

# The token every sampled row appends: an ordinary id (not an EOS or special token of Qwen2).
SAMPLED_TOKEN = 100


@dataclasses.dataclass(frozen=True)
class SimConfig:
    """The engine's scheduling configuration: what the simulated scheduler and block manager are built from."""

    scheduler: SchedulerConfig
    num_kv_pages: int
    enable_prefix_caching: bool = True
    async_scheduling: bool = True   # EngineArgs.async_scheduling: step N's tokens are handled after N + 1 is scheduled

    def __post_init__(self):
        need = self.scheduler.max_pages_per_seq
        if self.num_kv_pages < need:
            raise ValueError(f"num_kv_pages={self.num_kv_pages} cannot hold one sequence of max_model_len="
                             f"{self.scheduler.max_model_len} tokens ({need} pages of {self.scheduler.block_size}); "
                             f"raise num_kv_pages or lower max_model_len")

    @classmethod
    def build(cls, *, max_model_len: int = 2048, max_num_seqs: int = 128, max_num_batched_tokens: int | None = None,
              block_size: int = 16, num_kv_pages: int | None = None, enable_prefix_caching: bool = True,
              async_scheduling: bool = True, decode_buckets=None, prefill_token_buckets=None,
              enable_chunked_prefill: bool = True) -> "SimConfig":
        """Engine argument names and defaults, resolved as the engine resolves them (model_setup.load_model).
        num_kv_pages None: room for max_num_seqs sequences at max_model_len (no preemption)."""
        sc = SchedulerConfig.build(max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                                   max_num_batched_tokens=max_num_batched_tokens, block_size=block_size,
                                   decode_buckets=decode_buckets, prefill_token_buckets=prefill_token_buckets,
                                   enable_chunked_prefill=enable_chunked_prefill)
        pages = num_kv_pages if num_kv_pages is not None else sc.max_num_seqs * sc.max_pages_per_seq
        return cls(scheduler=sc, num_kv_pages=pages, enable_prefix_caching=enable_prefix_caching,
                   async_scheduling=async_scheduling)

    @classmethod
    def from_engine(cls, engine) -> "SimConfig":
        """The configuration an LLMEngine runs with (its resolved SchedulerConfig and page count)."""
        return cls(scheduler=engine.scheduler_config, num_kv_pages=engine.blocks.num_pages,
                   enable_prefix_caching=engine.blocks.enable_prefix_caching,
                   async_scheduling=engine.args.async_scheduling)

    @classmethod
    def from_dict(cls, d: dict) -> "SimConfig":
        """The inverse of to_dict (e.g. a step-time model's meta["sim_config"]: the engine it was fitted on)."""
        return cls.build(max_model_len=d["max_model_len"], max_num_seqs=d["max_num_seqs"],
                         max_num_batched_tokens=d["max_num_batched_tokens"], block_size=d["block_size"],
                         num_kv_pages=d["num_kv_pages"], enable_prefix_caching=d["enable_prefix_caching"],
                         async_scheduling=d.get("async_scheduling", True), decode_buckets=d["decode_buckets"],
                         prefill_token_buckets=sorted({q for _, q in d["prefill_buckets"]}),
                         enable_chunked_prefill=bool(d.get("mixed_chunks", ())))

    def to_dict(self) -> dict:
        sc = self.scheduler
        return {"max_model_len": sc.max_model_len, "max_num_seqs": sc.max_num_seqs,
                "max_num_batched_tokens": sc.max_num_batched_tokens, "block_size": sc.block_size,
                "decode_buckets": list(sc.decode_buckets), "prefill_buckets": [list(b) for b in sc.prefill_buckets],
                "max_prefill_chunk": sc.max_prefill_chunk, "mixed_chunks": list(sc.mixed_chunks),
                "num_kv_pages": self.num_kv_pages,
                "enable_prefix_caching": self.enable_prefix_caching, "async_scheduling": self.async_scheduling}


@dataclasses.dataclass
class RequestRecord:
    """One request as the simulator saw it. Times are seconds on the trace's clock."""

    index: int
    arrival: float
    prompt_len: int
    output_len: int
    priority: int
    client: str
    token_times: list[float] = dataclasses.field(default_factory=list)
    preemptions: int = 0
    cached_tokens: int = 0  # prompt tokens found in the prefix cache at its (last) admission

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.arrival

    @property
    def tpot(self) -> float | None:
        n = len(self.token_times)
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 else None

    @property
    def finish(self) -> float:
        return self.token_times[-1]

    @property
    def itls(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]


@dataclasses.dataclass(frozen=True)
class SimReport:
    policy: str
    metrics: dict                          # BENCHMARKS.md names: ttft_ms_mean, tpot_ms_mean, output_tok_s, ...
    requests: tuple[RequestRecord, ...]    # in trace order

    def by(self, field: str) -> dict:
        """Mean TTFT / TPOT (ms) and request count per value of a request field ("priority", "client")."""
        groups: dict = {}
        for r in self.requests:
            groups.setdefault(getattr(r, field), []).append(r)
        out = {}
        for key in sorted(groups, key=str):
            rs = groups[key]
            tpots = [r.tpot for r in rs if r.tpot is not None]
            out[key] = {"requests": len(rs), "ttft_ms_mean": statistics.fmean(r.ttft for r in rs) * 1e3,
                        "tpot_ms_mean": statistics.fmean(tpots) * 1e3 if tpots else None,
                        "output_tokens": sum(len(r.token_times) for r in rs)}
        return out

    def to_dict(self) -> dict:
        return {"policy": self.policy, "metrics": dict(self.metrics)}


def simulate(trace: Trace, model: StepTimeModel, config: SimConfig,
             policy: str | type[SchedulingPolicy] = "fcfs", *, vocab_size: int = NUM_REGULAR_TOKENS, check: bool = True,
             on_step: Callable[[float, SchedulerOutput], None] | None = None) -> SimReport:
    """Replays `trace` through a fresh Scheduler and BlockManager under `policy` on a clock driven by `model`.

    `policy`: a registered name (qwenjax.core.policies.POLICIES) or a SchedulingPolicy subclass (a fresh instance per run,
    since policies such as fair share keep state).
    `vocab_size`: prompt ids are drawn below it (Trace.prompt_token_ids), as a replay on an engine draws them.
    `check`: assert the block manager's invariants at the end, with every page back in the free pool.
    `on_step(clock, out)`: called with each step's SchedulerOutput when it is scheduled (before its bookkeeping).
    """
    if isinstance(policy, type) and issubclass(policy, SchedulingPolicy):
        name, policy_obj = policy.name or policy.__name__, policy()
    elif policy in POLICIES:
        name, policy_obj = policy, POLICIES[policy]()
    else:
        raise ValueError(f"policy must be one of {', '.join(map(repr, POLICIES))} or a SchedulingPolicy subclass, "
                         f"got {policy!r}")
    sc = config.scheduler
    for i, r in enumerate(trace):
        if r.prompt_len > sc.max_model_len:
            raise ValueError(f"trace request {i} has a {r.prompt_len}-token prompt, longer than max_model_len="
                             f"{sc.max_model_len} (the engine would refuse it)")
    blocks = BlockManager(config.num_kv_pages, sc.block_size, enable_prefix_caching=config.enable_prefix_caching)
    sched = Scheduler(sc, blocks, policy=policy_obj)
    records = [RequestRecord(index=i, arrival=r.arrival, prompt_len=r.prompt_len, output_len=r.output_len,
                             priority=r.priority, client=r.client) for i, r in enumerate(trace)]
    n, nxt = len(trace), 0
    clock = 0.0
    steps = {"prefill": 0, "decode": 0, "mixed": 0}
    busy = 0.0
    decode_rows = 0
    in_flight = None  # async: (sampling rows, end, duration) of the step whose tokens are not handled yet
    while nxt < n or sched.has_work() or in_flight is not None:
        # Async: this schedule() happens while the step in flight runs, schedule_ahead of its time before it ends.
        cutoff = clock - model.schedule_ahead * in_flight[2] if in_flight is not None else clock
        while nxt < n and trace[nxt].arrival <= cutoff:
            r = trace[nxt]
            # seq_id = trace index: policies break ties on it, so ties resolve the same way in every run.
            seq = Sequence(request_id=str(nxt), index=0, prompt_token_ids=trace.prompt_token_ids(nxt, vocab_size),
                           params=_params(r.output_len), seed=0, arrival_time=r.arrival, priority=r.priority,
                           client=r.client, seq_id=nxt,
                           max_output_tokens=min(r.output_len, sc.max_model_len - r.prompt_len))
            sched.add(seq)
            nxt += 1
        out = sched.schedule()
        launched, dt = None, 0.0
        if out is not None:  # LLMEngine._dispatch's bookkeeping
            if on_step is not None:
                on_step(clock, out)
            dt = model.time(step_shape(out))
            sampled = []
            for row in out.rows:
                row.seq.num_computed += row.num_new_tokens
                if row.samples:
                    row.seq.output_token_ids.append(SAMPLED_TOKEN)
                    sampled.append(row.seq)
            clock += dt
            busy += dt
            steps[out.kind] += 1
            if out.kind != "prefill":
                decode_rows += len(out.rows) - (out.kind == "mixed")
            launched = (sampled, clock, dt)
        if config.async_scheduling:
            done, in_flight = in_flight, launched
        else:
            done = launched
        if done is not None:  # LLMEngine._process
            sampled, end, _ = done
            for seq in sampled:
                rec = records[seq.seq_id]
                rec.token_times.append(end)
                if len(rec.token_times) >= seq.max_output_tokens:
                    sched.remove(seq)
                    seq.status = SeqStatus.FINISHED
                    rec.preemptions, rec.cached_tokens = seq.num_preemptions, seq.num_cached_tokens
        elif out is None:
            if sched.has_work():
                raise RuntimeError(f"the scheduler made no progress at t={clock:.6f}s with {len(sched.waiting)} "
                                   f"waiting and {len(sched.running)} running (too few KV pages for one request?)")
            clock = max(clock, trace[nxt].arrival)  # idle until the next arrival
    if check:
        blocks.check()
        if blocks.num_free != blocks.num_pages:
            raise AssertionError(f"{blocks.num_pages - blocks.num_free} KV pages still held after the trace")
    metrics = _metrics(records, blocks, sched, steps, busy)
    decode_steps = steps["decode"] + steps["mixed"]
    metrics["decode_batch_mean"] = decode_rows / decode_steps if decode_steps else 0.0
    return SimReport(policy=name, metrics=metrics, requests=tuple(records))


def compare_policies(trace: Trace, model: StepTimeModel, config: SimConfig,
                     policies: Iterable[str | type[SchedulingPolicy]] = tuple(POLICIES), **kw) -> dict[str, SimReport]:
    """One simulation per policy on the same trace, model and config, keyed by policy name."""
    reports = [simulate(trace, model, config, p, **kw) for p in policies]
    return {r.policy: r for r in reports}


def _params(output_len: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True, detokenize=False)


def _metrics(records: list[RequestRecord], blocks: BlockManager, sched: Scheduler, steps: dict,
             busy: float) -> dict:
    if not records:
        return {}
    ttft = [r.ttft for r in records]
    tpot = [r.tpot for r in records if r.tpot is not None]
    itl = [x for r in records for x in r.itls]
    out_tokens = sum(len(r.token_times) for r in records)
    start = min(r.arrival for r in records)
    total = max(r.finish for r in records) - start
    m = {"num_requests": len(records), "output_tokens": out_tokens, "total_time_s": total,
         "output_tok_s": out_tokens / total if total > 0 else None,
         "req_s": len(records) / total if total > 0 else None}
    for name, xs in (("ttft", ttft), ("tpot", tpot), ("itl", itl)):
        arr = np.asarray(xs) * 1e3
        m[f"{name}_ms_mean"] = float(arr.mean()) if len(arr) else None
        m[f"{name}_ms_p50"] = float(np.percentile(arr, 50)) if len(arr) else None
        m[f"{name}_ms_p99"] = float(np.percentile(arr, 99)) if len(arr) else None
    m.update({"preemptions": sched.num_preemptions, "prefill_steps": steps["prefill"],
              "decode_steps": steps["decode"], "mixed_steps": steps["mixed"], "busy_s": busy,
              "prefix_cache_queries": blocks.query_tokens, "prefix_cache_hits": blocks.hit_tokens,
              "prefix_cache_hit_rate": blocks.hit_tokens / blocks.query_tokens if blocks.query_tokens else 0.0,
              "kv_pages": blocks.num_pages, "kv_pages_free_at_end": blocks.num_free})
    return m
