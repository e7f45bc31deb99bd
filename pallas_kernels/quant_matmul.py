"""Weight-only low-bit matmul (AWQ 4-bit, GPTQ 4/8-bit): Pallas GPU (Triton lowering) kernel, jitted API, jnp reference.

Axis letters: M rows of x (tokens), K inputs, N outputs, G groups (K / group_size, or 1), S K-splits.

Layout contract (the checkpoints' own arrays, untouched; see awq_layout.py and gptq_layout.py beside this file):
  x        [M, K]        bfloat16 / float16
  awq      qweight int32 [K, N/8], qzeros int32 [G, N/8]; nibble i of packed column c is output c*8 + ORDER[i]
  gptq     qweight int32 [K/pf, N] (value j of word w is input row w*pf + j), qzeros int32 [G, N/pf] (packed along
           N; "gptq" v1 stores zero - 1, "gptq_v2" the zero)
  scales   [G, N]        any float dtype
  out      [M, N]        x.dtype;  out = x @ W,  W[k, n] = (q[k, n] - z[g(k), n]) * s[g(k), n],  g(k) = k // group

Kernel: grid (N / bn, S, M / bm). A program owns a [bm, bn] output tile and walks its split's K blocks of bk rows.
The packed tile is loaded once, coalesced and unexpanded; each of its pf bit fields is a "slab" that is unpacked with
one shift and mask into integers, has the zero subtracted, and goes through the tensor cores in the activation dtype
(exact: |q - z| <= 255). Every K block lies inside one group (bk divides group_size), so the scale is applied once
per block to the float32 product ([bm, bn] multiplies instead of [bk, bn]).
  gptq: slab j holds input rows j, j+pf, ... of the block, all bn columns: dot(x[:, j::pf], slab_j), one accumulator.
  awq:  nibble i holds all bk rows, output columns ORDER[i], ORDER[i]+8, ...: eight accumulators of [bm, bn/8],
        stored with stride 8. No interleaving shuffle is ever done in registers.
S > 1 (decode: few rows, so K is split to fill the GPU) writes float32 partials summed by XLA.
act-order GPTQ (desc_act, arbitrary g_idx) is not handled here: the caller falls back to XLA.

Status (H100, Qwen2-7B layer shapes, group 128, bf16; packed-weight bytes per second): GPTQ 4-bit decode (1-8 rows)
reaches 250-360 GB/s, 1.4-1.9x faster than XLA's dequantize-then-dot but still 0.7-0.8x the bf16 matmul's time
(the goal is about 2.5x faster than bf16); GPTQ 8-bit decode 480-570 GB/s (1.6-1.8x XLA, 0.6-0.9x bf16); AWQ decode
about 150-190 GB/s, no faster than XLA; prefill (256+ rows)
2-4x slower than XLA, whose dequantize-then-dot costs only ~15% over bf16 there. An alternative that expanded every
element from its own word (gather loads served from L1, one dot of K = block_k) measured slower for both formats.
The small per-slab dots (K = block_k / pf) and their register-to-shared layout conversions are the suspects; the
next steps are a load-time repack into a kernel-friendly packed layout, or a Mosaic GPU (wgmma) kernel after jax's
hopper_mixed_type_matmul_mgpu.
Those figures were wall times of calls with many arguments and outputs each, which the host's dispatch may have
bounded (benchmarks/quant_matmul.py now times a whole XLA program of products and profiles device time).

Use in the model (qwenjax/layers/quant_linear.py, kernel_path): decode rows up to GEMV_MAX_ROWS go to the GEMV kernel
(pallas_kernels/quant_gemv.py); this kernel takes 4-bit GPTQ from there to 16 rows. Its "awq" format is the AWQ
checkpoint's layout, which the model no longer holds (the loader repacks AWQ for the GEMV): it is kept for the sweep.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import awq_layout as awq, gptq_layout as gptq

# --- jax version differences live here only (as in paged_attention.py). -------------------------
_CompilerParams = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
_dot = getattr(plgpu, "dot", None) or pl.dot
# ---------------------------------------------------------------------------------------------------

FORMATS = ("awq", "gptq", "gptq_v2")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i -> output column offset within a packed word
_X_DTYPES = (jnp.bfloat16, jnp.float16)
_MIN_DOT = 16            # Triton's smallest dot dimension
_TARGET_PROGRAMS = 264   # two waves of an H100's 132 SMs
_MIN_BLOCKS_PER_SPLIT = 4


def _kernel_gptq(x_ref, qw_ref, qz_ref, s_ref, o_ref, *, bits, v1, block_k, blocks_per_group, blocks_per_split,
                 num_k_blocks):
    # x_ref [bm, K], qw_ref [K/pf, bn], qz_ref [G, bn/pf], s_ref [G, bn], o_ref [bm, bn] (f32 when K is split)
    pf, mask = 32 // bits, (1 << bits) - 1
    bm, bn = x_ref.shape[0], s_ref.shape[1]
    rows_per_slab = block_k // pf
    cdt = x_ref.dtype
    first = pl.program_id(1) * blocks_per_split
    count = jnp.clip(num_k_blocks - first, 0, blocks_per_split)
    col = lax.broadcasted_iota(jnp.int32, (1, bn), 1)
    zero_word, zero_shift = col // pf, (col % pf) * bits  # zeros are packed along N: column n in word n // pf

    def body(i, acc):
        kb = first + i
        g = kb // blocks_per_group if blocks_per_group else 0
        words = qw_ref[pl.ds(kb * rows_per_slab, rows_per_slab), :]  # [bk/pf, bn], one coalesced load
        zw = plgpu.load(qz_ref.at[jnp.full((1, 1), g, jnp.int32), zero_word])  # [1, bn]
        z = ((zw >> zero_shift) & mask) + (1 if v1 else 0)
        part = jnp.zeros((bm, bn), jnp.float32)
        for j in range(pf):
            x = x_ref[:, pl.ds(kb * block_k + j, rows_per_slab, stride=pf)]  # rows j, j+pf, ... of the block
            w = (((words >> (bits * j)) & mask) - z).astype(cdt)
            part += _dot(x, w)
        return acc + part * s_ref[pl.ds(g, 1), :].astype(jnp.float32)

    acc = lax.fori_loop(0, count, body, jnp.zeros((bm, bn), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _kernel_awq(x_ref, qw_ref, qz_ref, s_ref, o_ref, *, block_k, blocks_per_group, blocks_per_split, num_k_blocks):
    # x_ref [bm, K], qw_ref [K, bn/8], qz_ref [G, bn/8], s_ref [G, bn], o_ref [bm, bn] (f32 when K is split)
    bm, bn = x_ref.shape[0], s_ref.shape[1]
    nw = bn // 8
    cdt = x_ref.dtype
    first = pl.program_id(1) * blocks_per_split
    count = jnp.clip(num_k_blocks - first, 0, blocks_per_split)

    def body(i, accs):
        kb = first + i
        g = kb // blocks_per_group
        x = x_ref[:, pl.ds(kb * block_k, block_k)]
        words = qw_ref[pl.ds(kb * block_k, block_k), :]  # [bk, bn/8]
        zw = qz_ref[pl.ds(g, 1), :]                        # [1, bn/8], packed like qweight
        out = []
        for i_nib, offset in enumerate(AWQ_ORDER):
            w = (((words >> (4 * i_nib)) & 0xF) - ((zw >> (4 * i_nib)) & 0xF)).astype(cdt)
            s = s_ref[pl.ds(g, 1), pl.ds(offset, nw, stride=8)].astype(jnp.float32)
            out.append(accs[i_nib] + _dot(x, w) * s)
        return tuple(out)

    accs = lax.fori_loop(0, count, body, tuple(jnp.zeros((bm, nw), jnp.float32) for _ in AWQ_ORDER))
    for acc, offset in zip(accs, AWQ_ORDER):
        o_ref[:, pl.ds(offset, nw, stride=8)] = acc.astype(o_ref.dtype)


def default_settings(m: int, k: int, n: int, *, fmt: str, bits: int, group_size: int):
    """(block_m, block_n, block_k, num_splits) used where the caller leaves them None."""
    pf = 32 // bits
    group = k if group_size == -1 else group_size
    block_k = 128 if fmt != "awq" else min(128, group)
    while group % block_k or k % block_k:
        block_k //= 2
    block_k = max(block_k, _MIN_DOT * pf if fmt != "awq" else _MIN_DOT)
    block_n = 128
    while n % block_n:
        block_n //= 2
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    blocks = k // block_k
    programs = (n // block_n) * pl.cdiv(m, block_m)
    splits = 1 if m > 64 else max(1, min(pl.cdiv(_TARGET_PROGRAMS, programs), blocks // _MIN_BLOCKS_PER_SPLIT))
    return block_m, block_n, block_k, splits


def _validate(x, qweight, qzeros, scales, fmt, bits, group_size, block_m, block_n, block_k, num_splits):
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if bits not in ((4,) if fmt == "awq" else (4, 8)):
        raise ValueError(f"{fmt} supports bits {(4,) if fmt == 'awq' else (4, 8)}, got {bits}")
    if x.ndim != 2 or x.dtype not in _X_DTYPES:
        raise ValueError(f"x must be bfloat16 or float16 [M, K], got {x.dtype}{x.shape}")
    m, k = x.shape
    pf = 32 // bits
    n = scales.shape[1]
    want_qw = (k, n // 8) if fmt == "awq" else (k // pf, n)
    if qweight.shape != want_qw or qweight.dtype != jnp.int32:
        raise ValueError(f"{fmt} qweight must be int32 {want_qw} for x [{m}, {k}] and scales {scales.shape}, got "
                         f"{qweight.dtype}{qweight.shape}")
    groups = 1 if group_size == -1 else k // group_size
    if group_size != -1 and (group_size <= 0 or k % group_size):
        raise ValueError(f"group_size must be -1 or divide K={k}, got {group_size}")
    if scales.shape != (groups, n) or qzeros.shape != (groups, n // pf) or qzeros.dtype != jnp.int32:
        raise ValueError(f"scales must be [{groups}, {n}] and qzeros int32 [{groups}, {n // pf}]; got "
                         f"{scales.shape} and {qzeros.dtype}{qzeros.shape}")
    group = k if group_size == -1 else group_size
    slab_k = block_k // pf if fmt != "awq" else block_k  # K of each tensor-core product
    if k % block_k or group % block_k or slab_k < _MIN_DOT or block_k & (block_k - 1):
        raise ValueError(f"block_k={block_k} must be a power of two dividing K={k} and the group ({group}), with "
                         f"block_k / {pf if fmt != 'awq' else 1} >= {_MIN_DOT}")
    slab_n = block_n // 8 if fmt == "awq" else block_n  # N of each tensor-core product
    if n % block_n or slab_n < _MIN_DOT or block_n & (block_n - 1):
        raise ValueError(f"block_n={block_n} must be a power of two dividing N={n}, with "
                         f"block_n{' / 8' if fmt == 'awq' else ''} >= {_MIN_DOT}")
    if block_m < _MIN_DOT or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two >= {_MIN_DOT}, got {block_m}")
    if not (isinstance(num_splits, int) and num_splits >= 1):
        raise ValueError(f"num_splits must be a positive int, got {num_splits}")


def supported(m: int, k: int, n: int, *, fmt: str, bits: int, group_size: int, dtype) -> bool:
    """Whether the kernel takes this product with its default settings (else the caller uses XLA)."""
    if jnp.dtype(dtype) not in _X_DTYPES or fmt not in FORMATS:
        return False
    try:
        bm, bn, bk, s = default_settings(m, k, n, fmt=fmt, bits=bits, group_size=group_size)
        pf = 32 // bits
        slab_k = bk // pf if fmt != "awq" else bk
        slab_n = bn // 8 if fmt == "awq" else bn
        group = k if group_size == -1 else group_size
        return k % bk == 0 and group % bk == 0 and slab_k >= _MIN_DOT and slab_n >= _MIN_DOT and n % bn == 0
    except ZeroDivisionError:
        return False


@functools.partial(jax.jit, static_argnames=("fmt", "bits", "group_size", "block_m", "block_n", "block_k",
                                             "num_splits", "num_warps", "num_stages", "interpret"))
def quant_matmul(x, qweight, qzeros, scales, *, fmt: str, bits: int, group_size: int, block_m=None, block_n=None,
                 block_k=None, num_splits=None, num_warps=None, num_stages=None, interpret=False):
    """x [M, K] @ the low-bit weight -> [M, N] in x.dtype.

    Args:
        x: [M, K] bfloat16 / float16 activations.
        qweight, qzeros, scales: one layer's checkpoint arrays (module docstring), unchanged.
        fmt: "awq", "gptq" (v1 zeros: stored + 1) or "gptq_v2" (static).
        bits: 4 (awq, gptq) or 8 (gptq) (static).
        group_size: input rows per scale group, or -1 for one group (static).
        block_m, block_n, block_k, num_splits: tiling (static); default from `default_settings`.
        num_warps, num_stages: Triton launch settings (static); default 4 and 3.
        interpret: run in Pallas interpret mode (CPU tests).
    """
    m, k = x.shape
    n = scales.shape[1]
    dm, dn, dk, ds = default_settings(m, k, n, fmt=fmt, bits=bits, group_size=group_size)
    bm, bn, bk, splits = block_m or dm, block_n or dn, block_k or dk, num_splits or ds
    _validate(x, qweight, qzeros, scales, fmt, bits, group_size, bm, bn, bk, splits)
    pf = 32 // bits
    num_k_blocks = k // bk
    per_split = pl.cdiv(num_k_blocks, splits)
    splits = pl.cdiv(num_k_blocks, per_split)  # no split starts past K
    bpg = 0 if group_size == -1 else group_size // bk
    mp = pl.cdiv(m, bm) * bm
    xp = jnp.pad(x, ((0, mp - m), (0, 0))) if mp != m else x
    groups = scales.shape[0]
    if fmt == "awq":
        kernel = functools.partial(_kernel_awq, block_k=bk, blocks_per_group=bpg, blocks_per_split=per_split,
                                   num_k_blocks=num_k_blocks)
        qw_spec = pl.BlockSpec((k, bn // 8), lambda j, s, i: (0, j))
    else:
        kernel = functools.partial(_kernel_gptq, bits=bits, v1=fmt == "gptq", block_k=bk, blocks_per_group=bpg,
                                   blocks_per_split=per_split, num_k_blocks=num_k_blocks)
        qw_spec = pl.BlockSpec((k // pf, bn), lambda j, s, i: (0, j))
    in_specs = [
        pl.BlockSpec((bm, k), lambda j, s, i: (i, 0)),
        qw_spec,
        pl.BlockSpec((groups, bn // pf), lambda j, s, i: (0, j)),
        pl.BlockSpec((groups, bn), lambda j, s, i: (0, j)),
    ]
    if splits == 1:
        out_shape = jax.ShapeDtypeStruct((mp, n), x.dtype)
        out_spec = pl.BlockSpec((bm, bn), lambda j, s, i: (i, j))
    else:
        out_shape = jax.ShapeDtypeStruct((splits, mp, n), jnp.float32)
        out_spec = pl.BlockSpec((None, bm, bn), lambda j, s, i: (s, i, j))
    out = pl.pallas_call(
        kernel,
        grid=(n // bn, splits, mp // bm),
        in_specs=in_specs,
        out_specs=out_spec,
        out_shape=out_shape,
        compiler_params=_CompilerParams(num_warps=num_warps or 4, num_stages=num_stages or 3),
        interpret=interpret,
        name=f"qwenjax_{fmt}{bits}_matmul_m{bm}_n{bn}_k{bk}_s{splits}",
    )(xp, qweight, qzeros, scales)
    if splits > 1:
        out = out.sum(axis=0).astype(x.dtype)
    return out[:m]


def quant_matmul_reference(x, qweight, qzeros, scales, *, fmt: str, bits: int, group_size: int):
    """Plain jnp: dequantize the whole weight in float32, then one float32 matmul; -> [M, N] in x.dtype. `fmt`:
    "awq", "awq_kp" (AWQ repacked along K, see qwenjax/quantization/repack.py), "gptq" or "gptq_v2"."""
    k = x.shape[1]
    if fmt in ("awq", "awq_kp"):
        dequantize = awq.dequantize if fmt == "awq" else awq.dequantize_kpacked
        w = dequantize(qweight, qzeros, scales, group_size=k if group_size == -1 else group_size, dtype=jnp.float32)
    else:
        g_idx = gptq.default_g_idx(k, group_size)
        w = gptq.dequantize(qweight, qzeros, scales, jnp.asarray(g_idx), bits=bits, checkpoint_format=fmt,
                            dtype=jnp.float32)
    return jnp.dot(x.astype(jnp.float32), w, precision="highest").astype(x.dtype)
