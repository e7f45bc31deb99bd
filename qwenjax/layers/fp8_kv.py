"""FP8 KV pages: the per-layer scales and which page dtypes use them. What a page stores and the saturating cast
are the kernels' page format (pallas_kernels/page_format.py), shared with the engine's jnp path.

vLLM's convention:
  kv_cache_dtype "fp8_e5m2"          pages are float8_e5m2 and hold the value itself (a direct cast, no scale).
  kv_cache_dtype "fp8" / "fp8_e4m3"  pages are float8_e4m3fn and hold value / scale; true value = stored * scale,
                                     with one float32 k_scale and one v_scale per layer (per tensor), read from the
                                     checkpoint when it has them and 1.0 otherwise.
Invariant: writing a finite value never stores inf or NaN (page_format.to_pages saturates).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class KVScale(nnx.Variable):
    """One layer's per-tensor K (or V) dequantization scale, a float32 scalar. Model state, not a trainable
    parameter; it is an input array of the jitted step like the weights, so every checkpoint compiles the same
    shapes. Only float8_e4m3fn pages use it (see `page_scale`)."""


def uses_scale(dtype) -> bool:
    """Only float8_e4m3fn pages are scaled; float8_e5m2 pages are a direct cast (vLLM), float pages exact."""
    return jnp.dtype(dtype) == jnp.float8_e4m3fn


def page_scale(dtype, scale: jax.Array | None) -> jax.Array | None:
    """The scale that pages of `dtype` are written and read with: the layer's scale, or None (no scaling)."""
    return scale if uses_scale(dtype) else None


def describe_scales(state) -> tuple[bool, str]:
    """(found, text): whether any layer's checkpoint scale differs from 1.0, and the range of k/v scales."""
    values = {"k_scale": [], "v_scale": []}
    for path, var in nnx.to_flat_state(state):
        if isinstance(var, KVScale):
            values[path[-1]].append(float(var[...]))
    found = any(v != 1.0 for vs in values.values() for v in vs)
    text = ", ".join(f"{name} {min(vs):.4g}..{max(vs):.4g}" for name, vs in values.items() if vs)
    return found, text
