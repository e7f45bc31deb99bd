"""Grouped matmul (the experts of a MoE layer): Pallas GPU (Triton lowering) kernel, jitted API and jnp reference.

Axis letters: M rows (token-expert pairs, sorted by expert), K inputs, N outputs, G groups (experts), NT row tiles.

Contract, the same as `jax.lax.ragged_dot(x, w, group_sizes)`:
  x            [M, K]     bfloat16 / float16 / float32, rows grouped: the first group_sizes[0] rows use w[0], ...
  w            [G, K, N]  same dtype as x
  group_sizes  [G] int32  sum(group_sizes) <= M; rows past the sum come out as zeros
  out          [M, N]     x.dtype, accumulated in float32

Why not `jax.lax.ragged_dot`: on CUDA GPUs XLA (through jax 0.11.2, cuDNN 9.19) rewrites it into a dense dot over a
group-masked, group-broadcast [G, M, K] copy of x: G times the FLOPs and a G x larger temporary (measured on an
H200 with Qwen2-57B-A14B's experts, G 64, K 3584, N 2560: 8 rows 302 us, 65536 rows 104 ms and a 30 GB temporary).
This kernel does the work and reads the weights of the groups that have rows, nothing more.

Kernel: grid (NT, N / bn). The rows of each group are cut into tiles of bm rows (a group's last tile is partial), and
one more group, the tail past sum(group_sizes), gets tiles that store zeros; NT = cdiv(M, bm) + G + 1 bounds the
tile count, and tiles past the real count are empty (no loads, no stores). A program owns a [bm, bn] output tile
of one group and walks K in steps of bk: masked loads of x rows (masked lanes cost no bandwidth), plain loads of the
group's weight block, float32 accumulation on the tensor cores. The tile table (group, first row, end row) is built
in jnp before the call (`tile_table`); the tiles of one group are consecutive along grid axis 0, so programs that
run together share the group's weight columns in L2.

Status (H100, Qwen2-57B-A14B's experts, bf16, benchmarks/moe_layer.py): one token's 8 experts (gate_proj, 147 MB)
in 82-89 us, 1.7-1.8 TB/s, 0.6 of the copy bandwidth; the whole MoE block of one token (routed + shared expert,
0.88 GB) at 0.81 of it, its routed experts 5.9x faster than through ragged_dot; 64 and 256 tokens (every
expert read) at 0.91 and 0.81.
Prefill-sized calls (thousands of rows per expert) are not tuned yet: the tensor cores see [128, 64] x [64, 128]
blocks through Triton's dot, without warp specialisation.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# --- jax version differences live here only (as in paged_attention.py). -------------------------
_CompilerParams = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
_dot = getattr(plgpu, "dot", None) or pl.dot
# ---------------------------------------------------------------------------------------------------

_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
_MIN_DOT = 16  # Triton's smallest dot dimension


def tile_table(group_sizes: jax.Array, m: int, block_m: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(group [NT], first row [NT], end row [NT]) of every row tile, NT = cdiv(m, block_m) + G + 1.

    Group G is the tail (rows past sum(group_sizes): stored as zeros); group G + 1 marks an empty tile (first ==
    end). Tiles of one group are consecutive and in row order.
    """
    g = group_sizes.shape[0]
    sizes = group_sizes.astype(jnp.int32)
    sizes = jnp.concatenate([sizes, jnp.maximum(m - sizes.sum(), 0)[None]])          # [G + 1], the tail last
    tiles = (sizes + block_m - 1) // block_m                                            # [G + 1]
    tile_end = jnp.cumsum(tiles)
    nt = pl.cdiv(m, block_m) + g + 1
    t = jnp.arange(nt, dtype=jnp.int32)
    group = jnp.sum(t[:, None] >= tile_end[None, :], axis=1).astype(jnp.int32)         # [NT] in 0..G+1
    gc = jnp.minimum(group, g)
    row0 = (jnp.cumsum(sizes) - sizes)[gc] + (t - (tile_end - tiles)[gc]) * block_m
    row1 = jnp.minimum(row0 + block_m, (jnp.cumsum(sizes))[gc])
    empty = group > g
    return group, jnp.where(empty, 0, row0), jnp.where(empty, 0, row1)


