"""Qwen2-MoE (Qwen2MoeForCausalLM): logits and greedy tokens equal transformers' on tiny random checkpoints, the
expert layer is a grouped matmul (ragged_dot) with no [tokens, experts, ...] intermediate, and a mesh of 4 agrees."""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from qwenjax.config import ModelConfig
from qwenjax.models.loader import load_model_config
from tests.moe_checkpoints import hf_moe_model, write_moe_checkpoint
from tests.test_model_vs_hf import ATOL, _our_logits

# name -> writer arguments: shared expert on/off, norm_topk_prob on/off, dense layers by step and by list
VARIANTS = {
    "shared_norm": dict(shared_expert_intermediate_size=40, norm_topk_prob=True, seed=31),
    "noshared_nonorm": dict(shared_expert_intermediate_size=0, norm_topk_prob=False, num_layers=3,
                            mlp_only_layers=(1,), seed=32),
    "shared_step2": dict(shared_expert_intermediate_size=40, norm_topk_prob=False, num_layers=3,
                         decoder_sparse_step=2, top_k=3, seed=33),
}


@pytest.fixture(scope="module")
def moe_ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("moe")
    return {name: write_moe_checkpoint(d / name, **kw) for name, kw in VARIANTS.items()}


def test_config_reads_moe_fields(moe_ckpts):
    cfg = load_model_config(moe_ckpts["noshared_nonorm"])
    assert cfg.architecture == "Qwen2MoeForCausalLM" and cfg.num_experts == 8 and cfg.num_experts_per_tok == 2
    assert cfg.mlp_only_layers == (1,) and cfg.shared_expert_intermediate_size == 0
    assert [cfg.is_moe_layer(i) for i in range(3)] == [True, False, True]
    step2 = load_model_config(moe_ckpts["shared_step2"])
    assert [step2.is_moe_layer(i) for i in range(3)] == [False, True, False]
    hash(cfg)  # still a valid static jit argument


def test_57b_config_parses():
    from pathlib import Path

    p = Path(__file__).resolve().parents[2] / "shared/assets/configs/qwen2-57b-a14b-instruct.json"
    if not p.is_file():
        pytest.skip("the shared 57B config is not present")
    cfg = ModelConfig.from_file(str(p))
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (64, 8, 2560)
    assert cfg.shared_expert_intermediate_size == 20480 and not cfg.norm_topk_prob
    assert 56e9 < cfg.num_params() < 58.5e9


