"""One simulated engine: the real Scheduler and BlockManager on a clock of its own, stepped one loop iteration at a
time, so that several can run side by side behind a router (qwenjax.sim.cluster) on one trace.

An iteration does the host bookkeeping `LLMEngine.step` does, in the same order, with the device replaced by
`StepTimeModel.time`: schedule(); the step's rows count their new tokens and each row that samples gets an output
token (a fixed id that is never EOS, as with `ignore_eos`); the step ends `model.time(shape)` later. With async
scheduling a step's tokens are handled after the next step has been scheduled: a sequence whose outputs reach its
length limit is then removed from the scheduler (which returns its pages), one schedule() later than without.

Invariants: `clock` is when the replica's last launched step ends (or, idle, when its newest request arrived); its
next schedule() happens at `next_schedule_time()` (schedule_ahead of the step in flight's time before it ends, as
the engine schedules step N + 1 while step N runs); a request routed to it joins its waiting queue before that.
"""

from __future__ import annotations

import math

from qwenjax.core.block_manager import BlockManager
from qwenjax.core.policies import SchedulingPolicy
from qwenjax.core.routing import ReplicaLoad
from qwenjax.core.scheduler import Scheduler
from qwenjax.core.sequence import SeqStatus, Sequence
from qwenjax.sim.step_model import StepTimeModel, step_shape

# The token every sampled row appends: an ordinary id (not an EOS or special token of Qwen2).
SAMPLED_TOKEN = 100


class Replica:
    def __init__(self, index: int, model: StepTimeModel, config, policy: SchedulingPolicy, records: list, *,
                 on_step=None):
        """`config`: a SimConfig; `records`: the trace's RequestRecords (shared by all replicas, indexed by seq_id);
        `on_step(clock, out)`: called with each step's SchedulerOutput when it is scheduled."""
        sc = config.scheduler
        self.index, self.model, self.records, self.on_step = index, model, records, on_step
        self.async_scheduling = config.async_scheduling
        self.blocks = BlockManager(config.num_kv_pages, sc.block_size,
                                   enable_prefix_caching=config.enable_prefix_caching)
        self.sched = Scheduler(sc, self.blocks, policy=policy)
        self.clock = 0.0
        self.in_flight = None  # async: (sampling rows, end, duration) of the step whose tokens are not handled yet
        self.steps = {"prefill": 0, "decode": 0, "mixed": 0}
        self.busy = 0.0
        self.decode_rows = 0
        self.num_routed = 0

    @property
    def active(self) -> bool:
        return self.sched.has_work() or self.in_flight is not None

    def next_schedule_time(self) -> float:
        """When its next schedule() happens (inf when it has nothing to do)."""
        if self.in_flight is not None:
            return self.clock - self.model.schedule_ahead * self.in_flight[2]
        return self.clock if self.sched.has_work() else math.inf

    def add(self, seq: Sequence, arrival: float) -> None:
        if not self.active:
            self.clock = max(self.clock, arrival)  # idle until this arrival
        self.sched.add(seq)
        self.num_routed += 1

    def load(self) -> ReplicaLoad:
        seqs = [*self.sched.waiting, *self.sched.running]
        # tokens still to compute (prompts, recomputes) and to generate
        tokens = sum(s.num_tokens - s.num_computed + s.max_output_tokens - len(s.output_token_ids) for s in seqs)
        return ReplicaLoad(self.index, num_requests=len(seqs), num_tokens=tokens,
                           cached_blocks=lambda hashes: len(self.blocks.lookup(hashes, len(hashes))))

    def iterate(self) -> None:
        """One loop iteration: schedule and launch a step, then handle the step whose tokens are due."""
        out = self.sched.schedule()
        launched = None
        if out is not None:  # LLMEngine._launch's bookkeeping
            if self.on_step is not None:
                self.on_step(self.clock, out)
            dt = self.model.time(step_shape(out))
            sampled = []
            for row in out.rows:
                row.seq.num_computed += row.num_new_tokens
                if row.samples:
                    row.seq.output_token_ids.append(SAMPLED_TOKEN)
                    sampled.append(row.seq)
            self.clock += dt
            self.busy += dt
            self.steps[out.kind] += 1
            if out.kind != "prefill":
                self.decode_rows += len(out.rows) - (out.kind == "mixed")
            launched = (sampled, self.clock, dt)
        if self.async_scheduling:
            done, self.in_flight = self.in_flight, launched
        else:
            done = launched
        if done is not None:  # LLMEngine._process
            sampled, end, _ = done
            for seq in sampled:
                rec = self.records[seq.seq_id]
                rec.token_times.append(end)
                if len(rec.token_times) >= seq.max_output_tokens:
                    self.sched.remove(seq)
                    seq.status = SeqStatus.FINISHED
                    rec.preemptions, rec.cached_tokens = seq.num_preemptions, seq.num_cached_tokens
        elif out is None and self.sched.has_work():
            raise RuntimeError(f"the scheduler made no progress at t={self.clock:.6f}s with {len(self.sched.waiting)} "
                               f"waiting and {len(self.sched.running)} running (too few KV pages for one request?)")

    def check(self) -> None:
        """The block manager's invariants, with every page back in the free pool."""
        self.blocks.check()
        if self.blocks.num_free != self.blocks.num_pages:
            raise AssertionError(f"{self.blocks.num_pages - self.blocks.num_free} KV pages still held after the trace "
                                 f"(replica {self.index})")
