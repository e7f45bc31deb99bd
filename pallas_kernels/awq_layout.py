"""AWQ (GEMM version) packing: the math that turns `qweight`, `qzeros`, `scales` into a float weight [in, out].

Layout of one linear layer with I inputs, O outputs, group size g (G = I / g groups):
  qweight  int32 [I, O/8]   eight 4-bit values per word, packed along the OUTPUT dimension
  qzeros   int32 [G, O/8]   the zeros, packed the same way
  scales   float [G, O]
Nibble i (bits 4i..4i+3) of packed column c holds output column c*8 + AWQ_ORDER[i]; so output column c*8 + j sits
in nibble AWQ_SHIFT_NIBBLE[j]. W[k, n] = (q[k, n] - z[k // g, n]) * s[k // g, n].

Every function takes numpy or jax arrays and returns the same kind (jnp inside jit, numpy for checks on the host).
"""

from __future__ import annotations

import numpy as np

from pallas_kernels.int_packing import array_module, unpack_cols

BITS = 4
PACK = 8  # values per int32 word
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i -> output column offset within the word
AWQ_SHIFT_NIBBLE = tuple(int(i) for i in np.argsort(AWQ_ORDER))  # output offset j -> nibble (0, 4, 1, 5, 2, 6, 3, 7)


def unpack(packed, *, dtype=None):
    """int32 [R, C/8] packed along columns -> [R, C] values in 0..15, in output-column order."""
    xp = array_module(packed)
    shifts = xp.asarray([BITS * i for i in AWQ_SHIFT_NIBBLE], dtype=xp.int32)  # [8]
    # Arithmetic shift of a negative word fills with ones; the mask keeps only the nibble.
    vals = (packed[..., None] >> shifts) & 0xF  # [R, C/8, 8], last axis = output offset j
    vals = vals.reshape(*packed.shape[:-1], packed.shape[-1] * PACK)
    return vals if dtype is None else vals.astype(dtype)


def dequantize(qweight, qzeros, scales, *, group_size: int, dtype=None):
    """-> W [I, O] in `dtype` (default: the scales' dtype). Exact: (q - z) is a small integer times one scale."""
    xp = array_module(qweight)
    dtype = dtype or scales.dtype
    I, O = qweight.shape[0], qweight.shape[1] * PACK
    G = scales.shape[0]
    if I != G * group_size or scales.shape != (G, O) or qzeros.shape != (G, O // PACK):
        raise ValueError(f"AWQ shapes disagree: qweight {tuple(qweight.shape)} (in {I}, out {O}), qzeros "
                         f"{tuple(qzeros.shape)}, scales {tuple(scales.shape)}, group_size {group_size}; expected "
                         f"qzeros ({I // group_size}, {O // PACK}) and scales ({I // group_size}, {O})")
    q = unpack(qweight, dtype=xp.int32).reshape(G, group_size, O)
    z = unpack(qzeros, dtype=xp.int32)[:, None, :]
    w = (q - z).astype(dtype) * scales.astype(dtype)[:, None, :]
    return w.reshape(I, O)


# The K-packed variant ("awq_kp"), made at load by qwenjax/quantization/repack.py: nibble j of word (8w + a, b) is
# row 8w + j, column 8b + a; qzeros in natural order (nibble a of word b is column 8b + a).

def unpack_kpacked(qweight):
    """awq_kp qweight int32 [I, O/8] -> [I, O] values in 0..15."""
    xp = array_module(qweight)
    I, C = qweight.shape
    shifts = xp.asarray([4 * j for j in range(PACK)], dtype=xp.int32)
    v = (qweight.reshape(I // PACK, PACK, C)[..., None] >> shifts) & 0xF  # [w, a, b, j]
    return v.transpose(0, 3, 2, 1).reshape(I, C * PACK)                    # [w, j, b, a] -> row 8w + j, col 8b + a


def dequantize_kpacked(qweight, qzeros, scales, *, group_size: int, dtype=None):
    """awq_kp arrays -> W [I, O] in `dtype` (default: the scales' dtype); exactly awq.dequantize of the originals."""
    dtype = dtype or scales.dtype
    I, O = qweight.shape[0], qweight.shape[1] * PACK
    G = scales.shape[0]
    if I != G * group_size or scales.shape != (G, O) or qzeros.shape != (G, O // PACK):
        raise ValueError(f"AWQ shapes disagree: qweight {tuple(qweight.shape)} (in {I}, out {O}), qzeros "
                         f"{tuple(qzeros.shape)}, scales {tuple(scales.shape)}, group_size {group_size}")
    q = unpack_kpacked(qweight).reshape(G, group_size, O)
    z = unpack_cols(qzeros, 4)[:, None, :]
    w = (q - z).astype(dtype) * scales.astype(dtype)[:, None, :]
    return w.reshape(I, O)
