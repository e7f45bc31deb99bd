"""FP8 (float8_e4m3fn) quantization of weights and activations: the rounding every FP8 path shares.

One rule everywhere (weights at load, activations in the step): for a set of values v sharing one scale,
  scale = max|v| x (1 / FP8_MAX)  (1.0 where max|v| is 0: the values are then all zero and stay zero)
  q     = float8_e4m3fn(clip(v / scale, -FP8_MAX, FP8_MAX))   (round to nearest even; the clip keeps the cast from
                                                                 making NaN, as e4m3fn has no inf)
and v is approximated by q x scale. Scales are float32; the division is done in float32. The scale multiplies by
INV_FP8_MAX, the float32 nearest 1 / 448, because that is what XLA compiles `max|v| / 448` to (its algebraic
simplifier turns a division by a constant into a multiplication by the constant's reciprocal): written so, the rule
gives the same scale jitted, eager and in a Pallas kernel (pallas_kernels/fp8_act_quant.py).
Which values share a scale: a weight's output channel (quantization="fp8" at load), a token's row of activations
(dynamic), a token's group of `group` consecutive input columns (block-scaled checkpoints), or a checkpoint's
static per-tensor `input_scale` (then the scale is given, not computed).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

FP8_DTYPE = jnp.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
INV_FP8_MAX = float(np.float32(1.0 / FP8_MAX))


def scale_for(amax: jax.Array) -> jax.Array:
    """float32 scales from float32 absolute maxima (module docstring)."""
    return jnp.where(amax > 0, amax.astype(jnp.float32) * jnp.float32(INV_FP8_MAX), 1.0).astype(jnp.float32)


def cast_fp8(v: jax.Array, scale: jax.Array) -> jax.Array:
    """v / scale rounded to float8_e4m3fn, saturating at +-FP8_MAX. `scale` broadcasts against v."""
    return jnp.clip(v.astype(jnp.float32) / scale, -FP8_MAX, FP8_MAX).astype(FP8_DTYPE)


def quantize_weight_per_channel(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A float kernel [I, O] -> (float8 [I, O], scales float32 [1, O]): one scale per output channel."""
    scale = scale_for(jnp.max(jnp.abs(w.astype(jnp.float32)), axis=0, keepdims=True))
    return cast_fp8(w, scale), scale


def quantize_activations(x: jax.Array, *, group: int | None = None,
                         static_scale: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """x [T, I] -> (float8 [T, I], scales float32 [T, G]).

    static_scale given: G = 1, every row x / static_scale. Else dynamic: group None -> G = 1, one scale per token;
    group g -> G = I / g, one per token per g consecutive columns (I must be a multiple of g)."""
    T, I = x.shape
    if static_scale is not None:
        scale = jnp.broadcast_to(jnp.asarray(static_scale, jnp.float32).reshape(1, 1), (T, 1))
        return cast_fp8(x, scale), scale
    g = I if group is None else group
    xg = x.astype(jnp.float32).reshape(T, I // g, g)
    scale = scale_for(jnp.max(jnp.abs(xg), axis=-1))
    return cast_fp8(xg, scale[..., None]).reshape(T, I), scale
