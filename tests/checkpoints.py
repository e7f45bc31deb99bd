"""Tiny random Qwen2 checkpoints in Hugging Face format, written by transformers itself (torch on CPU)."""

from __future__ import annotations

import shutil
from pathlib import Path

from qwenjax.tokenizer import default_tokenizer_dir

REAL_VOCAB = 151936


def write_checkpoint(path: Path, *, vocab_size=512, hidden_size=64, intermediate_size=96, num_layers=2,
                     num_heads=4, num_kv_heads=2, tie=False, seed=0, max_position_embeddings=512,
                     shards: int = 1, with_tokenizer: bool = False, rope_theta=10000.0, embed_std=0.5,
                     rope_parameters: dict | None = None) -> Path:
    """`rope_parameters`: RoPE scaling as transformers 5 takes it (e.g. {"rope_type": "yarn", "factor": 4.0,
    "original_max_position_embeddings": 64}); config.json then holds it under `rope_parameters`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    rope = {"rope_parameters": {**rope_parameters, "rope_theta": rope_theta}} if rope_parameters else \
        {"rope_theta": rope_theta}
    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                      num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                      max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie,
                      **rope, rms_norm_eps=1e-6, bos_token_id=151643 if vocab_size > 151645 else 0,
                      eos_token_id=151645 if vocab_size > 151645 else 1, torch_dtype="float32")
    model = Qwen2ForCausalLM(cfg).eval()
    # Larger-than-default weights so logits are far from uniform and greedy ties are rare.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0.0, 0.08 if "embed" not in name else embed_std)
    path.mkdir(parents=True, exist_ok=True)
    max_shard = None
    if shards > 1:
        total = sum(p.numel() * 4 for p in model.parameters())
        max_shard = f"{max(1, total // shards // 1000 + 1)}KB"
    model.save_pretrained(path, safe_serialization=True, **({"max_shard_size": max_shard} if max_shard else {}))
    if with_tokenizer:
        for f in Path(default_tokenizer_dir()).iterdir():
            shutil.copy(f, path / f.name)
    return path


def hf_model(path: Path):
    import torch
    from transformers import Qwen2ForCausalLM

    return Qwen2ForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


def hf_greedy(model, prompts: list[list[int]], new: int, **generate_kwargs) -> list[list[int]]:
    """transformers' greedy `generate` of exactly `new` tokens after each prompt (no EOS stop), one prompt at a
    time: the oracle's tokens. `generate_kwargs`: e.g. repetition_penalty."""
    import torch

    # An explicit all-ones attention mask: without one, generate infers it from pad_token_id and would mask every
    # prompt token equal to it (token 0 here).
    with torch.no_grad():
        return [model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               max_new_tokens=new, do_sample=False, min_new_tokens=new, pad_token_id=0,
                               eos_token_id=None, **generate_kwargs)[0, len(p):].tolist()
                for p in prompts]


EOS_CHAIN_WORDS = (" one", " two", " three")


def write_eos_chain_checkpoint(path: Path, words=EOS_CHAIN_WORDS, *, margin: float = 20.0) -> tuple[Path, list[int]]:
    """A Qwen2 checkpoint (real vocabulary and tokenizer, written by transformers) whose greedy continuation of any
    prompt not ending in one of `words` is exactly those words' tokens and then EOS (151645).

    How: every layer's o_proj and down_proj are zero, so the last hidden state is the embedding of the current token;
    chain token i has embedding 5 x e_i (a basis vector), every other token a small random embedding plus 5 x e_31;
    lm_head maps e_31 to the first chain token, e_i to chain token i + 1 and the last one's to EOS, each `margin`
    above a random background row (std 0.08; after the final RMSNorm a logit gap of about 100 at margin 20, so even
    sampling at temperature 1 follows the chain). Returns the path and the chain's token ids."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(default_tokenizer_dir())
    chain = []
    for w in words:
        ids = tok.encode(w, add_special_tokens=False)
        assert len(ids) == 1, (w, ids)
        chain.append(ids[0])
    eos, hidden, generic = 151645, 32, 31
    assert len(chain) < generic
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=REAL_VOCAB, hidden_size=hidden, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                      tie_word_embeddings=False, rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=eos,
                      torch_dtype="float32")
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()  # the layers add nothing to the residual stream
            elif "norm" in name:
                p.fill_(1.0)
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        embed.normal_(0.0, 0.15)
        embed[:, generic] = 5.0
        head.normal_(0.0, 0.08)
        for i, t in enumerate(chain):
            embed[t] = 0.0
            embed[t, i] = 5.0
        for src, dst in zip([generic] + list(range(len(chain))), chain + [eos]):
            head[dst, src] += margin
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    for f in Path(default_tokenizer_dir()).iterdir():
        shutil.copy(f, path / f.name)
    return path, chain
