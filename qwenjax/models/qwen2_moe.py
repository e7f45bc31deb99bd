"""Qwen2MoeForCausalLM (Qwen2-57B-A14B) as Flax NNX modules, reusing the dense Qwen2 attention, norms and MLP.

Shapes: T tokens (B*Q flattened), D model dim, E experts, k experts per token, F expert ffn dim.
The experts of a layer are stacked ([E, D, F] / [E, F, D]) and run as one grouped matmul over the T*k (token, expert)
pairs sorted by expert (`jax.lax.ragged_dot`; on GPU the Pallas kernel in pallas_kernels/grouped_matmul.py), so no
[T, E, F] (or [T, E, D]) array is ever built: the work and memory follow the k experts each token chose, not all E.
On a mesh the experts are tensor parallel (split on F) or, with `expert_parallel`, split on E (Qwen2MoeExperts).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from qwenjax.compat import platform
from qwenjax.config import ModelConfig
from qwenjax.layers.norm import RMSNorm
from qwenjax.models.fusion import Fusion
from qwenjax.models.qwen2 import Qwen2Attention, Qwen2DecoderLayer, Qwen2ForCausalLM, Qwen2MLP, Qwen2Model
from qwenjax.models.sharding import AXIS
from qwenjax.quantization.config import QuantConfig


class Qwen2MoeExperts(nnx.Module):
    """E SwiGLU experts, stacked. HF stores `experts.{e}.{gate,up,down}_proj.weight` per expert; the loader
    transposes and stacks them into these arrays (names kept: `experts.gate_proj` etc.).

    On a mesh ("tp" axis of n > 1 devices, traced under `jax.set_mesh`) the experts run under shard_map, each device
    on its own slice of the stacked weights, and the partial outputs are summed with one psum (an all-reduce, as
    after a row-parallel projection):
      tensor parallel (default): every device holds every expert's F/n slice, so every (token, expert) pair is
        local and each device computes its F/n share of every pair;
      expert parallel (`cfg.expert_parallel`): every device holds E/n whole experts and computes only the pairs
        routed to them (the rest are sorted past its groups and cost nothing but a zero store).
    The activations are replicated over the mesh when they reach the MLP (the attention output was all-reduced), so
    every device routes all tokens itself and no token is sent anywhere.
    """

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        E, D, F = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        init = nnx.initializers.normal(0.02)
        self.gate_proj = nnx.Param(init(rngs.params(), (E, D, F), dtype))   # [E, D, F]
        self.up_proj = nnx.Param(init(rngs.params(), (E, D, F), dtype))     # [E, D, F]
        self.down_proj = nnx.Param(init(rngs.params(), (E, F, D), dtype))   # [E, F, D]
        self.expert_parallel = cfg.expert_parallel

    def __call__(self, x: jax.Array, weights: jax.Array, experts: jax.Array) -> jax.Array:
        """x [T, D], routing weights and expert ids [T, k] -> sum over each token's k experts, [T, D]."""
        stacks = (self.gate_proj[...], self.up_proj[...], self.down_proj[...])
        mesh = jax.sharding.get_abstract_mesh()
        n = 1 if mesh is None or mesh.empty or AXIS not in mesh.axis_names else mesh.shape[AXIS]
        if n == 1:
            return routed_experts(x, weights, experts, *stacks, first_expert=0)
        if self.expert_parallel:
            specs = (P(AXIS, None, None),) * 3
        else:
            specs = (P(None, None, AXIS), P(None, None, AXIS), P(None, AXIS, None))
        ep = self.expert_parallel

        def body(x, weights, experts, gate, up, down):
            first = jax.lax.axis_index(AXIS) * gate.shape[0] if ep else 0
            return jax.lax.psum(routed_experts(x, weights, experts, gate, up, down, first_expert=first), AXIS)

        return jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), P()) + specs, out_specs=P(),
                             check_vma=False)(x, weights, experts, *stacks)


def routed_experts(x: jax.Array, weights: jax.Array, experts: jax.Array, gate: jax.Array, up: jax.Array,
                   down: jax.Array, *, first_expert) -> jax.Array:
    """The routed experts' output for the (token, expert) pairs whose expert is one of the El held here.

    x [T, D]; weights, experts [T, k]; gate / up [El, D, F'], down [El, F', D] hold experts first_expert ..
    first_expert + El - 1 (all E with first_expert 0 on one device or under tensor parallelism, where F' = F/n).

    Static shapes: the T*k pairs are sorted by local expert with every pair of another device's expert given the
    key El, so the local pairs come first, grouped by expert, and the rest form a tail past sum(group_sizes). The
    grouped matmul computes only the grouped rows (its tail comes out as zeros) and the weights of the tail are
    zeroed too, so one buffer of T*k rows serves whatever share of pairs is local, with no [T, E, ...] array and no
    dynamic shape. The pairs are put back in (token, slot) order by a row gather and each token sums its k.
    """
    T, k = experts.shape
    el = gate.shape[0]
    local = experts - first_expert
    is_local = (local >= 0) & (local < el)
    key = jnp.where(is_local, local, el).reshape(-1)                      # [T*k], el = not on this device
    order = jnp.argsort(key, stable=True)                                 # [T*k]
    group_sizes = jnp.bincount(key, length=el + 1)[:el].astype(jnp.int32)   # [El]
    xs = x[order // k]                                                    # [T*k, D], expert order
    h = jax.nn.silu(grouped_matmul(xs, gate, group_sizes)) * grouped_matmul(xs, up, group_sizes)   # [T*k, F']
    y = grouped_matmul(h, down, group_sizes)                              # [T*k, D]
    y = y * jnp.where(is_local, weights, 0).reshape(-1)[order][:, None]
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(T * k, dtype=order.dtype))   # [T*k]
    return y[inverse].reshape(T, k, -1).sum(axis=1)                       # [T, D]


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """x [M, K] rows grouped by group_sizes [G] @ w [G, K, N] -> [M, N], rows past the groups zero
    (`jax.lax.ragged_dot`'s contract). On GPU the Pallas kernel: XLA expands ragged_dot there into a dense dot over
    all G groups (pallas_kernels/grouped_matmul.py has the numbers); elsewhere ragged_dot itself."""
    if platform() == "gpu":
        from pallas_kernels.grouped_matmul import grouped_matmul as kernel, supported

        if supported(w.shape[1], w.shape[2], w.dtype) and x.dtype == w.dtype:
            return kernel(x, w, group_sizes)
    return jax.lax.ragged_dot(x, w, group_sizes)


