"""FP8 skinny GEMM over x's real rows: no pad before it, the scaled output written by it, and optionally the
activations' per-token quantization inside it. Pallas GPU (Triton lowering) kernel and its jitted API.

Contract: wq [N, K] float8_e4m3fn (the model's [O, I]), w_scale [1, N] float32, and either
  x [M, K] float8_e4m3fn with x_scale [M, 1] float32 (quantized elsewhere), or
  x [M, K] bfloat16 / float16 / float32 with x_scale None: (x, x_scale) = fp8_quant.quantize_activations(x) inside,
  or with x_scale [M, 1] given: x's rows' scales by that rule, found elsewhere (the add + RMSNorm kernel has the row
  in registers; XLA fuses a row's maximum into the op that makes it), x quantized by them inside
-> y[m, n] = x_scale[m] w_scale[n] sum_k xq[m, k] wq[n, k], in out_dtype: fp8_skinny.py's product.

Why: at a decode step of a few rows, pallas_kernels/fp8_skinny.py needs x padded to 16 rows and leaves the scales
and the cast (or the split-K sum) to XLA, and XLA's quantization of x costs two more kernels a product: with the
padding fused into the cast, ~14 small kernels a layer of the FP8 7B on an H100, ~0.55 ms of its 3.75 ms token
(NOTES 54). Here x's rows are read under a mask (rows past M read as zeros and are never stored), and where K is not
split the kernel writes the scaled output in out_dtype: one kernel a product (where K is split, XLA adds the
already-scaled float32 partials and casts, or with `partials` the add + RMSNorm kernel after the product does).
With float x the quantization is inside too (QWENJAX_FP8_ACT_KERNEL=fused); with float8 x the rows come from the
kernel that wrote them (=1: rms_norm.py, fp8_act_quant.py).

Kernel: fp8_skinny's grid, tiles and heuristic (grid (row blocks, N / block_n, S), a program owns block_n weight rows
and one K-split, tensor-core dots of [block_m, block_k] tiles, swapped below 64 rows). To quantize, each program
first walks all of x's K for its rows' maxima (x is a few KB to tens of KB, read from L2 by every program of the row
block, in chunks of up to 4,096 columns for one row; the elementwise maximum is carried and reduced once at the end),
then quantizes each x tile in registers before its dot (for one row, the row's tile once, widened with zero rows).
With the scales given, the maxima pass is skipped: on an H100 (batch 1, NOTES 56) it cost each product 0.7 us (qkv)
to 4.8 us (down_proj, K = 18,944) against the same kernel on float8 rows.

Values: the rule's exactly (fp8_act_quant.py's): the maximum is exact, scale = max|v| x float32(1/448) (1 where the
row is zero), q = float8(clip(v / scale, -448, 448)) with the division IEEE-rounded (`div.rn.f32`). The products are
exact in float32; the sums run block_k terms in the tensor core, then in a float32 accumulator. Where K is split,
each split's partial is scaled before XLA adds them (fp8_skinny scales the sum): float32 rounding apart, the same.

Status: the default for decode steps of at most 8 rows (layers/fp8_matmul.py's QWENJAX_FP8_ACT_KERNEL "auto"); on an
H100 correct at the 7B's shapes (tests/gpu/test_fp8_gpu.py) and 3.680 ms a token at batch 1 against 3.788 with
XLA's quantization (NOTES 56). Offline for sm_90 (benchmarks/kernel_isa.py): wgmma with cp.async, no spills; main
loop 129 instructions against fp8_skinny's 126, 148 quantizing one row.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import fp8_skinny
from pallas_kernels.fp8_act_quant import FP8, FP8_MAX, INV_FP8_MAX, div_rn, rounded
from pallas_kernels.fp8_skinny import _DIMS, _CompilerParams

FLOAT_X = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))  # quantized inside


def supported(m: int, k: int, n: int, *, x_dtype=jnp.bfloat16, w_dtype=FP8) -> bool:
    """Whether the kernel takes this product with its default tiles (x float8, or float to quantize inside)."""
    return fp8_skinny.supported(m, k, n, x_dtype=x_dtype, w_dtype=w_dtype, x_dtypes=(FP8, *FLOAT_X))


def _kernel(x_ref, *refs, block_m, block_k, blocks_per_split, num_k_blocks, swap, interpret, swiglu=False):
    # x_ref [M, K] (all of x, unpadded: this program's rows are block i's, those past M read as zeros and are never
    # stored); refs: x_scale [M, 1] float32 (float8 x; float x where its rows' scales were found elsewhere), w [bn, K]
    # float8 (this block of weight rows), w_scale [1, bn] float32, out [M, bn]: the output in out_dtype (no K split)
    # or this split's float32 partial. swap: the
    # product as w . x^T ([bn, bm]), as in fp8_skinny (wgmma's M side a multiple of 64). swiglu: two weight blocks
    # (gate's rows, up's) and their scales, the output h = silu(gate) * up [M, bn].
    quantize = x_ref.dtype != FP8
    parts = 2 if swiglu else 1
    xs_ref = refs[0] if len(refs) == 2 * parts + 2 else None  # x_scale: given, or found here
    w_refs, ws_refs, o_ref = refs[-2 * parts - 1:-parts - 1], refs[-parts - 1:-1], refs[-1]
    bm, bk, bn = block_m, block_k, w_refs[0].shape[0]
    # x's tiles are loaded as [lr, bk]: lr = bm, or 1 where x is one row to quantize (batch-1 decode), whose tile
    # is then widened to the dot's [bm, bk] with zero rows, so the loads, maxima and divisions are done once a
    # column instead of bm times (offline, sm_90: 148 main-loop instructions against 450). Float8 x keeps bm: its
    # tiles then go to shared memory by cp.async, pipelined, where a widened tile would pass through registers.
    lr = 1 if quantize and x_ref.shape[0] == 1 else bm
    rows = pl.program_id(0) * bm + lax.broadcasted_iota(jnp.int32, (lr, bk), 0)
    cols = lax.broadcasted_iota(jnp.int32, (lr, bk), 1)
    real = rows < x_ref.shape[0]

    def x_tile(k0):  # [lr, bk] in x's dtype
        return plgpu.load(x_ref.at[rows, k0 + cols], mask=real, other=jnp.zeros((), x_ref.dtype))

    if xs_ref is None:  # every row's maximum over all of K (an elementwise maximum carried, reduced once), its scale
        # in chunks of `width` columns: up to 4,096 for one row (down_proj's 18,944 in 5 loads), bk for more
        k = x_ref.shape[1]
        width = min(pl.next_power_of_2(k), 4096) if lr == 1 else bk
        wrows = pl.program_id(0) * bm + lax.broadcasted_iota(jnp.int32, (lr, width), 0)
        wcols = lax.broadcasted_iota(jnp.int32, (lr, width), 1)

        def widest(b, mx):
            c = b * width + wcols
            v = plgpu.load(x_ref.at[wrows, c], mask=(wrows < x_ref.shape[0]) & (c < k),
                           other=jnp.zeros((), x_ref.dtype))
            return jnp.maximum(mx, jnp.abs(v.astype(jnp.float32)))

        amax = jnp.max(lax.fori_loop(0, pl.cdiv(k, width), widest, jnp.zeros((lr, width), jnp.float32)), axis=1,
                       keepdims=True)                                          # [lr, 1]
        scale = jnp.where(amax > 0, amax * jnp.float32(INV_FP8_MAX), 1.0)      # the rule's, fp8_act_quant's
    else:
        scale_rows = pl.program_id(0) * bm + lax.broadcasted_iota(jnp.int32, (lr, 1), 0)
        scale = plgpu.load(xs_ref.at[scale_rows, jnp.zeros((lr, 1), jnp.int32)], mask=scale_rows < x_ref.shape[0],
                           other=jnp.ones((), jnp.float32))                    # [lr, 1]
    scale_tile = jnp.broadcast_to(scale, (lr, bk))

    def quantized(tile):  # [lr, bk] -> [bm, bk] float8
        if quantize:
            tile = jnp.clip(div_rn(tile.astype(jnp.float32), scale_tile, interpret), -FP8_MAX, FP8_MAX).astype(FP8)
        if lr == bm:
            return tile
        first_row = lax.broadcasted_iota(jnp.int32, (bm, bk), 0) == 0
        return jnp.where(first_row, jnp.broadcast_to(tile, (bm, bk)), jnp.zeros((), FP8))

    first = pl.program_id(2) * blocks_per_split
    count = jnp.clip(num_k_blocks - first, 0, blocks_per_split)

    def body(i, accs):
        k0 = pl.multiple_of((first + i) * bk, bk)
        xq = quantized(x_tile(k0))                                             # [bm, bk] float8
        out = []
        for w_ref, acc in zip(w_refs, accs):
            w = w_ref[:, pl.ds(k0, bk)]                                        # [bn, bk] float8: one load a row
            a, b = (w, xq) if swap else (xq, w)
            out.append(acc + lax.dot_general(a, b, _DIMS, preferred_element_type=jnp.float32))
        return tuple(out)

    accs = lax.fori_loop(0, count, body, (jnp.zeros((bn, bm) if swap else (bm, bn), jnp.float32),) * parts)
    # [bm, bn] each: (acc x_s) w_s, as XLA's (where lr = 1 the rows past the first carry the first row's scale:
    # they are zero and never stored)
    ys = [(acc.T if swap else acc) * scale * ws_ref[...] for acc, ws_ref in zip(accs, ws_refs)]
    y = ys[0]
    if swiglu:  # h as torch computes it from the projection's outputs in the model dtype (fp8_act_quant's SwiGLU)
        gate, up = (rounded(v, o_ref.dtype, interpret) for v in ys)
        y = rounded(gate / (1.0 + jnp.exp(-gate)), o_ref.dtype, interpret) * up
    out_rows = pl.program_id(0) * bm + lax.broadcasted_iota(jnp.int32, (bm, bn), 0)
    out_cols = lax.broadcasted_iota(jnp.int32, (bm, bn), 1)
    plgpu.store(o_ref.at[out_rows, out_cols], y.astype(o_ref.dtype), mask=out_rows < o_ref.shape[0])


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_m", "block_n", "block_k", "num_splits",
                                             "num_warps", "num_stages", "interpret", "partials", "swiglu"))
def fp8_skinny_rows(x: jax.Array, wq: jax.Array, w_scale: jax.Array, x_scale: jax.Array | None = None, *,
                    out_dtype, block_m=None, block_n=None, block_k=None, num_splits=None, num_warps=None,
                    num_stages=None, interpret: bool = False, partials: bool = False,
                    swiglu: bool = False) -> jax.Array:
    """[M, N] in out_dtype (module docstring: x float8 with x_scale, or float x quantized inside); tiles and launch
    default to fp8_skinny.heuristic. partials: where K is split, the splits' scaled float32 partials [S, M, N]
    instead of their sum, for a consumer that adds them itself (rms_norm.add_rms_norm). swiglu: wq [2F, K] and
    w_scale [1, 2F] are a fused gate/up projection (gate's F rows, then up's) and the result is the MLP's
    h = silu(gate) * up [M, F] in out_dtype, as torch computes it from the bf16 gate and up (the fused output, its
    slices and XLA's multiply never written; K is not split)."""
    (m, k), n = x.shape, wq.shape[0]
    if wq.shape[1] != k or w_scale.shape != (1, n) or (x_scale is not None and x_scale.shape != (m, 1)):
        raise ValueError(f"fp8 skinny GEMM operands: x [M, K], wq [N, K], w_scale [1, N], x_scale [M, 1] or none; "
                         f"got {list(x.shape)}, {list(wq.shape)}, {list(w_scale.shape)}, "
                         f"{None if x_scale is None else list(x_scale.shape)}")
    if swiglu and (n % 2 or (num_splits or 1) != 1):
        raise ValueError(f"fp8 skinny GEMM with swiglu: gate and up side by side (an even N, got {n}), K not split "
                         f"(got num_splits={num_splits})")
    n_out = n // 2 if swiglu else n
    if swiglu and block_n is None:  # two weight blocks a program: half as wide, as many programs and bytes each
        block_n = 64 if n_out % 64 == 0 else None
    bm, bn, bk, splits, per_split, num_k_blocks, warps, stages = fp8_skinny.launch(
        m, k, n_out, (block_m, block_n, block_k, 1 if swiglu else num_splits, num_warps, num_stages),
        x_dtype=x.dtype, w_dtype=wq.dtype, x_dtypes=(FP8, *FLOAT_X))
    if x_scale is None and jnp.dtype(x.dtype) not in FLOAT_X:
        raise ValueError(f"fp8 skinny GEMM: float8 x comes with its x_scale [M, 1] (float x may: its rows' scales "
                         f"by the rule, else found inside); got x {jnp.dtype(x.dtype)} and no x_scale")
    if splits == 1:
        out_spec = pl.BlockSpec((m, bn), lambda i, j, s: (0, j))
        out_shape = jax.ShapeDtypeStruct((m, n_out), out_dtype)
    else:
        out_spec = pl.BlockSpec((None, m, bn), lambda i, j, s: (s, 0, j))
        out_shape = jax.ShapeDtypeStruct((splits, m, n), jnp.float32)
    whole = pl.BlockSpec((m, k), lambda i, j, s: (0, 0))
    scales = [] if x_scale is None else [pl.BlockSpec((m, 1), lambda i, j, s: (0, 0))]
    # the weight and its scales once (or twice, gate's block j and up's: the same arrays, blocks F / bn apart)
    offsets = (0, n_out // bn) if swiglu else (0,)
    weights = [pl.BlockSpec((bn, k), lambda i, j, s, o=o: (j + o, 0)) for o in offsets]
    w_scales = [pl.BlockSpec((1, bn), lambda i, j, s, o=o: (0, j + o)) for o in offsets]
    out = pl.pallas_call(
        functools.partial(_kernel, block_m=bm, block_k=bk, blocks_per_split=per_split, num_k_blocks=num_k_blocks,
                          swap=bm < 64, interpret=interpret, swiglu=swiglu),
        grid=(-(-m // bm), n_out // bn, splits),
        in_specs=[whole, *scales, *weights, *w_scales],
        out_specs=out_spec,
        out_shape=out_shape,
        compiler_params=_CompilerParams(num_warps=warps, num_stages=stages),
        interpret=interpret,
        name=f"qwenjax_fp8_skinny_rows{'_q' if jnp.dtype(x.dtype) in FLOAT_X else ''}"
             f"{'s' if x_scale is not None and jnp.dtype(x.dtype) in FLOAT_X else ''}{'_swiglu' if swiglu else ''}"
             f"_m{bm}_n{bn}_k{bk}_s{splits}",
    )(x, *([] if x_scale is None else [x_scale.astype(jnp.float32)]), *[wq] * len(offsets),
      *[w_scale.astype(jnp.float32)] * len(offsets))
    return out if splits == 1 or partials else out.sum(axis=0).astype(out_dtype)
