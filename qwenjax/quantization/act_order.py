"""Load-time reordering of GPTQ act-order (desc_act) layers into group order, so that the decode kernels take them.

An act-order checkpoint assigns input rows to groups through g_idx [I], a permutation of the natural assignment
k // group_size (GPTQ quantizes the rows in order of decreasing activation, then stores them in the original order).
The kernels (pallas_kernels/quant_skinny.py) read the group of row k as k // group_size. Sorting the rows by group
makes that true: with perm = the stable argsort of g_idx,

  qweight'[k] = qweight[perm[k]] (repacked: value j of word w is row perm[w*pf + j]),  g_idx' = g_idx[perm]
  y = x @ W = x[:, perm] @ W[perm]

and g_idx[perm] is k // group_size for every GPTQ act-order checkpoint (each group has group_size rows, the last
possibly fewer); anything else is refused by name. qzeros and scales are indexed by group and stay as they are.
QuantLinear keeps `perm` [I] int32 and gathers x's columns through it at run time (M x I values: small at decode).
Row-parallel layers under tensor parallelism: after the sort, a device's slice of rows is whole groups (the mesh
divides I in whole groups, models/mesh_padding.py), matching its slice of the scales and zeros.

Every function takes numpy or jax arrays and returns the same kind, except `group_order` (host numpy).
"""

from __future__ import annotations

import functools

import numpy as np

from pallas_kernels.gptq_layout import default_g_idx
from pallas_kernels.int_packing import array_module, unpack_rows


def group_order(g_idx, group_size: int, *, name: str = "layer") -> np.ndarray:
    """The stable argsort of g_idx [I] (host), int32; ValueError unless it puts the rows in k // group_size order."""
    g = np.asarray(g_idx).astype(np.int64)
    perm = np.argsort(g, kind="stable").astype(np.int32)
    want = default_g_idx(g.shape[0], group_size)
    if not np.array_equal(g[perm], want):
        i = int(np.flatnonzero(g[perm] != want)[0])
        raise ValueError(f"GPTQ act-order g_idx of {name} ({g.shape[0]} rows, group_size {group_size}) does not "
                         f"assign group_size rows to each group: in group order, row {i} is in group "
                         f"{int(g[perm][i])}, expected {int(want[i])}. Supported: the layout GPTQ writes, every "
                         f"group group_size rows (the last possibly fewer)")
    return perm


def padded_g_idx(g_idx, rows: int, group_size: int) -> np.ndarray:
    """A checkpoint's g_idx [I] extended to `rows` for a model padded for the mesh (models/mesh_padding.py): the
    padded rows, whose inputs are always zero, go to the padded groups as k // group_size puts them, so that the
    group order of the whole stays group_size rows a group."""
    g = np.asarray(g_idx).astype(np.int32)
    return np.concatenate([g, default_g_idx(rows, group_size)[g.shape[0]:]])


def pack_rows(vals, bits: int):
    """[R, C] values in 0 .. 2**bits - 1 -> int32 [R/pf, C]: value j of word w is row w*pf + j."""
    xp = array_module(vals)
    pf = 32 // bits
    R, C = vals.shape
    shifts = xp.asarray([bits * j for j in range(pf)], dtype=xp.uint32)
    words = (vals.reshape(R // pf, pf, C).astype(xp.uint32) << shifts[None, :, None]).sum(axis=1, dtype=xp.uint32)
    return words.view(xp.int32)


def permute_qweight(qweight, perm, bits: int):
    """GPTQ qweight int32 [I/pf, O] with its input rows taken in `perm`'s order (row k of the result is row perm[k])."""
    return pack_rows(unpack_rows(qweight, bits)[perm], bits)


def act_order_loaded(loaded: dict, wanted: dict, quant, *, place) -> dict:
    """The loader's {param path: device array} with every act-order layer sorted into group order: qweight permuted
    on the device (in its own sharding), g_idx replaced by k // group_size, and `perm` added. `place(host array,
    key)` puts a host array at `key`'s sharding. A no-op unless `quant` is GPTQ with desc_act."""
    if quant is None or quant.method != "gptq" or not quant.desc_act:
        return loaded
    import jax

    out = dict(loaded)
    for key in wanted:
        if key[-1] != "perm":
            continue
        owner = key[:-1]
        g_key, q_key = owner + ("g_idx",), owner + ("qweight",)
        if g_key not in loaded or q_key not in loaded:
            continue  # the loader's check of missing parameters names them
        perm = group_order(np.asarray(loaded[g_key]), quant.group_size, name=".".join(map(str, owner)))
        out[key] = place(perm, key)
        out[g_key] = place(default_g_idx(perm.shape[0], quant.group_size), g_key)
        qw = loaded[q_key]
        out[q_key] = _permute_on_devices(quant.bits, qw.sharding)(qw, jax.numpy.asarray(perm))
    return out


@functools.lru_cache(maxsize=None)
def _permute_on_devices(bits: int, sharding):
    """permute_qweight jitted into `sharding`: one compilation per (bits, sharding, shape), not one per layer. Its
    transient is the layer's unpacked values (4 bytes a weight), one layer at a time."""
    import jax

    return jax.jit(functools.partial(permute_qweight, bits=bits), out_shardings=sharding)
