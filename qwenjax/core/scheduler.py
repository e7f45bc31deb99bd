"""Continuous batching on the host: which sequences run in the next step, and how many new tokens each brings.

A step is a prefill step (rows bring Q > 1 new tokens: prompts, chunks of long prompts, recomputes after
preemption), a decode step (every running sequence brings its one newest token), or, with chunked prefill (on by
default, as in vLLM), a mixed step: a decode step plus one prefill row of at most `mixed_chunks[-1]` tokens.

A prefill step of rows that all start at position 0 is packed: the rows lie back to back on one token axis, each
taking its own length rounded up to PACKED_ROW_ALIGN slots, and rows join while those slots stay within
max_num_batched_tokens (vLLM's budget counts each row's own tokens too). A prefill row that starts after 0 (the
next chunk of a long prompt, a prefix-cache hit) runs alone over its cached pages, and so does a lone fresh chunk of
more than LONG_PREFILL_ROW tokens (one (1, Q) rectangular step: the long-prompt kernel, see scheduler_config).

Which one (chunked prefill on): while sequences are decoding, prefill work that is a single row (the next chunk of
a long prompt or recompute, or the one request that can start now: a new arrival, a prefix-cache hit) joins the
decodes as a mixed step, so the decodes never stall behind it; a burst of requests that can start together (several
admissible at once: a batch's start, many slots freed) runs as a prefill step of many rows, which is the fastest way
through it. With chunked prefill off, prefill goes first, as in vLLM without it, and a long prompt's chunks run alone.

Invariants:
- a sequence is in exactly one of `waiting`, `running`, or neither (finished / aborted);
- every running sequence holds pages for all its computed tokens (a multi-step decode reserves its steps' slots up
  front); waiting sequences hold none;
- a decode step includes every running sequence whose only uncomputed token is its newest one, except those whose
  outputs (pending ones included, see Sequence) already reach their length limit;
- the newest tokens may be placeholders (async scheduling; a multi-step decode's tokens): their values are on the
  device only, and the step that feeds the newest one reads it there. Every token the scheduler hashes (computed and
  known, full pages) is known on the host.
- with prefix caching, a page is named (see block_manager) only once every token in it is computed and known: names are
  given at the start of `schedule()`, after the engine has counted the previous step's tokens, and before a
  sequence's pages are released (finish, abort, preemption), so a recompute after preemption can hit its own pages.

The copies of an n > 1 request (indices 1..n-1) are never prefilled: they wait until the first copy's prompt is
computed, then fork from it (`_fork_waiting`: its prompt pages shared, one page of their own, a decode row at the
prompt's last token), in queue order while slots and pages last; copies that do not fit go behind the requests queued
meanwhile.

A sequence admitted with a prefix hit starts at `num_computed = cached tokens` and reads the cached pages, so it runs
through the context prefill path, which is compiled for one row: such a row runs alone in its prefill step (or as the
prefill row of a mixed step). At least its
last token is always computed (there must be logits to sample), so a hit covers at most (tokens - 1) // page_size
blocks and never a page the new row writes into. Penalties see the whole sequence all the same: the step that admits
a row with a hit rebuilds its device-side penalty history from the skipped tokens (see worker/step_input.py:
StepInput.history).
"""

from __future__ import annotations

from collections import deque

from qwenjax.core.block_manager import BlockManager
from qwenjax.core.copy_forks import CopyForks
from qwenjax.core.lora_slots import LoRASlots
from qwenjax.core.policies import FCFSPolicy, SchedulingPolicy, make_policy  # noqa: F401 (FCFSPolicy re-exported)
from qwenjax.core.scheduler_output import ScheduledSeq, SchedulerOutput
from qwenjax.core.sequence import SeqStatus, Sequence
from qwenjax.scheduler_config import LONG_PREFILL_ROW, SchedulerConfig, packed_len