@pytest.mark.parametrize("name", list(VARIANTS))
def test_prefill_and_decode_logits_match_hf(name, moe_ckpts):
    path = moe_ckpts[name]
    ids = list(map(int, np.random.default_rng(7).integers(0, 512, 36)))
    with torch.no_grad():
        ref = hf_moe_model(path)(torch.tensor([ids])).logits[0].numpy()
    ours = _our_logits(path, ids, decode_from=24)  # 24 prompt tokens prefilled, 12 decoded one by one
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=1e-4)
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def _collect_avals(jaxpr, out: list) -> None:
    for eqn in jaxpr.eqns:
        out.append((eqn.primitive.name, [tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape")]))
        for sub in _sub_jaxprs(eqn.params):
            _collect_avals(sub, out)


def _sub_jaxprs(params: dict):
    """Jaxprs nested in an equation's params (pjit, custom_vjp, scan, cond branches...), on every JAX version."""
    for v in params.values():
        for x in v if isinstance(v, (tuple, list)) else (v,):
            if isinstance(x, jax.extend.core.ClosedJaxpr):
                yield x.jaxpr
            elif isinstance(x, jax.extend.core.Jaxpr):
                yield x


def test_moe_layer_is_a_ragged_dot_without_dense_expert_intermediate():
    from qwenjax.models.qwen2_moe import Qwen2MoeSparseMoeBlock

    B, Q, D, E, k, F = 2, 20, 32, 8, 2, 24
    T = B * Q
    cfg = ModelConfig(vocab_size=64, hidden_size=D, intermediate_size=56, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, max_position_embeddings=64, num_experts=E,
                      num_experts_per_tok=k, moe_intermediate_size=F, shared_expert_intermediate_size=48)
    block = Qwen2MoeSparseMoeBlock(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(block)
    x = jnp.ones((B, Q, D), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, x).jaxpr
    eqns: list = []
    _collect_avals(jaxpr, eqns)
    ragged = [shapes for prim, shapes in eqns if prim.startswith("ragged_dot")]
    assert len(ragged) == 3 and all(s == [(T * k, F)] or s == [(T * k, D)] for s in ragged), ragged
    for prim, shapes in eqns:
        for shape in shapes:
            assert not (len(shape) >= 3 and T in shape and E in shape), (prim, shape)   # no [T, E, ...]
            assert np.prod(shape, dtype=np.int64) < T * E * min(D, F), (prim, shape)


NEW = 8


def test_batched_greedy_generation_equals_hf(moe_ckpts):
    from qwenjax import LLM, SamplingParams
    from tests.conftest import SMALL_ENGINE

    path = moe_ckpts["shared_norm"]
    rng = np.random.default_rng(5)
    prompts = [list(map(int, rng.integers(0, 512, n))) for n in (3, 17, 30)]
    model = hf_moe_model(path)
    with torch.no_grad():
        ref = [model.generate(torch.tensor([p]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                              pad_token_id=0, eos_token_id=None)[0, len(p):].tolist() for p in prompts]
    llm = LLM(str(path), **{**SMALL_ENGINE, "prefill_token_buckets": (32,), "skip_warmup": True})
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(temperature=0, max_tokens=NEW,
                        ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == ref


def test_mesh_of_4_matches_mesh_of_1(moe_ckpts, tmp_path):
    from tests.test_tensor_parallel import run_with_devices

    out = tmp_path / "mesh.json"
    proc = run_with_devices(["-m", "tests.test_qwen2_moe", str(moe_ckpts["shared_norm"]), str(out)], n=4,
                            timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = {int(n): v for n, v in json.loads(out.read_text()).items()}
    assert r[4]["tokens"] == r[1]["tokens"]
    np.testing.assert_allclose(np.asarray(r[4]["logprobs"]), np.asarray(r[1]["logprobs"]), atol=1e-4)
    specs = r[4]["specs"]
    assert specs["model.layers.0.mlp.experts.gate_proj"] == [None, None, "tp"]
    assert specs["model.layers.0.mlp.experts.down_proj"] == [None, "tp", None]
    assert specs["model.layers.0.mlp.gate.kernel"] == []
    assert specs["model.layers.0.mlp.shared_expert.up_proj.kernel"] == [None, "tp"]
    assert r[4]["expert_shard_shape"] == [8, 64, 24 // 4]


def _mesh_worker(path: str, out: str) -> None:
    """Runs under 4 CPU devices: greedy tokens and logprobs at meshes 1 and 4, and the expert shardings."""
    from qwenjax import LLM, SamplingParams
    from tests.conftest import SMALL_ENGINE

    assert jax.device_count() == 4, jax.devices()
    rng = np.random.default_rng(3)
    prompts = [list(map(int, rng.integers(0, 512, n))) for n in (5, 17, 28)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=1)
    result = {}
    for n in (1, 4):
        llm = LLM(path, **{**SMALL_ENGINE, "prefill_token_buckets": (32,), "skip_warmup": True},
                  tensor_parallel_size=n)
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
        flat = {".".join(map(str, p)): v.value for p, v in nnx.to_flat_state(llm.llm_engine.runner.params)}
        result[n] = {
            "tokens": [o.outputs[0].token_ids for o in outs],
            "logprobs": [[lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
                         for o in outs],
            "specs": {k: list(v.sharding.spec) for k, v in flat.items() if k.startswith("model.layers.0.")},
            "expert_shard_shape": list(flat["model.layers.0.mlp.experts.gate_proj"].addressable_shards[0].data.shape),
        }
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    _mesh_worker(sys.argv[1], sys.argv[2])
