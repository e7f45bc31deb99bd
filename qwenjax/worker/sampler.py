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
whether candidates came from a top-k or a full sort.

The Gumbel noise of a row is drawn over the whole vocabulary from fold_in(key(seed), step), indexed by token id, so
a seeded row gets the same token whatever else is in the batch, at whatever position, under whichever SamplerMode.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qwenjax.sampling_params import GREEDY_TEMPERATURE, SamplingParams

FILTERS = ("none", "topk", "sort")
TOPK_CAPS = (64, 256, 1024)  # candidate counts of mode 'topk'; a larger top_k needs mode 'sort'
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
           history: tuple[jax.Array, jax.Array] | None = None) -> SamplerOutput:
    """Samples one token per row. logits: [B, V] raw model outputs. Pure; call it inside jit with mode static.

    `mode` must come from choose_mode() over the same rows: with filter "none" the rows' top_k/top_p are ignored,
    and with "topk" a row's top-p only sees the topk_cap most likely tokens.
    """
    raw = logits.astype(jnp.float32)
    x = raw
    if mode.has_bias:
        x = x.at[jnp.arange(x.shape[0])[:, None], t.bias_ids].add(t.bias_values, mode="drop")
    if mode.penalties:
        x = apply_penalties(x, t, history)
    if mode.has_banned:
        x = apply_banned(x, t)
    if mode.has_mask:
        x = apply_bitmask(x, t.bitmask)

    if mode.all_greedy:
        token_ids = jnp.argmax(x, axis=-1)
    else:
        scores = filtered_logits(x, t, mode) + gumbel_noise(t.seeds, t.steps, x.shape[-1])
        greedy = (t.temperature < GREEDY_TEMPERATURE)[:, None]
        token_ids = jnp.argmax(jnp.where(greedy, x, scores), axis=-1)
    token_ids = token_ids.astype(jnp.int32)

    # Logprobs without materialising log_softmax over [B, V]: raw - logsumexp(raw).
    lse = jax.nn.logsumexp(raw, axis=-1)
    chosen = jnp.take_along_axis(raw, token_ids[:, None], axis=-1)[:, 0] - lse
    if mode.num_logprobs > 0:
        top_vals, top_ids = chunked_top_k(raw, mode.num_logprobs)
        top_logprobs = top_vals - lse[:, None]
    else:
        top_ids = jnp.zeros((raw.shape[0], 0), jnp.int32)
        top_logprobs = jnp.zeros((raw.shape[0], 0), jnp.float32)
    return SamplerOutput(token_ids=token_ids, logprobs=chosen, top_ids=top_ids.astype(jnp.int32),
                         top_logprobs=top_logprobs)


