"""Device-resident token history for repetition / presence / frequency penalties.

One row per running sequence (rows assigned by the scheduler, plus a scratch row R - 1 for padding rows):
`prompt_mask[r, v]` says token v occurs in the row's prompt, `output_counts[r, v]` how often it was generated.
The model step adds its input tokens: prompt positions to the mask, later positions to the counts. Every generated
token is the input of the next step, so before sampling at step N the counts hold every output token so far.
This keeps the sampler's shapes fixed whatever the history length (no recompiles as sequences grow).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qwenjax.compat import register_dataclass


@register_dataclass
@dataclasses.dataclass(frozen=True)
class PenaltyState:
    prompt_mask: jax.Array    # [R, V] bool
    output_counts: jax.Array  # [R, V] int32


def empty(rows: int, vocab_size: int, sharding=None) -> PenaltyState:
    make = jax.jit(lambda: PenaltyState(jnp.zeros((rows, vocab_size), jnp.bool_),
                                        jnp.zeros((rows, vocab_size), jnp.int32)), out_shardings=sharding)
    return make()


def update(state: PenaltyState, input_ids, positions, query_lens, prompt_lens, slots, reset) -> PenaltyState:
    """Adds a step's new tokens [B, Q] to their rows; rows with `reset` are cleared first (prefill steps only)."""
    B, Q = input_ids.shape
    V = state.prompt_mask.shape[1]
    mask, counts = state.prompt_mask, state.output_counts
    if Q > 1:  # a row starting at position 0 (new or recomputed sequence) forgets its previous owner's history
        keep = ~reset[:, None]
        mask = mask.at[slots].set(mask[slots] & keep)
        counts = counts.at[slots].set(jnp.where(keep, counts[slots], 0))
    valid = jnp.arange(Q)[None, :] < query_lens[:, None]
    is_prompt = positions < prompt_lens[:, None]
    rows = jnp.broadcast_to(slots[:, None], (B, Q))
    mask = mask.at[rows, jnp.where(valid & is_prompt, input_ids, V)].set(True, mode="drop")
    counts = counts.at[rows, jnp.where(valid & ~is_prompt, input_ids, V)].add(1, mode="drop")
    return PenaltyState(mask, counts)


def rows_of(state: PenaltyState, slots) -> tuple[jax.Array, jax.Array]:
    """(in_prompt [B, V] bool, output_counts [B, V] int32) of the step's rows."""
    return state.prompt_mask[slots], state.output_counts[slots]