class Scheduler(CopyForks):
    def __init__(self, config: SchedulerConfig, blocks: BlockManager, policy: str | SchedulingPolicy | None = None,
                 loras: LoRASlots | None = None):
        self.config = config
        self.blocks = blocks
        # Multi-LoRA: a sequence starts only once its adapter holds a device slot (it waits, skipped, meanwhile).
        self.loras = loras
        self.policy = make_policy(policy)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # Each running sequence owns one row of the device-side penalty state; at most max_num_seqs run at once.
        self._free_slots = list(range(config.max_num_seqs - 1, -1, -1))
        self.num_waiting_copies = 0  # copies of n > 1 requests not started yet (0: no step looks for them)

    # ---- membership
    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)
        if seq.copy_pending:
            self.num_waiting_copies += 1

    def remove(self, seq: Sequence) -> None:
        """Takes a sequence out of the queues (finished or aborted) and returns its pages."""
        if seq.copy_pending:  # a copy that never started leaves: it needs no fork
            self._copy_started(seq)
        if seq in self.running:
            self._name_pages(seq)
            self.running.remove(seq)
            self._free_slots.append(seq.slot)
            seq.slot = None
            self._release_lora(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq.block_table)
        seq.num_named_pages = 0

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- scheduling
    def schedule(self) -> SchedulerOutput | None:
        for seq in self.running:  # pages the previous step filled get their names
            self._name_pages(seq)
        forks = self._fork_waiting()
        out = self._schedule_mixed() if self.config.mixed_chunks else None
        if out is None:
            out = self._schedule_prefill()
        if out is None:
            out = self._schedule_decode(self.config.num_scheduler_steps)
        if out is not None:
            self.policy.on_scheduled(out.rows)
            out.forks = forks
            if self.loras is not None:
                out.lora_loads = self.loras.take_loads()
            for r in out.rows:  # a parent whose prompt this step computes pins its pages for its copies
                p = r.seq
                if p.num_unforked and p.fork_pages is None and \
                        p.num_computed + r.num_new_tokens >= len(p.prompt_token_ids) - 1:
                    n = -(-(len(p.prompt_token_ids) - 1) // self.blocks.page_size)
                    p.fork_pages = self.blocks.share(p.block_table[:n])
        return out

    # ---- prefix caching
    def _name_pages(self, seq: Sequence) -> None:
        blocks = self.blocks
        if not blocks.enable_prefix_caching:
            return
        # Computed tokens may still be pending (multi-step: a dispatch's tokens before its last): hash known ones.
        full = min(seq.num_computed, seq.num_tokens - seq.num_pending) // blocks.page_size
        if full <= seq.num_named_pages:
            return
        if len(seq.block_hashes) < full:
            blocks.hash_blocks(seq.tokens(0, full * blocks.page_size), seq.block_hashes, seq.hash_root)
        blocks.commit(seq.block_table, seq.block_hashes, seq.num_named_pages, full)
        seq.num_named_pages = full

    def _prefix_hit(self, seq: Sequence) -> list[int] | None:
        """Cached pages for the leading blocks of a sequence about to start; None where it may not look."""
        blocks = self.blocks
        if not blocks.enable_prefix_caching or seq.num_computed or seq.block_table:
            return None
        max_blocks = (seq.num_tokens - 1) // blocks.page_size  # the last token is always computed
        if len(seq.block_hashes) < max_blocks:
            blocks.hash_blocks(seq.tokens(0, max_blocks * blocks.page_size), seq.block_hashes, seq.hash_root)
        return blocks.lookup(seq.block_hashes, max_blocks)

    def _prefill_bucket(self, rows: int, longest: int) -> tuple[int, int] | None:
        for b, q in self.config.prefill_buckets:  # sorted by (Q, B): the smallest shape that fits
            if q >= longest and b >= rows:
                return b, q
        return None

    def _packed_bucket(self, rows: int, slots: int) -> tuple[int, int] | None:
        for r, t in self.config.packed_buckets:  # sorted by T: the smallest that fits
            if t >= slots and r >= rows:
                return r, t
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
        budget = packed_len(self.config.max_num_batched_tokens)
        slots = 0  # token slots of the packed rows so far
        ps = self.blocks.page_size
        computing: set[int] = set()  # names of the blocks this step's rows compute
        for seq in self.policy.order(self.waiting):
            if len(self.running) + len(rows) >= self.config.max_num_seqs:
                break
            if self._copy_state(seq) is not None:
                continue  # a copy of an n > 1 request: forked from its parent (_fork_waiting), never prefilled
            if not self._lora_ready(seq, rows):
                continue  # its adapter waits for a device slot
            hit = self._prefix_hit(seq)
            pages = hit or []
            if pages and rows:
                continue  # a row reading cached pages runs alone (context prefill is compiled for B = 1)
            if hit is not None and len(seq.block_hashes) > len(pages) and seq.block_hashes[len(pages)] in computing:
                continue  # another row (e.g. a sibling of n > 1) computes its next block now: a hit next step
            cached = len(pages) * ps
            n = min(seq.num_tokens - cached, chunk)
            if rows and (slots + packed_len(n) > budget or self._packed_bucket(len(rows) + 1, slots + packed_len(n))
                         is None):
                break
            need = self.blocks.pages_needed(pages, cached + n) + self.blocks.num_reclaimed(pages)
            if not self.blocks.can_admit(need):
                break
            if hit is not None:
                self.blocks.take(seq.block_table, pages, query_tokens=seq.num_tokens)
                seq.num_computed = seq.num_cached_tokens = cached
                seq.num_named_pages = len(pages)
            self.blocks.grow(seq.block_table, cached + n)
            rows.append(ScheduledSeq(seq, n, samples=cached + n == seq.num_tokens))
            slots += packed_len(n)
            if pages:
                break
            computing.update(seq.block_hashes[:(cached + n) // ps])
        if not rows:
            return None
        for r in rows:
            self._start(r.seq)
        # A prefix hit runs alone over its cached pages; a long fresh chunk alone (nothing else could start with it)
        # takes the same rectangular path, whose kernel is the faster one for a long row (see LONG_PREFILL_ROW).
        if rows[0].seq.num_computed > 0 or (len(rows) == 1 and rows[0].num_new_tokens > LONG_PREFILL_ROW):
            return SchedulerOutput("prefill", rows, True, self._prefill_bucket(1, rows[0].num_new_tokens))
        return SchedulerOutput("prefill", rows, False, self._packed_bucket(len(rows), slots))

    def _schedule_mixed(self) -> SchedulerOutput | None:
        """Decodes plus one prefill row (see the module docstring), or None: no decodes, no single prefill row, or a
        burst of admissible requests (left to a prefill step)."""
        if not any(s.num_uncomputed == 1 and not s.at_length_limit for s in self.running):
            return None
        chunk = self.config.mixed_chunks[-1]
        partial = next((s for s in self.running if s.num_uncomputed > 1), None)
        candidate = None
        if partial is None:
            startable = self.waiting if not self.num_waiting_copies else \
                [s for s in self.waiting if self._copy_state(s) is None]
            free = min(self.config.max_num_seqs - len(self.running), len(startable))
            if free == 0 or free > 1:
                return None  # nothing to start, or a burst: a prefill step of many rows
            candidate = next(iter(self.policy.order(startable)))
        decode = self._schedule_decode()
        if decode is None or decode.preempted:
            return decode  # pages ran short: no prefill joins (the preempted wait at the front of the queue)
        prefill = None
        if partial is not None:
            n = min(partial.num_uncomputed, chunk)
            if self.blocks.grow(partial.block_table, partial.num_computed + n):
                prefill = ScheduledSeq(partial, n, samples=partial.num_computed + n == partial.num_tokens)
        else:
            prefill = self._admit(candidate, chunk)
        if prefill is None:
            return decode
        q = next(q for q in self.config.mixed_chunks if q >= prefill.num_new_tokens)
        # Always the context path (it handles a row starting at 0 too): one compiled program per (D, Q), not two.
        return SchedulerOutput("mixed", decode.rows + [prefill], True, (1, q),
                               decode_bucket=decode.bucket[0], num_decode=len(decode.rows))

    def _admit(self, seq: Sequence, chunk: int) -> ScheduledSeq | None:
        """Starts one waiting sequence with at most `chunk` new tokens (after a prefix hit), or None if its pages do
        not fit now."""
        if not self._lora_ready(seq, []):
            return None
        hit = self._prefix_hit(seq)
        pages = hit or []
        cached = len(pages) * self.blocks.page_size
        n = min(seq.num_tokens - cached, chunk)
        need = self.blocks.pages_needed(pages, cached + n) + self.blocks.num_reclaimed(pages)
        if not self.blocks.can_admit(need):
            return None
        if hit is not None:
            self.blocks.take(seq.block_table, pages, query_tokens=seq.num_tokens)
            seq.num_computed = seq.num_cached_tokens = cached
            seq.num_named_pages = len(pages)
        self.blocks.grow(seq.block_table, cached + n)
        self._start(seq)
        return ScheduledSeq(seq, n, samples=cached + n == seq.num_tokens)

    def _start(self, seq: Sequence) -> None:
        if seq.copy_pending:
            self._copy_started(seq)
        self.waiting.remove(seq)
        seq.status = SeqStatus.RUNNING
        seq.slot = self._free_slots.pop()
        if self.loras is not None:  # checked by _lora_ready (a fork's parent holds its adapter already)
            seq.lora_slot = self.loras.acquire(seq.lora_int_id)
        self.running.append(seq)

    # ---- multi-LoRA
    def _lora_ready(self, seq: Sequence, rows: list[ScheduledSeq]) -> bool:
        """Whether `seq`'s adapter can hold a device slot once `rows` (started this step, not yet acquired) do."""
        if self.loras is None:
            return True
        return self.loras.can_acquire(seq.lora_int_id, {r.seq.lora_int_id for r in rows})

    def _release_lora(self, seq: Sequence) -> None:
        if self.loras is not None:
            self.loras.release(seq.lora_int_id)
            seq.lora_slot = 0

    def _schedule_decode(self, steps: int = 1) -> SchedulerOutput | None:
        """Every decoding sequence feeds its newest token. With `steps` > 1 (multi-step decode, only when no prefill
        work can start: prefill and mixed steps are tried first) the dispatch runs `steps` decode steps back to back
        on the device, each feeding the token the one before sampled, if every row can take them all: room for
        `steps` more outputs under its length limit, no logprobs, min_tokens reached (its banned ids cannot change
        within the dispatch). Otherwise one step. Pages are reserved for all the steps' tokens up front."""
        seqs = [s for s in sorted(self.running, key=self.policy.key)
                # Its pending last token ends it (async scheduling): another step would be wasted; or it is still
                # prefilling (a mixed step's prefill row).
                if not s.at_length_limit and s.num_uncomputed == 1]
        if steps > 1 and not all(_takes_steps(s, steps) for s in seqs):
            steps = 1
        preempted: list[Sequence] = []
        rows: list[ScheduledSeq] = []
        for seq in seqs:
            if seq.status is SeqStatus.RUNNING and self._make_room(seq, seq.num_tokens + steps - 1, preempted):
                rows.append(ScheduledSeq(seq, 1, samples=True))
        rows = [r for r in rows if r.seq.status is SeqStatus.RUNNING]  # a policy may evict an earlier row
        if not rows:
            return None
        b = next(b for b in self.config.decode_buckets if b >= len(rows))
        return SchedulerOutput("decode", rows, False, (b, 1), preempted, num_steps=steps)

    def _make_room(self, seq: Sequence, num_tokens: int, preempted: list[Sequence]) -> bool:
        """Grows `seq` to `num_tokens` slots, preempting the policy's victims; False if `seq` itself was preempted.

        Cannot loop forever: each round frees a sequence, and one sequence alone always fits (checked at start-up).
        """
        while not self.blocks.grow(seq.block_table, num_tokens):
            # The policy's victim among all running sequences, `seq` included: a newer sequence never takes an older
            # one's pages under FCFS.
            victim = self.policy.victim(self.running) if seq in self.running else seq
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Preemption by recompute: drop the pages; the whole sequence is prefilled again later."""
        self._name_pages(seq)
        self.running.remove(seq)
        self._free_slots.append(seq.slot)
        seq.slot = None
        self._release_lora(seq)
        self.blocks.release(seq.block_table)
        seq.num_named_pages = 0
        seq.num_computed = 0
        seq.num_preemptions += 1
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1



def _takes_steps(seq: Sequence, steps: int) -> bool:
    """Whether `seq` can decode `steps` tokens in one dispatch (see Scheduler._schedule_decode)."""
    n = len(seq.output_token_ids)  # pending ones included
    p = seq.params
    return seq.max_output_tokens - n >= steps and p.logprobs is None and n >= p.min_tokens
