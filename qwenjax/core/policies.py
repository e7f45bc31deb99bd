"""Scheduling policies: which waiting sequence is admitted first, and which running one is preempted.

A policy is one class. The scheduler asks it three things:
- `order(seqs)`: the order in which waiting sequences are admitted and running ones get pages to grow;
- `victim(running)`: the running sequence to preempt (by recompute) when pages run out;
- `on_scheduled(rows)`: told what each step ran (stateful policies such as fair share count usage here).
Most policies only define `key` (smaller runs first) and `victim_key` (the largest is preempted first).

Plain Python; never imports jax.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

from qwenjax.core.sequence import Sequence


class SchedulingPolicy:
    name = ""

    def key(self, seq: Sequence):
        return seq.arrival_time, seq.seq_id

    def victim_key(self, seq: Sequence):
        return self.key(seq)

    def order(self, seqs: Iterable[Sequence]) -> list[Sequence]:
        return sorted(seqs, key=self.key)

    def victim(self, running: list[Sequence]) -> Sequence:
        return max(running, key=self.victim_key)

    def on_scheduled(self, rows) -> None:
        """`rows`: the step's ScheduledSeq list (each has `.seq` and `.num_new_tokens`)."""


class FCFSPolicy(SchedulingPolicy):
    """First come, first served (vLLM's default); the newest running sequence is preempted first.

    Waiting sequences keep queue order: a preempted sequence goes back to the front of the queue.
    """

    name = "fcfs"

    def order(self, seqs: Iterable[Sequence]) -> list[Sequence]:
        return list(seqs)


class PriorityPolicy(SchedulingPolicy):
    """Lower `priority` value first (as vLLM), then arrival; the lowest-priority, newest sequence is preempted."""

    name = "priority"

    def key(self, seq: Sequence):
        return seq.priority, seq.arrival_time, seq.seq_id


class ShortestPromptFirstPolicy(SchedulingPolicy):
    """Shortest prompt first (lowers mean time to first token); the sequence holding the most tokens is preempted,
    which frees the most pages."""

    name = "spf"

    def key(self, seq: Sequence):
        return len(seq.prompt_token_ids), seq.arrival_time, seq.seq_id

    def victim_key(self, seq: Sequence):
        return seq.num_tokens, seq.arrival_time, seq.seq_id


class FairSharePolicy(SchedulingPolicy):
    """Fair share of computed tokens between clients (`Sequence.client`).

    Each client's usage is the tokens its sequences ran (prefill and decode); the client with the least usage goes
    first, and a victim is taken from the client with the most (its newest sequence). A client seen for the first
    time starts at the least usage among the clients already counted, so it gets its share from now on instead of
    starving everyone else until it has caught up with their whole history.
    """

    name = "fair"

    def __init__(self):
        self.usage: dict[str, int] = defaultdict(int)

    def _usage(self, client: str) -> int:
        if client not in self.usage:
            self.usage[client] = min(self.usage.values(), default=0)
        return self.usage[client]

    def key(self, seq: Sequence):
        return self._usage(seq.client), seq.arrival_time, seq.seq_id

    def victim_key(self, seq: Sequence):
        return self._usage(seq.client), seq.arrival_time, seq.seq_id

    def on_scheduled(self, rows) -> None:
        for r in rows:
            self.usage[r.seq.client] = self._usage(r.seq.client) + r.num_new_tokens


POLICIES: dict[str, type[SchedulingPolicy]] = {
    p.name: p for p in (FCFSPolicy, PriorityPolicy, ShortestPromptFirstPolicy, FairSharePolicy)}


def make_policy(policy: str | SchedulingPolicy | None) -> SchedulingPolicy:
    """A policy instance from its name (see POLICIES), an instance (returned as is), or None (FCFS)."""
    if policy is None:
        return FCFSPolicy()
    if isinstance(policy, str):
        if policy not in POLICIES:
            raise ValueError(f"scheduling_policy must be one of {', '.join(map(repr, POLICIES))}, got {policy!r}")
        return POLICIES[policy]()
    return policy
