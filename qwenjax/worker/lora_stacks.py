"""The device half of multi-LoRA: every layer's adapter slots as preallocated stacked arrays.

Per layer and target projection (all seven of a Qwen2 layer, whatever the adapters target): A [S, I, R] and
B [S, R, O], S = max_loras + 1 slots (slot 0 stays all zeros: "no adapter"), R = max_lora_rank rounded up to the
kernel's multiple of 16; an adapter of lower rank, or one that leaves a projection out, fills the rest with zeros. On
one device q/k/v and gate/up are held as groups (layers/lora.LORA_GROUPS): A [S, I, G * R] side by side and
B [S, G * R, sum O] block-diagonal, one shrink and one expand a group. Scaling (lora_alpha / r) is already folded
into B on the host (qwenjax/lora/peft.py). I and O are the running model's (mesh-padded, models/mesh_padding.py)
widths: padded heads and FFN columns are appended, so an adapter's real columns come first and the padding is zeros,
like the base weights'.

Loading an adapter into a slot is one jitted `.at[slot].set` per array into the donated stacks, so the shapes never
change and no step recompiles when the mix of adapters does. With a fold (worker/lora_fold.py: one device, float
weights) the A of every slot lives in the base projections' extra columns instead: the stacks hold None for A, and
`load` writes A into the parameter leaves it is given. Over a "tp" mesh A and B follow their base weight:
column-parallel projections (q/k/v/gate/up) split B on O (A replicated), row-parallel ones (o/down) split A on I
(B replicated), so each device's shrink and expand read only its own slices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from pallas_kernels.lora_matmul import RANK_MULTIPLE
from qwenjax.config import LoRAConfig, ModelConfig
from qwenjax.layers.lora import LORA_GROUPS
from qwenjax.lora.peft import OWNER, TARGET_MODULES, LoRAWeights, projection_shapes
from qwenjax.models.sharding import ROW_PARALLEL, param_spec
from qwenjax.worker.lora_fold import LoRAFold


def slot_rank(config: LoRAConfig) -> int:
    return -(-config.max_lora_rank // RANK_MULTIPLE) * RANK_MULTIPLE


def stack_shardings(cfg: ModelConfig, mesh, n: int) -> dict[str, tuple[NamedSharding, NamedSharding]]:
    """(A's, B's) sharding per projection, following the base weight's (module docstring)."""
    out = {}
    for name in TARGET_MODULES:
        spec = param_spec(("model", "layers", 0, OWNER[name], name, "kernel"), cfg, n)
        spec = tuple(spec) + (None,) * (2 - len(tuple(spec)))
        if name in ROW_PARALLEL:
            a, b = (P(None, spec[0], None) if spec[0] else P()), P()
        else:
            a, b = P(), (P(None, None, spec[1]) if spec[1] else P())
        out[name] = (NamedSharding(mesh, a), NamedSharding(mesh, b))
    return out


class LoRAStacks:
    """The slot arrays of one engine (`stacks`: per layer {projection or group: (A, B)}) and the writes into them."""

    def __init__(self, cfg: ModelConfig, config: LoRAConfig, dtype, mesh, fold: LoRAFold | None = None):
        self.config, self.dtype = config, jnp.dtype(dtype)
        self.num_slots, self.rank = config.max_loras + 1, slot_rank(config)
        shapes = projection_shapes(cfg)  # the running (padded) model's
        n = mesh.shape.get("tp", 1) if hasattr(mesh, "shape") else 1
        # entry name -> its projections, in column order (a group on one device, else each projection alone)
        groups = LORA_GROUPS if n == 1 else {}
        grouped = {p for parts in groups.values() for p in parts}
        self.entries = {**{g: parts for g, parts in groups.items()},
                        **{p: (p,) for p in shapes if p not in grouped}}
        self.shapes = {e: (shapes[parts[0]][0], sum(shapes[p][1] for p in parts)) for e, parts in self.entries.items()}
        self.part_shapes = shapes
        shard = stack_shardings(cfg, mesh, n) if n > 1 else \
            {e: (NamedSharding(mesh, P()),) * 2 for e in self.entries}
        S, R = self.num_slots, self.rank
        self.fold = fold
        if fold is not None and fold.columns != self.rank_columns():
            raise ValueError(f"a LoRA fold of columns {fold.columns} does not match the stacks' {self.rank_columns()}")

        def zeros():
            return [{e: (None if fold is not None else jnp.zeros((S, i, R * len(self.entries[e])), self.dtype),
                         jnp.zeros((S, R * len(self.entries[e]), o), self.dtype))
                     for e, (i, o) in self.shapes.items()} for _ in range(cfg.num_hidden_layers)]

        if fold is not None:  # no A arrays: their shardings are None (an empty subtree) as the stacks' A are
            shard = {e: (None, sb) for e, (_, sb) in shard.items()}
        self.shardings = [dict(shard) for _ in range(cfg.num_hidden_layers)]
        self.stacks = jax.jit(zeros, out_shardings=self.shardings)()
        self._write = jax.jit(_write_slot, donate_argnums=(0,), out_shardings=self.shardings)

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self.stacks))

    def host_slot(self, weights: LoRAWeights | None) -> list[dict]:
        """One slot's arrays on the host in the stacks' shapes and dtype: the adapter's A / B (part g of a group in
        A's rank columns [g R, g R + r) and B's block of rows [g R, g R + r) x its own columns), zeros elsewhere."""
        R, out = self.rank, []
        for layer in range(len(self.stacks)):
            d = {}
            for e, (i, o) in self.shapes.items():
                parts = self.entries[e]
                a, b = np.zeros((i, R * len(parts)), self.dtype), np.zeros((R * len(parts), o), self.dtype)
                col = 0
                for g, name in enumerate(parts):
                    if weights is not None and (layer, name) in weights.modules:
                        wa, wb = weights.modules[(layer, name)]
                        a[:wa.shape[0], g * R:g * R + wa.shape[1]] = wa
                        b[g * R:g * R + wb.shape[0], col:col + wb.shape[1]] = wb
                    col += self.part_shapes[name][1]
                d[e] = (a, b)
            out.append(d)
        return out

    def rank_columns(self) -> dict[str, int]:
        """Each entry's A columns a slot (G x the slot rank): what a fold adds to its weight per slot."""
        return {e: self.rank * len(parts) for e, parts in self.entries.items()}

    def load(self, slot: int, weights: LoRAWeights | None, param_leaves: list | None = None) -> list | None:
        """Writes an adapter (None: zeros) into device slot `slot` (1..max_loras); with a fold, its A into
        `param_leaves` (the runner's parameters), returned updated (as given without a fold)."""
        if not 1 <= slot < self.num_slots:
            raise ValueError(f"LoRA slot must be in [1, {self.num_slots - 1}], got {slot}")
        if weights is not None and weights.rank > self.config.max_lora_rank:
            raise ValueError(f"LoRA adapter {weights.lora_name!r}: rank {weights.rank} exceeds max_lora_rank="
                             f"{self.config.max_lora_rank}")
        host = self.host_slot(weights)
        if self.fold is None:
            self.stacks = self._write(self.stacks, np.int32(slot), host)
            return param_leaves
        self.stacks = self._write(self.stacks, np.int32(slot), [{e: (None, b) for e, (_, b) in d.items()}
                                                                for d in host])
        return self.fold.write(param_leaves, slot, [{e: a for e, (a, _) in d.items()} for d in host])


def _write_slot(stacks, slot, new):
    return jax.tree.map(lambda s, x: s.at[slot].set(x.astype(s.dtype)), stacks, new)
