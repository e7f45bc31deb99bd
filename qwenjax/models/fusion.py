"""Fused projections: q/k/v as one `qkv_proj` and gate/up as one `gate_up_proj`, one matmul each.

Batch-1 decode streams every weight once, one kernel per projection; fusing the three column-parallel projections of
attention (which read the same input) and the two of the MLP takes three launches a layer away (with AWQ/GPTQ, two
GEMV launches and their split-K sums) and gives the small k/v products the bandwidth of a large one. The weights are
concatenated once, at load; the Hugging Face checkpoint keeps its separate names (q_proj, k_proj, ... stay the
loader's input) and orbax checkpoints (convert.py) hold the separate parts too, so neither depends on the mesh.

Column order (the invariant). A fused parameter's output columns are in PER-SHARD order for the mesh of
`Fusion.shards` devices it was built for:

    qkv_proj      [q_0 k_0 v_0 | q_1 k_1 v_1 | ... | q_{n-1} k_{n-1} v_{n-1}]
    gate_up_proj  [gate_0 up_0 | gate_1 up_1 | ... ]

where q_j is the j-th 1/n of q_proj's output columns (query heads j*N/n .. (j+1)*N/n - 1). Split evenly over the "tp"
axis (sharding.py: column-parallel), device j holds exactly q_j, k_j, v_j: its own heads, so the fused product and
the split of its output (`split_columns`) need no communication. On one device this is the plain concatenation
[q k v]. Every array of a fused projection follows the same order along its LAST axis, in that array's units:
columns for a float kernel [D, O], a bias [O], scales [G, O] and GPTQ's qweight [I/pf, O]; int32 words of pf
columns for AWQ's qweight [I, O/8] and qzeros [G, O/8] and GPTQ's qzeros [G, O/pf] (a word never straddles two
parts or two shards: `Fusion.decide` fuses only when every part's per-shard width is whole words). GPTQ's g_idx [I]
maps the SHARED input's rows to groups: one array for the fused layer, which must be the same for every part
(a GPTQ act-order checkpoint whose parts disagree is refused at load, models/loader.py).

The module that owns a fused projection `<name>` keeps its parts' output widths (columns, natural order) as the
static attribute `<name>_widths`: its own call splits the output with them, and the loader checks the parts'
shapes against them.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from pallas_kernels.int_packing import array_module
from qwenjax.config import ModelConfig
from qwenjax.quantization.config import QuantConfig

QKV = "qkv_proj"
GATE_UP = "gate_up_proj"
# Fused projection -> its parts, in column order within a shard. Both are column-parallel (sharding.py).
FUSED = {QKV: ("q_proj", "k_proj", "v_proj"), GATE_UP: ("gate_proj", "up_proj")}
_PART_OF = {part: (fused, i) for fused, parts in FUSED.items() for i, part in enumerate(parts)}


@dataclasses.dataclass(frozen=True)
class Fusion:
    """Which projections a model fuses, and the shard count its fused columns are ordered for.

    Built by `decide` from the config and the mesh size, the one place the choice is made; the loaders
    (models/loader.py, convert.py) pass it to the model's constructor. The default is a single device's layout,
    everything fused (always possible there).
    """

    shards: int = 1       # "tp" mesh size the fused columns are ordered for (module docstring)
    qkv: bool = True      # q/k/v as qkv_proj; False: q_proj, k_proj, v_proj as separate projections
    gate_up: bool = True  # gate/up as gate_up_proj (dense MLPs and Qwen2-MoE's shared expert; never routed experts)

    @classmethod
    def decide(cls, cfg: ModelConfig, shards: int, quant: QuantConfig | None = None) -> "Fusion":
        """Fuse a group when each of its parts splits into `shards` whole pieces (whole packed words, quantized):
        then every device's slice of the fused weight is its own slice of each part. q/k/v also need the kv heads
        to divide over the mesh: otherwise k/v are replicated while q is split (sharding.py), and no one split of a
        fused weight holds both, so they stay three projections, as before fusion existed."""
        unit = shards * (quant.pack_factor if quant is not None else 1)
        N, K, H = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        ffn = [cfg.intermediate_size] + ([cfg.shared_expert_intermediate_size]
                                         if cfg.num_experts and cfg.shared_expert_intermediate_size else [])
        return cls(shards=shards, qkv=K % shards == 0 and (N * H) % unit == 0 and (K * H) % unit == 0,
                   gate_up=all(f % unit == 0 for f in ffn))

    @classmethod
    def none(cls, shards: int = 1) -> "Fusion":
        """Every projection separate: the layout of Hugging Face checkpoints and of orbax checkpoints (convert.py)."""
        return cls(shards=shards, qkv=False, gate_up=False)


def fused_key(key: tuple) -> tuple[tuple, int] | None:
    """A part's parameter path -> (the fused parameter's path, the part's index), or None for any other path:
    ('model', 'layers', 3, 'self_attn', 'k_proj', 'bias') -> (('model', 'layers', 3, 'self_attn', 'qkv_proj',
    'bias'), 1)."""
    if len(key) < 2 or key[-2] not in _PART_OF:
        return None
    fused, i = _PART_OF[key[-2]]
    return key[:-2] + (fused, key[-1]), i


def part_keys(key: tuple) -> tuple[tuple, ...]:
    """The inverse of `fused_key`: a fused parameter's path -> its parts' paths, in order."""
    return tuple(key[:-2] + (part, key[-1]) for part in FUSED[key[-2]])


def interleave(parts, shards: int):
    """Parts [..., W_i] (numpy or jax arrays, the same leading shape) -> [..., sum W_i] in per-shard order: shard j
    is [p_0's j-th 1/shards, p_1's j-th, ...]. Each W_i must divide by `shards`."""
    xp = array_module(parts[0])
    lead = parts[0].shape[:-1]
    blocks = [p.reshape(*lead, shards, p.shape[-1] // shards) for p in parts]
    return xp.concatenate(blocks, axis=-1).reshape(*lead, -1)


def split_columns(y, widths: tuple[int, ...], shards: int) -> list:
    """The inverse of `interleave`: y [..., sum(widths)] in per-shard order -> the parts [..., widths[i]], each in
    its natural column order. Under a "tp" split of y's last axis in `shards` pieces every slice is local."""
    lead = y.shape[:-1]
    y = y.reshape(*lead, shards, -1)
    out, at = [], 0
    for w in widths:
        out.append(y[..., at:at + w // shards].reshape(*lead, w))
        at += w // shards
    return out


def part_shape(key: tuple, shape: tuple, owner, part: int) -> tuple:
    """The shape part `part` of the fused parameter `key` ([..., W], per-shard order) has in the checkpoint: the
    fused array's leading shape and its share of the last axis (its columns' share of the module's
    `<fused>_widths`, in that axis's units: columns or packed words); g_idx [I] is the shared input's, whole."""
    if key[-1] == "g_idx":
        return shape
    widths = getattr(owner, f"{key[-2]}_widths")
    return shape[:-1] + (shape[-1] * widths[part] // sum(widths),)


def fused_host_array(key: tuple, parts: list, shards: int, quant: QuantConfig | None):
    """The loader's fused parameter `key` from its parts (memory-mapped checkpoint arrays, in order), read lazily
    (FusedColumns). GPTQ's g_idx is one array for the fused layer: the parts read the same input, and an act-order
    checkpoint must give them the same row -> group map (AutoGPTQ orders rows by the shared input's Hessian, so they
    agree), else ValueError; without act-order g_idx is not read (quant_linear.dequantize_weight)."""
    if key[-1] != "g_idx":
        return FusedColumns(parts, shards)
    if quant is not None and quant.desc_act and any(not np.array_equal(parts[0], p) for p in parts[1:]):
        names = "/".join(FUSED[key[-2]])
        raise ValueError(f"GPTQ act-order (desc_act) checkpoint: the g_idx of {names} in "
                         f"{'.'.join(map(str, key[:-2]))} differ; they read the same input and are fused into one "
                         f"{key[-2]} with one g_idx, so their rows must be assigned to the same groups")
    return parts[0]


class FusedColumns:
    """The parts [..., W_i] of a fused parameter seen as one [..., sum W_i] array in per-shard order for `shards`.
    Indexing reads only the parts' columns of the shards asked for, so the loader's `place` gives each device its
    slice without building the fused array on the host."""

    def __init__(self, parts: list[np.ndarray], shards: int):
        self.parts, self.shards = parts, shards
        self.shape = tuple(parts[0].shape[:-1]) + (sum(p.shape[-1] for p in parts),)
        self.dtype = parts[0].dtype

    def __getitem__(self, index):
        index = tuple(index) + (slice(None),) * (len(self.shape) - len(tuple(index)))
        lead, (start, stop, _) = index[:-1], index[-1].indices(self.shape[-1])
        block = self.shape[-1] // self.shards
        if start % block or stop % block:  # not whole shards (no sharding asks for this): the columns of all
            return interleave([p[lead] for p in self.parts], self.shards)[..., start:stop]
        first, last = start // block, stop // block
        return interleave([p[lead + (slice(first * p.shape[-1] // self.shards, last * p.shape[-1] // self.shards),)]
                           for p in self.parts], last - first)
