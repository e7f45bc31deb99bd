"""A packed prefill step's rows split between the two GPU prefill kernels: rows of more than HOPPER_MIN_ROW tokens
attend with the Hopper kernel on an aligned copy of their q, the other rows with the Triton ragged kernel in place.
Opt-in (QWENJAX_PREFILL_KERNEL=routed, attention_kernels.packed_kernels): on an H100 at 411731a the copies, the merge
and the two kernels' launches over every slot cost more than the faster kernel saved on bursts (8 x 2,048: 1,035 us a
layer against the Triton kernel's 955; 32 x 256, no long row: 381 against 215), though a step of one long row gained
(8k: 1,148 against 1,455 us); benchmarks/NOTES.md entry 45.

Why a copy and not a layout change. The Hopper kernel (pallas_kernels/paged_prefill_hopper.py) needs every row to
start at a multiple of its program tile, HOPPER_TILE = 128 tokens (a program's two warpgroups share one row's K/V
stream); the packed layout starts rows at PACKED_ROW_ALIGN = 16 so that a burst of short prompts wastes few slots.
Laying rows out at 128 in the step's token buffer would cost up to 112 padding slots a row in every projection and
MLP (about 21 us a slot for the 7B on an H100: a 600-token row's attention gains ~0.13 ms from the faster kernel, its
~56 average padding slots cost ~1.2 ms), change the scheduler's budgeting and the buckets' row counts, and could not
depend on the platform without the scheduler knowing the kernel. The copy costs two gathers of [T, N, H] a layer
(q in, the output back: ~4 x 7 KB a token for the 7B, ~0.3 us a token over 28 layers at 2.6 TB/s, less where XLA
fuses the q gather into RoPE), which the long rows' attention repays from a few hundred tokens on; the layout, the
scheduler and every other backend stay exactly as they were.

Shapes are fixed per bucket: the aligned buffer has `aligned_slots(T)` slots, the packed step's T rounded up to the
tile plus one spare tile per SLACK_TOKENS slots. Long rows take their aligned place in row order while they fit
(`route_rows`); a row that does not fit, and every row of HOPPER_MIN_ROW tokens or fewer, takes the Triton kernel.
Rows of SLACK_TOKENS tokens or more always fit (each needs at most one spare tile). Buckets of HOPPER_MIN_ROW slots
or fewer hold no long row: they run the Triton kernel alone (`aligned_slots` 0), as before.

Axis letters: T packed slots, A aligned slots, R rows, N q heads, K kv heads, H head dim.
"""

from __future__ import annotations

import jax.numpy as jnp

from qwenjax.scheduler_config import LONG_PREFILL_ROW

HOPPER_TILE = 128  # the Hopper kernel's program tile: 2 * HopperPrefillConfig.block_q
# Rows of more than this many tokens take the Hopper kernel: the threshold a lone fresh row crosses to take the
# rectangular (Hopper) path (scheduler_config.LONG_PREFILL_ROW), so one rule holds for lone rows and packed ones.
HOPPER_MIN_ROW = LONG_PREFILL_ROW
SLACK_TOKENS = 2048  # one spare tile in the aligned buffer per this many packed slots


def aligned_slots(tokens: int) -> int:
    """A, the aligned buffer's slots for a packed step of `tokens` slots; 0 when no row of more than HOPPER_MIN_ROW
    tokens fits in the step (the Triton kernel alone)."""
    if tokens <= HOPPER_MIN_ROW:
        return 0
    return (-(-tokens // HOPPER_TILE) + max(1, tokens // SLACK_TOKENS)) * HOPPER_TILE


def route_rows(query_lens, aligned: int):
    """([R] bool: the row takes the Hopper kernel, [R] int32: its first slot in the aligned buffer).

    Long rows are laid in row order, each at a multiple of HOPPER_TILE taking its length rounded up to the tile;
    a long row whose end would pass `aligned` takes the Triton kernel (and so does every long row after it: their
    starts only grow). Aligned starts are nondecreasing over all rows (a row not laid out takes no slots)."""
    eligible = query_lens > HOPPER_MIN_ROW
    foot = jnp.where(eligible, -(-query_lens // HOPPER_TILE) * HOPPER_TILE, 0)
    end = jnp.cumsum(foot, dtype=jnp.int32)
    return eligible & (end <= aligned), (end - foot).astype(jnp.int32)


def slot_maps(query_lens, row_starts, hopper, starts, *, tokens: int, aligned: int):
    """([T] aligned slot of each packed slot that holds a Hopper row's token, `aligned` elsewhere;
    [A] packed slot each aligned slot copies, `tokens` (a zero row) elsewhere). row_starts nondecreasing, as the
    packed layout keeps them (padding rows start at T)."""
    t = jnp.arange(tokens, dtype=jnp.int32)
    R = row_starts.shape[0]
    row = jnp.clip(jnp.searchsorted(row_starts, t, side="right").astype(jnp.int32) - 1, 0, R - 1)
    offset = t - row_starts[row]
    mine = hopper[row] & (offset >= 0) & (offset < query_lens[row])
    to_aligned = jnp.where(mine, starts[row] + offset, aligned)
    from_packed = jnp.full((aligned,), tokens, jnp.int32).at[to_aligned].set(t, mode="drop")
    return to_aligned, from_packed


def routed_ragged_attention(q, k_pages, v_pages, scales, block_tables, seq_lens, query_lens, row_starts, *,
                            hopper_fn, triton_fn, aligned: int):
    """A packed step's attention, q [T, N, H], its rows split between `hopper_fn` (long rows, on the aligned copy)
    and `triton_fn` (the others, in place); -> [T, N, H], 0 at slots of no row.

    Both kernels take (q, k_pages, v_pages, scales, block_tables, seq_lens, query_lens, row_starts) in the packed
    layout (pallas_kernels/paged_prefill.py), each seeing the other's rows as padding rows (lengths 0)."""
    T = q.shape[0]
    hopper, starts = route_rows(query_lens, aligned)
    to_aligned, from_packed = slot_maps(query_lens, row_starts, hopper, starts, tokens=T, aligned=aligned)
    q_aligned = q.at[from_packed].get(mode="fill", fill_value=0)  # slots of no long row: zeros
    out_aligned = hopper_fn(q_aligned, k_pages, v_pages, scales, block_tables, jnp.where(hopper, seq_lens, 0),
                            jnp.where(hopper, query_lens, 0), starts)
    out = triton_fn(q, k_pages, v_pages, scales, block_tables, jnp.where(hopper, 0, seq_lens),
                    jnp.where(hopper, 0, query_lens), row_starts)
    back = out_aligned.at[to_aligned].get(mode="fill", fill_value=0)
    return jnp.where((to_aligned < aligned)[:, None, None], back, out)
