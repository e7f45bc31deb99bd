"""The device mesh and where every parameter and KV page lives on it (tensor parallelism, Megatron style).

One mesh axis, "tp". Column-parallel projections (q/k/v/gate/up) split their output features, row-parallel ones
(o/down) their input features, so each layer needs one all-reduce after attention and one after the MLP, which
XLA's SPMD partitioner inserts. Embedding and lm_head split the vocabulary. Qwen2-MoE's stacked experts
([E, D, F] / [E, F, D]) are tensor parallel on F, like a dense MLP: every device holds a 1/n slice of every expert,
so the work stays balanced whatever the router picks and no all-to-all of tokens is needed. With expert parallelism
(`cfg.expert_parallel`, EngineArgs.enable_expert_parallel) they split on E instead: each device holds E/n whole
experts and computes the pairs routed to them (models/qwen2_moe.py, Qwen2MoeExperts). Either way the router and the
shared expert's gate are replicated and the shared expert splits like the dense MLP. KV pages split on kv heads;
when the mesh divides the q heads but not the kv heads (Qwen2-1.5B's 12 / 2 at mesh 4), k/v projections and pages are
replicated instead. A mesh that does not divide the q heads or an FFN width gets a model padded until it does
(models/mesh_padding.py): the configs these functions receive are the padded ones.
The fused projections qkv_proj and gate_up_proj (models/fusion.py) are column-parallel too: their columns are stored
in per-shard order, so an even split of their outputs gives each device its own slice of every part. q/k/v are fused
only where k/v split with q (`Fusion.decide`), so a replicated k/v projection is always a separate one.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qwenjax.config import ModelConfig
from qwenjax.models.fusion import FUSED

AXIS = "tp"


def make_mesh(tensor_parallel_size: int, devices=None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    if tensor_parallel_size > len(devices):
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size} needs {tensor_parallel_size} devices, but "
                         f"JAX sees {len(devices)} ({devices[0].platform})")
    return Mesh(np.asarray(devices[:tensor_parallel_size]), (AXIS,))


def check_divisible(cfg: ModelConfig, n: int) -> None:
    """The splits must be even. `cfg` is the model padded for the mesh (mesh_padding.pad_for_mesh), whose heads and
    widths always divide; what padding does not cover (experts under expert parallelism) raises here."""
    if cfg.num_attention_heads % n:
        raise ValueError(f"Total number of attention heads ({cfg.num_attention_heads}) must be divisible by "
                         f"tensor parallel size ({n}).")
    if cfg.intermediate_size % n:
        raise ValueError(f"intermediate_size ({cfg.intermediate_size}) must be divisible by tensor parallel size "
                         f"({n}).")
    if cfg.num_experts and cfg.expert_parallel and cfg.num_experts % n:
        raise ValueError(f"num_experts ({cfg.num_experts}) must be divisible by tensor parallel size ({n}) with "
                         f"expert parallelism; without enable_expert_parallel the experts split on their width, "
                         f"which any mesh size can.")
    moe_split = ("shared_expert_intermediate_size",) if cfg.expert_parallel else \
        ("moe_intermediate_size", "shared_expert_intermediate_size")
    for name in moe_split:
        if cfg.num_experts and getattr(cfg, name) % n:
            raise ValueError(f"{name} ({getattr(cfg, name)}) must be divisible by tensor parallel size ({n}).")


def kv_heads_sharded(cfg: ModelConfig, n: int) -> bool:
    return n > 1 and cfg.num_key_value_heads % n == 0


COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj") + tuple(FUSED)
ROW_PARALLEL = ("o_proj", "down_proj")


def param_spec(path: tuple, cfg: ModelConfig, n: int, shape: tuple[int, ...] | None = None) -> P:
    """PartitionSpec of the parameter at NNX path `path` (e.g. ('model','layers',0,'self_attn','q_proj','kernel')).

    With `shape`, a split that would not divide evenly over the mesh gives a replicated parameter instead (e.g. a
    GPTQ layer quantized as one group has a single row of scales). Any spec computes the same values; the specs
    only decide where the bytes live and which collectives XLA inserts.
    """
    spec = _spec(path, cfg, n)
    if shape is not None and any(ax is not None and shape[i] % n for i, ax in enumerate(spec)):
        return P()
    return spec


def _spec(path: tuple, cfg: ModelConfig, n: int) -> P:
    if n == 1:
        return P()
    names = [p for p in path if isinstance(p, str)]
    leaf, owner = names[-1], names[-2] if len(names) > 1 else ""
    if owner == "experts" and cfg.expert_parallel:
        return P(AXIS, None, None)                # stacked experts, split on E: [E, D, F] / [E, F, D]
    if owner == "experts":                        # stacked experts, split on F
        return P(None, AXIS, None) if leaf == "down_proj" else P(None, None, AXIS)   # [E, F, D] / [E, D, F]
    if owner == "embed_tokens":
        return P(AXIS, None)                      # [V, D]
    if owner == "lm_head":
        return P(None, AXIS)                      # [D, V]
    if owner in ("k_proj", "v_proj") and not kv_heads_sharded(cfg, n):
        return P()                                # replicated kv heads
    # Quantized layers (layers/quant_linear.py) split the same features: AWQ qweight [I, O/8], qzeros [G, O/8],
    # GPTQ qweight [I/pf, O], qzeros [G, O/pf], scales [G, O] of both keep O last and the input side (rows, or
    # groups of rows) first, so column-parallel splits the last axis and row-parallel the first. GPTQ's g_idx [I]
    # maps input rows to groups: whole for column-parallel, split with the rows for row-parallel.
    if leaf == "input_scale":
        return P()                                # an fp8 layer's static activation scale []
    if leaf == "perm":
        return P()                                # an act-order layer's row order [I] (quantization/act_order.py)
    # FP8 layers (layers/fp8_linear.py): weight [O, I] float8, split like a float kernel's transpose (while loading,
    # a kernel [I, O] like a float kernel); weight_scale [G, O] like scales.
    if owner in COLUMN_PARALLEL:
        if leaf == "bias":
            return P(AXIS)                        # [out]
        if leaf == "weight":
            return P(AXIS, None)                  # fp8 weight [out, D]
        return P() if leaf == "g_idx" else P(None, AXIS)   # kernel [D, out]; qweight / qzeros / scales
    if owner in ROW_PARALLEL:
        if leaf == "bias":
            return P()
        if leaf == "weight":
            return P(None, AXIS)                  # fp8 weight [D, in]
        return P(AXIS) if leaf == "g_idx" else P(AXIS, None)   # kernel [in, D]; qweight / qzeros / scales
    return P()                                    # norms, KV scales


def kv_sharding(mesh: Mesh, cfg: ModelConfig) -> NamedSharding:
    """KV pages [K, P, S, H]: split on kv heads when they divide evenly, else replicated."""
    n = mesh.shape[AXIS]
    return NamedSharding(mesh, P(AXIS, None, None, None) if kv_heads_sharded(cfg, n) else P())


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def vocab_sharding(mesh: Mesh, vocab_size: int) -> NamedSharding:
    """[rows, V] arrays computed from the logits (the logits themselves, the penalty state): split on V like lm_head's
    output, when V divides evenly, so a step never gathers them. Replicated, they cost an all-gather of every
    [rows, V] array each dispatch (the penalty state: (max_num_seqs + 1) x V x 5 bytes, ~195 MB for 256 rows of
    Qwen2's vocabulary, benchmarks/NOTES.md); split, the sampler's reductions over V all-reduce a few values a row."""
    n = mesh.shape[AXIS]
    return NamedSharding(mesh, P(None, AXIS) if n > 1 and vocab_size % n == 0 else P())
