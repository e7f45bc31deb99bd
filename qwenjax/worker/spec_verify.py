"""The verify step of speculative decoding: one jitted call that scores k + 1 positions a row over the paged cache
and accepts on the device (worker/rejection_sampler.py).

Row b feeds Q = k + 1 tokens: its newest token (position p = num_computed, not yet in the cache) and its n_b <= k
drafts at p+1 .. p+n_b, padded to Q (padding columns: out-of-range slots, dropped). It is a context-prefill row
([B, Q] rows layout, `has_context` True: the rows attend to their cached pages and, causally, to their own new
tokens through the pages written first), so one program per (decode bucket B, Q) serves every mix of proposals:
rows without proposals are rows with n_b = 0, and nothing recompiles as proposals vary.

KV of every fed token is written; the slots of rejected drafts lie past the row's accepted length and are simply
overwritten by later steps (attention never reads past seq_lens). The block table must hold p + 1 + n_b slots.

Penalty state: the newest token is added before sampling (as a decode step does); accepted drafts after acceptance,
rejected ones never. `last_tokens` gets each row's final token (corrected or bonus).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenjax.layers.attention_metadata import AttentionMetadata
from qwenjax.layers.lora import LoRAInputs
from qwenjax.worker import packing, penalty_state
from qwenjax.worker.rejection_sampler import VerifyOutput, rejection_sample_over_mesh
from qwenjax.worker.step_input import StepInput


def build_verify_input(seqs: Sequence, drafts: Sequence[Sequence[int]], *, rows: int, num_positions: int,
                       page_size: int, num_pages: int, max_pages_per_seq: int,
                       scratch_slot: int) -> tuple[StepInput, np.ndarray, np.ndarray]:
    """(StepInput of B = `rows` rows x Q = `num_positions` tokens, drafts [B, Q - 1] i32, num_drafts [B] i32) for
    decoding sequences `seqs` (each with one uncomputed token) and their proposals `drafts` (at most Q - 1 each)."""
    B, Q, ps = rows, num_positions, page_size
    ids = np.zeros((B, Q), np.int32)
    pos = np.zeros((B, Q), np.int32)
    slots = (num_pages * ps + np.arange(B * Q, dtype=np.int32)).reshape(B, Q)  # padding: out of range, distinct
    tables = np.zeros((B, max_pages_per_seq), np.int32)
    seq_lens = np.zeros((B,), np.int32)
    q_lens = np.zeros((B,), np.int32)
    draft_ids = np.zeros((B, Q - 1), np.int32)
    num_drafts = np.zeros((B,), np.int32)
    slot_rows = np.full((B,), scratch_slot, np.int32)
    prompt_lens = np.zeros((B,), np.int32)
    lora = np.zeros((B, Q), np.int32)  # each token's LoRA slot (0: none)
    for b, (seq, d) in enumerate(zip(seqs, drafts)):
        n, start = len(d), seq.num_computed
        if n > Q - 1:
            raise ValueError(f"row {b} has {n} drafts; the verify step takes at most {Q - 1}")
        table = np.asarray(seq.block_table, np.int32)
        p = np.arange(start, start + 1 + n, dtype=np.int32)
        ids[b, 0] = seq.token_at(start)
        ids[b, 1:1 + n] = d
        pos[b, :1 + n] = p
        slots[b, :1 + n] = table[p // ps] * ps + p % ps
        tables[b, :len(table)] = table
        seq_lens[b] = start + 1 + n
        q_lens[b] = 1 + n
        draft_ids[b, :n] = d
        num_drafts[b] = n
        slot_rows[b] = seq.slot
        prompt_lens[b] = len(seq.prompt_token_ids)
        lora[b, :1 + n] = seq.lora_slot
    meta = AttentionMetadata(positions=pos, slot_mapping=slots, block_tables=tables, seq_lens=seq_lens,
                             query_lens=q_lens)
    inp = StepInput(input_ids=ids, meta=meta, logits_index=np.arange(B, dtype=np.int32) * Q, slots=slot_rows,
                    prompt_lens=prompt_lens, reset=np.zeros((B,), np.bool_), history=np.zeros((B, 0), np.int32),
                    lora_ids=lora.reshape(-1))
    return inp, draft_ids, num_drafts


def verify(graphdef, param_tree, mesh, param_leaves, kv_cache, penalties, last_tokens, i_buf, f_buf,
           lora_stacks=None, *, layout, mode):
    """The device half (ModelRunner.verify): (kv_cache, penalties, last_tokens, VerifyOutput). The acceptance runs on
    each device's vocabulary columns over `mesh` (rejection_sampler.rejection_sample_over_mesh)."""
    inp, tensors, drafts, num_drafts = packing.unpack(i_buf, f_buf, layout)
    meta: AttentionMetadata = inp.meta
    B, Q = inp.input_ids.shape
    ids = jnp.where(inp.input_ids < 0, last_tokens[inp.slots][:, None], inp.input_ids)  # a PENDING newest token
    model = nnx.merge(graphdef, jax.tree.unflatten(param_tree, param_leaves))
    lora = None if lora_stacks is None else LoRAInputs.build(lora_stacks, inp.lora_ids.reshape(-1))
    hidden, kv_cache = model(ids, meta, kv_cache, has_context=True, lora=lora)
    logits = model.logits(hidden.reshape(B * Q, hidden.shape[-1]))  # [B * Q, V]: every position is scored
    none = jnp.zeros((B, 0), jnp.int32)
    live = jnp.minimum(meta.query_lens, 1)
    penalties = penalty_state.update(penalties, ids[:, :1], meta.positions[:, :1], live, inp.prompt_lens, inp.slots,
                                     inp.reset, none)
    history = penalty_state.history_of(penalties, inp.slots) if mode.penalties else None
    out: VerifyOutput = rejection_sample_over_mesh(mesh, logits.reshape(B, Q, -1), tensors, mode, drafts, num_drafts,
                                                   history)
    penalties = penalty_state.update(penalties, ids[:, 1:], meta.positions[:, 1:], out.num_accepted, inp.prompt_lens,
                                     inp.slots, inp.reset, none)
    final = jnp.take_along_axis(out.token_ids, out.num_accepted[:, None], axis=1)[:, 0]
    last_tokens = last_tokens.at[inp.slots].set(final)
    return kv_cache, penalties, last_tokens, out
