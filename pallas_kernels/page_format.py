"""The KV page format every kernel and the engine's jnp path share: what a page stores for a K/V value, how it
becomes a value again, and the jnp scatter of new K/V into their slots (the reference the fused RoPE + write kernel
matches bit for bit).

vLLM's convention (the per-layer scales and which dtypes use them: qwenjax/layers/fp8_kv.py):
  float pages                 a plain cast.
  float8_e5m2 pages           the value itself (a direct cast, no scale).
  float8_e4m3fn pages         value / scale, with one float32 k_scale and v_scale per layer; true value = stored * scale.
Invariant: writing a finite value never stores inf or NaN. The cast saturates: the value (divided by the scale for
e4m3) is clipped to the format's largest finite value (e5m2 57344, e4m3fn 448) before the cast, so an outlier
becomes +-max rather than inf (e5m2) or NaN (e4m3fn has no inf) that would poison every later attention read.

Axis letters: B rows, Q tokens a row, K kv heads, P pages, S page size, H head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

FP8_MAX = {jnp.dtype(jnp.float8_e5m2): 57344.0, jnp.dtype(jnp.float8_e4m3fn): 448.0}


def is_fp8(dtype) -> bool:
    return jnp.dtype(dtype) in FP8_MAX


def to_pages(x: jax.Array, dtype, scale: jax.Array | None = None) -> jax.Array:
    """Values -> what pages of `dtype` store: for fp8, the saturating cast of x / scale; otherwise a plain cast."""
    if not is_fp8(dtype):
        return x.astype(dtype)
    x = x.astype(jnp.float32)
    if scale is not None:
        x = x / scale
    top = FP8_MAX[jnp.dtype(dtype)]
    return jnp.clip(x, -top, top).astype(dtype)


def from_pages(pages: jax.Array, scale: jax.Array | None = None) -> jax.Array:
    """Stored pages -> float32 values: stored * scale (fp8 e4m3), or the stored values themselves."""
    x = pages.astype(jnp.float32)
    return x if scale is None else x * scale


def write_kv(pages: jax.Array, new: jax.Array, slots: jax.Array, scale: jax.Array | None = None) -> jax.Array:
    """Scatters new [B, Q, K, H] into pages [K, P, S, H] at flat slot indices [B, Q]; out-of-range slots drop.

    fp8 pages store the saturating cast of new / scale (`to_pages`): never inf or NaN from finite values.
    """
    K, P, S, H = pages.shape
    flat = pages.reshape(K, P * S, H)
    vals = to_pages(new.reshape(-1, K, H), pages.dtype, scale)
    slots = slots.reshape(-1)
    if slots.shape[0] == 1:
        # XLA rewrites a one-index scatter into a fusion over the whole page array, which copies the donated cache
        # every step (CPU, built-in model: a 1-row decode step took 600 ms against 4 ms). A second index, out of
        # range and so dropped (and never equal to the first: the indices stay unique), keeps it a scatter in place.
        vals = jnp.concatenate([vals, vals])
        slots = jnp.concatenate([slots, jnp.where(slots[:1] == P * S, P * S + 1, P * S).astype(slots.dtype)])
    flat = flat.at[:, slots, :].set(vals.transpose(1, 0, 2), mode="drop", unique_indices=True)
    return flat.reshape(K, P, S, H)
