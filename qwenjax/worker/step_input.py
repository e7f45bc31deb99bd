"""SchedulerOutput -> StepInput: the padded, fixed-shape numpy arrays one jitted step consumes (see the layouts in
layers/attention.py: [B, Q] rows, a mixed step's decode + prefill segments, a packed prefill step)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from qwenjax.compat import register_dataclass
from qwenjax.core.scheduler_output import SchedulerOutput
from qwenjax.layers.attention_metadata import AttentionMetadata, MixedMetadata, PackedMetadata
from qwenjax.scheduler_config import packed_len


@register_dataclass
@dataclasses.dataclass(frozen=True)
class StepInput:
    input_ids: jax.Array      # [B, Q] int32 new tokens of each row, padded with 0; a mixed step: [D + B * Q] flat;
                              # a packed step: [T] flat (rows at their row_starts)
    meta: AttentionMetadata | MixedMetadata | PackedMetadata  # positions / slots / block tables / lengths
    logits_index: jax.Array   # [R] int32 flat index (into the step's T tokens) of each row's last new token
    slots: jax.Array          # [R] int32 row of the penalty state; padding rows use the scratch row
    prompt_lens: jax.Array    # [R] int32 prompt length: new tokens at positions >= it are outputs (recompute)
    reset: jax.Array          # [R] bool rebuild the row's penalty state: clear it, then add `history`
    history: jax.Array        # [B, L] int32 tokens at positions [0, start) of a prefill row that starts after 0 in a
                              # slot it just got (a prefix-cache hit), -1 elsewhere; L = 0 in steps without context
    lora_ids: jax.Array       # [T] int32 LoRA slot of each of the step's tokens (input_ids flattened); 0: no adapter
# R = B rows, D + B in a mixed step (decode rows first), or a packed step's R. Per-row arrays follow the sampler's
# row order.


class _Segment:
    """numpy arrays of one segment of B rows x Q new tokens, filled row by row."""

    def __init__(self, B: int, Q: int, *, page_size: int, num_pages: int, width: int, slot_base: int):
        self.Q, self.page_size = Q, page_size
        self.ids = np.zeros((B, Q), np.int32)
        self.lora = np.zeros((B, Q), np.int32)
        self.pos = np.zeros((B, Q), np.int32)
        # Padding slots are out of range (their writes are dropped) and distinct, so the scatter's indices stay unique.
        self.slots = (num_pages * page_size + slot_base + np.arange(B * Q, dtype=np.int32)).reshape(B, Q)
        self.tables = np.zeros((B, width), np.int32)
        self.seq_lens = np.zeros((B,), np.int32)
        self.q_lens = np.zeros((B,), np.int32)

    def fill(self, b: int, seq, n: int) -> None:
        start, table, ps = seq.num_computed, seq.block_table, self.page_size
        if self.Q == 1:  # decode, the hot path: plain Python per row, no per-row numpy calls
            self.ids[b, 0] = seq.token_at(start)
            self.pos[b, 0] = start
            self.slots[b, 0] = table[start // ps] * ps + start % ps
        else:
            self.ids[b, :n] = seq.tokens(start, start + n)
            p = np.arange(start, start + n, dtype=np.int32)
            self.pos[b, :n] = p
            self.slots[b, :n] = np.asarray(table, np.int32)[p // ps] * ps + p % ps
        self.tables[b, :len(table)] = table
        if seq.lora_slot:
            self.lora[b, :n] = seq.lora_slot
        self.seq_lens[b] = start + n
        self.q_lens[b] = n

    def meta(self) -> AttentionMetadata:
        return AttentionMetadata(positions=self.pos, slot_mapping=self.slots, block_tables=self.tables,
                                 seq_lens=self.seq_lens, query_lens=self.q_lens)


def _packed_input(out: SchedulerOutput, *, page_size: int, num_pages: int, max_pages_per_seq: int,
                  scratch_slot: int) -> StepInput:
    """A packed prefill step: the rows' tokens back to back on T slots, each row starting at a multiple of
    PACKED_ROW_ALIGN; every row starts at position 0."""
    R, T = out.bucket
    ps = page_size
    ids = np.zeros((T,), np.int32)
    lora = np.zeros((T,), np.int32)
    pos = np.zeros((T,), np.int32)
    slots = num_pages * ps + np.arange(T, dtype=np.int32)  # padding: out of range (dropped) and distinct
    tables = np.zeros((R, max_pages_per_seq), np.int32)
    seq_lens = np.zeros((R,), np.int32)
    q_lens = np.zeros((R,), np.int32)
    starts = np.full((R,), T, np.int32)  # padding rows start at the end: row_starts stays nondecreasing
    last = np.zeros((R,), np.int32)
    slot_rows = np.full((R,), scratch_slot, np.int32)
    prompt_lens = np.zeros((R,), np.int32)
    o = 0
    for r, row in enumerate(out.rows):
        seq, n = row.seq, row.num_new_tokens
        table = np.asarray(seq.block_table, np.int32)
        p = np.arange(n, dtype=np.int32)
        ids[o:o + n] = seq.tokens(0, n)
        lora[o:o + n] = seq.lora_slot
        pos[o:o + n] = p
        slots[o:o + n] = table[p // ps] * ps + p % ps
        tables[r, :len(table)] = table
        seq_lens[r] = q_lens[r] = n
        starts[r] = o
        last[r] = o + n - 1
        slot_rows[r] = seq.slot
        prompt_lens[r] = len(seq.prompt_token_ids)
        o += packed_len(n)
    meta = PackedMetadata(positions=pos, slot_mapping=slots, block_tables=tables, seq_lens=seq_lens,
                          query_lens=q_lens, row_starts=starts)
    return StepInput(input_ids=ids, meta=meta, logits_index=last, slots=slot_rows, prompt_lens=prompt_lens,
                     reset=q_lens > 0, history=np.zeros((R, 0), np.int32), lora_ids=lora)


def build_step_input(out: SchedulerOutput, *, page_size: int, num_pages: int, max_pages_per_seq: int,
                     scratch_slot: int) -> StepInput:
    if out.packed:
        return _packed_input(out, page_size=page_size, num_pages=num_pages, max_pages_per_seq=max_pages_per_seq,
                             scratch_slot=scratch_slot)
    B, Q = out.bucket
    D = out.decode_bucket
    geo = dict(page_size=page_size, num_pages=num_pages, width=max_pages_per_seq)
    dec = _Segment(D, 1, slot_base=0, **geo) if D else None
    seg = _Segment(B, Q, slot_base=D, **geo)
    R = D + B
    last = np.zeros((R,), np.int32)
    slot_rows = np.full((R,), scratch_slot, np.int32)
    prompt_lens = np.zeros((R,), np.int32)
    reset = np.zeros((R,), np.bool_)
    # Only steps with context have rows that start after position 0; the width is static per such bucket.
    history = np.full((B, max_pages_per_seq * page_size if out.has_context else 0), -1, np.int32)
    for i, row in enumerate(out.rows):
        seq, n, start = row.seq, row.num_new_tokens, row.seq.num_computed
        r = out.row_index(i)
        if r < D:
            dec.fill(r, seq, n)
            last[r] = r
        else:
            b = r - D
            seg.fill(b, seq, n)
            last[r] = D + b * Q + n - 1
            if start == seq.num_cached_tokens > 0:  # admitted now with its first `start` tokens found cached
                history[b, :start] = seq.tokens(0, start)
        slot_rows[r] = seq.slot
        prompt_lens[r] = len(seq.prompt_token_ids)
        if start == 0 or (r >= D and Q > 1 and start == seq.num_cached_tokens):
            reset[r] = True
    if dec is None:
        ids, meta, lora = seg.ids, seg.meta(), seg.lora.reshape(-1)
    else:
        ids, meta = np.concatenate([dec.ids.reshape(-1), seg.ids.reshape(-1)]), MixedMetadata(dec.meta(), seg.meta())
        lora = np.concatenate([dec.lora.reshape(-1), seg.lora.reshape(-1)])
    return StepInput(input_ids=ids, meta=meta, logits_index=last, slots=slot_rows, prompt_lens=prompt_lens,
                     reset=reset, history=history, lora_ids=lora)
