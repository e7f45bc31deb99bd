"""The sampler's filters (min_p, top-k, top-p) as one per-row threshold, and the top-k they draw candidates from.

Axis letters as in worker/sampler.py. Every function takes a `VocabSlice` (worker/vocab_split.py): over a mesh each
device holds V / n columns of the rows, and the reductions over V (row max, logsumexp, top-k candidates, the
bisection of the fallback) combine per-shard results with small collectives; nothing of size V is gathered.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwenjax.sampling_params import GREEDY_TEMPERATURE
from qwenjax.worker.vocab_split import VocabSlice

TOPK_CAPS = (64, 256, 1024)  # candidate counts of mode 'topk'; a larger top_k needs mode 'sort'


def filtered_logits(logits: jax.Array, t, mode, vs: VocabSlice | None = None) -> jax.Array:
    """Temperature-scaled logits [B, V] with the tokens min_p, top-k and top-p drop set to -inf.

    This is the distribution a non-greedy row samples from (softmax of the result). Greedy rows are scaled by 1.
    `t` sampler.SamplingTensors, `mode` sampler.SamplerMode (not imported: the sampler imports this module);
    `vs` the columns `logits` holds (None: whole rows).
    """
    vs = vs or VocabSlice.whole(logits.shape[-1])
    temperature = jnp.where(t.temperature < GREEDY_TEMPERATURE, 1.0, t.temperature)
    x = logits / temperature[:, None]
    # min_p: p < min_p * p_max  <=>  x < x_max + log(min_p); log(0) = -inf keeps everything.
    x_max = vs.max(x)[:, None]
    x = jnp.where(x < x_max + jnp.log(t.min_p)[:, None], -jnp.inf, x)
    v = vs.vocab_size
    if mode.filter == "none":
        return x
    if vs.axis is not None and min(mode.topk_cap or TOPK_CAPS[-1], v) >= vs.size:
        # A small vocabulary split: the candidates would be whole shards, i.e. the vocabulary gathered. Bisect.
        threshold = _bisected_threshold(x, t, vs.logsumexp(x), vs)
    elif mode.filter == "topk":
        candidates, _ = vs.top_k(x, min(mode.topk_cap, v), chunked_top_k)
        threshold, _ = _threshold(candidates, t.top_k, t.top_p, lse=None)
    else:
        # Top-p without top-k: the TOPK_CAPS[-1] best tokens nearly always hold the top-p set; the bisection over
        # whole rows runs (for the whole batch) only when some row's set reaches past them.
        lse = vs.logsumexp(x)
        candidates, _ = vs.top_k(x, min(TOPK_CAPS[-1], v), chunked_top_k)
        threshold, contained = _threshold(candidates, t.top_k, t.top_p, lse)
        # `contained` derives from gathered candidates: equal on every device, so all take the same branch.
        threshold = jax.lax.cond(jnp.all(contained), lambda: threshold, lambda: _bisected_threshold(x, t, lse, vs))
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


def _bisected_threshold(x: jax.Array, t, lse: jax.Array, vs: VocabSlice) -> jax.Array:
    """_threshold's value over whole rows, without sorting them (VocabSlice.lowest_kept): the k-th largest value,
    then top-p's last kept value among the tokens top-k kept, renormalised."""
    kth = vs.lowest_kept(x, jnp.ones(x.shape, jnp.int32), t.top_k)
    kth = jnp.where(t.top_k > 0, kth, -jnp.inf)
    kept = jnp.where(x < kth[:, None], -jnp.inf, x)
    kept_lse = jnp.where(t.top_k > 0, vs.logsumexp(kept), lse)
    last = vs.lowest_kept(kept, jnp.exp(kept - kept_lse[:, None]), t.top_p)
    return jnp.maximum(kth, jnp.where(t.top_p < 1.0, last, -jnp.inf))


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
