"""One host-to-device transfer per call: a step's many small numpy inputs packed into one int32 buffer and one
float32 buffer, unpacked inside the jitted function by static offsets.

A jitted call copies each numpy argument to the device separately; a decode step has about twenty of them, and at
batch 1 those copies cost more than a large part of the step. The layout (`Layout`, static and hashable) is part of
the compiled program's key, like the shapes it records.

Every leaf starts at a multiple of ALIGN elements (256 bytes) of its buffer, the alignment XLA gives the buffers it
allocates. XLA may hand a custom call a static slice of a parameter in place instead of copying it (jax 0.11.2's GPU
compiler does, by its dynamic-slice fusion, when the slice's size is a multiple of 256 bytes, whatever its offset), so
a leaf's offset becomes the kernel operand's address, and Mosaic GPU kernels refuse an operand that is not 256-byte
aligned. With leaves at arbitrary offsets, the block tables of a mixed step reached the Hopper prefill kernel at
offsets such as 645 int32s and the 7B engine's warm-up failed with `Input buffer 1 is not 256-byte aligned`
(benchmarks/NOTES.md, entry 32; benchmarks/hopper_alignment.py). The padding costs at most 252 bytes a leaf.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Layout:
    treedef: object                                   # the pytree structure of the packed value
    leaves: tuple[tuple[str, int, tuple[int, ...], np.dtype], ...]  # (buffer "i"/"f", offset, shape, dtype)
    sizes: tuple[int, int]                            # int32 and float32 buffer lengths


_F32, _U32, _BOOL = np.dtype(np.float32), np.dtype(np.uint32), np.dtype(np.bool_)
ALIGN_BYTES = 256
ALIGN = ALIGN_BYTES // 4  # elements of either buffer (int32 / float32)


_ZEROS = {np.dtype(np.int32): [np.zeros((k,), np.int32) for k in range(ALIGN)],
          _F32: [np.zeros((k,), np.float32) for k in range(ALIGN)]}  # the gap after a leaf, by its length


def pack(tree) -> tuple[np.ndarray, np.ndarray, Layout]:
    """numpy pytree -> (int32 buffer, float32 buffer, layout). bool and uint32 travel as int32 bits; each leaf starts
    at a multiple of ALIGN elements (see the module docstring), the gaps zeros."""
    leaves, treedef = jax.tree.flatten(tree)
    ints, floats, spec, n_i, n_f = [], [], [], 0, 0
    gap_i, gap_f = _ZEROS[np.dtype(np.int32)], _ZEROS[_F32]
    for a in leaves:
        dt = a.dtype
        pad = -a.size % ALIGN
        if dt == _F32:
            floats.append(a.ravel())
            spec.append(("f", n_f, a.shape, dt))
            if pad:
                floats.append(gap_f[pad])
            n_f += a.size + pad
        else:
            ints.append((a.view(np.int32) if dt == _U32 else a.astype(np.int32, copy=False)).ravel())
            spec.append(("i", n_i, a.shape, dt))
            if pad:
                ints.append(gap_i[pad])
            n_i += a.size + pad
    i_buf = np.concatenate(ints) if ints else np.zeros((0,), np.int32)
    f_buf = np.concatenate(floats) if floats else np.zeros((0,), np.float32)
    return i_buf, f_buf, Layout(treedef, tuple(spec), (n_i, n_f))


def unpack(i_buf: jax.Array, f_buf: jax.Array, layout: Layout):
    """Inside jit: the pytree back, each leaf a static slice of its buffer in its original dtype."""
    out = []
    for buf, off, shape, dtype in layout.leaves:
        if off % ALIGN:  # trace time only: a layout pack() did not build
            raise ValueError(f"packed leaf at offset {off}, not a multiple of {ALIGN} elements ({ALIGN_BYTES} bytes)")
        size = int(np.prod(shape, dtype=np.int64))
        src = i_buf if buf == "i" else f_buf
        a = jax.lax.slice(src, (off,), (off + size,)).reshape(shape)
        if dtype == _BOOL:
            a = a != 0
        elif dtype == _U32:
            a = jax.lax.bitcast_convert_type(a, jnp.uint32)
        elif dtype != a.dtype:
            a = a.astype(dtype)
        out.append(a)
    return jax.tree.unflatten(layout.treedef, out)
