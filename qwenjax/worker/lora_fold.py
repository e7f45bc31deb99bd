"""Multi-LoRA's shrink folded into the base projections: one GEMM gives a projection and every slot's x @ A.

Where: one device (no "tp" mesh), float (unquantized) weights, a dense Qwen2 in the fused qkv_proj / gate_up_proj
layout (always the layout on one device): there each of a layer's four projection groups is one plain dot whose
weight can take columns. Elsewhere (a mesh, AWQ / GPTQ / FP8 weights) the stacks keep A and every step runs the
shrink kernels (layers/lora.py).

Layout (the invariant). For each layer and projection group e of SITES, with O_e the base width, R_e the group's
rank columns (G x the slot rank: its parts side by side, as the stacks' A) and S slots (slot 0: no adapter):

    kernel [I, O_e + (S - 1) R_e] = [W | A_1 | ... | A_{S-1}]     bias (qkv) [O_e + (S - 1) R_e] = [b | 0 ... 0]

slot s's A at columns [O_e + (s - 1) R_e, O_e + s R_e); an empty slot's columns are zeros. The model reads the
first O_e columns as its projection and passes the rest to layers/lora.py as `folded` (models/qwen2.py,
`_base_and_folded`). The extra bytes are the A stacks' that the fold replaces (S - 1 of their S slots), read by every
step: at 8 rank-16 slots on the 7B, 10.4 MB a layer against the layer's ~466 MB.

QWENJAX_LORA_FOLD=0 keeps A in the stacks on one device too (the shrink kernels run): for comparing the two paths.

Loading a slot writes its A columns into the runner's parameter leaves (donated: no copy of the weights) in one
jitted program; the shapes never change, so nothing recompiles when the adapters do.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax import lax

from qwenjax.layers.lora import LORA_GROUPS

FOLD_ENV = "QWENJAX_LORA_FOLD"
SITES = {"qkv_proj": ("self_attn", "qkv_proj"), "o_proj": ("self_attn", "o_proj"),
         "gate_up_proj": ("mlp", "gate_up_proj"), "down_proj": ("mlp", "down_proj")}


def _path(keys) -> tuple:
    out = tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", None))) for k in keys)
    return out[:-1] if out and out[-1] == "value" else out


class LoRAFold:
    """Where a LoRA engine's parameters carry the slots' A (module docstring): leaf indices and widths."""

    def __init__(self, params, num_layers: int, rank_columns: dict[str, int], num_slots: int):
        flat = jax.tree_util.tree_flatten_with_path(params)[0]
        index = {_path(keys): i for i, (keys, _) in enumerate(flat)}
        self.num_slots, self.columns = num_slots, dict(rank_columns)
        self.nbytes = 0
        self.kernel, self.bias = [], []  # per layer: {entry: leaf index}
        self.base_width: dict[str, int] = {}
        for layer in range(num_layers):
            ks, bs = {}, {}
            for e, (owner, proj) in SITES.items():
                pre = ("model", "layers", layer, owner, proj)
                ks[e] = index[pre + ("kernel",)]
                if pre + ("bias",) in index:
                    bs[e] = index[pre + ("bias",)]
                self.base_width[e] = flat[ks[e]][1].shape[1]
            self.kernel.append(ks)
            self.bias.append(bs)

    @staticmethod
    def applies(params, num_layers: int, mesh_size: int, quantized: bool) -> bool:
        """Whether the fold can hold this model's slots: one device, float weights, every site a plain kernel (and
        not turned off by FOLD_ENV=0)."""
        if mesh_size != 1 or quantized or os.environ.get(FOLD_ENV, "1") == "0":
            return False
        paths = {_path(keys): leaf for keys, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
        kernels = [paths.get(("model", "layers", i, o, p, "kernel")) for i in range(num_layers)
                   for o, p in SITES.values()]
        return all(k is not None and k.ndim == 2 and jnp.issubdtype(k.dtype, jnp.floating) for k in kernels)

    @staticmethod
    def rank_columns(rank: int) -> dict[str, int]:
        """Each site's A columns a slot on one device: G x the slot rank (a group's parts side by side)."""
        return {e: rank * len(LORA_GROUPS.get(e, (e,))) for e in SITES}

    def extra_columns(self, entry: str) -> int:
        return (self.num_slots - 1) * self.columns[entry]

    def extend(self, params):
        """params with every site's kernel (and bias) widened by zeros to the layout's width; the old leaves are
        deleted as each new one is made, so the peak is one weight more, not a second model."""
        leaves, tree = jax.tree.flatten(params)
        self.nbytes = 0  # the added columns' bytes
        for layer in range(len(self.kernel)):
            for e in SITES:
                n = self.extra_columns(e)
                for i in (self.kernel[layer][e], self.bias[layer].get(e)):
                    if i is None:
                        continue
                    old = leaves[i]
                    leaves[i] = _widen(old, n)
                    self.nbytes += leaves[i].nbytes - old.nbytes
                    old.delete()
        return jax.tree.unflatten(tree, leaves)

    def write(self, leaves: list, slot: int, a_cols: list[dict]) -> list:
        """The runner's parameter leaves with slot `slot`'s A columns set to a_cols[layer][entry] ([I, R_e], host
        arrays; zeros clear the slot)."""
        idx = [self.kernel[layer][e] for layer in range(len(self.kernel)) for e in SITES]
        starts = tuple(self.base_width[e] for _ in self.kernel for e in SITES)
        widths = tuple(self.columns[e] for _ in self.kernel for e in SITES)
        new = [a_cols[layer][e] for layer in range(len(self.kernel)) for e in SITES]
        out = list(leaves)
        written = _write_columns([leaves[i] for i in idx], jnp.int32(slot), new, starts=starts, widths=widths)
        for i, w in zip(idx, written):
            out[i] = w
        return out


@functools.partial(jax.jit, static_argnums=(1,))
def _widen(w: jax.Array, n: int) -> jax.Array:
    return jnp.concatenate([w, jnp.zeros(w.shape[:-1] + (n,), w.dtype)], axis=-1)


@functools.partial(jax.jit, static_argnames=("starts", "widths"), donate_argnums=(0,))
def _write_columns(kernels: list, slot, new: list, *, starts: tuple, widths: tuple) -> list:
    return [lax.dynamic_update_slice(k, a.astype(k.dtype), (0, s + (slot - 1) * w))
            for k, a, s, w in zip(kernels, new, starts, widths)]
