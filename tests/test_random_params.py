"""Random ("dummy") weights: made on the device one parameter at a time, with the kinds the modules' own
initializers give (zeros, ones, normal(0.02)), deterministic in the seed, dense and MoE."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwenjax.config import ModelConfig
from qwenjax.models.loader import model_class
from qwenjax.models.random_weights import init_kind, random_params

BASE = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
CONFIGS = {
    "dense": ModelConfig(**BASE),
    "moe": ModelConfig(**BASE, architecture="Qwen2MoeForCausalLM", num_experts=8, num_experts_per_tok=2,
                       moe_intermediate_size=32, shared_expert_intermediate_size=48, mlp_only_layers=(1,)),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_random_params_follow_the_modules_initializers(name):
    cfg = CONFIGS[name]
    _, state = random_params(cfg, jnp.float32, seed=3)
    eager = nnx.split(model_class(cfg)(cfg, dtype=jnp.float32, rngs=nnx.Rngs(3)))[1]
    ours, theirs = list(nnx.to_flat_state(state)), list(nnx.to_flat_state(eager))
    assert [p for p, _ in ours] == [p for p, _ in theirs]
    kinds = set()
    for (path, v), (_, e) in zip(ours, theirs):
        a, b = np.asarray(v[...]), np.asarray(e[...])
        assert a.shape == b.shape and a.dtype == b.dtype, path
        kind = "ones" if (b == 1).all() else "zeros" if (b == 0).all() else "normal"
        assert init_kind(path) == kind, path
        kinds.add(kind)
        if kind == "normal" and a.size >= 1000:
            assert abs(a.std() - 0.02) < 0.002 and abs(a.mean()) < 0.002, path
        elif kind != "normal":
            np.testing.assert_array_equal(a, b)
    assert kinds == {"ones", "zeros", "normal"}


def test_random_params_are_deterministic_in_the_seed():
    cfg = CONFIGS["moe"]
    leaves = lambda seed: jax.tree.leaves(random_params(cfg, jnp.bfloat16, seed=seed)[1])  # noqa: E731
    a, b, c = leaves(0), leaves(0), leaves(1)
    assert all((np.asarray(x, np.float32) == np.asarray(y, np.float32)).all() for x, y in zip(a, b))
    assert any((np.asarray(x, np.float32) != np.asarray(y, np.float32)).any() for x, y in zip(a, c))
    # distinct parameters of one shape get distinct values (each its own key)
    flat = dict(nnx.to_flat_state(random_params(cfg, jnp.float32, seed=0)[1]))
    up = lambda i: np.asarray(flat[("model", "layers", i, "self_attn", "qkv_proj", "kernel")][...])  # noqa: E731
    assert not np.array_equal(up(0), up(1))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_random_params_are_made_in_the_fused_shapes(name):
    """One device: q/k/v and gate/up come out fused ([D, (N + 2K) H], [D, 2F]; the shared expert's [D, 2 Fs]),
    with no separate q/k/v/gate/up parameters left; the routed experts' stacks stay separate."""
    cfg = CONFIGS[name]
    flat = {p: v.shape for p, v in nnx.to_flat_state(random_params(cfg, jnp.float32, seed=0)[1])}
    D, H = cfg.hidden_size, cfg.head_dim
    assert flat[("model", "layers", 0, "self_attn", "qkv_proj", "kernel")] == (D, (4 + 2 * 2) * H)
    assert flat[("model", "layers", 0, "self_attn", "qkv_proj", "bias")] == ((4 + 2 * 2) * H,)
    assert flat[("model", "layers", 1, "mlp", "gate_up_proj", "kernel")] == (D, 2 * cfg.intermediate_size)
    if cfg.num_experts:
        assert flat[("model", "layers", 0, "mlp", "shared_expert", "gate_up_proj", "kernel")] == (D, 2 * 48)
        assert flat[("model", "layers", 0, "mlp", "experts", "gate_proj")] == (8, D, 32)
    assert not [p for p in flat if {"q_proj", "k_proj", "v_proj"} & set(p) or
                ({"gate_proj", "up_proj"} & set(p) and "experts" not in p)]


@pytest.mark.parametrize("block", [None, (32, 32)])
def test_fp8_random_params_are_made_one_parameter_at_a_time_like_the_modules(block):
    """FP8 models (quantization="fp8", or block-scaled) take the per-parameter path too: the same parameters,
    shapes and dtypes as Fp8Linear's constructor, float8 weights whose dequantized values have std 0.02 (the float
    init's), the constructor's scales, zeros and ones exactly."""
    from qwenjax.quantization.config import QuantConfig

    cfg = CONFIGS["dense"]
    d = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    quant = QuantConfig.from_dict(dict(d, weight_block_size=list(block)) if block else d)
    _, state = random_params(cfg, jnp.bfloat16, seed=3, quant=quant)
    eager = nnx.split(model_class(cfg)(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(3), quant=quant))[1]
    ours, theirs = list(nnx.to_flat_state(state)), list(nnx.to_flat_state(eager))
    assert [p for p, _ in ours] == [p for p, _ in theirs]
    flat = dict(ours)
    seen = set()
    for (path, v), (_, e) in zip(ours, theirs):
        a, b = v[...], e[...]
        assert a.shape == b.shape and a.dtype == b.dtype, path
        kind = init_kind(path, a.dtype)
        seen.add(kind)
        if kind == "fp8_normal":
            w = np.asarray(a, np.float32) * np.asarray(flat[path[:-1] + ("weight_scale",)][...])[:1].T
            assert abs(w.std() - 0.02) < 0.002 and abs(w.mean()) < 0.002, path
        elif kind != "normal":
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32), err_msg=str(path))
    assert {"fp8_normal", "fp8_scale", "normal", "zeros", "ones"} <= seen
