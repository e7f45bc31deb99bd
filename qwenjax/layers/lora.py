"""LoRA deltas inside the model: y + (x @ A[slot]) @ B[slot] for each token's adapter slot.

`LoRAInputs` is what a step gives the model: the stacked slot arrays of every layer (worker/lora_stacks.py: per
layer a dict projection -> (A [S, I, R], B [S, R, O]), slot 0 all zeros) and the slot of each of the step's T tokens.
Fused projections (models/fusion.py) get the delta of each part after their output is split, so fusion and LoRA are
independent. On a GPU of a one-device mesh the Pallas kernels run (pallas_kernels/lora_matmul.py); elsewhere the jnp
reference (on a mesh, XLA splits it as it splits the base weights: A and B are sharded like them).
"""

from __future__ import annotations

import dataclasses

import jax

from pallas_kernels.lora_matmul import lora_matmul, lora_matmul_reference
from qwenjax import compat


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoRAInputs:
    stacks: list       # per layer: {projection: (A [S, I, R], B [S, R, O])}
    ids: jax.Array     # [T] int32 slot of each token; 0: no adapter


def _use_kernel() -> bool:
    if compat.platform() != "gpu":
        return False
    mesh = jax.sharding.get_abstract_mesh()
    return mesh is None or mesh.empty or mesh.size == 1


def add_lora(y: jax.Array, x: jax.Array, lora: LoRAInputs | None, layer: int, name: str) -> jax.Array:
    """y [T, O] (the base projection of x [T, I]) plus the LoRA delta of projection `name` of `layer`."""
    if lora is None:
        return y
    a, b = lora.stacks[layer][name]
    x2 = x.reshape(-1, x.shape[-1]).astype(a.dtype)
    fn = lora_matmul if _use_kernel() else lora_matmul_reference
    delta = fn(x2, a, b, lora.ids)
    return y + delta.reshape(y.shape).astype(y.dtype)
