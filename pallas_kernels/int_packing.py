"""Helpers shared by the AWQ and GPTQ unpacking code: array-module dispatch and bit-field extraction."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def array_module(x):
    """numpy for numpy arrays (host checks, the loader), jax.numpy for everything else (traced or device arrays)."""
    return np if isinstance(x, np.ndarray) else jnp


def unpack_rows(packed, bits: int):
    """int32 [R/pf, C] packed along rows -> [R, C]: value j of word w is row w*pf + j (bits j*b .. j*b+b-1)."""
    xp = array_module(packed)
    pf = 32 // bits
    shifts = xp.asarray([bits * j for j in range(pf)], dtype=xp.int32)  # [pf]
    vals = (packed[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)  # [R/pf, pf, C]
    return vals.reshape(packed.shape[0] * pf, packed.shape[1])


def unpack_cols(packed, bits: int):
    """int32 [R, C/pf] packed along columns -> [R, C]: value j of word c is column c*pf + j."""
    xp = array_module(packed)
    pf = 32 // bits
    shifts = xp.asarray([bits * j for j in range(pf)], dtype=xp.int32)
    vals = (packed[:, :, None] >> shifts) & ((1 << bits) - 1)  # [R, C/pf, pf]
    return vals.reshape(packed.shape[0], packed.shape[1] * pf)
