"""FP8 weight GEMV for decode (M = 1..MAX_ROWS rows): Pallas GPU (Triton lowering) kernel and its jitted API.

Axis letters: M rows of x (tokens), K inputs, N outputs, S K-splits.

Contract (layers/fp8_matmul.py's, one scale group): xq [M, K] float8_e4m3fn, x_scale [M, 1] float32, wq [N, K]
float8_e4m3fn (the model's [O, I]), w_scale [1, N] float32 -> y[m, n] = x_scale[m] w_scale[n] sum_k xq[m, k] wq[n, k],
in out_dtype.
Every float8 value is exact in float32 and so is every product of two, so this equals XLA's FP8 GEMM up to the
order of the float32 sum: the same values, not an approximation of them.

Why: at a few rows the product is a read of the weight (K x N bytes) and nothing else; cuBLASLt's FP8 GEMM, which XLA
takes for the float8 dot, cost 60-110 us over bf16's at 7B shapes up to 4,096 rows on an H100 (NOTES 47), so a
decode step on FP8 weights was slower than on bf16 ones. Here the weight is read once, 1 byte a value. (Measured
since, NOTES 48: with the weight [N, K] cuBLASLt's GEMM no longer transposes it and beat this kernel at gate/up, one
row, 85 against 99 us; so it stays opt-in.)

Kernel: no tensor-core dot (bandwidth, not FMA rate, is the limit). Grid (N / block_n, S); a program owns block_n
rows of the weight and one K-split and walks it in [block_n, block_k] tiles (contiguous along K): one coalesced load,
converted to float32 by the hardware's float8 conversion (tt.fp_to_fp: sm_89 and later), multiplied by x's block_k
values of each row broadcast over the tile's rows, and added into an element-wise float32 accumulator [block_n,
block_k] per row of x (summed over its block_k columns once, at the end). x comes in as float32 (xq converted
outside: exact, M x K values).
S > 1 writes float32 partials [S, M, N] that XLA sums; the scales multiply that sum (one small fusion).

Status: tested on CPU in interpret mode against the float32 reference; on an H100 (tests/gpu/test_fp8_gpu.py) in its
first, [K, N] form, which the [N, K] form has not run as yet. Opt-in from the model (layers/fp8_matmul.py's GEMV_ENV).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_CompilerParams = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")

MAX_ROWS = 8             # the kernel unrolls over the rows of x: decode batches only
_FP8 = jnp.dtype(jnp.float8_e4m3fn)
_TARGET_PROGRAMS = 528   # four programs per SM of an H100 (132 SMs): short programs, the weight read spread evenly


def heuristic(m: int, k: int, n: int) -> tuple[int, int, int, int, int]:
    """(block_n, block_k, num_splits, num_warps, num_stages). A [block_n, block_k] float32 accumulator per row of x
    over 128 threads: 64 x 128 at one row (64 registers a thread; each weight row's 128 bytes one line), block_k
    halved per doubling of the rows so the accumulators stay at 64 registers; K split until about _TARGET_PROGRAMS
    programs run. Untuned."""
    bn = 64
    while bn > 16 and n % bn:
        bn //= 2
    bk = max(2, 128 // (1 << (m - 1).bit_length()))
    while bk > 2 and k % bk:
        bk //= 2
    blocks = k // bk
    splits = max(1, min(-(-_TARGET_PROGRAMS // (n // bn)), blocks))
    return bn, bk, splits, 4, 3


def why_not(m: int, k: int, n: int, *, x_dtype, w_dtype, block_n: int, block_k: int) -> str | None:
    """None when the product and the tiles fit the kernel, else why not (with the numbers)."""
    if jnp.dtype(w_dtype) != _FP8 or jnp.dtype(x_dtype) != _FP8:
        return f"the fp8 GEMV takes float8_e4m3fn x and weights, got {jnp.dtype(x_dtype)} and {jnp.dtype(w_dtype)}"
    if not 1 <= m <= MAX_ROWS:
        return f"the fp8 GEMV takes 1 to {MAX_ROWS} rows of x, got {m}"
    for name, v, dim, low in (("block_n", block_n, n, 16), ("block_k", block_k, k, 2)):
        if v < low or v & (v - 1) or dim % v:
            return f"{name}={v} must be a power of two >= {low} dividing {dim}"
    return None


def supported(m: int, k: int, n: int, *, x_dtype=_FP8, w_dtype=_FP8) -> bool:
    """Whether the kernel takes this product with its default tiles (else the caller uses another path)."""
    bn, bk, *_ = heuristic(max(m, 1), k, n)
    return why_not(m, k, n, x_dtype=x_dtype, w_dtype=w_dtype, block_n=bn, block_k=bk) is None


def _kernel(x_ref, w_ref, o_ref, *, rows, block_k, blocks_per_split, num_k_blocks):
    # x_ref [M, K] float32 (whole); w_ref [bn, K] float8 (this block of weight rows); o_ref [M, bn] float32 (this
    # split's)
    first = pl.program_id(1) * blocks_per_split
    count = jnp.clip(num_k_blocks - first, 0, blocks_per_split)

    def body(i, accs):
        k0 = (first + i) * block_k
        w = w_ref[:, pl.ds(k0, block_k)].astype(jnp.float32)                  # [bn, bk]: one load, converted
        return tuple(acc + x_ref[m, pl.ds(k0, block_k)][None, :] * w for m, acc in enumerate(accs))

    zeros = tuple(jnp.zeros((w_ref.shape[0], block_k), jnp.float32) for _ in range(rows))
    for m, acc in enumerate(lax.fori_loop(0, count, body, zeros)):
        o_ref[pl.ds(m, 1), :] = jnp.sum(acc, axis=1)[None]


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_n", "block_k", "num_splits", "num_warps",
                                             "num_stages", "interpret"))
def fp8_gemv(xq: jax.Array, x_scale: jax.Array, wq: jax.Array, w_scale: jax.Array, *, out_dtype, block_n=None,
             block_k=None, num_splits=None, num_warps=None, num_stages=None, interpret: bool = False) -> jax.Array:
    """[M, N] in out_dtype (module docstring for the operands); tiles and launch default to `heuristic`."""
    (m, k), n = xq.shape, wq.shape[0]
    if wq.shape[1] != k or x_scale.shape != (m, 1) or w_scale.shape != (1, n):
        raise ValueError(f"fp8 GEMV operands: xq [M, K], x_scale [M, 1], wq [N, K], w_scale [1, N]; got "
                         f"{list(xq.shape)}, {list(x_scale.shape)}, {list(wq.shape)}, {list(w_scale.shape)}")
    d = heuristic(m, k, n) if 1 <= m <= MAX_ROWS else (0, 0, 1, 4, 3)
    bn, bk, splits, warps, stages = (v if v is not None else dv for v, dv in
                                     zip((block_n, block_k, num_splits, num_warps, num_stages), d))
    why = why_not(m, k, n, x_dtype=xq.dtype, w_dtype=wq.dtype, block_n=bn, block_k=bk)
    if why:
        raise ValueError(why)
    num_k_blocks = k // bk
    per_split = pl.cdiv(num_k_blocks, splits)
    splits = pl.cdiv(num_k_blocks, per_split)  # no split starts past K
    partials = pl.pallas_call(
        functools.partial(_kernel, rows=m, block_k=bk, blocks_per_split=per_split, num_k_blocks=num_k_blocks),
        grid=(n // bn, splits),
        in_specs=[pl.BlockSpec((m, k), lambda j, s: (0, 0)), pl.BlockSpec((bn, k), lambda j, s: (j, 0))],
        out_specs=pl.BlockSpec((None, m, bn), lambda j, s: (s, 0, j)),
        out_shape=jax.ShapeDtypeStruct((splits, m, n), jnp.float32),
        compiler_params=_CompilerParams(num_warps=warps, num_stages=stages),
        interpret=interpret,
        name=f"qwenjax_fp8_gemv_m{m}_n{bn}_k{bk}_s{splits}",
    )(xq.astype(jnp.float32), wq)
    return (partials.sum(axis=0) * x_scale * w_scale).astype(out_dtype)
