"""The pieces both GEMV bodies share (quant_gemv.py's `_kernel`, quant_gemv_window.py's): a tile's output columns,
a block's zero and scale per column, and the store of the accumulators. Layouts: quant_gemv.py's module docstring."""
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
