"""On-device sampling over per-row parameter arrays, and the host helpers that build those arrays.

Axis letters: B rows (one per sequence being sampled), V vocabulary, W = ceil(V / 32) bitmask words, C filter
candidates, Hp / Ho prompt / output history length, Kb banned ids, Kl logit-bias entries, L returned top logprobs.

Per row, in vLLM's order: logit_bias added to the raw logits, penalties (repetition over prompt+output tokens, then
frequency and presence over output tokens), banned ids -> -inf, tokens outside the row's allowed bitmask (structured
outputs, allowed_token_ids) -> -inf, temperature, min_p, top-k, then top-p over what top-k kept, then a Gumbel-max
draw. Greedy rows take the argmax of the penalised logits. Returned logprobs are log_softmax of the raw
logits (vLLM v1's default), whatever the penalties and filters did.

Filters are expressed as one per-row threshold: a token survives iff its scaled logit is >= the threshold. Tokens
tied with the last kept one therefore all survive, and the result depends only on the row's own values, not on
whether it came from top-k candidates or the bisection over whole rows (worker/sampler_filters.py).

The Gumbel noise of a row is drawn over the whole vocabulary from fold_in(key(seed), step), indexed by token id, so
a seeded row gets the same token whatever else is in the batch, at whatever position, under whichever SamplerMode,
on whichever mesh.

Over a mesh (sample_over_mesh) every [B, V] computation runs on each device's V / n columns under shard_map, with
per-shard reductions and small collectives (worker/vocab_split.py): no [B, V] array crosses devices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qwenjax.sampling_params import GREEDY_TEMPERATURE, SamplingParams
from qwenjax.worker.sampler_filters import TOPK_CAPS, chunked_top_k, filtered_logits  # noqa: F401 (re-exported)
from qwenjax.worker.vocab_split import VocabSlice, over_vocab, split_columns

FILTERS = ("none", "topk", "sort")
LOGPROB_BUCKETS = (0, 5, 20)  # num_logprobs is rounded up to one of these (exact above the last)
MIN_HISTORY = 16  # smallest padded history / banned-list length; lengths are powers of two from here


@dataclasses.dataclass(frozen=True)
class SamplerMode:
    """The static part of a sampling call: one compiled variant per value. Build it with choose_mode()."""

    all_greedy: bool  # every row greedy: argmax of the (penalised, banned) logits; no noise, no filters
    # "none": no row has top-k/top-p. "topk": every row with top-p has a top_k, and all top_k <= topk_cap: the
    # topk_cap best tokens are the candidates. "sort": some row has top-p alone (or top_k > 1024): the 1024 best
    # tokens are the candidates when they hold every row's kept set, else the whole batch sorts its rows.
    filter: str
    topk_cap: int  # candidates when filter == "topk"; 0 otherwise
    penalties: bool  # some row has a repetition, presence or frequency penalty
    num_logprobs: int  # L: top logprobs returned per row; 0 returns only the sampled token's logprob
    has_banned: bool  # some row has banned ids (min_tokens not reached, bad_words)
    has_mask: bool = False  # some row has an allowed-token bitmask (structured outputs, allowed_token_ids)
    has_bias: bool = False  # some row has a logit_bias

    def __post_init__(self):
        if self.filter not in FILTERS:
            raise ValueError(f"filter must be one of {FILTERS}, got {self.filter!r}.")
        if (self.filter == "topk") != (self.topk_cap > 0):
            raise ValueError(f"topk_cap must be > 0 exactly when filter == 'topk', got {self.topk_cap} "
                             f"with filter={self.filter!r}.")
        if self.all_greedy and self.filter != "none":
            raise ValueError(f"an all-greedy mode has no filter, got filter={self.filter!r}.")
        if self.num_logprobs < 0:
            raise ValueError(f"num_logprobs must be non-negative, got {self.num_logprobs}.")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingTensors:
    """Per-row sampling parameters. Token-id arrays are padded with V, which every scatter drops."""

    temperature: jax.Array  # [B] f32; < GREEDY_TEMPERATURE (0 from build_tensors) => greedy row
    top_p: jax.Array  # [B] f32; 1.0 => off
    top_k: jax.Array  # [B] i32; 0 => off
    min_p: jax.Array  # [B] f32; 0.0 => off
    repetition_penalty: jax.Array  # [B] f32; 1.0 => off
    presence_penalty: jax.Array  # [B] f32; 0.0 => off
    frequency_penalty: jax.Array  # [B] f32; 0.0 => off
    seeds: jax.Array  # [B] u32
    steps: jax.Array  # [B] i32 tokens the row has generated so far; folded into the row's key
    prompt_tokens: jax.Array  # [B, Hp] i32 prompt ids (for repetition_penalty), padded with V
    output_tokens: jax.Array  # [B, Ho] i32 generated ids (for all three penalties), padded with V
    banned: jax.Array  # [B, Kb] i32 ids forced to -inf this step, padded with V
    bitmask: jax.Array  # [B, W] i32 allowed tokens (bit t % 32 of word t // 32), -1 words: all; W = 0 without mask
    bias_ids: jax.Array  # [B, Kl] i32 logit_bias token ids, padded with V
    bias_values: jax.Array  # [B, Kl] f32 their biases


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplerOutput:
    token_ids: jax.Array  # [B] i32
    logprobs: jax.Array  # [B] f32 log_softmax(raw logits) at the sampled token
    top_ids: jax.Array  # [B, L] i32 most likely ids under the raw logits, best first
    top_logprobs: jax.Array  # [B, L] f32 their log_softmax values


# ----------------------------------------------------------------------------------------------- device side


# Penalties are always applied (from the device-resident history; a no-op at their neutral values), so a request's
# penalties never select another compiled variant. Warm-up compiles the modes of greedy, plain temperature, and
# top-k/top-p with top_k <= 64 (Qwen2's generation_config: top_k 20); a row with top_p but no top_k, logprobs, or
# min_tokens compiles its sampler variant (small) on first use.
WARMUP_MODES = tuple(SamplerMode(all_greedy=g, filter=f, topk_cap=c, penalties=True, num_logprobs=0, has_banned=False)
                     for g, f, c in ((True, "none", 0), (False, "none", 0), (False, "topk", 64)))

def sample(logits: jax.Array, t: SamplingTensors, mode: SamplerMode,
           history: tuple[jax.Array, jax.Array] | None = None, vs: VocabSlice | None = None,
           noise: jax.Array | None = None) -> SamplerOutput:
    """Samples one token per row. logits: [B, V] raw model outputs. Pure; call it inside jit with mode static.

    `mode` must come from choose_mode() over the same rows: with filter "none" the rows' top_k/top_p are ignored,
    and with "topk" a row's top-p only sees the topk_cap most likely tokens. `vs`: the vocabulary columns `logits`
    and `history` hold (under sample_over_mesh: this device's V / n); None: whole rows. The outputs are whole.
    `noise`: the rows' gumbel_noise on those columns (None: drawn here over whole rows, the columns kept).
    """
    vs = vs or VocabSlice.whole(logits.shape[-1])
    raw = logits.astype(jnp.float32)
    x = raw
    if mode.has_bias:
        x = x.at[jnp.arange(x.shape[0])[:, None], vs.local_ids(t.bias_ids)].add(t.bias_values, mode="drop")
    if mode.penalties:
        x = apply_penalties(x, t, history, vs)
    if mode.has_banned:
        x = apply_banned(x, t, vs)
    if mode.has_mask:
        x = apply_bitmask(x, t.bitmask, vs)

    if mode.all_greedy:
        token_ids = vs.argmax(x)
    else:
        if noise is None:
            noise = vs.local_columns(gumbel_noise(t.seeds, t.steps, vs.vocab_size))
        scores = filtered_logits(x, t, mode, vs) + noise
        greedy = (t.temperature < GREEDY_TEMPERATURE)[:, None]
        token_ids = vs.argmax(jnp.where(greedy, x, scores))

    # Logprobs without materialising log_softmax over [B, V]: raw - logsumexp(raw).
    lse = vs.logsumexp(raw)
    chosen = vs.take(raw, token_ids) - lse
    if mode.num_logprobs > 0:
        top_vals, top_ids = vs.top_k(raw, mode.num_logprobs, chunked_top_k)
        top_logprobs = top_vals - lse[:, None]
    else:
        top_ids = jnp.zeros((raw.shape[0], 0), jnp.int32)
        top_logprobs = jnp.zeros((raw.shape[0], 0), jnp.float32)
    return SamplerOutput(token_ids=token_ids, logprobs=chosen, top_ids=top_ids.astype(jnp.int32),
                         top_logprobs=top_logprobs)


def sample_over_mesh(mesh, logits: jax.Array, t: SamplingTensors, mode: SamplerMode,
                     history: tuple[jax.Array, jax.Array, jax.Array] | None = None,
                     with_ranks: bool = False) -> tuple[SamplerOutput, jax.Array | None]:
    """`sample` with the vocabulary split over the mesh's "tp" axis (worker/vocab_split.py), plus, `with_ranks`,
    each sampled token's rank in the vocabulary (1 + tokens with a larger raw logit, vLLM's rank; else None).

    `history`: (prompt_mask [R, V], output_counts [R, V], slots [B]): the penalty state, whose rows `slots` are
    read on each device's columns (worker/penalty_state.py); None when mode.penalties is off.
    """
    def body(vs, split, whole):
        t, slots = whole
        logits, noise, rows = split_inputs(split, slots)
        out = sample(logits, t, mode, rows, vs, noise)
        if not with_ranks:
            return out, None
        # Compared on the logits themselves (exact: a logprob + logsumexp round trip can put a token above itself).
        return out, 1 + vs.count_greater(logits, vs.take(logits, out.token_ids))

    split, slots = vocab_inputs(mesh, logits, t, mode, history)
    return over_vocab(body, mesh, logits.shape[-1], split, (t, slots))


def vocab_inputs(mesh, logits: jax.Array, t: SamplingTensors, mode: SamplerMode,
                 history: tuple[jax.Array, jax.Array, jax.Array] | None) -> tuple[tuple, jax.Array | None]:
    """(the [.., V] inputs a sampler over the mesh splits: logits, the rows' Gumbel noise unless all greedy, the
    penalty state when given; the penalty rows' slots or None). split_inputs takes them apart inside the body.

    The noise [B, V] is laid out split on V like the logits: a function of the replicated seeds and steps alone, and
    JAX's threefry is partitionable (bits of element i from the key and i), so each device computes its own columns
    and nothing crosses the mesh; over no mesh it is the whole noise."""
    split = (logits,)
    if not mode.all_greedy:
        split += (split_columns(gumbel_noise(t.seeds, t.steps, logits.shape[-1]), mesh),)
    if history is None:
        return split, None
    return split + tuple(history[:2]), history[2]


def split_inputs(split: tuple, slots) -> tuple[jax.Array, jax.Array | None, tuple[jax.Array, jax.Array] | None]:
    """(logits, noise or None, (in_prompt, counts) of the rows `slots` or None) from vocab_inputs' arrays, on the
    columns this device holds."""
    logits, rest = split[0], split[1:]
    noise, rest = (rest[0], rest[1:]) if len(rest) % 2 else (None, rest)
    return logits, noise, None if slots is None else (rest[0][slots], rest[1][slots])


def apply_penalties(logits: jax.Array, t: SamplingTensors, history: tuple[jax.Array, jax.Array] | None = None,
                    vs: VocabSlice | None = None) -> jax.Array:
    """Repetition penalty over prompt+output tokens, then frequency and presence penalties over output tokens."""
    b, v = logits.shape
    rows = jnp.arange(b)[:, None]
    if history is not None:
        in_prompt, counts = history  # [B, V] bool, [B, V] int32
    else:
        vs = vs or VocabSlice.whole(v)
        counts = jnp.zeros((b, v), jnp.int32).at[rows, vs.local_ids(t.output_tokens)].add(1, mode="drop")
        in_prompt = jnp.zeros((b, v), jnp.bool_).at[rows, vs.local_ids(t.prompt_tokens)].set(True, mode="drop")
    generated = counts > 0
    rep = t.repetition_penalty[:, None]
    # Dividing positive and multiplying negative logits makes a seen token less likely whatever its sign.
    penalised = jnp.where(logits > 0, logits / rep, logits * rep)
    logits = jnp.where(in_prompt | generated, penalised, logits)
    logits = logits - t.frequency_penalty[:, None] * counts.astype(jnp.float32)
    return logits - t.presence_penalty[:, None] * generated.astype(jnp.float32)


def apply_banned(logits: jax.Array, t: SamplingTensors, vs: VocabSlice | None = None) -> jax.Array:
    vs = vs or VocabSlice.whole(logits.shape[-1])
    rows = jnp.arange(logits.shape[0])[:, None]
    return logits.at[rows, vs.local_ids(t.banned)].set(-jnp.inf, mode="drop")


def apply_bitmask(logits: jax.Array, bitmask: jax.Array, vs: VocabSlice | None = None) -> jax.Array:
    """Logits [B, V] with every token whose bit is 0 in `bitmask` [B, W] set to -inf (bit t % 32 of word t // 32;
    the mask covers the whole vocabulary, `vs` says which columns `logits` holds)."""
    vs = vs or VocabSlice.whole(logits.shape[-1])
    b, v = logits.shape
    if vs.size % 32 == 0:  # columns starting on a word boundary: this device's words, each expanded to 32 bits
        need = -(-vs.vocab_size // 32)  # (no [B, V] gather); words past the mask's width allow nothing
        words = jnp.pad(bitmask, ((0, 0), (0, max(0, need - bitmask.shape[1]))))
        if vs.axis is not None:
            words = jax.lax.dynamic_slice_in_dim(words, vs.offset // 32, vs.size // 32, axis=1)
        bits = (words[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1  # [B, W, 32]: token w * 32 + i
        allowed = bits.reshape(b, -1)[:, :v] != 0
    else:
        ids = vs.column_ids()
        words = jnp.take(bitmask, ids // 32, axis=1)  # [B, V]: each column's word
        allowed = ((words >> (ids % 32)[None, :]) & 1) != 0
    return jnp.where(allowed, logits, -jnp.inf)


def gumbel_noise(seeds: jax.Array, steps: jax.Array, vocab_size: int) -> jax.Array:
    """[B, V] f32 Gumbel(0, 1) noise; row b depends only on (seeds[b], steps[b], V), so a seeded row's draw is the
    same on any mesh (split_noise lays it out over one)."""

    def row(seed, step):
        key = jax.random.fold_in(jax.random.key(seed), step)
        return jax.random.gumbel(key, (vocab_size,), jnp.float32)

    return jax.vmap(row)(seeds, steps)


# ------------------------------------------------------------------------------------------------- host side


class SamplingRow(NamedTuple):
    """What the host knows about one sequence to be sampled this step (a NamedTuple: built for every row of every
    step, where a frozen dataclass's __init__ costs several times more)."""

    params: SamplingParams
    seed: int  # the request's seed (params.seed, or one the engine drew); reduced mod 2**32
    output_ids: Sequence[int] = ()  # tokens generated so far; its length is the step folded into the key
    prompt_ids: Sequence[int] = ()  # only read when the row has a repetition penalty
    banned_ids: Sequence[int] = ()  # e.g. params.banned_token_ids(len(output_ids), eos_ids)


def choose_mode(rows: Sequence[SamplingRow]) -> SamplerMode:
    """The cheapest SamplerMode that samples every row exactly (up to ties, see the module docstring)."""
    sampled = [r.params for r in rows if not r.params.is_greedy]
    filtering = [p for p in sampled if p.top_k > 0 or p.top_p < 1.0]
    max_top_k = max((p.top_k for p in filtering), default=0)
    if not filtering:
        filter_, cap = "none", 0
    elif any(p.top_k == 0 for p in filtering) or max_top_k > TOPK_CAPS[-1]:
        filter_, cap = "sort", 0  # top-p over the whole vocabulary, or a top_k beyond the largest cap
    else:
        filter_, cap = "topk", next(c for c in TOPK_CAPS if c >= max_top_k)
    wanted = max((r.params.logprobs or 0 for r in rows), default=0)
    num_logprobs = next((b for b in LOGPROB_BUCKETS if b >= wanted), wanted)
    return SamplerMode(
        all_greedy=not sampled,
        filter=filter_,
        topk_cap=cap,
        penalties=any(_has_penalty(r.params) for r in rows),
        num_logprobs=num_logprobs,
        has_banned=any(len(r.banned_ids) > 0 for r in rows),
        has_mask=any(r.params.allowed_token_ids is not None or r.params.structured_outputs is not None for r in rows),
        has_bias=any(bool(r.params.logit_bias) for r in rows),
    )


def build_tensors(rows: Sequence[SamplingRow], *, num_rows: int, vocab_size: int,
                  with_history: bool = True, bitmask: np.ndarray | None = None) -> SamplingTensors:
    """Numpy SamplingTensors for `rows`, padded to `num_rows` (padding rows are greedy and unpenalised).

    `bitmask` [num_rows, ceil(V / 32)] int32 holds the rows' allowed tokens when the mode has_mask (the host fills
    it: core/constraints.py); None gives a [num_rows, 0] array (no mask).

    History and banned lengths are padded to powers of two (at least MIN_HISTORY) so that few shapes compile;
    token lists are only copied for rows whose penalties read them.
    """
    if len(rows) > num_rows:
        raise ValueError(f"got {len(rows)} rows for a batch of num_rows={num_rows}.")
    b, v, n = num_rows, vocab_size, len(rows)
    f32 = lambda fill: np.full((b,), fill, np.float32)  # noqa: E731
    temperature, top_p, min_p = f32(0.0), f32(1.0), f32(0.0)
    rep, presence, frequency = f32(1.0), f32(0.0), f32(0.0)
    top_k = np.zeros((b,), np.int32)
    seeds = np.zeros((b,), np.uint32)
    steps = np.zeros((b,), np.int32)
    # Column by column from Python lists (one numpy conversion per field rather than one per row and field: a
    # 512-row decode step builds this every step).
    ps = [r.params for r in rows]
    temperature[:n] = [0.0 if p.is_greedy else p.temperature for p in ps]
    top_p[:n] = [p.top_p for p in ps]
    top_k[:n] = [p.top_k for p in ps]
    min_p[:n] = [p.min_p for p in ps]
    rep[:n] = [p.repetition_penalty for p in ps]
    presence[:n] = [p.presence_penalty for p in ps]
    frequency[:n] = [p.frequency_penalty for p in ps]
    seeds[:n] = [r.seed & 0xFFFFFFFF for r in rows]
    steps[:n] = [len(r.output_ids) for r in rows]
    prompts: list[Sequence[int]] = [()] * b
    outputs: list[Sequence[int]] = [()] * b
    banned: list[Sequence[int]] = [()] * b
    biased: list[Sequence[int]] = [()] * b
    bias_values = []
    for i, r in enumerate(rows):
        if r.params.logit_bias:
            biased[i] = list(r.params.logit_bias)
            bias_values.append((i, list(r.params.logit_bias.values())))
        p = r.params
        if with_history and p.repetition_penalty != 1.0:
            prompts[i] = r.prompt_ids
        if with_history and _has_penalty(p):
            outputs[i] = r.output_ids
        if r.banned_ids:
            banned[i] = r.banned_ids
    return SamplingTensors(
        temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
        repetition_penalty=rep, presence_penalty=presence, frequency_penalty=frequency,
        seeds=seeds, steps=steps,
        prompt_tokens=_pad_ids(prompts, v), output_tokens=_pad_ids(outputs, v), banned=_pad_ids(banned, v),
        bitmask=np.zeros((b, 0), np.int32) if bitmask is None else bitmask, **_bias(biased, bias_values, v),
    )


def history_bucket(length: int) -> int:
    """Padded length for `length` ids: the next power of two, at least MIN_HISTORY."""
    return max(MIN_HISTORY, 1 << max(length - 1, 0).bit_length())


def _has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _bias(biased: list[Sequence[int]], values: list[tuple[int, list[float]]], vocab_size: int) -> dict:
    """bias_ids / bias_values of the rows: ids padded with V (dropped), values with 0."""
    ids = _pad_ids(biased, vocab_size) if values else np.full((len(biased), 0), vocab_size, np.int32)
    vals = np.zeros(ids.shape, np.float32)
    for i, v in values:
        vals[i, :len(v)] = v
    return dict(bias_ids=ids, bias_values=vals)


def _pad_ids(lists: Sequence[Sequence[int]], vocab_size: int) -> np.ndarray:
    out = np.full((len(lists), history_bucket(max(map(len, lists), default=0))), vocab_size, np.int32)
    for i, ids in enumerate(lists):
        if ids:
            out[i, : len(ids)] = ids
    return out
