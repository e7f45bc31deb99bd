"""Load-time repack of AWQ weights into the K-packed layout that the decode kernel streams (pallas_kernels/quant_gemv.py).

AWQ packs eight 4-bit values along the OUTPUT dimension (pallas_kernels/awq_layout.py); a GEMV wants each word to hold
consecutive INPUT rows of one column, as GPTQ does, so a thread's word is eight multiply-adds into one output. The
repacked arrays keep the checkpoint's shapes and dtype (packed int32, never dequantized):

  qweight  int32 [I, O/8] -> [I, O/8]: nibble j of word (8w + a, b) is row 8w + j, column 8b + a ("awq_kp")
  qzeros   int32 [G, O/8] -> [G, O/8]: nibble a of word b is column 8b + a (natural order, the true zero)
  scales   unchanged

Every 8-row, 8-column block of W maps onto the same block of words, so a slice of rows (a multiple of 8) or of
packed columns of the repacked array holds exactly the same rows or columns of W as the checkpoint's slice: tensor
parallel splits (sharding.py: rows of o/down, packed columns of q/k/v/gate/up) mean the same before and after, and
the repack is local to each shard.

Every function takes numpy or jax arrays and returns the same kind.
"""

from __future__ import annotations

from pallas_kernels import awq_layout as awq
from pallas_kernels.int_packing import array_module

PACK = 8


def _pack_last(vals, xp):
    """[..., 8] values in 0..15 -> [...] int32, value i in bits 4i..4i+3."""
    shifts = xp.asarray([4 * i for i in range(PACK)], dtype=xp.uint32)
    words = (vals.astype(xp.uint32) << shifts).sum(axis=-1, dtype=xp.uint32)  # disjoint bits: sum == or
    return words.view(xp.int32)


def awq_to_kpacked(qweight):
    """AWQ qweight int32 [I, O/8] -> the awq_kp layout, same shape (module docstring). I must be a multiple of 8."""
    xp = array_module(qweight)
    I, C = qweight.shape
    if I % PACK:
        raise ValueError(f"the awq_kp layout packs 8 input rows per word; the layer has {I} inputs")
    q = awq.unpack(qweight).reshape(I // PACK, PACK, C, PACK)   # [w, j, b, a]: row 8w + j, column 8b + a
    return _pack_last(q.transpose(0, 3, 2, 1), xp).reshape(I, C)  # [w, a, b] <- values over j


def awq_zeros_natural(qzeros):
    """AWQ qzeros int32 [G, O/8] (interleaved nibble order) -> nibble a of word b is column 8b + a."""
    xp = array_module(qzeros)
    G, C = qzeros.shape
    return _pack_last(awq.unpack(qzeros).reshape(G, C, PACK), xp)


def repack_loaded(loaded: dict, quant) -> dict:
    """The loader's {param path: device array} with AWQ's qweight / qzeros moved to the kernel layout on the device
    (each array in its own sharding, the input donated: one layer's worth of temporaries at a time)."""
    if quant is None or quant.method != "awq":
        return loaded
    import jax

    fns = {"qweight": awq_to_kpacked, "qzeros": awq_zeros_natural}
    donate = (0,) if jax.default_backend() != "cpu" else ()  # the CPU backend cannot reuse donated buffers
    out = dict(loaded)
    for key, arr in loaded.items():
        fn = fns.get(key[-1]) if isinstance(key[-1], str) else None
        if fn is not None:
            out[key] = jax.jit(fn, out_shardings=arr.sharding, donate_argnums=donate)(arr)
    return out