def route(router_logits: jax.Array, k: int, norm_topk_prob: bool, dtype) -> tuple[jax.Array, jax.Array]:
    """router_logits [T, E] -> (weights [T, k] in `dtype`, expert ids [T, k]): softmax in float32, top-k,
    renormalised over the k only when `norm_topk_prob` (Qwen2-57B-A14B does not)."""
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, k)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights.astype(dtype), experts


class Qwen2MoeSparseMoeBlock(nnx.Module):
    """Router (`gate`), stacked routed experts, and an optional shared expert scaled by sigmoid(`shared_expert_gate`).
    With shared_expert_intermediate_size 0 the shared expert is absent (HF's would add exactly zero). The router is
    replicated on a mesh; the shared expert is tensor parallel like a dense MLP (see sharding.py), its gate/up fused
    as a dense MLP's are (`fusion`); the routed experts' stacks stay separate."""

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs, fusion: Fusion = Fusion()):
        D = cfg.hidden_size
        lin = dict(use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs, kernel_init=nnx.initializers.normal(0.02))
        self.gate = nnx.Linear(D, cfg.num_experts, **lin)                    # router: kernel [D, E]
        self.experts = Qwen2MoeExperts(cfg, dtype=dtype, rngs=rngs)
        self.has_shared = cfg.shared_expert_intermediate_size > 0
        if self.has_shared:
            shared_cfg = dataclasses.replace(cfg, intermediate_size=cfg.shared_expert_intermediate_size)
            self.shared_expert = Qwen2MLP(shared_cfg, dtype=dtype, rngs=rngs, fusion=fusion)
            self.shared_expert_gate = nnx.Linear(D, 1, **lin)
        self.num_experts, self.top_k, self.norm_topk_prob = cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob

    def __call__(self, x: jax.Array) -> jax.Array:
        shape = x.shape
        x = x.reshape(-1, shape[-1])                                          # [T, D]
        weights, experts = route(self.gate(x), self.top_k, self.norm_topk_prob, x.dtype)   # [T, k], [T, k]
        out = self.experts(x, weights, experts)                               # [T, D]
        if self.has_shared:
            out = out + jax.nn.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.reshape(shape)


class Qwen2MoeDecoderLayer(Qwen2DecoderLayer):
    """Qwen2's decoder layer whose MLP is sparse or dense by `cfg.is_moe_layer(i)`; the call is the dense one."""

    def __init__(self, cfg: ModelConfig, layer: int, *, dtype, rngs: nnx.Rngs, fusion: Fusion = Fusion()):
        self.self_attn = Qwen2Attention(cfg, dtype=dtype, rngs=rngs, fusion=fusion)
        if cfg.is_moe_layer(layer):
            self.mlp = Qwen2MoeSparseMoeBlock(cfg, dtype=dtype, rngs=rngs, fusion=fusion)
        else:
            self.mlp = Qwen2MLP(cfg, dtype=dtype, rngs=rngs, fusion=fusion)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)


class Qwen2MoeModel(Qwen2Model):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs, fusion: Fusion = Fusion()):
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=dtype, rngs=rngs,
                                      embedding_init=nnx.initializers.normal(0.02))
        self.layers = nnx.List([Qwen2MoeDecoderLayer(cfg, i, dtype=dtype, rngs=rngs, fusion=fusion)
                                for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.head_dim, self.rope_theta, self.rope_scaling = cfg.head_dim, cfg.rope_theta, cfg.rope_scaling


class Qwen2MoeForCausalLM(Qwen2ForCausalLM):
    """Same calling convention as Qwen2ForCausalLM: `model(input_ids [B, Q], meta, kv_cache, has_context=...)
    -> (hidden [B, Q, D], kv_cache)` and `.logits(hidden)`."""

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.bfloat16, rngs: nnx.Rngs, quant: QuantConfig | None = None,
                 fusion: Fusion = Fusion()):
        if quant is not None:
            raise NotImplementedError(f"{quant.method} quantized Qwen2MoeForCausalLM checkpoints are not supported "
                                      f"yet; use a float checkpoint")
        self.config = cfg
        self.model = Qwen2MoeModel(cfg, dtype=dtype, rngs=rngs, fusion=fusion)
        if not cfg.tie_word_embeddings:
            self.lm_head = nnx.Linear(cfg.hidden_size, cfg.vocab_size, use_bias=False, dtype=dtype,
                                      param_dtype=dtype, rngs=rngs, kernel_init=nnx.initializers.normal(0.02))