def _kernel(group_ref, row0_ref, row1_ref, x_ref, w_ref, o_ref, *, num_groups, block_m, block_k, block_n,
            precision):
    # group_ref / row0_ref / row1_ref [NT]; x_ref [M, K]; w_ref [G, K, bn]; o_ref [M, bn]
    i = pl.program_id(0)
    g, row0, row1 = group_ref[i], row0_ref[i], row1_ref[i]
    k_total = x_ref.shape[1]
    rows = row0 + lax.broadcasted_iota(jnp.int32, (block_m, 1), 0)                     # [bm, 1]
    row_ok = rows < row1
    kk = lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
    cols = lax.broadcasted_iota(jnp.int32, (1, block_n), 1)
    # The tail's tiles and empty tiles skip the loop. (int32 arithmetic, not jnp.where of two Python ints: Pallas'
    # Triton lowering typed that bound i1 and the loop failed to verify.)
    steps = (g < num_groups).astype(jnp.int32) * (k_total // block_k)
    ge = jnp.minimum(g, num_groups - 1)

    def body(s, acc):
        k0 = s * block_k
        # Integer-array indices with a mask (Pallas interpret mode cannot mix them with slices in a masked load).
        x = plgpu.load(x_ref.at[rows, k0 + kk], mask=jnp.broadcast_to(row_ok, (block_m, block_k)),
                       other=jnp.zeros((), x_ref.dtype))
        w = w_ref[ge, pl.ds(k0, block_k), :]
        return acc + _dot(x, w, precision=precision).astype(jnp.float32)

    acc = lax.fori_loop(0, steps, body, jnp.zeros((block_m, block_n), jnp.float32))
    plgpu.store(o_ref.at[rows, cols], acc.astype(o_ref.dtype), mask=jnp.broadcast_to(row_ok, (block_m, block_n)))


def default_settings(m: int, k: int, n: int, g: int) -> tuple[int, int, int]:
    """(block_m, block_n, block_k) for a call with m rows over g groups: a 16-row tile per group when groups hold
    16 rows or fewer on average (decode), else 128 rows; 128 columns; 64 of K.

    Swept on an H100 at Qwen2-57B-A14B's gate_proj (64 experts, K 3584, N 2560; benchmarks/moe_layer.py --sweep):
    8 rows 82 us (16 x 128) against 85-101 us for the other tilings; 512 rows 448 us (16 x 128) against 454-481;
    2048 rows 476 us (128 x 128, 8 warps) against 497-668.
    """
    mean = max(1, m // max(g, 1))
    block_m = 16 if mean <= 16 else 128
    block_n = 128
    while block_n > _MIN_DOT and n % block_n:
        block_n //= 2
    block_k = 64
    while block_k > _MIN_DOT and k % block_k:
        block_k //= 2
    return block_m, block_n, block_k


def _validate(x, w, group_sizes, block_m, block_n, block_k):
    if x.ndim != 2 or w.ndim != 3 or x.shape[1] != w.shape[1]:
        raise ValueError(f"x must be [M, K] and w [G, K, N]; got x{x.shape}, w{w.shape}")
    if x.dtype not in _DTYPES or w.dtype != x.dtype:
        raise ValueError(f"x and w must share a dtype among bfloat16, float16, float32; got {x.dtype}, {w.dtype}")
    if group_sizes.shape != (w.shape[0],) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes must be integer [G={w.shape[0]}]; got {group_sizes.dtype}{group_sizes.shape}")
    k, n = w.shape[1:]
    for name, b, dim in (("block_n", block_n, n), ("block_k", block_k, k)):
        if b < _MIN_DOT or b & (b - 1) or dim % b:
            raise ValueError(f"{name}={b} must be a power of two >= {_MIN_DOT} dividing {dim}")
    if block_m < _MIN_DOT or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two >= {_MIN_DOT}, got {block_m}")


def supported(k: int, n: int, dtype) -> bool:
    """Whether the kernel takes w [G, k, n] of `dtype` (else the caller uses XLA)."""
    return jnp.dtype(dtype) in _DTYPES and k % _MIN_DOT == 0 and n % _MIN_DOT == 0


@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "block_k", "num_warps", "num_stages",
                                             "interpret"))
def grouped_matmul(x, w, group_sizes, *, block_m=None, block_n=None, block_k=None, num_warps=None, num_stages=None,
                   interpret=False):
    """x [M, K] rows grouped by `group_sizes` [G] @ w [G, K, N] -> [M, N] in x.dtype (rows past the groups: 0).

    Args:
        x, w, group_sizes: the module docstring's contract (`jax.lax.ragged_dot`'s).
        block_m, block_n, block_k: tiling (static); default from `default_settings`.
        num_warps, num_stages: Triton launch settings (static); default 4 (8 for 128-row tiles) and 3.
        interpret: run in Pallas interpret mode (CPU tests).
    """
    m, k = x.shape
    g, _, n = w.shape
    dm, dn, dk = default_settings(m, k, n, g)
    bm, bn, bk = block_m or dm, block_n or dn, block_k or dk
    _validate(x, w, group_sizes, bm, bn, bk)
    group, row0, row1 = tile_table(group_sizes, m, bm)
    nt = group.shape[0]
    # Interpret mode evaluates masked loads as clamped slices: rows past M would shift the window, so x gets bm
    # zero rows there. On the GPU masked lanes are never dereferenced and x is used as it is.
    mp = m + bm if interpret else m
    if mp != m:
        x = jnp.pad(x, ((0, mp - m), (0, 0)))
    # float32 (tests) multiplies in full float32, not TF32, so it matches XLA's float32 dot on other backends.
    precision = lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    kernel = functools.partial(_kernel, num_groups=g, block_m=bm, block_k=bk, block_n=bn, precision=precision)
    table = pl.BlockSpec((nt,), lambda i, j: (0,))
    out = pl.pallas_call(
        kernel,
        grid=(nt, n // bn),
        in_specs=[table, table, table,
                  pl.BlockSpec((mp, k), lambda i, j: (0, 0)),
                  pl.BlockSpec((g, k, bn), lambda i, j: (0, 0, j))],
        out_specs=pl.BlockSpec((mp, bn), lambda i, j: (0, j)),
        out_shape=jax.ShapeDtypeStruct((mp, n), x.dtype),
        compiler_params=_CompilerParams(num_warps=num_warps or (8 if bm >= 128 else 4), num_stages=num_stages or 3),
        interpret=interpret,
        name=f"qwenjax_grouped_matmul_m{bm}_n{bn}_k{bk}",
    )(group, row0, row1, x, w)
    return out[:m] if mp != m else out


def grouped_matmul_reference(x, w, group_sizes):
    """jnp reference: each row times its group's weight, float32 accumulation; rows past the groups are 0."""
    m = x.shape[0]
    ends = jnp.cumsum(group_sizes)
    row_group = jnp.sum(jnp.arange(m)[:, None] >= ends[None, :], axis=1)               # [M], G for the tail
    valid = row_group < w.shape[0]
    wg = w[jnp.minimum(row_group, w.shape[0] - 1)]                                      # [M, K, N]
    out = jnp.einsum("mk,mkn->mn", x.astype(jnp.float32), wg.astype(jnp.float32))
    return jnp.where(valid[:, None], out, 0).astype(x.dtype)
