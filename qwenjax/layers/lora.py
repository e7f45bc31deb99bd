"""LoRA deltas inside the model: y + (x @ A[slot]) @ B[slot] for each token's adapter slot.

`LoRAInputs` is what a step gives the model: the stacked slot arrays of every layer (worker/lora_stacks.py: per layer
a dict projection -> (A [S, I, R], B [S, R, O]), slot 0 all zeros) and the slot of each of the step's T tokens. On
one device the projections that read one input share their arrays (LORA_GROUPS: q/k/v, gate/up): A side by side
[S, I, G * R] and B block-diagonal [S, G * R, sum O], so a group costs one shrink and one expand, not G of each (8
matmuls a layer instead of 14; the zero blocks cost G x the expand's small FLOPs); the delta is split back into the
parts. Over a mesh every projection keeps its own arrays, split like its base weight. Fused base projections
(models/fusion.py) get the delta of each part after their output is split, so fusion and LoRA are independent. On a
GPU the Pallas kernels run where the mesh is one device and they take the shapes, else the dense jnp form (over a
mesh XLA splits it as it splits the base weights: A and B are sharded like them); on CPU the jnp reference.

Which kernels: steps of at most SPLIT_K_MAX_ROWS tokens (decode buckets, mixed and verify steps) run
pallas_kernels/lora_decode.py (a split-K shrink and an expand: the shrink's output is too narrow for a row-tiled
grid to fill the GPU), larger ones (prefill) the grouped-matmul pair of pallas_kernels/lora_matmul.py. Either way
the rows' grouping (and the decode kernels' tile table) is built once a step in `LoRAInputs.build`, not per call.
A step in which no row has an adapter never reaches this module: the model runner then runs the base model's
program (worker/model_runner.py, `_lora_stacks_for`).

The fold (one device, float base weights: worker/lora_fold.py). There the shrink of every slot is part of the base
projection itself: its weight carries the slots' A as extra columns [W | A_1 | ... | A_{S-1}], so the base GEMM
gives y and every slot's h = x @ A_s at once (rounded to x.dtype, as the contract's shrink). The stacks then hold
no A (None) and the model passes the projection's whole output as `folded` [T, O + (S - 1) * R], the slots'
columns after its O; what is left a projection group is one expand (lora_decode_expand on a GPU, reading each row's
own slot's columns; in q/k/v and gate/up each tile only its part's block of B) and the add. At batch 1 on an
H100 the four shrinks and their split-K sums were ~16.6 us of the LoRA's ~28 us a layer (NOTES 49); the fold costs
the GEMMs (S - 1) x A's bytes instead.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.lora_decode import LoRAPlan, lora_decode_expand, lora_decode_matmul, plan as decode_plan
from pallas_kernels.lora_matmul import (folded_expand_grouped, folded_expand_reference, group_by_slot, lora_matmul,
                                        lora_matmul_dense, lora_matmul_reference, supported)
from qwenjax import compat


# Steps of at most this many tokens take the split-K decode kernels on a GPU, larger ones the grouped pair. Prefill
# row tiles alone fill the GPU (thousands of rows: hundreds of tiles), and a split there only adds partials.
SPLIT_K_MAX_ROWS = 1024
LORA_GROUPS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
# QWENJAX_LORA_EXPAND_ADD=1: decode steps add each delta inside the expand kernel, into the base projection's buffer
# (lora_decode_matmul's `base`; 3 kernels a projection group at batch 1 instead of 4). Correct on an H100
# (tests/gpu/test_lora_gpu.py's decode_add cases) but slower end to end there (NOTES 48): opt-in; read when traced.
EXPAND_ADD_ENV = "QWENJAX_LORA_EXPAND_ADD"
# QWENJAX_LORA_FUSE_REDUCTION=1: the decode expand sums the shrink's split-K partials itself (lora_decode_matmul's
# fuse_reduction; one kernel fewer a group). Opt-in until benchmarks/lora.py has timed it; read when traced.
FUSE_REDUCTION_ENV = "QWENJAX_LORA_FUSE_REDUCTION"
# QWENJAX_LORA_FOLD_INPLACE=1: with the fold, the decode expand reads the slots' columns from the base projection's
# whole output (lora_decode_expand's col0) instead of a slice of it, which XLA copies for the Pallas call (an extra
# slice and a memcpy a layer at batch 1 on an H100, ~59 us a token: NOTES 50). Opt-in until timed; read when traced.
FOLD_INPLACE_ENV = "QWENJAX_LORA_FOLD_INPLACE"


def _decode(x2, a, b, lora, base=None):
    fuse = os.environ.get(FUSE_REDUCTION_ENV) == "1"
    return lora_decode_matmul(x2, a, b, lora.plan, base=base, fuse_reduction=fuse)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoRAInputs:
    stacks: list       # per layer: {projection: (A [S, I, R], B [S, R, O])}; A None where folded (module doc)
    ids: jax.Array     # [T] int32 slot of each token; 0: no adapter
    grouping: tuple | None = None  # (order, inverse [T], group sizes [S - 1]) of the grouped kernels (GPU prefill)
    plan: LoRAPlan | None = None   # the decode kernels' row grouping and tile table (GPU, T <= SPLIT_K_MAX_ROWS)

    @classmethod
    def build(cls, stacks: list, ids: jax.Array) -> "LoRAInputs":
        """The step's LoRA inputs; on a GPU with the kernels' grouping of the rows, computed here once a step."""
        if compat.platform() != "gpu":
            return cls(stacks, ids)
        S = next(iter(stacks[0].values()))[1].shape[0]
        if ids.shape[0] <= SPLIT_K_MAX_ROWS:
            return cls(stacks, ids, plan=decode_plan(ids, S))
        return cls(stacks, ids, group_by_slot(ids, S))


def _matmul(a: jax.Array, b: jax.Array):
    """The batched LoRA matmul for this backend, mesh and shape (module docstring)."""
    if compat.platform() != "gpu":
        return lora_matmul_reference
    mesh = jax.sharding.get_abstract_mesh()
    one_device = mesh is None or mesh.empty or mesh.size == 1
    return lora_matmul if one_device and supported(a.shape[1], b.shape[2], a.shape[2], a.dtype) else lora_matmul_dense


def _adds_in_expand(y: jax.Array, a: jax.Array, b: jax.Array, lora: LoRAInputs) -> bool:
    """Whether the decode kernels add this delta into y's buffer themselves (EXPAND_ADD_ENV)."""
    return (os.environ.get(EXPAND_ADD_ENV) == "1" and lora.plan is not None and y.dtype == a.dtype
            and _matmul(a, b) is lora_matmul)


