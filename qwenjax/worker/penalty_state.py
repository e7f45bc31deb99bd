"""Device-resident token history for repetition / presence / frequency penalties.

One row per running sequence (rows assigned by the scheduler, plus a scratch row R - 1 for padding rows):
`prompt_mask[r, v]` says token v occurs in the row's prompt, `output_counts[r, v]` how often it was generated.
The model step adds its input tokens: prompt positions to the mask, later positions to the counts. Every generated
token is the input of the next step, so before sampling at step N the counts hold every output token so far.
This keeps the sampler's shapes fixed whatever the history length (no recompiles as sequences grow).

A row that starts after position 0 in a slot it just got (its first tokens were found in the prefix cache) is rebuilt
from `history`, the tokens of the positions it skips, in the same step, so penalties see the whole sequence.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qwenjax.compat import register_dataclass
from qwenjax.worker.vocab_split import VocabSlice, over_vocab


@register_dataclass
@dataclasses.dataclass(frozen=True)
class PenaltyState:
    prompt_mask: jax.Array    # [R, V] bool
    output_counts: jax.Array  # [R, V] int32


def empty(rows: int, vocab_size: int, sharding=None) -> PenaltyState:
    make = jax.jit(lambda: PenaltyState(jnp.zeros((rows, vocab_size), jnp.bool_),
                                        jnp.zeros((rows, vocab_size), jnp.int32)), out_shardings=sharding)
    return make()


def update(state: PenaltyState, input_ids, positions, query_lens, prompt_lens, slots, reset,
           history) -> PenaltyState:
    """Adds a step's new tokens [B, Q] to their rows. Rows with `reset` (prefill steps only) are cleared first, then
    given `history` [B, L] (the tokens of positions 0..L-1 they skip; -1: none). Over the mesh being traced
    (jax.set_mesh) each device writes its own vocabulary columns (vocab_split.over_vocab): the state is never
    gathered."""

    def body(vs, split, whole):
        (mask, counts), (input_ids, positions, query_lens, prompt_lens, slots, reset, history) = split, whole
        B, Q = input_ids.shape
        if Q > 1:  # a row starting afresh (new, recomputed, or a prefix hit) forgets its previous owner's history
            keep = ~reset[:, None]
            mask = mask.at[slots].set(mask[slots] & keep)
            counts = counts.at[slots].set(jnp.where(keep, counts[slots], 0))
        if history.shape[1]:
            mask, counts = _add(vs, mask, counts, history, jnp.arange(history.shape[1])[None, :], history >= 0,
                                prompt_lens, slots)
        valid = jnp.arange(Q)[None, :] < query_lens[:, None]
        return PenaltyState(*_add(vs, mask, counts, input_ids, positions, valid, prompt_lens, slots))

    return over_vocab(body, jax.sharding.get_abstract_mesh(), state.prompt_mask.shape[1],
                      (state.prompt_mask, state.output_counts),
                      (input_ids, positions, query_lens, prompt_lens, slots, reset, history), split_out=True)


def update_packed(state: PenaltyState, input_ids, positions, token_rows, real, prompt_lens, slots,
                  reset) -> PenaltyState:
    """`update` for a packed prefill step: tokens [T] at `positions`, each in row `token_rows` (real where `real`);
    rows with `reset` (every real row: all start at position 0) are cleared first."""

    def body(vs, split, whole):
        (mask, counts), (input_ids, positions, token_rows, real, prompt_lens, slots, reset) = split, whole
        keep = ~reset[:, None]
        mask = mask.at[slots].set(mask[slots] & keep)
        counts = counts.at[slots].set(jnp.where(keep, counts[slots], 0))
        return PenaltyState(*_add(vs, mask, counts, input_ids[:, None], positions[:, None], real[:, None],
                                  prompt_lens[token_rows], slots[token_rows]))

    return over_vocab(body, jax.sharding.get_abstract_mesh(), state.prompt_mask.shape[1],
                      (state.prompt_mask, state.output_counts),
                      (input_ids, positions, token_rows, real, prompt_lens, slots, reset), split_out=True)


def fork_rows(state: PenaltyState, slots, tokens) -> PenaltyState:
    """Rows `slots` [M] (past the last row: none) cleared and given their prompt `tokens` [M, L] (V: none), on each
    device's columns over the mesh being traced (ModelRunner.fork)."""

    def body(vs, split, whole):
        (mask, counts), (slots, tokens) = split, whole
        mask = mask.at[slots].set(False, mode="drop")
        rows = jnp.broadcast_to(slots[:, None], tokens.shape)
        mask = mask.at[rows, vs.local_ids(tokens)].set(True, mode="drop")
        return PenaltyState(mask, counts.at[slots].set(0, mode="drop"))

    return over_vocab(body, jax.sharding.get_abstract_mesh(), state.prompt_mask.shape[1],
                      (state.prompt_mask, state.output_counts), (slots, tokens), split_out=True)


def _add(vs: VocabSlice, mask, counts, tokens, positions, valid, prompt_lens, slots):
    """Tokens [B, T] at `positions` into their rows: prompt positions to the mask, later ones to the counts; only
    the tokens of the columns `vs` holds land (the others, and invalid ones, are dropped)."""
    V = vs.vocab_size
    is_prompt = positions < prompt_lens[:, None]
    rows = jnp.broadcast_to(slots[:, None], tokens.shape)
    mask = mask.at[rows, vs.local_ids(jnp.where(valid & is_prompt, tokens, V))].set(True, mode="drop")
    counts = counts.at[rows, vs.local_ids(jnp.where(valid & ~is_prompt, tokens, V))].add(1, mode="drop")
    return mask, counts


def rows_of(state: PenaltyState, slots) -> tuple[jax.Array, jax.Array]:
    """(in_prompt [B, V] bool, output_counts [B, V] int32) of the step's rows."""
    return state.prompt_mask[slots], state.output_counts[slots]


def history_of(state: PenaltyState, slots) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(prompt_mask [R, V], output_counts [R, V], slots [B]): sampler.sample_over_mesh's `history`, which reads the
    rows `slots` on each device's vocabulary columns."""
    return state.prompt_mask, state.output_counts, slots
