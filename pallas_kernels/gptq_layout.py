"""GPTQ packing: the math that turns `qweight`, `qzeros`, `scales`, `g_idx` into a float weight [in, out].

Layout of one linear layer with I inputs, O outputs, b bits (pf = 32 / b values per int32), G groups:
  qweight  int32 [I/pf, O]   packed along the INPUT dimension: value j of word w is input row w*pf + j
  qzeros   int32 [G, O/pf]   packed along the OUTPUT dimension: value j of word c is output column c*pf + j
  scales   float [G, O]
  g_idx    int32 [I]         row -> group; k // group_size without desc_act, any assignment with desc_act
checkpoint_format "gptq" (v1) stores zero - 1 (a symmetric 4-bit layer has qzeros 0x77777777, true zero 8);
"gptq_v2" stores the zero itself. W[k, n] = s[g_idx[k], n] * (q[k, n] - z[g_idx[k], n]).

Every function takes numpy or jax arrays and returns the same kind.
"""

from __future__ import annotations

import numpy as np

from pallas_kernels.int_packing import unpack_cols, unpack_rows


def unpack_qweight(qweight, bits: int):
    """int32 [I/pf, O] -> [I, O] int32 values in 0 .. 2**bits - 1."""
    return unpack_rows(qweight, bits)


def unpack_qzeros(qzeros, bits: int, checkpoint_format: str):
    """int32 [G, O/pf] -> the true zeros [G, O] int32 (v1's stored zero - 1 is undone here)."""
    z = unpack_cols(qzeros, bits)
    if checkpoint_format == "gptq":
        return z + 1
    if checkpoint_format == "gptq_v2":
        return z
    raise ValueError(f"checkpoint_format must be 'gptq' or 'gptq_v2', got {checkpoint_format!r}")


def default_g_idx(in_features: int, group_size: int) -> np.ndarray:
    """g_idx of a checkpoint without desc_act: row k is in group k // group_size (-1: all rows in group 0)."""
    rows = np.arange(in_features, dtype=np.int32)
    return rows // group_size if group_size > 0 else np.zeros_like(rows)


def dequantize(qweight, qzeros, scales, g_idx, *, bits: int, checkpoint_format: str, dtype=None):
    """-> W [I, O] in `dtype` (default: the scales' dtype), gathering each row's group through g_idx."""
    dtype = dtype or scales.dtype
    pf = 32 // bits
    I, O = qweight.shape[0] * pf, qweight.shape[1]
    G = scales.shape[0]
    if scales.shape != (G, O) or qzeros.shape != (G, O // pf) or tuple(g_idx.shape) != (I,):
        raise ValueError(f"GPTQ shapes disagree: qweight {tuple(qweight.shape)} (in {I}, out {O}, {bits} bits), "
                         f"qzeros {tuple(qzeros.shape)}, scales {tuple(scales.shape)}, g_idx {tuple(g_idx.shape)}; "
                         f"expected qzeros ({G}, {O // pf}), scales ({G}, {O}), g_idx ({I},)")
    q = unpack_qweight(qweight, bits)
    z = unpack_qzeros(qzeros, bits, checkpoint_format)
    return (q - z[g_idx]).astype(dtype) * scales.astype(dtype)[g_idx]
