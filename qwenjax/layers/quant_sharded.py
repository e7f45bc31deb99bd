"""The skinny decode kernel under tensor parallelism: each device runs it on its own shard of the packed weight
(shard_map over the "tp" mesh axis), so a decode product never gathers a packed weight (a Pallas custom call has no
partitioning rule of its own; left to XLA it would be replicated).

The shard_map specs are the loader's shardings (models/sharding.py `param_spec`, whose rule is: a split that does
not divide the axis evenly leaves that array replicated):
  "out"   column-parallel (q/k/v, gate/up, fused or not): qweight / qzeros / scales split on their last axis (output
          columns, or packed words of 8 columns), x replicated; each device computes its own columns, out [M, O]
          split on O, the fused layers' columns in the same per-shard order as the whole product's.
  "in"    row-parallel (o_proj, down_proj): qweight split on its first axis (input rows, or packed words of pf rows)
          and qzeros / scales on groups, x split on I; each device computes a float32 partial of all O columns
          from its K slice, psum-ed over the mesh and then cast (the one-device kernel also sums its K splits in
          float32 and casts once). Act-order layers arrive sorted into group order (quantization/act_order.py),
          x already gathered through perm, so a device's rows are whole groups as for any other layer; that
          gather reads columns of x held by other devices (XLA inserts the collective: M x I values a step).
  None    replicated (k/v projections where the kv heads do not split): every device the whole product.
Where the arrays do not split so that each device holds whole groups of its own rows (e.g. groups straddling two
devices, or scales of several groups replicated because the groups do not divide over the mesh), or where the
kernel does not take a device's shape, this returns None and the caller runs the XLA path, which XLA partitions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

AXIS = "tp"
SPLITS = ("out", "in", None)


def tp_size() -> int:
    """Devices on the "tp" axis of the mesh being traced under (1 without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty or AXIS not in mesh.axis_names else mesh.shape[AXIS]


def local_product(split, n: int, in_features: int, qweight, qzeros, scales, *, group_size: int):
    """(specs of x, qweight, qzeros, scales, out; the local K, N and group_size; whether to psum) of one device's
    product, or None when the loader's shardings do not give each device whole groups of its own rows."""
    O = scales.shape[-1]
    if split == "out":
        if any(a.shape[-1] % n for a in (qweight, qzeros, scales)):
            return None  # some array replicated by param_spec while the others split: no common column slice
        col = P(None, AXIS)
        return P(), col, col, col, col, in_features, O // n, group_size, False
    if split == "in":
        if qweight.shape[0] % n or in_features % n:
            return None
        k = in_features // n
        G = scales.shape[0]
        if G % n == 0 and G // n * group_size == k:
            row = P(AXIS, None)
            return P(None, AXIS), row, row, row, P(), k, O, group_size, True
        if G == 1 and group_size in (-1, in_features):  # one group over every row: scales replicated, all local rows
            return P(None, AXIS), P(AXIS, None), P(), P(), P(), k, O, -1, True
        return None  # groups straddle devices, or several groups replicated: XLA partitions the dequantize-then-dot
    if split is None:
        return P(), P(), P(), P(), P(), in_features, O, group_size, False
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def sharded_skinny(x2, qweight, qzeros, scales, *, split, fmt: str, bits: int, group_size: int, fits,
                   interpret: bool, mode: str | None = None):
    """x2 [M, I] @ the layer's packed weight on each device of the "tp" mesh -> [M, O] in x2.dtype, or None where
    the kernel cannot run per device (module docstring). `fits(m, k, n)` says whether the kernel takes a device's
    product (quant_linear.skinny_fits)."""
    from pallas_kernels import quant_skinny

    n = tp_size()
    m, I = x2.shape
    local = local_product(split, n, I, qweight, qzeros, scales, group_size=group_size)
    if local is None:
        return None
    x_spec, w_spec, z_spec, s_spec, out_spec, k, cols, gs, reduce = local
    if not fits(m, k, cols, gs):
        return None

    def body(x, qw, qz, s):
        y = quant_skinny.quant_skinny(x, qw, qz, s, fmt=fmt, bits=bits, group_size=gs, interpret=interpret,
                                      mode=mode, out_dtype=jnp.float32 if reduce else None)
        return jax.lax.psum(y, AXIS).astype(x.dtype) if reduce else y

    return jax.shard_map(body, mesh=jax.sharding.get_abstract_mesh(), in_specs=(x_spec, w_spec, z_spec, s_spec),
                         out_specs=out_spec, check_vma=False)(x2, qweight, qzeros, scales)
