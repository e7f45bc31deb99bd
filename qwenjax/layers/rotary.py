"""Rotary position embeddings (the rotate-half layout Hugging Face's Qwen2 uses).

The cos / sin tables made here are the only place RoPE scaling enters: every attention path (the jnp `apply_rope`,
the fused RoPE + KV write kernel) takes them as given, so a scaled model needs no other code path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwenjax.rope_scaling import RopeScaling, attention_scaling, inv_freq


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float,
                 scaling: RopeScaling | None = None) -> tuple[jax.Array, jax.Array]:
    """positions [...] int -> cos, sin [..., head_dim] float32 (each frequency repeated for both halves).

    `scaling` (qwenjax/rope_scaling.py): the frequencies and the factor on cos and sin transformers computes for
    it (yarn's attention factor); None is plain RoPE. Either way the tables depend on the position alone, so K
    written to a page is the same whichever step or sequence wrote it (prefix caching relies on that)."""
    if scaling is None:
        inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    else:
        inv = jnp.asarray(inv_freq(head_dim, theta, scaling))  # host-computed constant, [head_dim // 2]
    freqs = positions.astype(jnp.float32)[..., None] * inv
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    mscale = attention_scaling(scaling)
    if mscale != 1.0:  # transformers: cos * attention_scaling, sin * attention_scaling, in float32
        cos, sin = cos * jnp.float32(mscale), sin * jnp.float32(mscale)
    return cos, sin
