"""What a step tells attention: per-row positions, slots, block tables and lengths, in the three layouts the
engine builds (worker/step_input.py): rectangular [B, Q] rows (decode, a context chunk), a mixed step (decode rows
plus one prefill segment), and a packed prefill step (fresh rows back to back on T token slots).

Axis letters: B rows, Q new tokens a row, D decode rows, M pages a row in the block table, P pages, S page size,
R packed rows, T token slots.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qwenjax.compat import register_dataclass


@register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    positions: jax.Array     # [B, Q] int32 absolute position of each new token (padding: 0)
    slot_mapping: jax.Array  # [B, Q] int32 page * S + offset of each new token; padding: P * S (out of range, dropped)
    block_tables: jax.Array  # [B, M] int32 pages of each row, in order; unused entries 0
    seq_lens: jax.Array      # [B] int32 context length after this step (cached + new); padding rows 0
    query_lens: jax.Array    # [B] int32 new tokens in the row; padding rows 0


@register_dataclass
@dataclasses.dataclass(frozen=True)
class MixedMetadata:
    """A mixed step: D decode rows ([D, 1] metadata) and a prefill segment ([B, Q] metadata) in one program.

    The step's tokens are flat, [D + B * Q]: the decode rows' tokens first, then the prefill rows' (row-major,
    padded to Q). Projections and MLPs run once over all of them (one weight read for both kinds of rows); only
    attention treats the segments apart: decode rows through the decode kernel, prefill rows through the prefill
    path (`has_context` says whether they may read cached pages). The segment sizes are static (array shapes).
    """

    decode: AttentionMetadata
    prefill: AttentionMetadata


@register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedMetadata:
    """A packed prefill step: R rows of fresh tokens (each starting at position 0) back to back on one axis of T
    token slots, row r's `query_lens[r]` tokens at [row_starts[r], row_starts[r] + query_lens[r]).

    Invariants (worker/step_input.py builds them): row_starts are multiples of config.PACKED_ROW_ALIGN and nondecreasing, rows
    do not overlap; padding rows have query_lens = seq_lens = 0 and start at T; slots between and after rows are
    padding (out-of-range slot, position 0). Only projections see the padding slots: at most PACKED_ROW_ALIGN - 1 a
    row, against the [B, Q] layout's padding of every row to the longest.
    """

    positions: jax.Array     # [T] int32 position of each slot's token in its row (padding: 0)
    slot_mapping: jax.Array  # [T] int32 page * S + offset; padding: out of range, dropped
    block_tables: jax.Array  # [R, M] int32
    seq_lens: jax.Array      # [R] int32 = query_lens (fresh rows)
    query_lens: jax.Array    # [R] int32 tokens of the row; padding rows 0
    row_starts: jax.Array    # [R] int32 first slot of the row; padding rows T

    def token_rows(self) -> tuple[jax.Array, jax.Array]:
        """([T] row of each slot (clipped into range), [T] whether the slot holds one of its row's tokens)."""
        t = jnp.arange(self.positions.shape[0], dtype=jnp.int32)
        row = jnp.clip(jnp.searchsorted(self.row_starts, t, side="right").astype(jnp.int32) - 1, 0,
                       self.row_starts.shape[0] - 1)
        return row, (t >= self.row_starts[row]) & (t < self.row_starts[row] + self.query_lens[row])


def segments(meta: "AttentionMetadata | MixedMetadata | PackedMetadata") -> tuple:
    """The step's segments in token order."""
    return (meta.decode, meta.prefill) if isinstance(meta, MixedMetadata) else (meta,)


def flat_positions(meta: "AttentionMetadata | MixedMetadata | PackedMetadata") -> jax.Array:
    """[T] positions of the step's tokens in token order."""
    return jnp.concatenate([s.positions.reshape(-1) for s in segments(meta)])


def step_slots(meta: "AttentionMetadata | MixedMetadata | PackedMetadata") -> jax.Array:
    """[T] flat slots of the step's tokens in token order."""
    return jnp.concatenate([s.slot_mapping.reshape(-1) for s in segments(meta)])
