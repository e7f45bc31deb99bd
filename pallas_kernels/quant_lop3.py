"""Int4 skinny products with Marlin's dequantization: the "lop3" / "lop3_t" modes of quant_skinny.py.

The dot modes of quant_skinny.py turn each 4-bit field into a float with an and-or into float32's exponent, a
subtract, a multiply and a conversion, field by field (~5 instructions a weight, entry 46 of benchmarks/NOTES.md,
which bound the kernels by instruction issue at about half the copy bandwidth). Here one PTX `lop3` turns two fields
of a word into two 16-bit floats at once, as Marlin does: (word & 0x000f000f) | MAGIC reads, as a pair of float16
(MAGIC 0x64006400) or bfloat16 (0x43004300) values, (BASE + field j, BASE + field j + 4) with BASE = 1024 or 128,
the power of two whose unit in the last place is 1 (the word shifted right by 4j first). One packed subtract of
(BASE + zero) gives the exact (q - z). Where a block of 8 * block_kw input rows lies inside one group, the dot takes
(q - z) and the block's float32 product is scaled after it; where a block spans groups, a packed multiply by the
scale joins the asm (one rounding, as XLA's dequantize-then-dot). ~1.5 instructions a weight of dequantization
(entry 52: 2.9 in the whole loop, against the GEMV's 5.9).

Layouts: quant_skinny.py's K-packed words, 4 bits only ("gptq", "gptq_v2" [K/8, N]; "awq_kp" [K, N/8] seen as
[K/8, 8 classes, N/8]). The word tile [bkw, cw] is stacked with itself along a new minor axis of 2 (`jnp.stack`
lowers to Triton's join, whose pair sits in one thread's consecutive registers); per shift j one asm instance takes
the pair and writes the fields (j, j + 4) of its word. The four shifts' tiles are joined into [bkw, cw, e, j % 2,
j // 2] and reshaped into one [8 bkw, cw] operand (lop3_t: its transpose, the weight as wgmma's left operand)
whose row 8w + 2j + e is input row 8w + j + 4e; x is permuted to match in advance (`arrange_x`, a small XLA
transpose), so a block is one dot of K = 8 bkw.

Split dots (`split_dots`: one warpgroup, num_warps 4): instead of the joined tile, one dot of K = 2 bkw per shift j,
its x the row j of x arranged [bm, 4, K/4]. On an H100 (ncu, entry 53 of benchmarks/NOTES.md) the joined tile on 4
warps went through shared memory with a 29-way bank conflict on its stores (86% of the store wavefronts, the L1 85%
busy, DRAM at 15%: 148 us at gate/up, one row); compiled offline (Triton 3.9, sm_90) the split form has no shared
store in its loop (the tile goes to wgmma from registers), for 48 more FADD a loop (Pallas does not fuse `acc +
dot`). On 8 warps the joined tile needs no such round trip offline and the split one does (32 STS), so it stays.
A block's zeros and scales are loaded one block ahead, in the loop's carry (in the split form on the H100 the
scales' plain load was the top stall; the prefetch is not yet measured).

Invariants: the asm's two outputs of an instance must be the (e = 0, e = 1) elements of one word; Triton's
ElementwiseInlineAsm groups an instance's `pack` elements by consecutive registers, so this holds while the tile's
layout keeps the stacked axis innermost in registers (checked by the GPU tests, tests/gpu/test_quant_gemv_gpu.py:
94 passed on an H100 at 29dc2fe). Interpret mode (CPU) cannot run PTX: the same pairs are computed with jnp
integer and float operations of identical results.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import gemv_tiles

BITS = 4
# x's dtype -> (the pair's exponent bits, BASE, the PTX type of the packed subtract and multiply)
_PAIR = {jnp.dtype(jnp.bfloat16): (0x43004300, 128.0, "bf16x2"), jnp.dtype(jnp.float16): (0x64006400, 1024.0, "f16x2")}


def arrange_x(x, *, split: bool = False):
    """x [bm, K] in the K order of the dequantized pairs (word w, shift j, pair element e: input row 8w + j + 4e).
    Joined: [bm, K], column 8w + 2j + e. Split: [bm, 4, K/4], [m, j, 2w + e] (shift j's dot reads one row)."""
    bm, k = x.shape
    if split:
        return x.reshape(bm, k // 8, 2, 4).transpose(0, 3, 1, 2).reshape(bm, 4, k // 4)
    return x.reshape(bm, k // 8, 2, 4).transpose(0, 1, 3, 2).reshape(bm, k)


def split_dots(num_warps: int) -> bool:
    """One dot per shift (module docstring) on one warpgroup; the joined tile on more."""
    return num_warps <= 4


def _pairs(words, shifts, zc, s, *, dtype, interpret):
    """words [.., 2] int32 (a word in both elements of the minor axis), shifts (4j), zc = BASE + zero and s the
    scale (None: no scale), all [.., 2] -> [.., 2] in x's dtype: (q_j - z) * s at element 0 and (q_{j+4} - z) * s at
    element 1, q_j the word's bits 4j..4j+3."""
    magic, base, ptx = _PAIR[jnp.dtype(dtype)]
    if interpret:  # the asm's arithmetic: exact subtraction, one rounding of the product to x's dtype
        e = lax.broadcasted_iota(jnp.int32, words.shape, words.ndim - 1)
        q = ((words >> (shifts + 16 * e)) & 0xF).astype(jnp.float32) - (zc.astype(jnp.float32) - base)
        return (q if s is None else q * s.astype(jnp.float32)).astype(dtype)
    # An instance takes two elements of each argument: the words (the same word) and the shifts (the same), one
    # 32-bit register each, then (BASE + z) and s as pairs, one register each (16-bit pairs).
    n = 2 if s is None else 3
    asm = ("{\n\t.reg .b32 t;\n\t"
           f"shr.u32 t, $1, ${n + 2};\n\tlop3.b32 $0, t, 0x000f000f, {magic:#010x}, 0xea;\n\t"
           f"sub.{ptx} $0, $0, $3;\n\t" + ("" if s is None else f"mul.{ptx} $0, $0, $4;\n\t") + "}")
    (out,) = plgpu.elementwise_inline_asm(asm, args=[words, zc, *([] if s is None else [s]), shifts],
                                          constraints="=r" + ",r" * (n + 3), pack=2,
                                          result_shape_dtypes=[jax.ShapeDtypeStruct(words.shape, dtype)])
    return out


def kernel(x_ref, qw_ref, qz_ref, s_ref, o_ref, *, rows, zero_offset, bkw, blocks_per_group, blocks_per_split,
           num_k_blocks, transpose, interpret, split=False):
    # x_ref [bm, K] (arrange_x); qw_ref [K/8, A, cw]; qz_ref [G, bn/8]; s_ref [G, bn]; o_ref [bm, bn]: only its
    # first `rows` rows are written (the rest of x is padding; the caller reads those rows alone)
    A, cw = qw_ref.shape[1], qw_ref.shape[2]
    bm, cdt = x_ref.shape[0], x_ref.dtype
    base = _PAIR[jnp.dtype(cdt)][1]
    cols = [gemv_tiles.skinny_columns(A, cw, 8, BITS, a) for a in range(A)]  # [1, cw] each
    first = pl.program_id(1) * blocks_per_split
    count = jnp.clip(num_k_blocks - first, 0, blocks_per_split)
    acc_shape = (cw, bm) if transpose else (bm, cw)
    scale_after = blocks_per_group >= 0  # every block inside one group (the zeros and scales one row a block)
    tile = (bkw, cw, 2)                                                 # word row w, column, element e

    def zeros_scales(kb):
        """Block kb's zeros and scales, one (z, s) per class, float32 [1 or bkw, cw] (kb clamped into K)."""
        kb = jnp.minimum(kb, num_k_blocks - 1)
        if blocks_per_group < 0:  # a block spans -blocks_per_group groups: each word row w its own (rows 8w + j)
            w = lax.broadcasted_iota(jnp.int32, (bkw, 1), 0)
            g = kb * -blocks_per_group + w * 8 // (bkw * 8 // -blocks_per_group)
        else:
            g = kb // blocks_per_group if blocks_per_group else 0
        return tuple(gemv_tiles.skinny_zeros_scales(qz_ref, s_ref, g, *cols[a], bits=BITS, zero_offset=zero_offset,
                                                    natural=A == 1) for a in range(A))

    def body(i, carry):
        # The block's zeros and scales come in the carry, loaded one block ahead: a plain load (they feed the asm
        # and the multiply, not the dot, so Triton's pipeliner leaves them) waited in the loop (ncu, entry 53).
        accs, zs = carry
        kb = first + i
        zs_next = zeros_scales(kb + 1)
        xb = None if split else x_ref[:, pl.ds(kb * 8 * bkw, 8 * bkw)]  # [bm, 8 bkw], column 8w + 2j + e
        out = []
        for a in range(A):  # awq_kp: class a holds output columns 8b + a
            words = qw_ref[pl.ds(kb * bkw, bkw), a, :]                   # [bkw, cw]
            za, sa = zs[a]
            spread = lambda v: jnp.broadcast_to(v[:, :, None], tile)  # noqa: E731
            zc = spread((za + base).astype(cdt))  # BASE + z: exact in x's dtype
            # the block in one group: the exact (q - z) in the dots, the block's float32 product scaled after
            sc = None if scale_after else spread(sa.astype(cdt))
            # per shift j: [bkw, cw, 2] (fields j, j + 4)
            h = [_pairs(jnp.stack([words, words], axis=-1), jnp.full(tile, 4 * j, jnp.int32), zc, sc, dtype=cdt,
                        interpret=interpret) for j in range(4)]
            if split:  # one dot per shift j, K = 2 bkw in the order (w, e): the tile goes to the MMA from registers
                d = None
                for j in range(4):
                    xj = x_ref[:, j, pl.ds(kb * 2 * bkw, 2 * bkw)]                # [bm, 2 bkw]
                    if transpose:
                        dj = jnp.dot(h[j].transpose(1, 0, 2).reshape(cw, 2 * bkw), xj.T,
                                     preferred_element_type=jnp.float32)
                    else:
                        dj = jnp.dot(xj, h[j].transpose(0, 2, 1).reshape(2 * bkw, cw),
                                     preferred_element_type=jnp.float32)
                    d = dj if d is None else d + dj
            else:  # joined: [bkw, cw, e, j % 2, j // 2], one dot of K = 8 bkw
                h = jnp.stack([jnp.stack([h[0], h[1]], axis=-1), jnp.stack([h[2], h[3]], axis=-1)], axis=-1)
                if transpose:  # out^T = W^T x^T: the weight is the left operand, [cw, 8 bkw], column 8w + 2j + e
                    d = jnp.dot(h.transpose(1, 0, 4, 3, 2).reshape(cw, 8 * bkw), xb.T,
                                preferred_element_type=jnp.float32)
                else:          # [8 bkw, cw]
                    d = jnp.dot(xb, h.transpose(0, 4, 3, 2, 1).reshape(8 * bkw, cw),
                                preferred_element_type=jnp.float32)
            if scale_after:
                d = d * (sa.reshape(cw, 1) if transpose else sa)
            out.append(accs[a] + d)
        return tuple(out), zs_next

    accs, _ = lax.fori_loop(0, count, body, (tuple(jnp.zeros(acc_shape, jnp.float32) for _ in range(A)),
                                             zeros_scales(first)))
    r = lax.broadcasted_iota(jnp.int32, (bm, cw), 0)
    for a, acc in enumerate(accs):
        acc = (acc.T if transpose else acc).astype(o_ref.dtype)
        c = lax.broadcasted_iota(jnp.int32, (bm, cw), 1) if A == 1 else jnp.broadcast_to(cols[a][0], (bm, cw))
        plgpu.store(o_ref.at[r, c], acc, mask=r < rows)
