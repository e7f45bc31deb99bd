"""Tiny random Qwen2-MoE checkpoints in Hugging Face format, written by transformers' Qwen2MoeForCausalLM (torch, CPU)."""

from __future__ import annotations

from pathlib import Path


def write_moe_checkpoint(path: Path, *, vocab_size=512, hidden_size=64, intermediate_size=80, num_layers=2,
                         num_heads=4, num_kv_heads=2, num_experts=8, top_k=2, moe_intermediate_size=24,
                         shared_expert_intermediate_size=40, norm_topk_prob=False, decoder_sparse_step=1,
                         mlp_only_layers=(), tie=False, seed=0, router_std=0.15) -> Path:
    import torch
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2MoeConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads,
                         num_key_value_heads=num_kv_heads, num_experts=num_experts, num_experts_per_tok=top_k,
                         moe_intermediate_size=moe_intermediate_size,
                         shared_expert_intermediate_size=shared_expert_intermediate_size,
                         norm_topk_prob=norm_topk_prob, decoder_sparse_step=decoder_sparse_step,
                         mlp_only_layers=list(mlp_only_layers), max_position_embeddings=512, tie_word_embeddings=tie,
                         rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1, torch_dtype="float32")
    model = Qwen2MoeForCausalLM(cfg).eval()
    # Larger-than-default weights so logits are far from uniform and greedy ties are rare; a wide router so the
    # top-k choice is never a near-tie that summation order could flip.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.numel() == 0:
                continue
            if "norm" in name:
                p.uniform_(0.8, 1.2)
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0.0, router_std)
            else:
                p.normal_(0.0, 0.5 if "embed" in name else 0.08)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    return path


def hf_moe_model(path: Path):
    import torch
    from transformers import Qwen2MoeForCausalLM

    return Qwen2MoeForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_param_counts(config_path: Path) -> dict[str, int]:
    """Parameters of transformers' Qwen2MoeForCausalLM built from `config_path` on the meta device (no memory):
    "total", "embedding" (the input table), and "active", what one token's forward uses besides the embedding
    table: every parameter but the routed experts, and of those num_experts_per_tok / num_experts (each expert is
    the same size, so a token's k experts are k / E of them)."""
    import json

    import torch
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(**json.loads(Path(config_path).read_text()))
    with torch.device("meta"):
        model = Qwen2MoeForCausalLM(cfg)
    embedding = experts = other = 0
    for name, p in model.named_parameters():
        if name.endswith("embed_tokens.weight"):
            embedding += p.numel()
        elif ".mlp.experts." in name:  # stacked [E, ...] tensors, or one module per expert in older transformers
            experts += p.numel()
        else:
            other += p.numel()
    assert experts % cfg.num_experts == 0
    return {"total": embedding + experts + other, "embedding": embedding,
            "active": other + experts // cfg.num_experts * cfg.num_experts_per_tok}
