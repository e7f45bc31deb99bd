"""The built-in default model: a small Qwen2 with random weights and the real Qwen2.5 tokenizer.

Its tokenizer is Qwen2.5's (tokenizer config, added tokens and chat template over the vocabulary that Qwen2 and
Qwen2.5 share), so that its chat template renders tools and tool calls and `<tool_call>` is one token, as for the
Qwen2.5 checkpoints most deployments serve; its generation_config.json is Qwen2-Instruct's.

It lets `LLM()` and `python -m server` run with no download. Its text is gibberish by construction (the weights are
random); it exists to exercise the whole engine. Written once, with numpy only, into the user's cache directory.

Random weights never choose EOS, so a request without max_tokens would run to the 2,048-token context (the
deployment guide's requests set none: minutes each on a CPU). Its generation_config.json (Qwen2-Instruct's) therefore
carries `max_new_tokens` = DEFAULT_MAX_NEW_TOKENS, which the engine and the server take as the default max_tokens, as
vLLM reads a checkpoint's max_new_tokens.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from qwenjax.tokenizer import default_tokenizer_dir, write_qwen25_tokenizer

DEFAULT_MODEL_NAME = "qwenjax/tiny-random-qwen2"
DEFAULT_MAX_NEW_TOKENS = 128
CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
    "bos_token_id": 151643, "eos_token_id": 151645, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
    "use_sliding_window": False, "rope_scaling": None, "torch_dtype": "float32",
    "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
    "max_position_embeddings": 2048, "max_window_layers": 2, "sliding_window": 2048,
}


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    # v2: max_new_tokens in generation_config.json; v3: Qwen2.5's tokenizer files
    return Path(root) / "qwenjax" / "tiny-random-qwen2-v3"


def default_model_dir() -> Path:
    """Creates the default checkpoint on first use (atomically) and returns its directory."""
    path = cache_dir()
    if (path / "model.safetensors").is_file():
        return path
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_random_checkpoint(tmp, CONFIG, seed=0)
    write_qwen25_tokenizer(tmp)
    generation = json.loads((Path(default_tokenizer_dir()) / "generation_config.json").read_text())
    generation["max_new_tokens"] = DEFAULT_MAX_NEW_TOKENS
    (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
    try:
        tmp.rename(path)
    except OSError:  # another process made it first
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def write_random_checkpoint(path: Path, config: dict, *, seed: int) -> None:
    """HF-layout safetensors with random float32 weights (names and [out, in] shapes as transformers saves)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    D, F, V = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    N, K = config["num_attention_heads"], config["num_key_value_heads"]
    H = D // N
    w = lambda *shape: (rng.standard_normal(shape) * 0.05).astype(np.float32)  # noqa: E731
    tensors = {"model.embed_tokens.weight": w(V, D), "model.norm.weight": np.ones(D, np.float32)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors.update({
            p + "self_attn.q_proj.weight": w(N * H, D), p + "self_attn.q_proj.bias": w(N * H),
            p + "self_attn.k_proj.weight": w(K * H, D), p + "self_attn.k_proj.bias": w(K * H),
            p + "self_attn.v_proj.weight": w(K * H, D), p + "self_attn.v_proj.bias": w(K * H),
            p + "self_attn.o_proj.weight": w(D, N * H),
            p + "mlp.gate_proj.weight": w(F, D), p + "mlp.up_proj.weight": w(F, D), p + "mlp.down_proj.weight": w(D, F),
            p + "input_layernorm.weight": np.ones(D, np.float32),
            p + "post_attention_layernorm.weight": np.ones(D, np.float32),
        })
    if not config.get("tie_word_embeddings"):
        tensors["lm_head.weight"] = w(V, D)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with open(path / "config.json", "w") as f:
        json.dump(config, f, indent=2)
