"""Qwen2MoeForCausalLM (Qwen2-57B-A14B) as Flax NNX modules, reusing the dense Qwen2 attention, norms and MLP.

Shapes: T tokens (B*Q flattened), D model dim, E experts, k experts per token, F expert ffn dim.
The experts of a layer are stacked ([E, D, F] / [E, F, D]) and run as one grouped matmul (`jax.lax.ragged_dot`)
over the T*k (token, expert) pairs sorted by expert, so no [T, E, F] (or [T, E, D]) array is ever built: the
work and memory follow the k experts each token chose, not all E.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from qwenjax.config import ModelConfig
from qwenjax.layers.norm import RMSNorm
from qwenjax.models.qwen2 import Qwen2Attention, Qwen2DecoderLayer, Qwen2ForCausalLM, Qwen2MLP, Qwen2Model
from qwenjax.quantization.config import QuantConfig


class Qwen2MoeExperts(nnx.Module):
    """E SwiGLU experts, stacked. HF stores `experts.{e}.{gate,up,down}_proj.weight` per expert; the loader
    transposes and stacks them into these arrays (names kept: `experts.gate_proj` etc.)."""

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        E, D, F = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        init = nnx.initializers.normal(0.02)
        self.gate_proj = nnx.Param(init(rngs.params(), (E, D, F), dtype))   # [E, D, F]
        self.up_proj = nnx.Param(init(rngs.params(), (E, D, F), dtype))     # [E, D, F]
        self.down_proj = nnx.Param(init(rngs.params(), (E, F, D), dtype))   # [E, F, D]

    def __call__(self, x_sorted: jax.Array, group_sizes: jax.Array) -> jax.Array:
        """x_sorted [M, D] rows grouped by expert (group_sizes [E] rows each, in expert order) -> [M, D]."""
        gate = jax.lax.ragged_dot(x_sorted, self.gate_proj[...], group_sizes)   # [M, F]
        up = jax.lax.ragged_dot(x_sorted, self.up_proj[...], group_sizes)       # [M, F]
        return jax.lax.ragged_dot(jax.nn.silu(gate) * up, self.down_proj[...], group_sizes)  # [M, D]


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
    With shared_expert_intermediate_size 0 the shared expert is absent (HF's would add exactly zero)."""

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        D = cfg.hidden_size
        lin = dict(use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs, kernel_init=nnx.initializers.normal(0.02))
        self.gate = nnx.Linear(D, cfg.num_experts, **lin)                    # router: kernel [D, E]
        self.experts = Qwen2MoeExperts(cfg, dtype=dtype, rngs=rngs)
        self.has_shared = cfg.shared_expert_intermediate_size > 0
        if self.has_shared:
            shared_cfg = dataclasses.replace(cfg, intermediate_size=cfg.shared_expert_intermediate_size)
            self.shared_expert = Qwen2MLP(shared_cfg, dtype=dtype, rngs=rngs)
            self.shared_expert_gate = nnx.Linear(D, 1, **lin)
        self.num_experts, self.top_k, self.norm_topk_prob = cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob

    def __call__(self, x: jax.Array) -> jax.Array:
        shape = x.shape
        x = x.reshape(-1, shape[-1])                                          # [T, D]
        T, k = x.shape[0], self.top_k
        weights, experts = route(self.gate(x), k, self.norm_topk_prob, x.dtype)   # [T, k], [T, k]
        # Sort the T*k (token, expert) pairs by expert so each expert's rows are contiguous for ragged_dot.
        flat = experts.reshape(-1)                                            # [T*k]
        order = jnp.argsort(flat, stable=True)                                # [T*k]
        group_sizes = jnp.bincount(flat, length=self.num_experts).astype(jnp.int32)   # [E]
        y = self.experts(x[order // k], group_sizes)                          # [T*k, D], expert order
        y = y * weights.reshape(-1)[order][:, None]
        # Back to (token, slot) order through the inverse permutation (a row gather), then sum each token's k.
        inverse = jnp.zeros_like(order).at[order].set(jnp.arange(T * k, dtype=order.dtype))   # [T*k]
        out = y[inverse].reshape(T, k, -1).sum(axis=1)                        # [T, D]
        if self.has_shared:
            out = out + jax.nn.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.reshape(shape)


class Qwen2MoeDecoderLayer(Qwen2DecoderLayer):
    """Qwen2's decoder layer whose MLP is sparse or dense by `cfg.is_moe_layer(i)`; the call is the dense one."""

    def __init__(self, cfg: ModelConfig, layer: int, *, dtype, rngs: nnx.Rngs):
        self.self_attn = Qwen2Attention(cfg, dtype=dtype, rngs=rngs)
        if cfg.is_moe_layer(layer):
            self.mlp = Qwen2MoeSparseMoeBlock(cfg, dtype=dtype, rngs=rngs)
        else:
            self.mlp = Qwen2MLP(cfg, dtype=dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)


class Qwen2MoeModel(Qwen2Model):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=dtype, rngs=rngs,
                                      embedding_init=nnx.initializers.normal(0.02))
        self.layers = nnx.List([Qwen2MoeDecoderLayer(cfg, i, dtype=dtype, rngs=rngs)
                                for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.head_dim, self.rope_theta = cfg.head_dim, cfg.rope_theta


class Qwen2MoeForCausalLM(Qwen2ForCausalLM):
    """Same calling convention as Qwen2ForCausalLM: `model(input_ids [B, Q], meta, kv_cache, has_context=...)
    -> (hidden [B, Q, D], kv_cache)` and `.logits(hidden)`."""

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.bfloat16, rngs: nnx.Rngs, quant: QuantConfig | None = None):
        if quant is not None:
            raise NotImplementedError(f"{quant.method} quantized Qwen2MoeForCausalLM checkpoints are not supported "
                                      f"yet; use a float checkpoint")
        self.config = cfg
        self.model = Qwen2MoeModel(cfg, dtype=dtype, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = nnx.Linear(cfg.hidden_size, cfg.vocab_size, use_bias=False, dtype=dtype,
                                      param_dtype=dtype, rngs=rngs, kernel_init=nnx.initializers.normal(0.02))