def apply_penalties(logits: jax.Array, t: SamplingTensors,
                    history: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """Repetition penalty over prompt+output tokens, then frequency and presence penalties over output tokens."""
    b, v = logits.shape
    rows = jnp.arange(b)[:, None]
    if history is not None:
        in_prompt, counts = history  # [B, V] bool, [B, V] int32
    else:
        counts = jnp.zeros((b, v), jnp.int32).at[rows, t.output_tokens].add(1, mode="drop")  # [B, V]
        in_prompt = jnp.zeros((b, v), jnp.bool_).at[rows, t.prompt_tokens].set(True, mode="drop")  # [B, V]
    generated = counts > 0
    rep = t.repetition_penalty[:, None]
    # Dividing positive and multiplying negative logits makes a seen token less likely whatever its sign.
    penalised = jnp.where(logits > 0, logits / rep, logits * rep)
    logits = jnp.where(in_prompt | generated, penalised, logits)
    logits = logits - t.frequency_penalty[:, None] * counts.astype(jnp.float32)
    return logits - t.presence_penalty[:, None] * generated.astype(jnp.float32)


def apply_banned(logits: jax.Array, t: SamplingTensors) -> jax.Array:
    rows = jnp.arange(logits.shape[0])[:, None]
    return logits.at[rows, t.banned].set(-jnp.inf, mode="drop")


def apply_bitmask(logits: jax.Array, bitmask: jax.Array) -> jax.Array:
    """Logits [B, V] with every token whose bit is 0 in `bitmask` [B, W] set to -inf."""
    b, v = logits.shape
    bits = (bitmask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1  # [B, W, 32]: token w * 32 + i
    allowed = bits.reshape(b, -1)[:, :v] != 0
    return jnp.where(allowed, logits, -jnp.inf)


def filtered_logits(logits: jax.Array, t: SamplingTensors, mode: SamplerMode) -> jax.Array:
    """Temperature-scaled logits [B, V] with the tokens min_p, top-k and top-p drop set to -inf.

    This is the distribution a non-greedy row samples from (softmax of the result). Greedy rows are scaled by 1.
    """
    temperature = jnp.where(t.temperature < GREEDY_TEMPERATURE, 1.0, t.temperature)
    x = logits / temperature[:, None]
    # min_p: p < min_p * p_max  <=>  x < x_max + log(min_p); log(0) = -inf keeps everything.
    x_max = jnp.max(x, axis=-1, keepdims=True)
    x = jnp.where(x < x_max + jnp.log(t.min_p)[:, None], -jnp.inf, x)
    v = x.shape[-1]
    if mode.filter == "none":
        return x
    if mode.filter == "topk":
        candidates, _ = chunked_top_k(x, min(mode.topk_cap, v))
        threshold, _ = _threshold(candidates, t.top_k, t.top_p, lse=None)
    else:
        # Top-p without top-k: the TOPK_CAPS[-1] best tokens nearly always hold the top-p set; the full sort runs
        # (for the whole batch) only when some row's set reaches past them.
        lse = jax.nn.logsumexp(x, axis=-1)
        candidates, _ = chunked_top_k(x, min(TOPK_CAPS[-1], v))
        threshold, contained = _threshold(candidates, t.top_k, t.top_p, lse)
        full_sort = lambda: _threshold(jnp.sort(x, axis=-1, descending=True), t.top_k, t.top_p, lse)[0]  # noqa
        threshold = jax.lax.cond(jnp.all(contained), lambda: threshold, full_sort)
    return jnp.where(x < threshold[:, None], -jnp.inf, x)


def _threshold(candidates: jax.Array, top_k: jax.Array, top_p: jax.Array, lse: jax.Array | None):
    """([B] lowest kept value, [B] bool exact) given each row's best values `candidates` [B, C], descending.

    Top-k keeps values >= the k-th best. Top-p then keeps, within what top-k kept and renormalised, the smallest
    prefix whose mass reaches top_p: a token stays iff the mass strictly before it is < top_p. `lse` is the row's
    logsumexp over the whole vocabulary, used for rows without top-k; None when every top-p row has a top_k <= C.
    `exact` is False for rows whose kept set may reach past the candidates.
    """
    c = candidates.shape[-1]
    kth = jnp.take_along_axis(candidates, (jnp.clip(top_k, 1, c) - 1)[:, None], axis=-1)[:, 0]
    kth = jnp.where(top_k > 0, kth, -jnp.inf)  # [B]
    kept = jnp.where(candidates < kth[:, None], -jnp.inf, candidates)
    kept_lse = jax.nn.logsumexp(kept, axis=-1)
    if lse is not None:
        kept_lse = jnp.where(top_k > 0, kept_lse, lse)
    probs = jnp.exp(kept - kept_lse[:, None])  # the row's renormalised probabilities, best first
    cumulative = jnp.cumsum(probs, axis=-1)
    keep = cumulative - probs < top_p[:, None]
    n_keep = jnp.maximum(jnp.sum(keep, axis=-1), 1)  # keep is a prefix: the mass before never decreases
    last = jnp.take_along_axis(kept, (n_keep - 1)[:, None], axis=-1)[:, 0]
    # top_p == 1 is off, even where rounding pushes the running mass past 1 before the last candidate.
    threshold = jnp.maximum(kth, jnp.where(top_p < 1.0, last, -jnp.inf))
    top_k_inside = (top_k == 0) | (top_k <= c)
    top_p_inside = (top_p >= 1.0) | (cumulative[:, -1] >= top_p)
    return threshold, top_k_inside & top_p_inside


def chunked_top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """([B, k] largest values of each row of x [B, V], descending; [B, k] i32 their ids), like lax.top_k.

    XLA lowers lax.top_k on GPU to a full sort of the row. Instead: the k chunks (of `chunk` tokens) with the
    largest maxima hold the k largest values, ties included (every chunk left out has a maximum <= the k-th value
    and at least k values >= it lie in the chosen chunks), so one max pass and two small top_k calls suffice.
    Where a row has fewer than k finite values, the ids of its -inf tail are unspecified (possibly >= V).
    """
    b, v = x.shape
    chunk = 64 if k <= 256 else 16  # fastest on an H100 at B = 256, V = 151936
    groups = -(-v // chunk)
    if groups < 4 * k:  # small vocabulary: the direct call is as cheap
        values, ids = jax.lax.top_k(x, k)
        return values, ids.astype(jnp.int32)
    x = jnp.pad(x, ((0, 0), (0, groups * chunk - v)), constant_values=-jnp.inf).reshape(b, groups, chunk)
    _, group_ids = jax.lax.top_k(jnp.max(x, axis=-1), k)  # [B, k]
    candidates = jnp.take_along_axis(x, group_ids[:, :, None], axis=1).reshape(b, k * chunk)
    values, pos = jax.lax.top_k(candidates, k)
    ids = jnp.take_along_axis(group_ids, pos // chunk, axis=-1) * chunk + pos % chunk
    return values, ids.astype(jnp.int32)


def gumbel_noise(seeds: jax.Array, steps: jax.Array, vocab_size: int) -> jax.Array:
    """[B, V] f32 Gumbel(0, 1) noise; row b depends only on (seeds[b], steps[b], V)."""

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
