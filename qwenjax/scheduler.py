"""Continuous batching on the host: which sequences run in the next step, and how many new tokens each brings.

A step is either a prefill step (rows bring Q > 1 new tokens: prompts, chunks of long prompts, recomputes after
preemption) or a decode step (every running sequence brings its one newest token). Prefill goes first, as in vLLM
without chunked prefill, so new requests join the running batch between decode steps.

Invariants:
- a sequence is in exactly one of `waiting`, `running`, or neither (finished / aborted);
- every running sequence holds pages for all its computed tokens; waiting sequences hold none;
- a decode step includes every running sequence whose only uncomputed token is its newest one.
"""

from __future__ import annotations

import dataclasses
from collections import deque

from qwenjax.block_manager import BlockManager
from qwenjax.config import SchedulerConfig
from qwenjax.sequence import Sequence, SeqStatus


@dataclasses.dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int      # tokens [seq.num_computed, seq.num_computed + num_new_tokens) run this step
    samples: bool            # the step reaches the end of the sequence, so its last logits are sampled


@dataclasses.dataclass
class SchedulerOutput:
    kind: str                          # "prefill" | "decode"
    rows: list[ScheduledSeq]
    has_context: bool                  # some prefill row starts after position 0 (reads cached pages)
    bucket: tuple[int, int]            # (B, Q) static step shape
    preempted: list[Sequence] = dataclasses.field(default_factory=list)


class FCFSPolicy:
    """First come, first served; the newest running sequence is preempted first."""

    def admit_order(self, waiting: deque[Sequence]) -> list[Sequence]:
        return list(waiting)

    def victim(self, running: list[Sequence]) -> Sequence:
        return max(running, key=lambda s: (s.arrival_time, s.seq_id))


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager, policy=None):
        self.config = config
        self.blocks = blocks
        self.policy = policy or FCFSPolicy()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # Each running sequence owns one row of the device-side penalty state; at most max_num_seqs run at once.
        self._free_slots = list(range(config.max_num_seqs - 1, -1, -1))

    # ---- membership
    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Takes a sequence out of the queues (finished or aborted) and returns its pages."""
        if seq in self.running:
            self.running.remove(seq)
            self._free_slots.append(seq.slot)
            seq.slot = None
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq.block_table)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- scheduling
    def schedule(self) -> SchedulerOutput | None:
        out = self._schedule_prefill()
        if out is None:
            out = self._schedule_decode()
        return out

    def _prefill_bucket(self, rows: int, longest: int) -> tuple[int, int] | None:
        for b, q in self.config.prefill_buckets:  # sorted by (Q, B): the smallest shape that fits
            if q >= longest and b >= rows:
                return b, q
        return None

    def _schedule_prefill(self) -> SchedulerOutput | None:
        chunk = self.config.max_prefill_chunk
        # A partly prefilled sequence (long prompt, or recompute) continues alone: its rows read cached pages.
        for seq in self.running:
            if seq.num_uncomputed > 1:
                n = min(seq.num_uncomputed, chunk)
                if not self._make_room(seq, seq.num_computed + n, []):
                    return None
                row = ScheduledSeq(seq, n, samples=seq.num_computed + n == seq.num_tokens)
                return SchedulerOutput("prefill", [row], True, self._prefill_bucket(1, n))
        rows: list[ScheduledSeq] = []
        budget = self.config.max_num_batched_tokens
        for seq in self.policy.admit_order(self.waiting):
            if len(self.running) + len(rows) >= self.config.max_num_seqs:
                break
            n = min(seq.num_uncomputed, chunk)
            longest = max([r.num_new_tokens for r in rows] + [n])
            bucket = self._prefill_bucket(len(rows) + 1, longest)
            if bucket is None or (rows and (len(rows) + 1) * longest > budget):
                break
            if not self.blocks.can_admit(self.blocks.pages_needed(seq.block_table, n)):
                break
            self.blocks.grow(seq.block_table, n)
            rows.append(ScheduledSeq(seq, n, samples=n == seq.num_tokens))
        if not rows:
            return None
        for r in rows:
            self.waiting.remove(r.seq)
            r.seq.status = SeqStatus.RUNNING
            r.seq.slot = self._free_slots.pop()
            self.running.append(r.seq)
        longest = max(r.num_new_tokens for r in rows)
        return SchedulerOutput("prefill", rows, False, self._prefill_bucket(len(rows), longest))

    def _schedule_decode(self) -> SchedulerOutput | None:
        preempted: list[Sequence] = []
        rows: list[ScheduledSeq] = []
        for seq in sorted(self.running, key=lambda s: (s.arrival_time, s.seq_id)):
            if seq.status is SeqStatus.RUNNING and self._make_room(seq, seq.num_tokens, preempted):
                rows.append(ScheduledSeq(seq, 1, samples=True))
        rows = [r for r in rows if r.seq.status is SeqStatus.RUNNING]  # a policy may evict an earlier row
        if not rows:
            return None
        b = next(b for b in self.config.decode_buckets if b >= len(rows))
        return SchedulerOutput("decode", rows, False, (b, 1), preempted)

    def _make_room(self, seq: Sequence, num_tokens: int, preempted: list[Sequence]) -> bool:
        """Grows `seq` to `num_tokens` slots, preempting the policy's victims; False if `seq` itself was preempted.

        Cannot loop forever: each round frees a sequence, and one sequence alone always fits (checked at start-up).
        """
        while not self.blocks.grow(seq.block_table, num_tokens):
            others = [s for s in self.running if s is not seq]
            victim = self.policy.victim(others) if others else seq
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Preemption by recompute: drop the pages; the whole sequence is prefilled again later."""
        self.running.remove(seq)
        self._free_slots.append(seq.slot)
        seq.slot = None
        self.blocks.release(seq.block_table)
        seq.num_computed = 0
        seq.num_preemptions += 1
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
