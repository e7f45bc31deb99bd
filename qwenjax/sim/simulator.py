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
import math
import statistics
from typing import Callable, Iterable

import numpy as np

from qwenjax.core.policies import POLICIES, SchedulingPolicy
from qwenjax.core.routing import Router, RouteRequest
from qwenjax.core.scheduler_output import SchedulerOutput
from qwenjax.core.sequence import Sequence
from qwenjax.sampling_params import SamplingParams
from qwenjax.scheduler_config import SchedulerConfig
from qwenjax.sim.replica import SAMPLED_TOKEN, Replica  # noqa: F401 - SAMPLED_TOKEN: part of this module's API
from qwenjax.sim.step_model import StepTimeModel
from qwenjax.sim.traces import NUM_REGULAR_TOKENS, Trace


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

    `policy`: a registered name (qwenjax.core.policies.POLICIES) or a SchedulingPolicy subclass (a fresh instance per
    run, since policies such as fair share keep state).
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
    check_trace(trace, config)
    records = new_records(trace)
    replica = Replica(0, model, config, policy_obj, records, on_step=on_step)
    replay(trace, [replica], None, vocab_size=vocab_size)
    if check:
        replica.check()
    return SimReport(policy=name, metrics=report_metrics(records, [replica]), requests=tuple(records))


def check_trace(trace: Trace, config: SimConfig) -> None:
    sc = config.scheduler
    for i, r in enumerate(trace):
        if r.prompt_len > sc.max_model_len:
            raise ValueError(f"trace request {i} has a {r.prompt_len}-token prompt, longer than max_model_len="
                             f"{sc.max_model_len} (the engine would refuse it)")


def replay(trace: Trace, replicas: list[Replica], router: Router | None, *, vocab_size: int = NUM_REGULAR_TOKENS,
           on_route: Callable[[int, int], None] | None = None) -> None:
    """Runs the trace's requests through `replicas` in time order: a request arrives once every replica's next
    schedule() is at or after its arrival (so the router sees each replica as it is then) and goes to the replica
    `router` chooses (the only one when `router` is None); otherwise the replica whose schedule() comes first runs
    one iteration. `on_route(trace index, replica index)` is told each choice."""
    n, nxt = len(trace), 0
    while True:
        first = min(replicas, key=lambda r: r.next_schedule_time())
        t = first.next_schedule_time()
        if nxt < n and trace[nxt].arrival <= t:
            r = trace[nxt]
            # seq_id = trace index: policies break ties on it, so ties resolve the same way in every run.
            seq = Sequence(request_id=str(nxt), index=0, prompt_token_ids=trace.prompt_token_ids(nxt, vocab_size),
                           params=_params(r.output_len), seed=0, arrival_time=r.arrival, priority=r.priority,
                           client=r.client, seq_id=nxt,
                           max_output_tokens=min(r.output_len, replicas[0].sched.config.max_model_len - r.prompt_len))
            target = replicas[0]
            if router is not None:
                req = RouteRequest(r.prompt_len, tuple(replicas[0].blocks.hash_blocks(seq.prompt_token_ids, [])))
                i = router.choose(req, [rep.load() for rep in replicas])
                router.on_routed(req, i)
                target = replicas[i]
                if on_route is not None:
                    on_route(nxt, i)
            target.add(seq, r.arrival)
            nxt += 1
        elif t < math.inf:
            first.iterate()
        else:
            break


def new_records(trace: Trace) -> list[RequestRecord]:
    return [RequestRecord(index=i, arrival=r.arrival, prompt_len=r.prompt_len, output_len=r.output_len,
                          priority=r.priority, client=r.client) for i, r in enumerate(trace)]


def compare_policies(trace: Trace, model: StepTimeModel, config: SimConfig,
                     policies: Iterable[str | type[SchedulingPolicy]] = tuple(POLICIES), **kw) -> dict[str, SimReport]:
    """One simulation per policy on the same trace, model and config, keyed by policy name."""
    reports = [simulate(trace, model, config, p, **kw) for p in policies]
    return {r.policy: r for r in reports}


def _params(output_len: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True, detokenize=False)


def report_metrics(records: list[RequestRecord], replicas: list[Replica]) -> dict:
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
    total_of = lambda f: sum(f(rep) for rep in replicas)  # noqa: E731
    queries, hits = total_of(lambda r: r.blocks.query_tokens), total_of(lambda r: r.blocks.hit_tokens)
    m.update({"preemptions": total_of(lambda r: r.sched.num_preemptions),
              "prefill_steps": total_of(lambda r: r.steps["prefill"]),
              "decode_steps": total_of(lambda r: r.steps["decode"]),
              "mixed_steps": total_of(lambda r: r.steps["mixed"]),
              "busy_s": total_of(lambda r: r.busy), "prefix_cache_queries": queries, "prefix_cache_hits": hits,
              "prefix_cache_hit_rate": hits / queries if queries else 0.0,
              "kv_pages": total_of(lambda r: r.blocks.num_pages),
              "kv_pages_free_at_end": total_of(lambda r: r.blocks.num_free)})
    decode_steps = m["decode_steps"] + m["mixed_steps"]
    m["decode_batch_mean"] = total_of(lambda r: r.decode_rows) / decode_steps if decode_steps else 0.0
    return m
