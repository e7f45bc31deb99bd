"""Speculative acceptance on the device: which proposed tokens a verify step keeps, and the token after them.

Axis letters: B rows, Q = k + 1 scored positions a row, V vocabulary, R = B * Q flattened sampler rows (row b's
position j is R-row b * Q + j), L returned top logprobs.

Position j of row b scores the token after the row's input prefix plus its first j drafts; its target distribution
p_j is exactly what the one-token sampler (worker/sampler.py) would sample there: logit_bias, penalties (the counts
include drafts 1..j, as they would once accepted), banned ids, the bitmask, temperature, min_p, top-k and top-p.

- Greedy rows accept draft j+1 iff it is the argmax of p_j; the first mismatch's argmax (or, all accepted, the bonus
  argmax at position n) follows. Tokens equal those of one-token greedy steps.
- Sampled rows: an n-gram draft is deterministic (its proposal distribution q is one-hot), so draft x = d_{j+1} is
  accepted with probability min(1, p_j(x) / q(x)) = p_j(x), drawing u_j ~ U(0, 1); on rejection the token comes from
  the residual max(0, p_j - q) renormalised, which is p_j with x removed, renormalised. The output at each position
  is then distributed exactly as p_j (Leviathan et al. 2023, "Fast inference from transformers via speculative
  decoding"). After n accepted drafts the bonus token is a plain draw from p_n.
- Randomness of position j comes from the row's seed and its output index (steps + j), as the one-token sampler's:
  the Gumbel noise of the draw from fold_in(key(seed), step) (sampler.gumbel_noise), the acceptance uniform from
  fold_in(that key, ACCEPT_STREAM). A seeded request therefore repeats exactly.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qwenjax.sampling_params import GREEDY_TEMPERATURE
from qwenjax.worker.sampler import (SamplerMode, SamplingTensors, apply_banned, apply_bitmask, apply_penalties,
                                    chunked_top_k, filtered_logits, gumbel_noise, split_inputs,
                                    vocab_inputs)
from qwenjax.worker.vocab_split import VocabSlice, over_vocab

ACCEPT_STREAM = 0x5EC  # folded into a position's key for its acceptance uniform (the draw uses the key itself)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VerifyOutput:
    token_ids: jax.Array      # [B, Q] i32: positions < num_accepted hold the accepted drafts, position num_accepted
                              # the corrected / bonus token; later positions are meaningless
    num_accepted: jax.Array   # [B] i32 leading drafts accepted (<= the row's num_drafts)
    logprobs: jax.Array       # [B, Q] f32 log_softmax(raw logits) at token_ids
    ranks: jax.Array          # [B, Q] i32 1 + tokens with a higher raw logit ([B, 0] when mode.num_logprobs == 0)
    top_ids: jax.Array        # [B, Q, L] i32
    top_logprobs: jax.Array   # [B, Q, L] f32


def draft_counts(drafts: jax.Array, num_drafts: jax.Array, vs: VocabSlice) -> jax.Array:
    """[B, Q, V] i32: how often each token occurs among row b's drafts 1..j (position j's extra output counts), on
    the columns `vs` holds."""
    B, k = drafts.shape
    valid = jnp.arange(k)[None, :] < num_drafts[:, None]
    tok = vs.local_ids(jnp.where(valid, drafts, vs.vocab_size))  # out of range (or another device's): dropped
    one = jnp.zeros((B, k + 1, vs.size), jnp.int32)
    one = one.at[jnp.arange(B)[:, None], jnp.arange(1, k + 1)[None, :], tok].add(1, mode="drop")
    return jnp.cumsum(one, axis=1)


def target_logits(logits: jax.Array, t: SamplingTensors, mode: SamplerMode, drafts: jax.Array,
                  num_drafts: jax.Array, history: tuple[jax.Array, jax.Array] | None,
                  vs: VocabSlice | None = None) -> jax.Array:
    """[R, V] logits after bias, penalties, bans and the mask (before temperature): the one-token sampler's `x`.
    logits [B, Q, V]; `history` (in_prompt [B, V], output counts [B, V] before any draft) when mode.penalties;
    `vs` the vocabulary columns logits and history hold (None: whole rows)."""
    B, Q, V = logits.shape
    vs = vs or VocabSlice.whole(V)
    x = logits.reshape(B * Q, V).astype(jnp.float32)
    if mode.has_bias:
        x = x.at[jnp.arange(B * Q)[:, None], vs.local_ids(t.bias_ids)].add(t.bias_values, mode="drop")
    if mode.penalties:
        in_prompt, counts = history
        counts = counts[:, None, :] + draft_counts(drafts, num_drafts, vs)
        x = apply_penalties(x, t, (jnp.repeat(in_prompt, Q, axis=0), counts.reshape(B * Q, V)), vs)
    if mode.has_banned:
        x = apply_banned(x, t, vs)
    if mode.has_mask:
        x = apply_bitmask(x, t.bitmask, vs)
    return x


def rejection_sample(logits: jax.Array, t: SamplingTensors, mode: SamplerMode, drafts: jax.Array,
                     num_drafts: jax.Array, history: tuple[jax.Array, jax.Array] | None = None,
                     vs: VocabSlice | None = None, noise: jax.Array | None = None) -> VerifyOutput:
    """Accepts each row's leading drafts and draws the token after them (see the module docstring).

    logits [B, Q, V] raw; `t` holds R = B * Q rows (row b's position j at b * Q + j: its parameters, seed, and step =
    outputs so far + j); drafts [B, Q - 1] i32 (entries at or past num_drafts [B] are ignored). Pure; call inside jit
    with `mode` static (from choose_mode over the same R rows). `vs`: the vocabulary columns `logits` and `history`
    hold (under rejection_sample_over_mesh: this device's V / n); None: whole rows. The outputs are whole.
    `noise`: the R rows' gumbel_noise on those columns (None: drawn here).
    """
    B, Q, V = logits.shape
    vs = vs or VocabSlice.whole(V)
    raw = logits.reshape(B * Q, V).astype(jnp.float32)
    x = target_logits(logits, t, mode, drafts, num_drafts, history, vs)
    pos = jnp.arange(Q)[None, :]
    has_draft = pos < num_drafts[:, None]                                           # [B, Q]: a draft follows j
    nxt = jnp.concatenate([drafts, jnp.zeros((B, 1), drafts.dtype)], axis=1)        # [B, Q]: draft j + 1
    nxt = jnp.where(has_draft, nxt, -1).reshape(-1)                                 # [R]; -1: no draft
    argmax = vs.argmax(x)
    if mode.all_greedy:
        accept, after = nxt == argmax, argmax
    else:
        scaled = filtered_logits(x, t, mode, vs)
        p_draft = jnp.exp(vs.take(scaled, jnp.maximum(nxt, 0)) - vs.logsumexp(scaled))
        keys = jax.vmap(lambda s, n: jax.random.fold_in(jax.random.fold_in(jax.random.key(s), n), ACCEPT_STREAM))(
            t.seeds, t.steps)
        u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys)
        residual = jnp.where(vs.column_ids()[None, :] == nxt[:, None], -jnp.inf, scaled)  # no draft: none removed
        if noise is None:
            noise = vs.local_columns(gumbel_noise(t.seeds, t.steps, vs.vocab_size))
        drawn = vs.argmax(residual + noise)
        greedy = t.temperature < GREEDY_TEMPERATURE
        accept = jnp.where(greedy, nxt == argmax, u < p_draft)
        after = jnp.where(greedy, argmax, drawn)
    accept = accept.reshape(B, Q) & has_draft
    num_accepted = jnp.sum(jnp.cumprod(accept.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)
    tokens = jnp.where(pos < num_accepted[:, None], nxt.reshape(B, Q), after.reshape(B, Q))
    flat = tokens.reshape(-1)
    chosen = vs.take(raw, flat)
    lse = vs.logsumexp(raw)
    L = mode.num_logprobs
    if L > 0:
        ranks = (1 + vs.count_greater(raw, chosen)).astype(jnp.int32).reshape(B, Q)
        top_vals, top_ids = vs.top_k(raw, L, chunked_top_k)
        top_lps = (top_vals - lse[:, None]).reshape(B, Q, L)
        top_ids = top_ids.reshape(B, Q, L)
    else:
        ranks = jnp.zeros((B, 0), jnp.int32)
        top_ids, top_lps = jnp.zeros((B, Q, 0), jnp.int32), jnp.zeros((B, Q, 0), jnp.float32)
    return VerifyOutput(token_ids=tokens, num_accepted=num_accepted, logprobs=(chosen - lse).reshape(B, Q),
                        ranks=ranks, top_ids=top_ids, top_logprobs=top_lps)


def rejection_sample_over_mesh(mesh, logits: jax.Array, t: SamplingTensors, mode: SamplerMode, drafts: jax.Array,
                               num_drafts: jax.Array,
                               history: tuple[jax.Array, jax.Array, jax.Array] | None = None) -> VerifyOutput:
    """`rejection_sample` with the vocabulary split over the mesh's "tp" axis (worker/vocab_split.py); `history` as
    sampler.sample_over_mesh's: (prompt_mask [R, V], output_counts [R, V], slots [B]) or None."""
    def body(vs, split, whole):
        t, drafts, num_drafts, slots = whole
        logits, noise, rows = split_inputs(split, slots)
        return rejection_sample(logits, t, mode, drafts, num_drafts, rows, vs, noise)

    split, slots = vocab_inputs(mesh, logits, t, mode, history)
    return over_vocab(body, mesh, logits.shape[-1], split, (t, drafts, num_drafts, slots))
