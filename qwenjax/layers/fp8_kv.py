"""FP8 KV pages: what a page stores for a K/V value, how it becomes a value again, and the per-layer scales.

vLLM's convention, kept in this one place:
  kv_cache_dtype "fp8_e5m2"          pages are float8_e5m2 and hold the value itself (a direct cast, no scale).
  kv_cache_dtype "fp8" / "fp8_e4m3"  pages are float8_e4m3fn and hold value / scale; true value = stored * scale,
                                     with one float32 k_scale and one v_scale per layer (per tensor), read from the
                                     checkpoint when it has them and 1.0 otherwise.
Invariant: writing a finite value never stores inf or NaN. The cast saturates: the value (divided by the scale for
e4m3) is clipped to the format's largest finite value (e5m2 57344, e4m3fn 448) before the cast, so an outlier
becomes +-max rather than inf (e5m2) or NaN (e4m3fn has no inf) that would poison every later attention read.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

FP8_MAX = {jnp.dtype(jnp.float8_e5m2): 57344.0, jnp.dtype(jnp.float8_e4m3fn): 448.0}


class KVScale(nnx.Variable):
    """One layer's per-tensor K (or V) dequantization scale, a float32 scalar. Model state, not a trainable
    parameter; it is an input array of the jitted step like the weights, so every checkpoint compiles the same
    shapes. Only float8_e4m3fn pages use it (see `page_scale`)."""


def is_fp8(dtype) -> bool:
    return jnp.dtype(dtype) in FP8_MAX


def uses_scale(dtype) -> bool:
    """Only float8_e4m3fn pages are scaled; float8_e5m2 pages are a direct cast (vLLM), float pages exact."""
    return jnp.dtype(dtype) == jnp.float8_e4m3fn


def page_scale(dtype, scale: jax.Array | None) -> jax.Array | None:
    """The scale that pages of `dtype` are written and read with: the layer's scale, or None (no scaling)."""
    return scale if uses_scale(dtype) else None


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


def describe_scales(state) -> tuple[bool, str]:
    """(found, text): whether any layer's checkpoint scale differs from 1.0, and the range of k/v scales."""
    values = {"k_scale": [], "v_scale": []}
    for path, var in nnx.to_flat_state(state):
        if isinstance(var, KVScale):
            values[path[-1]].append(float(var[...]))
    found = any(v != 1.0 for vs in values.values() for v in vs)
    text = ", ".join(f"{name} {min(vs):.4g}..{max(vs):.4g}" for name, vs in values.items() if vs)
    return found, text
