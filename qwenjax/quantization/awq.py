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

from qwenjax.quantization.packing import array_module

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
