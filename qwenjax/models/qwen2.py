"""Qwen2ForCausalLM as Flax NNX modules. Attribute names follow Hugging Face's, so loading is a mapping.

Shapes: T tokens of the step (its rows' new tokens, flat: see layers/attention.segments), D model dim, N/K query/kv
heads, H head dim, F ffn dim, V vocabulary. Everything but attention is per token, so the layers run on [T, D]; the
model takes ids [B, Q] (one segment of rows) or [T] (a mixed step) and returns hidden states of the same leading
shape. The KV cache is passed in and returned (never stored on the module) so the jitted step stays pure.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qwenjax.config import ModelConfig
from qwenjax.layers.attention import attend, rope_and_write
from qwenjax.layers.attention_metadata import AttentionMetadata, MixedMetadata, flat_positions
from qwenjax.layers.fp8_kv import KVScale
from qwenjax.layers.fp8_linear import Fp8Linear
from qwenjax.layers.lora import LoRAInputs, add_lora, add_lora_parts
from qwenjax.layers.norm import RMSNorm
from qwenjax.layers.quant_linear import QuantLinear
from qwenjax.layers.rotary import rope_cos_sin
from qwenjax.models.fusion import Fusion, split_columns
from qwenjax.models.sharding import kv_heads_sharded
from qwenjax.quantization.config import QuantConfig

KVCache = list  # per layer: (k_pages [K, P, S, H], v_pages [K, P, S, H])


def _linear(din: int, dout: int, bias: bool, dtype, rngs: nnx.Rngs,
            quant: QuantConfig | None = None, split: str | None = "out") -> nnx.Linear | QuantLinear | Fp8Linear:
    """A projection: float nnx.Linear, QuantLinear (packed AWQ/GPTQ arrays) or Fp8Linear (float8 weights).
    split: its tensor-parallel split as models/sharding.py places it ("out", "in", None: replicated)."""
    if quant is not None and quant.method == "fp8":
        return Fp8Linear(din, dout, use_bias=bias, quant=quant, dtype=dtype, rngs=rngs)
    if quant is not None:
        return QuantLinear(din, dout, use_bias=bias, quant=quant, dtype=dtype, rngs=rngs, split=split)
    return nnx.Linear(din, dout, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs,
                      kernel_init=nnx.initializers.normal(0.02))


def _takes_rows(layer, tokens: int) -> str | None:
    """Whether this projection takes its input rows with their FP8 scales from the kernel that writes them, and in
    which form (Fp8Linear.takes_rows: "fp8", "scale" or None)."""
    return layer.takes_rows(tokens) if isinstance(layer, Fp8Linear) else None


def _project(layer, x: jax.Array, rows: tuple[jax.Array, jax.Array] | None) -> jax.Array:
    """layer(x), or from x's rows already quantized for an Fp8Linear ((q, scale), the same rule)."""
    return layer(x) if rows is None else layer.from_rows(*rows)


def _to_norm(layer, x: jax.Array, width: int, lora: LoRAInputs | None) -> jax.Array | None:
    """layer(x) for an FP8 projection whose output goes straight into the next RMSNorm.add (no LoRA, no folded
    columns, no bias): where its kernel splits K, the partials the norm's kernel adds (Fp8Linear.to_norm); None
    for every other layer."""
    if lora is None and isinstance(layer, Fp8Linear) and layer.bias is None and layer.out_features == width:
        return layer.to_norm(x)
    return None


def _base_and_folded(y: jax.Array, width: int) -> tuple[jax.Array, jax.Array | None]:
    """A projection's `width` base columns, and where worker/lora_fold.py gave its weight extra columns (the LoRA
    slots' shrink, past `width`) the whole output for layers/lora.py to read them from (None where it has none)."""
    if y.shape[-1] == width:
        return y, None
    return y[..., :width], y


