"""Floors and work from a model's config (BENCHMARKS.md's rules): the bytes a decode step reads (dense, a MoE model's
routed experts, packed quantized projections), KV bytes per token, FLOPs per request, and `ratio` for MBU, MFU and
speedups."""

from __future__ import annotations


def kv_bytes_per_token(cfg, itemsize: int = 2) -> int:
    """K and V of one token across all layers."""
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * itemsize


def experts_read(cfg, batch: int = 1) -> float:
    """Routed experts per MoE layer that a step of `batch` tokens reads: k for one token; for more, the expected
    number of distinct experts when each token picks k of E uniformly, E x (1 - (1 - k/E)^batch). 0 for dense."""
    E, k = cfg.num_experts, cfg.num_experts_per_tok
    if not E:
        return 0
    return k if batch <= 1 else E * (1.0 - (1.0 - k / E) ** batch)


def active_params(cfg, experts: float | None = None) -> float:
    """Parameters other than the embedding table that one token's forward uses (lm_head in full; for tied
    embeddings the table IS the lm_head, counted once): all of them for a dense model; for a MoE model every layer's
    attention, norms, router and shared expert but only `experts` (default k, the token's own) of its E routed
    experts. Qwen2-57B-A14B: about 13.7B of its 57.4B (14.3B with the embedding table: the "A14B")."""
    total = cfg.num_params(include_embedding=False)
    if not cfg.num_experts:
        return total
    used = cfg.num_experts_per_tok if experts is None else experts
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    return total - (cfg.num_experts - used) * per_expert * moe_layers


def decode_weight_bytes(cfg, itemsize: int = 2, batch: int = 1, quant: dict | None = None) -> int:
    """Bytes a decode step of `batch` rows must read: every weight except the embedding table, lm_head in full (for
    tied embeddings the table IS the lm_head, counted once); of a MoE layer's routed experts only those the step's
    tokens picked (k at batch 1, `experts_read` beyond). Dense: ModelConfig.num_params(include_embedding=False).

    With `quant` (a checkpoint's quantization_config; dense models), each layer's seven projections count their
    packed bytes instead (`quantized_projection_bytes`)."""
    total = int(round(active_params(cfg, experts_read(cfg, batch) if cfg.num_experts else None) * itemsize))
    return total + (quantized_projection_bytes(cfg, quant, itemsize) if quant else 0)


def quantized_projection_bytes(cfg, quant: dict, itemsize: int = 2) -> int:
    """What packing changes in a decode step's bytes: per projection of every layer, minus its float weight, plus
    bits / 8 bytes per weight and, per group of input rows and output column, one scale (`itemsize`) and one packed
    zero (bits / 8). GPTQ's g_idx is not read by a step without act-order and is not counted; biases stay float."""
    if cfg.num_experts:
        raise NotImplementedError("packed-byte floors of quantized MoE models are not defined")
    bits, group = int(quant["bits"]), int(quant.get("group_size") or quant.get("q_group_size") or -1)
    fp8 = quant.get("quant_method") == "fp8"   # one float32 scale per output column (per group of rows), no zeros
    scale_bytes, zero_bits = (4, 0) if fp8 else (itemsize, bits)
    D, F, H = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    Nq, Nkv = cfg.num_attention_heads * H, cfg.num_key_value_heads * H
    delta = 0
    for i, o in [(D, Nq), (D, Nkv), (D, Nkv), (Nq, D), (D, F), (D, F), (F, D)]:  # q k v o gate up down: (in, out)
        groups = 1 if group == -1 else -(-i // group)
        delta += i * o * bits // 8 + groups * o * scale_bytes + groups * o * zero_bits // 8 - i * o * itemsize
    return cfg.num_hidden_layers * delta


def load_time_quantization(method: str | None) -> dict | None:
    """--quantization's weights described as a quantization_config for the floors: fp8 is 8 bits a weight, one
    scale per output column (group -1)."""
    return {"quant_method": "fp8", "bits": 8, "group_size": -1} if method == "fp8" else None


def decode_floor_seconds(cfg, context_lens, copy_tbps: float, *, batch_contexts=None, itemsize: int = 2,
                         quant: dict | None = None) -> float:
    """Floor of a sequence of decode steps: step i reads the weights once plus the KV of its rows' contexts.

    context_lens: for batch 1, the context length (tokens attended) of each decode step. batch_contexts: for larger
    batches, a list per step of its rows' context lengths (the weights are still read once per step; for a MoE model
    the routed experts that step's rows pick, `experts_read`).
    """
    kv = kv_bytes_per_token(cfg, itemsize)
    steps = [[c] for c in context_lens] if batch_contexts is None else batch_contexts
    total = sum(decode_weight_bytes(cfg, itemsize, batch=len(rows), quant=quant) + kv * sum(rows) for rows in steps)
    return total / (copy_tbps * 1e12)


def linear_flops_per_token(cfg) -> int:
    """2 x (parameters other than the embedding table) one token's forward multiplies, lm_head included
    (BENCHMARKS.md's rule); for a MoE model its k routed experts, not all E (`active_params`)."""
    return int(2 * active_params(cfg))


def lm_head_params(cfg) -> int:
    return cfg.vocab_size * cfg.hidden_size


def attention_flops(cfg, prompt_len: int, output_len: int) -> int:
    """Attention FLOPs of one request: a causal prefill of the prompt (2 x N x P^2 x H per layer) and each decode
    step attending over its context (4 x N x C x H per layer), the last output token never fed back."""
    n, h, layers = cfg.num_attention_heads, cfg.head_dim, cfg.num_hidden_layers
    prefill = 2 * n * prompt_len * prompt_len * h
    ctx = sum(prompt_len + i for i in range(1, output_len))  # decode step i attends P + i tokens
    return layers * (prefill + 4 * n * h * ctx)


def request_flops(cfg, prompt_len: int, output_len: int) -> dict:
    """FLOPs of one request under BENCHMARKS.md's rule: 2 x non-embedding params per token (P + O tokens), plus
    attention. `lm_head_on_prompt` is the part of it spent by lm_head on prompt positions, which the engine does not
    compute (only sampled positions get logits): the rule is generous by that much on prefill-heavy work."""
    tokens = prompt_len + output_len
    return {"linear": linear_flops_per_token(cfg) * tokens, "attention": attention_flops(cfg, prompt_len, output_len),
            "lm_head_on_prompt": 2 * lm_head_params(cfg) * max(prompt_len - 1, 0)}


def sum_flops(parts: list[dict]) -> dict:
    out = {k: sum(p[k] for p in parts) for k in ("linear", "attention", "lm_head_on_prompt")}
    out["total"] = out["linear"] + out["attention"]
    return out


def ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den