def _delta(x: jax.Array, a: jax.Array, b: jax.Array, lora: LoRAInputs) -> jax.Array:
    x2 = x.reshape(-1, x.shape[-1]).astype(a.dtype)
    fn = _matmul(a, b)
    if fn is not lora_matmul:
        return fn(x2, a, b, lora.ids)
    return _decode(x2, a, b, lora) if lora.plan is not None else fn(x2, a, b, lora.ids, lora.grouping)


def _plus_delta(y: jax.Array, x: jax.Array, a: jax.Array, b: jax.Array, lora: LoRAInputs) -> jax.Array:
    """y [T, O] (the base projection of x [T, I]) plus the delta of the slot arrays (a, b), in y.dtype."""
    if _adds_in_expand(y, a, b, lora):
        x2 = x.reshape(-1, x.shape[-1]).astype(a.dtype)
        return _decode(x2, a, b, lora, base=y.reshape(x2.shape[0], -1)).reshape(y.shape)
    return y + _delta(x, a, b, lora).reshape(y.shape).astype(y.dtype)


def _folded_delta(out: jax.Array, width: int, b: jax.Array, lora: LoRAInputs, parts: tuple = ()) -> jax.Array:
    """[T, O] in b.dtype: the expand of the folded shrink, columns [width, ...) of the base projection's whole output
    `out` [T, width + (S - 1) * R] (module docstring); `parts`: a group's output widths (B block-diagonal over them:
    the decode expand skips the zero blocks)."""
    r, o = b.shape[1], b.shape[2]
    h_all = out[:, width:]
    if compat.platform() != "gpu" or r % 16 or o % 16:
        return folded_expand_reference(h_all, b, lora.ids)
    if lora.plan is not None and os.environ.get(FOLD_INPLACE_ENV) == "1":
        return lora_decode_expand(out, b, lora.plan, parts=parts, col0=width)
    if lora.plan is not None:
        return lora_decode_expand(h_all, b, lora.plan, parts=parts)
    return folded_expand_grouped(h_all, b, lora.ids, lora.grouping)


def add_lora(y: jax.Array, x: jax.Array, lora: LoRAInputs | None, layer: int, name: str,
             folded: jax.Array | None = None) -> jax.Array:
    """y [T, O] (the base projection of x [T, I]) plus the LoRA delta of projection `name` of `layer`; `folded`:
    where the stacks fold this projection's A into its weight, the projection's whole output [T, O + (S - 1) R]
    (y is its first O columns, the slots' shrink the rest)."""
    if lora is None:
        return y
    a, b = lora.stacks[layer][name]
    if a is None:
        return y + _folded_delta(folded, y.shape[-1], b, lora).astype(y.dtype)
    return _plus_delta(y, x, a, b, lora)


def add_lora_parts(ys: tuple, x: jax.Array, lora: LoRAInputs | None, layer: int, group: str,
                   folded: jax.Array | None = None) -> tuple:
    """The projections ys ([T, O_i], in LORA_GROUPS[group]'s order) of one input x, each plus its LoRA delta: one
    shrink and one expand where the stacks hold the group's arrays together, else one of each per part; `folded`
    as in add_lora."""
    if lora is None:
        return ys
    if group not in lora.stacks[layer]:
        return tuple(add_lora(y, x, lora, layer, name) for y, name in zip(ys, LORA_GROUPS[group]))
    a, b = lora.stacks[layer][group]
    bounds = np.cumsum([y.shape[-1] for y in ys])[:-1].tolist()
    if a is None:
        widths = tuple(y.shape[-1] for y in ys)
        delta = _folded_delta(folded, sum(widths), b, lora, widths)
    elif _adds_in_expand(ys[0], a, b, lora):  # the parts side by side (slices of one fused projection: its output)
        return tuple(jnp.split(_plus_delta(jnp.concatenate(ys, axis=-1), x, a, b, lora), bounds, axis=-1))
    else:
        delta = _delta(x, a, b, lora)  # [T, sum O_i], the parts side by side
    return tuple(y + d.astype(y.dtype) for y, d in zip(ys, jnp.split(delta, bounds, axis=-1)))