class Qwen2Attention(nnx.Module):
    """q/k/v as one `qkv_proj` (columns in per-shard order, models/fusion.py) when `fusion.qkv`, else three
    projections."""

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs, quant: QuantConfig | None = None,
                 fusion: Fusion = Fusion()):
        D, N, K, H = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.qkv_proj_widths, self.shards, self.fused_qkv = (N * H, K * H, K * H), fusion.shards, fusion.qkv
        if fusion.qkv:
            self.qkv_proj = _linear(D, (N + 2 * K) * H, True, dtype, rngs, quant)
        else:
            self.q_proj = _linear(D, N * H, True, dtype, rngs, quant)
            kv_split = "out" if kv_heads_sharded(cfg, fusion.shards) else None  # else replicated kv heads
            self.k_proj = _linear(D, K * H, True, dtype, rngs, quant, kv_split)
            self.v_proj = _linear(D, K * H, True, dtype, rngs, quant, kv_split)
        self.o_proj = _linear(N * H, D, False, dtype, rngs, quant, "in")
        # fp8_e4m3 KV pages hold K / k_scale and V / v_scale: the checkpoint's per-tensor scales, else 1.0.
        self.k_scale = KVScale(jnp.ones((), jnp.float32))
        self.v_scale = KVScale(jnp.ones((), jnp.float32))
        self.num_heads, self.num_kv_heads, self.head_dim, self.hidden_size = N, K, H, D

    def takes_rows(self, tokens: int) -> str | None:
        """Whether q/k/v take x's rows with their scales from the norm before them (Fp8Linear.takes_rows)."""
        return _takes_rows(self.qkv_proj if self.fused_qkv else self.q_proj, tokens)

    def __call__(self, x, cos, sin, k_pages, v_pages, meta: AttentionMetadata | MixedMetadata, has_context: bool,
                 lora: LoRAInputs | None = None, layer: int = 0, rows=None):
        """rows: x's rows with their FP8 scales for q/k/v ((q or x, scale), where takes_rows), else None."""
        T = x.shape[0]  # x [T, D], cos / sin [T, H]
        folded = None  # the LoRA slots' shrink, where the fold gives the weight extra columns (layers/lora.py)
        if self.fused_qkv:
            y, folded = _base_and_folded(_project(self.qkv_proj, x, rows), sum(self.qkv_proj_widths))
            q, k, v = split_columns(y, self.qkv_proj_widths, self.shards)
        else:
            q, k, v = (_project(p, x, rows) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k, v = add_lora_parts((q, k, v), x, lora, layer, "qkv_proj", folded)  # per part, fused or not
        q = q.reshape(T, self.num_heads, self.head_dim)
        k = k.reshape(T, self.num_kv_heads, self.head_dim)
        v = v.reshape(T, self.num_kv_heads, self.head_dim)
        scales = dict(k_scale=self.k_scale[...], v_scale=self.v_scale[...])
        q, k, v, k_pages, v_pages = rope_and_write(q, k, v, cos, sin, k_pages, v_pages, meta, has_context=has_context,
                                                   **scales)
        out = attend(q, k, v, k_pages, v_pages, meta, has_context=has_context, **scales).reshape(T, -1)
        y = _to_norm(self.o_proj, out, self.hidden_size, lora)  # may be [S, T, D] partials: the norm adds them
        if y is not None:
            return y, k_pages, v_pages
        y, folded = _base_and_folded(self.o_proj(out), self.hidden_size)
        return add_lora(y, out, lora, layer, "o_proj", folded), k_pages, v_pages


class Qwen2MLP(nnx.Module):
    """SwiGLU; gate/up as one `gate_up_proj` (columns in per-shard order, models/fusion.py) when `fusion.gate_up`."""

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs, quant: QuantConfig | None = None,
                 fusion: Fusion = Fusion()):
        D, F = cfg.hidden_size, cfg.intermediate_size
        self.gate_up_proj_widths, self.shards, self.fused_gate_up, self.hidden_size = (F, F), fusion.shards, \
            fusion.gate_up, D
        if fusion.gate_up:
            self.gate_up_proj = _linear(D, 2 * F, False, dtype, rngs, quant)
        else:
            self.gate_proj = _linear(D, F, False, dtype, rngs, quant)
            self.up_proj = _linear(D, F, False, dtype, rngs, quant)
        self.down_proj = _linear(F, D, False, dtype, rngs, quant, "in")

    def takes_rows(self, tokens: int) -> str | None:
        """Whether gate/up take x's rows with their scales from the norm before them (Fp8Linear.takes_rows)."""
        return _takes_rows(self.gate_up_proj if self.fused_gate_up else self.gate_proj, tokens)

    def __call__(self, x, lora: LoRAInputs | None = None, layer: int = 0, rows=None):
        """rows: x's rows with their FP8 scales for gate/up ((q or x, scale), where takes_rows), else None."""
        h = self._fp8_swiglu(x, lora, rows)
        if h is None:
            folded = None
            if self.fused_gate_up:
                y, folded = _base_and_folded(_project(self.gate_up_proj, x, rows), sum(self.gate_up_proj_widths))
                if (lora is None and folded is None and self.shards == 1
                        and _takes_rows(self.down_proj, x.shape[0]) == "fp8"):
                    # h = silu(gate) * up quantized for it by one kernel; K-split partials go to the norm after it
                    return self.down_proj.from_gate_up(y, partials=True)
                gate, up = split_columns(y, self.gate_up_proj_widths, self.shards)
            else:
                gate, up = _project(self.gate_proj, x, rows), _project(self.up_proj, x, rows)
            gate, up = add_lora_parts((gate, up), x, lora, layer, "gate_up_proj", folded)
            h = jax.nn.silu(gate) * up
        y = _to_norm(self.down_proj, h, self.hidden_size, lora)  # may be [S, T, D] partials: the norm adds them
        if y is not None:
            return y
        y, folded = _base_and_folded(self.down_proj(h), self.hidden_size)
        return add_lora(y, h, lora, layer, "down_proj", folded)

    def _fp8_swiglu(self, x, lora, rows) -> jax.Array | None:
        """h = silu(gate) * up by one FP8 kernel where it applies (Fp8Linear.swiglu: decode steps whose activations
        are quantized inside the GEMM), for a fused FP8 gate/up on one device without LoRA (no adapter columns folded
        in) and x not given as rows; else None."""
        layer = self.gate_up_proj if self.fused_gate_up else None
        if (isinstance(layer, Fp8Linear) and lora is None and rows is None and self.shards == 1
                and layer.out_features == sum(self.gate_up_proj_widths)):
            return layer.swiglu(x)
        return None


