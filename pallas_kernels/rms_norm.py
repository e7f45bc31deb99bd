"""Residual add + RMSNorm in one pass: Pallas GPU (Triton lowering) kernel, jitted API and jnp reference.

A decoder layer adds each block's output to the residual stream and normalizes the sum for the next block. XLA runs
that as three kernels (the add, the mean-of-squares reduction, the normalizing multiply): at batch 1 each is a ~1.4 us
launch-bound kernel, 4 of them a layer more than needed (~150 us a token on a 28-layer 7B). This kernel reads x and
the residual once and writes both the new residual and the normalized rows (vLLM's fused_add_rms_norm).

Numerics follow Hugging Face's Qwen2 (and `reference` here) in the model dtype: s = x + residual rounded to the model
dtype; y = weight * (s in float32 * rsqrt(mean(s^2) + eps)) rounded to the model dtype, the product rounded again.
Only the order of the float32 sum of squares differs from XLA's.

Shapes: x, residual [T, D] (T tokens, D the model width, any size: the row is padded to a power of two inside the
kernel and masked), weight [D]; or x the float32 partial sums [S, T, D] of a K-split product (a skinny kernel's
splits), added here in float32 (split 0 first) and rounded to residual's dtype: the sum XLA would run as a kernel of
its own before this one (one ~1.4 us kernel a product at batch 1). Returns (y [T, D], s [T, D]) in residual's dtype;
with fp8=True also y's rows quantized for an FP8 product (per-token dynamic scales, fp8_act_quant.py's rule): the
row is in registers, so the two kernels of XLA's quantization (or fp8_act_quant's one) before qkv_proj and
gate_up_proj go.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.fp8_act_quant import FP8, quantize_row, rounded
from pallas_kernels.paged_attention import _CompilerParams

_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


def _kernel(x_ref, r_ref, w_ref, y_ref, s_ref, *fp8_refs, eps: float, width: int, interpret: bool):
    # x_ref [T, D] or [S, T, D] float32 partials, r_ref / y_ref / s_ref [T, D] (all of them; this program's row is
    # program_id(0)), w_ref [D]; fp8_refs: none, or q [T, D] float8 and its scales [T, 1] (y's row quantized for an
    # FP8 product, fp8_act_quant's rule)
    t = pl.program_id(0)
    cols = pl.ds(0, pl.next_power_of_2(width))
    valid = lax.broadcasted_iota(jnp.int32, (pl.next_power_of_2(width),), 0) < width
    dtype = r_ref.dtype
    if len(x_ref.shape) == 3:  # the splits' partials, added in float32 then rounded: the product's output
        x = None
        for i in range(x_ref.shape[0]):
            p = plgpu.load(x_ref.at[jnp.int32(i), t, cols], mask=valid, other=0.0)
            x = p if x is None else x + p
        x = rounded(x, dtype, interpret)
    else:
        x = plgpu.load(x_ref.at[t, cols], mask=valid, other=jnp.zeros((), dtype)).astype(jnp.float32)
    r = plgpu.load(r_ref.at[t, cols], mask=valid, other=jnp.zeros((), dtype))
    s = (x + r.astype(jnp.float32)).astype(dtype)  # the model dtype's add
    s32 = s.astype(jnp.float32)
    inv = lax.rsqrt(jnp.sum(s32 * s32) / width + eps)  # masked lanes are 0: they add nothing
    w = plgpu.load(w_ref.at[cols], mask=valid, other=jnp.zeros((), w_ref.dtype))
    y = w * (s32 * inv).astype(dtype)
    plgpu.store(s_ref.at[t, cols], s, mask=valid)
    plgpu.store(y_ref.at[t, cols], y.astype(y_ref.dtype), mask=valid)
    if fp8_refs:  # (q, scale), or the scale alone
        quantize_row(rounded(y.astype(jnp.float32), y_ref.dtype, interpret), *(None, *fp8_refs)[-2:], t, cols, valid,
                     interpret)


def _validate(x, residual, weight):
    if residual.ndim != 2 or x.shape[-2:] != residual.shape or x.ndim not in (2, 3):
        raise ValueError(f"x must be [T, D] or float32 partials [S, T, D], residual [T, D]; got {x.shape} and "
                         f"{residual.shape}")
    if residual.dtype not in _DTYPES or x.dtype != (residual.dtype if x.ndim == 2 else jnp.float32):
        raise ValueError(f"residual's dtype must be one of bfloat16, float16, float32 and x's the same ([T, D]) or "
                         f"float32 (partials [S, T, D]); got x {x.dtype} {list(x.shape)} and residual "
                         f"{residual.dtype}")
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"weight must be [D={x.shape[-1]}]; got {weight.shape}")


@functools.partial(jax.jit, static_argnames=("eps", "fp8", "scale_only", "interpret"))
def add_rms_norm(x, residual, weight, *, eps: float, fp8: bool = False, scale_only: bool = False,
                 interpret: bool = False):
    """(weight * rmsnorm(x + residual), x + residual), both [T, D] in residual's dtype (x: [T, D], or the float32
    partials [S, T, D] of a K-split product, summed first: module docstring). One program a row. fp8: also the
    normalized rows quantized for an FP8 product, (q [T, D] float8_e4m3fn, scale [T, 1] float32), by
    fp8_act_quant.py's rule from the rows as written (the model dtype's values): (y, s, q, scale); with scale_only
    the scales alone, (y, s, scale), for a product that quantizes y by them (fp8_skinny_rows.py)."""
    _validate(x, residual, weight)
    T, D = residual.shape
    whole = pl.BlockSpec((T, D), lambda t: (0, 0))
    x_spec = whole if x.ndim == 2 else pl.BlockSpec(x.shape, lambda t: (0, 0, 0))
    fp8_specs = ([] if scale_only else [whole]) + [pl.BlockSpec((T, 1), lambda t: (0, 0))] if fp8 else []
    fp8_shapes = ([] if scale_only else [jax.ShapeDtypeStruct((T, D), FP8)]) + \
        [jax.ShapeDtypeStruct((T, 1), jnp.float32)] if fp8 else []
    return tuple(pl.pallas_call(
        functools.partial(_kernel, eps=float(eps), width=D, interpret=interpret),
        grid=(T,),
        in_specs=[x_spec, whole, pl.BlockSpec((D,), lambda t: (0,))],
        out_specs=[whole, whole, *fp8_specs],
        out_shape=[jax.ShapeDtypeStruct((T, D), residual.dtype)] * 2 + fp8_shapes,
        # partials: 8 warps, more of their loads in flight for the one program of a decode row (4 warps ran the
        # norm on 7-10 partials at 4.5 us on an H100 against 2.1 without: NOTES 56)
        compiler_params=_CompilerParams(num_warps=4 if D <= 4096 and x.ndim == 2 else 8, num_stages=1),
        interpret=interpret,
        name=("qwenjax_add_rms_norm_fp8_scale" if scale_only else "qwenjax_add_rms_norm_fp8") if fp8 else
        "qwenjax_add_rms_norm",
    )(x, residual, weight))


def reference(x, residual, weight, *, eps: float):
    """The same in plain jnp (Hugging Face's order of roundings; partials [S, T, D] summed, rounded first)."""
    if x.ndim == 3:
        x = x.sum(axis=0).astype(residual.dtype)
    s = x + residual
    s32 = s.astype(jnp.float32)
    y = s32 * lax.rsqrt(jnp.mean(s32 * s32, axis=-1, keepdims=True) + eps)
    return weight * y.astype(x.dtype), s
