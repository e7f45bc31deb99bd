"""SchedulerOutput -> StepInput: the padded, fixed-shape numpy arrays one jitted step consumes."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from qwenjax.compat import register_dataclass
from qwenjax.layers.attention import AttentionMetadata
from qwenjax.scheduler import SchedulerOutput


@register_dataclass
@dataclasses.dataclass(frozen=True)
class StepInput:
    input_ids: jax.Array      # [B, Q] int32 new tokens of each row, padded with 0
    meta: AttentionMetadata   # positions / slots / block tables / lengths, see AttentionMetadata
    logits_index: jax.Array   # [B] int32 index along Q of each row's last new token (its logits are sampled)
    slots: jax.Array          # [B] int32 row of the penalty state; padding rows use the scratch row R - 1
    prompt_lens: jax.Array    # [B] int32 prompt length: new tokens at positions >= it are outputs (recompute)
    reset: jax.Array          # [B] bool rebuild the row's penalty state: clear it, then add `history`
    history: jax.Array        # [B, L] int32 tokens at positions [0, start) of a row that starts after 0 in a slot it
                              # just got (a prefix-cache hit), -1 elsewhere; L = 0 in steps without context


def build_step_input(out: SchedulerOutput, *, page_size: int, num_pages: int, max_pages_per_seq: int,
                     scratch_slot: int) -> StepInput:
    B, Q = out.bucket
    ids = np.zeros((B, Q), np.int32)
    pos = np.zeros((B, Q), np.int32)
    # Padding slots are out of range (their writes are dropped) and distinct, so the scatter's indices stay unique.
    slots = (num_pages * page_size + np.arange(B * Q, dtype=np.int32)).reshape(B, Q)
    tables = np.zeros((B, max_pages_per_seq), np.int32)
    seq_lens = np.zeros((B,), np.int32)
    q_lens = np.zeros((B,), np.int32)
    last = np.zeros((B,), np.int32)
    slot_rows = np.full((B,), scratch_slot, np.int32)
    prompt_lens = np.zeros((B,), np.int32)
    reset = np.zeros((B,), np.bool_)
    # Only steps with context have rows that start after position 0; the width is static per such bucket.
    history = np.full((B, max_pages_per_seq * page_size if out.has_context else 0), -1, np.int32)
    for b, row in enumerate(out.rows):
        seq, n, start = row.seq, row.num_new_tokens, row.seq.num_computed
        table = seq.block_table
        if Q == 1:  # decode, the hot path: plain Python per row, no per-row numpy calls
            ids[b, 0] = seq.token_at(start)
            pos[b, 0] = start
            slots[b, 0] = table[start // page_size] * page_size + start % page_size
        else:
            ids[b, :n] = seq.tokens(start, start + n)
            p = np.arange(start, start + n, dtype=np.int32)
            pos[b, :n] = p
            slots[b, :n] = np.asarray(table, np.int32)[p // page_size] * page_size + p % page_size
        tables[b, :len(table)] = table
        seq_lens[b] = start + n
        q_lens[b] = n
        last[b] = n - 1
        slot_rows[b] = seq.slot
        prompt_lens[b] = len(seq.prompt_token_ids)
        if start == 0:
            reset[b] = True
        elif start == seq.num_cached_tokens:  # admitted now with its first `start` tokens found in the prefix cache
            reset[b] = True
            history[b, :start] = seq.tokens(0, start)
    meta = AttentionMetadata(positions=pos, slot_mapping=slots, block_tables=tables, seq_lens=seq_lens,
                             query_lens=q_lens)
    return StepInput(input_ids=ids, meta=meta, logits_index=last, slots=slot_rows, prompt_lens=prompt_lens,
                     reset=reset, history=history)