class Qwen2DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs, quant: QuantConfig | None = None,
                 fusion: Fusion = Fusion()):
        self.self_attn = Qwen2Attention(cfg, dtype=dtype, rngs=rngs, quant=quant, fusion=fusion)
        self.mlp = Qwen2MLP(cfg, dtype=dtype, rngs=rngs, quant=quant, fusion=fusion)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)

    def __call__(self, x, residual, cos, sin, k_pages, v_pages, meta, has_context, lora=None, layer: int = 0):
        """x: the previous layer's MLP output (the embeddings for the first layer, whose `residual` is None), not
        yet added to the residual stream. Returns this layer's MLP output and the stream before it: the sum of the
        two is Hugging Face's hidden state after the layer. Each add is fused with the norm that follows it."""
        T, rows = x.shape[-2], None  # x: [T, D], or an FP8 down_proj's partials [S, T, D] (_to_norm)
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        elif form := self.self_attn.takes_rows(T):  # FP8: the norm's kernel also gives its rows' scales for q/k/v
            h, residual, rows = self.input_layernorm.add_fp8(x, residual, form)
        else:
            h, residual = self.input_layernorm.add(x, residual)
        h, k_pages, v_pages = self.self_attn(h, cos, sin, k_pages, v_pages, meta, has_context, lora, layer, rows)
        if isinstance(self.mlp, Qwen2MLP) and (form := self.mlp.takes_rows(T)):  # not a MoE block (no FP8 MoE)
            h, residual, rows = self.post_attention_layernorm.add_fp8(h, residual, form)
        else:
            (h, residual), rows = self.post_attention_layernorm.add(h, residual), None
        mlp = self.mlp(h) if lora is None and rows is None else self.mlp(h, lora, layer, rows)
        return mlp, residual, k_pages, v_pages


class Qwen2Model(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs, quant: QuantConfig | None = None,
                 fusion: Fusion = Fusion()):
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=dtype, rngs=rngs,
                                      embedding_init=nnx.initializers.normal(0.02))
        self.layers = nnx.List([Qwen2DecoderLayer(cfg, dtype=dtype, rngs=rngs, quant=quant, fusion=fusion)
                                for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.head_dim, self.rope_theta, self.rope_scaling = cfg.head_dim, cfg.rope_theta, cfg.rope_scaling

    def __call__(self, input_ids, meta: AttentionMetadata | MixedMetadata, kv_cache: KVCache, has_context: bool,
                 lora: LoRAInputs | None = None):
        x = self.embed_tokens(input_ids.reshape(-1))  # [T, D]
        cos, sin = rope_cos_sin(flat_positions(meta), self.head_dim, self.rope_theta, self.rope_scaling)
        new_cache, residual = [], None
        # Python loop: the layers are unrolled into one program (a scan over stacked weights ran 2.2x slower).
        for i, (layer, (k_pages, v_pages)) in enumerate(zip(self.layers, kv_cache)):
            x, residual, k_pages, v_pages = layer(x, residual, cos, sin, k_pages, v_pages, meta, has_context, lora, i)
            new_cache.append((k_pages, v_pages))
        out = self.norm(x) if residual is None else self.norm.add(x, residual)[0]
        return out.reshape(*input_ids.shape, -1), new_cache


class Qwen2ForCausalLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype=jnp.bfloat16, rngs: nnx.Rngs, quant: QuantConfig | None = None,
                 fusion: Fusion = Fusion()):
        """`quant` set: the projections of every layer are QuantLinear; embeddings and lm_head stay float, as in
        published AWQ/GPTQ checkpoints. `fusion` (Fusion.decide for the mesh): which projections are fused and
        for how many shards their columns are ordered; the default is one device's layout."""
        self.config = cfg
        self.model = Qwen2Model(cfg, dtype=dtype, rngs=rngs, quant=quant, fusion=fusion)
        if not cfg.tie_word_embeddings:
            self.lm_head = _linear(cfg.hidden_size, cfg.vocab_size, False, dtype, rngs)

    def __call__(self, input_ids, meta: AttentionMetadata | MixedMetadata, kv_cache: KVCache, *, has_context: bool,
                 lora: LoRAInputs | None = None):
        """input_ids [B, Q] (or [T] with MixedMetadata) -> final hidden states [B, Q, D] ([T, D]) and the cache.
        `lora`: the adapters' slot arrays and each token's slot (multi-LoRA, layers/lora.py)."""
        return self.model(input_ids, meta, kv_cache, has_context, lora)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., D] -> logits [..., V] float32 (computed in the model dtype, as HF does)."""
        if self.config.tie_word_embeddings:
            out = self.model.embed_tokens.attend(hidden)
        else:
            out = self.lm_head(hidden)
        return out.astype(jnp.float32)
