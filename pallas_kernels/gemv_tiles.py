"""The pieces the K-packed kernels share (quant_gemv.py's `_kernel`, quant_gemv_window.py's; quant_skinny.py's and
quant_lop3.py's, the skinny_ ones): a tile's output columns, a block's zero and scale per column, and the store of
the accumulators. Layouts: quant_gemv.py's module docstring."""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


def tile_columns(A: int, cw: int, pf: int, bits: int):
    """(col, zero_word, zero_shift), each [A, cw]: the output column of each (class a, position b) of the tile
    (natural order for gptq, 8b + a for awq_kp), the qzeros word holding its zero and the zero's bit offset."""
    a_idx = lax.broadcasted_iota(jnp.int32, (A, cw), 0)
    b_idx = lax.broadcasted_iota(jnp.int32, (A, cw), 1)
    col = b_idx * A + a_idx
    return col, col // pf, (col % pf) * bits


def zero_and_scale(qz_ref, s_ref, g, cols, *, bits: int, zero_offset: int):
    """Group g's zero (float32, stored + zero_offset) and scale (float32) of the tile's columns: ([A, cw], [1 or A,
    cw]); `cols` is tile_columns' result."""
    col, zero_word, zero_shift = cols
    A, cw = col.shape
    zw = plgpu.load(qz_ref.at[jnp.full((A, cw), g, jnp.int32), zero_word])   # [A, cw]
    if A == 1:
        s = s_ref[pl.ds(g, 1), :].astype(jnp.float32)                       # [1, cw]
    else:
        s = plgpu.load(s_ref.at[jnp.full((A, cw), g, jnp.int32), col]).astype(jnp.float32)
    z = (((zw >> zero_shift) & ((1 << bits) - 1)) + zero_offset).astype(jnp.float32)
    return z, s


def store_rows(o_ref, accs, col):
    """Each row m's accumulator [bkw, A, cw] summed over its bkw rows into o_ref's row m at the tile's columns."""
    A, cw = col.shape
    for m, acc in enumerate(accs):
        out = jnp.sum(acc, axis=0)                                              # [A, cw]
        if A == 1:
            o_ref[pl.ds(m, 1), :] = out.astype(o_ref.dtype)
        else:
            plgpu.store(o_ref.at[jnp.full((A, cw), m, jnp.int32), col], out.astype(o_ref.dtype))


def skinny_columns(A, cw, pf, bits, a=None):
    """Output column of each (class a, position b) of a tile [A, cw] (or of class `a` alone, [1, cw]), and where
    its zero lies in the packed zeros: natural order for gptq (A = 1), 8b + a for awq_kp."""
    a_idx = lax.broadcasted_iota(jnp.int32, (A, cw), 0) if a is None else a
    col = lax.broadcasted_iota(jnp.int32, (A if a is None else 1, cw), 1) * A + a_idx
    return col, col // pf, (col % pf) * bits


def skinny_zeros_scales(qz_ref, s_ref, g, col, zero_word, zero_shift, *, bits, zero_offset, natural):
    """The zeros and scales of group g (a scalar: [1 or A, cw]; a [R, 1] column of groups: [R, cw], gathered) at
    the columns `col`, float32 (natural: col is 0..bn-1 and g a scalar, one plain row load of the scales)."""
    shape = (g.shape[0], col.shape[1]) if getattr(g, "ndim", 0) else col.shape
    gi = jnp.broadcast_to(g, shape).astype(jnp.int32)
    zw = plgpu.load(qz_ref.at[gi, jnp.broadcast_to(zero_word, shape)])
    z = (((zw >> jnp.broadcast_to(zero_shift, shape)) & ((1 << bits) - 1)) + zero_offset).astype(jnp.float32)
    if natural and not getattr(g, "ndim", 0):
        s = s_ref[pl.ds(g, 1), :]
    else:
        s = plgpu.load(s_ref.at[gi, jnp.broadcast_to(col, shape)])
    return z, s.astype(jnp.float32)
