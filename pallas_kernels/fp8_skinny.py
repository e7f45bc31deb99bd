"""FP8 skinny GEMM (M = 1..MAX_ROWS rows, decode and small mixed steps): Pallas GPU (Triton lowering) kernel on the
tensor cores, split over K where the output is narrow, and its jitted API.

Axis letters: M rows of x (tokens, padded to block_m), K inputs, N outputs, S K-splits.

Contract (layers/fp8_matmul.py's, one scale group; the same as fp8_gemv.py's): xq [M, K] float8_e4m3fn, x_scale
[M, 1] float32, wq [N, K] float8_e4m3fn (the model's [O, I]), w_scale [1, N] float32 -> y[m, n] = x_scale[m]
w_scale[n] sum_k xq[m, k] wq[n, k], in out_dtype. Every product of two float8 values is exact in float32; the tensor
core sums a block_k slice, and each slice's sum is added into a float32 accumulator (so no long chain of the
tensor core's reduced-precision accumulation: at most block_k terms, where cuBLASLt's fast accumulation runs over
all K, tests/gpu/test_fp8_gpu.py).

Why: between one and a few hundred rows a product is the read of its weight (K x N bytes; the FLOPs take less time
at FP8's rate), yet on an H100 cuBLASLt's FP8 GEMM, which XLA takes, read it at 0.7-1.7 TB/s, against 2.8 TB/s of
copy: at 256 rows down_proj (18,944 -> 3,584) took 95 us (bf16: 80), gate/up 111 us (bf16: 129); at 1 row gate/up 67-80
us, down 62-75 (NOTES 51). The FP8 engine's batch-1 token (4.34 ms against bf16's 5.24 with multi-step) and its
throughput (1.28x bf16) are held there.

Kernel: grid (M / block_m, N / block_n, S), the row blocks fastest so the programs sharing a weight tile run
together (it is read from HBM once, then from L2). A program owns block_n rows of the weight and one K-split, and
walks them in [block_n, block_k] tiles (block_k = 128: one 128-byte line a weight row), one tensor-core dot of x's
[block_m, block_k] tile against the tile's transpose a step, float32 accumulator [block_m, block_n]; below 64 rows
the product is taken as weight tile . x^T ([block_n, block_m], stored transposed), because Hopper's wgmma needs
the MMA's M side to be a multiple of 64 and takes an N side of 16. The split count
brings the programs to about _TARGET_PROGRAMS (down_proj at one row: 28 column tiles, 10 splits); S > 1 writes float32
partials [S, M, N] that XLA sums before the scales (one small fusion; S is 1 wherever the tiles alone fill the GPU,
and the partials never exceed half the weight's bytes).

Hopper's FP8 wgmma needs the dot to allow imprecise accumulation (`maxNumImpreciseAcc`), which Pallas' lowering
does not set: without qwenjax.compat.enable_pallas_fp8_wgmma (called by layers/fp8_matmul.py on import) Triton
upcasts both tiles to float16 for mma.sync. Compiled offline for sm_90 (benchmarks/kernel_isa.py, Triton 3.9):
with it, wgmma with instruction shape [16, 128, 32] at 128 x 128 tiles.

Status: on an H100 (jax 0.11.2, NOTES 53) its GPU grid passes (tests/gpu/test_fp8_gpu.py: the four 7B shapes at 1-512
rows, 2^-7 of the output's scale) and ncu measured gate/up (3,584 -> 37,888) at one row in 54 us, 2.55 TB/s, and
down_proj in 31 us, 2.2 TB/s (its warps wait on the pipeline's barrier: the bytes bound it). The model takes it by
default on one GPU (layers/fp8_matmul.py's SKINNY_ENV=0 turns it off).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_CompilerParams = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")

MAX_ROWS = 512            # beyond, the product is FLOP-bound and cuBLASLt's FP8 GEMM ran at 1.2-1.6x bf16 (NOTES 51)
_FP8 = jnp.dtype(jnp.float8_e4m3fn)
_TARGET_PROGRAMS = 264    # two programs per SM of an H100 (132 SMs)
_DIMS = (((1,), (1,)), ((), ()))  # x [bm, bk] . w [bn, bk] -> [bm, bn]


def heuristic(m: int, k: int, n: int) -> tuple[int, int, int, int, int, int]:
    """(block_m, block_n, block_k, num_splits, num_warps, num_stages). block_m: the rows padded to the tensor
    core's 16, up to 64 (128 from 128 rows, with 8 warps: a [128, 128] float32 accumulator is 64 registers a thread
    over 256 threads); block_n 128 (64 where 128 does not divide N); block_k 128; K split until about
    _TARGET_PROGRAMS programs run, while the float32 partials stay within half the weight's bytes. Untuned."""
    bm = 16
    while bm < min(m, 64):
        bm *= 2
    if m >= 128:
        bm = 128
    bn = 128 if n % 128 == 0 else 64
    bk = 128
    tiles = -(-m // bm) * (n // bn) if n % bn == 0 else 1
    blocks = max(k // bk, 1)
    mp = -(-m // bm) * bm
    # the float32 partials (S x mp x N x 4 bytes) kept to half the weight's K x N bytes, at most
    splits = max(1, min(-(-_TARGET_PROGRAMS // tiles), blocks, k // (8 * mp)))
    return bm, bn, bk, splits, 8 if bm == 128 else 4, 4


def why_not(m: int, k: int, n: int, *, x_dtype, w_dtype, block_n: int, block_k: int,
            x_dtypes=(_FP8,)) -> str | None:
    """None when the product and the tiles fit the kernel (x in one of x_dtypes: float8 here, the model dtype for
    fp8_skinny_rows.py), else why not (with the numbers)."""
    if jnp.dtype(w_dtype) != _FP8 or jnp.dtype(x_dtype) not in x_dtypes:
        takes = "float8_e4m3fn x and weights" if x_dtypes == (_FP8,) else \
            f"{' / '.join(str(jnp.dtype(d)) for d in x_dtypes)} x and float8_e4m3fn weights"
        return f"the fp8 skinny GEMM takes {takes}, got {jnp.dtype(x_dtype)} and {jnp.dtype(w_dtype)}"
    if not 1 <= m <= MAX_ROWS:
        return f"the fp8 skinny GEMM takes 1 to {MAX_ROWS} rows of x, got {m}"
    for name, v, dim in (("block_n", block_n, n), ("block_k", block_k, k)):
        if v < 16 or v & (v - 1) or dim % v:
            return f"{name}={v} must be a power of two >= 16 dividing {dim}"
    return None


def supported(m: int, k: int, n: int, *, x_dtype=_FP8, w_dtype=_FP8, x_dtypes=(_FP8,)) -> bool:
    """Whether the kernel takes this product with its default tiles (else the caller uses another path)."""
    _, bn, bk, *_ = heuristic(max(m, 1), k, n)
    return why_not(m, k, n, x_dtype=x_dtype, w_dtype=w_dtype, block_n=bn, block_k=bk, x_dtypes=x_dtypes) is None


def launch(m: int, k: int, n: int, given: tuple, *, x_dtype, w_dtype, x_dtypes=(_FP8,)):
    """The settings of one call: `given` (block_m, block_n, block_k, num_splits, num_warps, num_stages), None for
    the heuristic's, checked (ValueError naming what is wrong). Returns (block_m, block_n, block_k, splits,
    blocks_per_split, num_k_blocks, num_warps, num_stages), the splits trimmed so that none starts past K."""
    d = heuristic(max(m, 1), k, n)
    bm, bn, bk, splits, warps, stages = (v if v is not None else dv for v, dv in zip(given, d))
    why = why_not(m, k, n, x_dtype=x_dtype, w_dtype=w_dtype, block_n=bn, block_k=bk, x_dtypes=x_dtypes)
    if why:
        raise ValueError(why)
    num_k_blocks = k // bk
    per_split = pl.cdiv(num_k_blocks, splits)
    return bm, bn, bk, pl.cdiv(num_k_blocks, per_split), per_split, num_k_blocks, warps, stages


def _kernel(x_ref, w_ref, o_ref, *, block_k, blocks_per_split, num_k_blocks, swap):
    # x_ref [bm, K] float8 (this row block); w_ref [bn, K] float8 (this block of weight rows); o_ref [bm, bn] float32
    # (this split's partial). swap: the product as w . x^T ([bn, bm]), so the weight tile is the MMA's M side (a
    # multiple of 64, as wgmma needs) and the few rows of x its N side (16 is enough), stored transposed.
    first = pl.program_id(2) * blocks_per_split
    count = jnp.clip(num_k_blocks - first, 0, blocks_per_split)

    def body(i, acc):
        k0 = pl.multiple_of((first + i) * block_k, block_k)
        x = x_ref[:, pl.ds(k0, block_k)]                                       # [bm, bk] float8
        w = w_ref[:, pl.ds(k0, block_k)]                                       # [bn, bk] float8: one load a row
        a, b = (w, x) if swap else (x, w)
        return acc + lax.dot_general(a, b, _DIMS, preferred_element_type=jnp.float32)

    bm, bn = x_ref.shape[0], w_ref.shape[0]
    acc = lax.fori_loop(0, count, body, jnp.zeros((bn, bm) if swap else (bm, bn), jnp.float32))
    o_ref[...] = acc.T if swap else acc


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_m", "block_n", "block_k", "num_splits",
                                             "num_warps", "num_stages", "interpret"))
def fp8_skinny(xq: jax.Array, x_scale: jax.Array, wq: jax.Array, w_scale: jax.Array, *, out_dtype, block_m=None,
               block_n=None, block_k=None, num_splits=None, num_warps=None, num_stages=None,
               interpret: bool = False) -> jax.Array:
    """[M, N] in out_dtype (module docstring for the operands); tiles and launch default to `heuristic`."""
    (m, k), n = xq.shape, wq.shape[0]
    if wq.shape[1] != k or x_scale.shape != (m, 1) or w_scale.shape != (1, n):
        raise ValueError(f"fp8 skinny GEMM operands: xq [M, K], x_scale [M, 1], wq [N, K], w_scale [1, N]; got "
                         f"{list(xq.shape)}, {list(x_scale.shape)}, {list(wq.shape)}, {list(w_scale.shape)}")
    bm, bn, bk, splits, per_split, num_k_blocks, warps, stages = launch(
        m, k, n, (block_m, block_n, block_k, num_splits, num_warps, num_stages), x_dtype=xq.dtype, w_dtype=wq.dtype)
    mp = -(-m // bm) * bm
    xp = jnp.pad(xq, ((0, mp - m), (0, 0))) if mp != m else xq                # zero rows: zero partials, dropped
    partials = pl.pallas_call(
        functools.partial(_kernel, block_k=bk, blocks_per_split=per_split, num_k_blocks=num_k_blocks,
                          swap=bm < 64),
        grid=(mp // bm, n // bn, splits),
        in_specs=[pl.BlockSpec((bm, k), lambda i, j, s: (i, 0)), pl.BlockSpec((bn, k), lambda i, j, s: (j, 0))],
        out_specs=pl.BlockSpec((None, bm, bn), lambda i, j, s: (s, i, j)),
        out_shape=jax.ShapeDtypeStruct((splits, mp, n), jnp.float32),
        compiler_params=_CompilerParams(num_warps=warps, num_stages=stages),
        interpret=interpret,
        name=f"qwenjax_fp8_skinny_m{bm}_n{bn}_k{bk}_s{splits}",
    )(xp, wq)
    acc = partials.sum(axis=0) if splits > 1 else partials[0]
    return (acc[:m] * x_scale * w_scale).astype(out_dtype)
