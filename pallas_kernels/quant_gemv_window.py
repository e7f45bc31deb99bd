"""The GEMV's "window" unpack (quant_gemv.py, unpack="window"): the kernel body and where each bit field goes.

Same layouts, grid, blocks and contract as quant_gemv.py's `_kernel` (its module docstring); only the unpacking and
the place of the zero differ. One shift a PAIR of 4-bit fields puts them at bits 19 and 15 (`window_placement`;
int8: one field a shift, at 15), one and-or with the float32 exponent of 2**(23 - b) reads each as 2**(23 - b) + q
exactly, and the FMA takes that value as it is. Per block and column, once: acc += s * (P - sum_j x_j (2**(23 - b_j)
+ z)), with P the block's sum of x_j * v_j; the sums over x are the block rows' own (x's values only).
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.gemv_tiles import store_rows, tile_columns, zero_and_scale


def window_placement(bits: int) -> list[tuple[int, list[tuple[int, int]]]]:
    """unpack="window": [(shift, [(field j, bit b), ...]), ...]. Word >> shift (<< -shift when negative) puts each
    listed field j at bits [b, b + bits) with 15 <= b <= 23 - bits: or-ed with the float32 exponent of 2**(23 - b)
    it reads 2**(23 - b) + q exactly, and the offset 2**(23 - b) is at most 256, so the float32 sums that carry it
    lose at most ~6 of their 24 bits. Int4: 4 shifts for 8 fields (two a shift); int8: 4 for 4."""
    top, fields, out = 23 - bits, list(range(32 // bits))[::-1], []
    while fields:
        j = fields[0]
        shift = bits * j - top
        placed = [(i, bits * i - shift) for i in fields if 15 <= bits * i - shift <= top]
        out.append((shift, placed))
        fields = [i for i in fields if i not in dict(placed)]
    return out


def window_bits(bits: int) -> list[int]:
    """The distinct bit positions window_placement uses (one mask each)."""
    return sorted({b for _, placed in window_placement(bits) for _, b in placed})


def window_kernel(x_ref, qw_ref, qz_ref, s_ref, m_ref, o_ref, *, rows, bits, zero_offset, bkw, group_blocks,
                   blocks_per_split, num_k_blocks):
    # unpack="window" (module docstring): each field becomes v = 2**(23 - b) + q with one shift a word pair of
    # fields and one and-or a field, and the FMA takes v as it is; the offsets and the zero leave through one
    # per-block correction, sum_j x_j * (2**(23 - b_j) + z), computed from x's values alone per word row.
    # Invariant: a block lies inside one group (bkw * pf divides group_size), so z and s are constant over it.
    pf = 32 // bits
    A, cw = qw_ref.shape[1], qw_ref.shape[2]
    first = pl.program_id(1) * blocks_per_split
    count = jnp.clip(num_k_blocks - first, 0, blocks_per_split)
    cols = tile_columns(A, cw, pf, bits)
    placement = window_placement(bits)
    # The field masks come from memory, not immediates: each and-or then takes one mask register that lives through
    # the loop (as immediates, ptxas re-materializes the mask with a MOV before every and-or: +1 instruction a weight).
    masks = {b: m_ref[i] for i, b in enumerate(window_bits(bits))}

    def body(i, accs):
        kb = first + i
        g = kb // group_blocks if group_blocks else 0
        words = qw_ref[pl.ds(kb * bkw, bkw), :, :]                              # [bkw, A, cw], one coalesced load
        z, s = zero_and_scale(qz_ref, s_ref, g, cols, bits=bits, zero_offset=zero_offset)  # [A, cw], [1|A, cw]
        xs = [[x_ref[m, pl.ds(kb * bkw, bkw), j].astype(jnp.float32)[:, None, None] for j in range(pf)]
              for m in range(rows)]                                             # [bkw, 1, 1] of rows w * pf + j
        parts = [None] * rows
        offsets = [0.0] * pf
        for shift, placed in placement:
            src = words >> shift if shift > 0 else words << -shift if shift < 0 else words
            for j, b in placed:
                offsets[j] = float(1 << (23 - b))
                v = lax.bitcast_convert_type((src & masks[b]) | ((150 - b) << 23), jnp.float32)  # 2**(23 - b) + q
                for m in range(rows):
                    t = xs[m][j] * v
                    parts[m] = t if parts[m] is None else parts[m] + t
        new = []
        for m in range(rows):
            xsum = xs[m][0]
            off = xs[m][0] * offsets[0]
            for j in range(1, pf):
                xsum = xsum + xs[m][j]
                off = off + xs[m][j] * offsets[j]
            new.append(accs[m] + (parts[m] - (off + xsum * z[None])) * s[None])
        return tuple(new)

    zeros = tuple(jnp.zeros((bkw, A, cw), jnp.float32) for _ in range(rows))
    store_rows(o_ref, lax.fori_loop(0, count, body, zeros), cols[0])
