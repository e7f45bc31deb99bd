"""FP8 skinny GEMM that quantizes its activations itself: x in bfloat16 / float16 / float32, dynamic per-token FP8
scales, float8 weights; Pallas GPU (Triton lowering) kernel and its jitted API.

Contract: x [M, K] float, wq [N, K] float8_e4m3fn (the model's [O, I]), w_scale [1, N] float32 ->
  (xq, x_scale) = quantization/fp8_quant.quantize_activations(x)         (one scale a token, the rule below)
  y[m, n] = x_scale[m] w_scale[n] sum_k xq[m, k] wq[n, k], in out_dtype
The same product as pallas_kernels/fp8_skinny.py after the activations' quantization, in one kernel.

Why: at a decode step of a few rows, quantizing x in XLA costs two launch-bound kernels a product (the row's
maximum, then the divide-and-cast fused with the pad to 16 rows) and the skinny kernel's output one more (the scales
and the cast, or the split-K sum): on an H100 about 14 small kernels a layer of the FP8 7B, ~0.55 ms of its 3.75 ms
token (NOTES 54). Here x is read unpadded under a row mask, quantized tile by tile in registers, and where K is not
split the kernel writes the scaled output in out_dtype: one kernel a product (two where K is split: XLA sums the
already-scaled float32 partials and casts).

Kernel: fp8_skinny's grid, tiles and heuristic (grid (row blocks, N / block_n, S), a program owns block_n weight rows
and one K-split). Each program first walks all of x's K for its rows' maximum (x is a few KB to tens of KB, read from
L2 by every program of the row block; the elementwise maximum is carried and reduced once at the end), then its
K-split as fp8_skinny does, quantizing each [block_m, block_k] tile of x before the tensor-core dot.

Values: the rule's exactly (fp8_act_quant.py's): the maximum is exact, scale = max|v| x float32(1/448) (1 where the
row is zero), q = float8(clip(v / scale, -448, 448)) with the division IEEE-rounded (`div.rn.f32`), so the float8
values are those of the rule, not those of XLA's GPU division (NOTES 54). The products are exact in float32; the sums
run block_k terms in the tensor core, then in a float32 accumulator. Where K is split, each split's partial is scaled
before XLA adds them (the unsplit form scales the sum): the results differ by float32 rounding only.

Status: opt-in (layers/fp8_matmul.py's QWENJAX_FP8_ACT_KERNEL=fused); CPU interpret mode tested, not yet run on a GPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.fp8_act_quant import FP8, FP8_MAX, INV_FP8_MAX, div_rn
from pallas_kernels import fp8_skinny
from pallas_kernels.fp8_skinny import _DIMS, _CompilerParams

X_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


def why_not(m: int, k: int, n: int, *, x_dtype, w_dtype, block_n: int, block_k: int) -> str | None:
    """None when the product and the tiles fit the kernel, else why not (with the numbers)."""
    return fp8_skinny.why_not(m, k, n, x_dtype=x_dtype, w_dtype=w_dtype, block_n=block_n, block_k=block_k,
                              x_dtypes=X_DTYPES)


def supported(m: int, k: int, n: int, *, x_dtype=jnp.bfloat16, w_dtype=FP8) -> bool:
    """Whether the kernel takes this product with its default tiles (else the caller quantizes x and multiplies)."""
    return fp8_skinny.supported(m, k, n, x_dtype=x_dtype, w_dtype=w_dtype, x_dtypes=X_DTYPES)


def _kernel(x_ref, w_ref, ws_ref, o_ref, *, block_m, block_k, blocks_per_split, num_k_blocks, swap, interpret):
    # x_ref [M, K] float (all of x, unpadded: this program's rows are block i's, those past M read as zeros: zero
    # maximum, scale 1, zero float8 values, and they are never stored); w_ref [bn, K] float8 (this block of weight
    # rows); ws_ref [1, bn] float32; o_ref [M, bn]: the output in out_dtype (no K split) or this split's float32
    # partial. swap: the product as w . x^T ([bn, bm]), as in fp8_skinny (wgmma's M side a multiple of 64).
    bm, bk, bn = block_m, block_k, w_ref.shape[0]
    rows = pl.program_id(0) * bm + lax.broadcasted_iota(jnp.int32, (bm, bk), 0)
    cols = lax.broadcasted_iota(jnp.int32, (bm, bk), 1)
    real = rows < x_ref.shape[0]

    def x_tile(k0):  # [bm, bk] float32
        return plgpu.load(x_ref.at[rows, k0 + cols], mask=real, other=jnp.zeros((), x_ref.dtype)).astype(jnp.float32)

    # pass 1: every row's maximum over all of K (an elementwise maximum carried, reduced once)
    widest = lax.fori_loop(0, num_k_blocks, lambda b, mx: jnp.maximum(mx, jnp.abs(x_tile(b * bk))),
                           jnp.zeros((bm, bk), jnp.float32))
    amax = jnp.max(widest, axis=1, keepdims=True)                              # [bm, 1]
    scale = jnp.where(amax > 0, amax * jnp.float32(INV_FP8_MAX), 1.0)          # the rule's, fp8_act_quant's
    scale_tile = jnp.broadcast_to(scale, (bm, bk))

    first = pl.program_id(2) * blocks_per_split
    count = jnp.clip(num_k_blocks - first, 0, blocks_per_split)

    def body(i, acc):
        k0 = pl.multiple_of((first + i) * bk, bk)
        xq = jnp.clip(div_rn(x_tile(k0), scale_tile, interpret), -FP8_MAX, FP8_MAX).astype(FP8)   # [bm, bk]
        w = w_ref[:, pl.ds(k0, bk)]                                            # [bn, bk] float8: one load a row
        a, b = (w, xq) if swap else (xq, w)
        return acc + lax.dot_general(a, b, _DIMS, preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, count, body, jnp.zeros((bn, bm) if swap else (bm, bn), jnp.float32))
    y = (acc.T if swap else acc) * scale * ws_ref[...]                         # [bm, bn]: (acc x_s) w_s, as XLA's
    out_rows = pl.program_id(0) * bm + lax.broadcasted_iota(jnp.int32, (bm, bn), 0)
    out_cols = lax.broadcasted_iota(jnp.int32, (bm, bn), 1)
    plgpu.store(o_ref.at[out_rows, out_cols], y.astype(o_ref.dtype), mask=out_rows < o_ref.shape[0])


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_m", "block_n", "block_k", "num_splits",
                                             "num_warps", "num_stages", "interpret"))
def fp8_skinny_dynamic(x: jax.Array, wq: jax.Array, w_scale: jax.Array, *, out_dtype, block_m=None, block_n=None,
                       block_k=None, num_splits=None, num_warps=None, num_stages=None,
                       interpret: bool = False) -> jax.Array:
    """[M, N] in out_dtype (module docstring); tiles and launch default to fp8_skinny.heuristic."""
    (m, k), n = x.shape, wq.shape[0]
    if wq.shape[1] != k or w_scale.shape != (1, n):
        raise ValueError(f"fp8 skinny GEMM operands: x [M, K], wq [N, K], w_scale [1, N]; got {list(x.shape)}, "
                         f"{list(wq.shape)}, {list(w_scale.shape)}")
    bm, bn, bk, splits, per_split, num_k_blocks, warps, stages = fp8_skinny.launch(
        m, k, n, (block_m, block_n, block_k, num_splits, num_warps, num_stages), x_dtype=x.dtype, w_dtype=wq.dtype,
        x_dtypes=X_DTYPES)
    if splits == 1:
        out_spec = pl.BlockSpec((m, bn), lambda i, j, s: (0, j))
        out_shape = jax.ShapeDtypeStruct((m, n), out_dtype)
    else:
        out_spec = pl.BlockSpec((None, m, bn), lambda i, j, s: (s, 0, j))
        out_shape = jax.ShapeDtypeStruct((splits, m, n), jnp.float32)
    out = pl.pallas_call(
        functools.partial(_kernel, block_m=bm, block_k=bk, blocks_per_split=per_split, num_k_blocks=num_k_blocks,
                          swap=bm < 64, interpret=interpret),
        grid=(-(-m // bm), n // bn, splits),
        in_specs=[pl.BlockSpec((m, k), lambda i, j, s: (0, 0)), pl.BlockSpec((bn, k), lambda i, j, s: (j, 0)),
                  pl.BlockSpec((1, bn), lambda i, j, s: (0, j))],
        out_specs=out_spec,
        out_shape=out_shape,
        compiler_params=_CompilerParams(num_warps=warps, num_stages=stages),
        interpret=interpret,
        name=f"qwenjax_fp8_skinny_dyn_m{bm}_n{bn}_k{bk}_s{splits}",
    )(x, wq, w_scale.astype(jnp.float32))
    return out if splits == 1 else out.sum(axis=0).astype(out_dtype)
