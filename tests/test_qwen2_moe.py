"""Qwen2-MoE (Qwen2MoeForCausalLM): logits and greedy tokens equal transformers' on tiny random checkpoints, the
expert layer is a grouped matmul (ragged_dot) with no [tokens, experts, ...] intermediate, and a mesh of 4, tensor
parallel or expert parallel, agrees with one device and with transformers."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from qwenjax.config import ModelConfig
from qwenjax.models.loader import load_model_config
from qwenjax.models.sharding import param_spec
from tests.checkpoints import hf_greedy
from tests.moe_checkpoints import hf_moe_model, hf_param_counts, write_moe_checkpoint
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
    """The tracked Qwen2-57B-A14B config (the one the benchmarks resolve): its MoE fields, and its parameter count
    equal to transformers' own model built from the same file."""
    path = Path(__file__).resolve().parents[1] / "qwenjax/assets/configs/qwen2-57b-a14b-instruct.json"
    raw = json.loads(path.read_text())
    cfg = ModelConfig.from_file(str(path))
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == \
        (raw["num_experts"], raw["num_experts_per_tok"], raw["moe_intermediate_size"]) == (64, 8, 2560)
    assert cfg.shared_expert_intermediate_size == raw["shared_expert_intermediate_size"] == 20480
    assert not cfg.norm_topk_prob
    hf = hf_param_counts(path)
    assert cfg.num_params() == hf["total"]
    assert cfg.num_params(include_embedding=False) == hf["total"] - hf["embedding"]
    assert 56e9 < cfg.num_params() < 58.5e9  # "57B"


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


@pytest.mark.parametrize("placement", ["one_device", "tensor_parallel_4", "expert_parallel_4"])
def test_moe_layer_is_a_ragged_dot_without_dense_expert_intermediate(placement):
    """The routed experts are three grouped matmuls over the T*k pairs, with no [T, E, ...] array, on one device and
    inside the shard_map of a 4-device mesh (traced against an abstract mesh: no devices needed)."""
    import dataclasses

    from qwenjax.models.qwen2_moe import Qwen2MoeSparseMoeBlock

    B, Q, D, E, k, F = 2, 20, 32, 8, 2, 24
    T = B * Q
    cfg = ModelConfig(vocab_size=64, hidden_size=D, intermediate_size=56, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, max_position_embeddings=64, num_experts=E,
                      num_experts_per_tok=k, moe_intermediate_size=F, shared_expert_intermediate_size=48)
    cfg = dataclasses.replace(cfg, expert_parallel=placement == "expert_parallel_4")
    block = Qwen2MoeSparseMoeBlock(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(block)
    x = jnp.ones((B, Q, D), jnp.float32)
    trace = lambda state, x: jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, x).jaxpr
    if placement == "one_device":
        jaxpr = trace(state, x)
    else:
        # Auto axes (the engine's Mesh has them; jax 0.11.2's AbstractMesh rejected this trace otherwise) and the
        # parameters placed as the engine places them.
        mesh = jax.sharding.AbstractMesh((4,), ("tp",), axis_types=(jax.sharding.AxisType.Auto,))

        def placed(p, leaf):
            path = tuple(k.key if hasattr(k, "key") else k.idx if hasattr(k, "idx") else k for k in p)
            spec = param_spec(tuple(int(k) if isinstance(k, str) and k.isdigit() else k for k in path), cfg, 4,
                              leaf.shape)
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=NamedSharding(mesh, spec))

        with jax.sharding.use_abstract_mesh(mesh):
            jaxpr = trace(jax.tree_util.tree_map_with_path(placed, state),
                          jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P())))
    eqns: list = []
    _collect_avals(jaxpr, eqns)
    prims = [prim for prim, _ in eqns]
    assert ("shard_map" in prims) == (placement != "one_device") and ("psum" in prims or "psum2" in prims
                                                                       or placement == "one_device"), prims
    f_local = F // 4 if placement == "tensor_parallel_4" else F   # expert parallel: whole experts, E/4 of them
    ragged = [shapes for prim, shapes in eqns if prim.startswith("ragged_dot")]
    assert len(ragged) == 3 and all(s in ([(T * k, f_local)], [(T * k, D)]) for s in ragged), ragged
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
    ref = hf_greedy(model, prompts, NEW)
    llm = LLM(str(path), **{**SMALL_ENGINE, "prefill_token_buckets": (32,), "skip_warmup": True})
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(temperature=0, max_tokens=NEW,
                        ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == ref


@pytest.fixture(scope="module")
def mesh_results(moe_ckpts, tmp_path_factory):
    """The 4-device worker on two checkpoints: shared expert on with norm_topk_prob, and off without it."""
    from tests.test_tensor_parallel import run_with_devices

    d = tmp_path_factory.mktemp("mesh")
    out = {}
    for name in ("shared_norm", "noshared_nonorm"):
        proc = run_with_devices(["-m", "tests.moe_mesh_worker", str(moe_ckpts[name]), str(d / f"{name}.json")], n=4,
                                timeout=900)
        assert proc.returncode == 0, proc.stderr[-4000:]
        out[name] = json.loads((d / f"{name}.json").read_text())
    return out


def _hf_reference(path, prompts: list[list[int]], new: int):
    """HF's greedy continuations, each token the argmax of a full forward over the sequence so far (transformers'
    cached `generate` drifted from its own full forward by more than a near-tie on one of these prompts), and its
    log-softmax at every prompt position."""
    model = hf_moe_model(path)
    tokens, prompt_lp = [], []
    with torch.no_grad():
        for p in prompts:
            seq = list(p)
            for _ in range(new):
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
            tokens.append(seq[len(p):])
            prompt_lp.append(torch.log_softmax(model(torch.tensor([p])).logits[0], -1).numpy())
    return tokens, prompt_lp


def _same_logprobs(a: list[dict], b: list[dict], atol: float) -> None:
    """Top-k logprob dicts per position: the same ids, values within atol."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if x is None or y is None:
            assert x is None and y is None
            continue
        assert set(x) == set(y), (x, y)
        np.testing.assert_allclose([x[t] for t in sorted(x)], [y[t] for t in sorted(x)], atol=atol)


@pytest.mark.parametrize("name", ["shared_norm", "noshared_nonorm"])
def test_mesh_of_4_tensor_and_expert_parallel_match_mesh_of_1_and_hf(name, mesh_results, moe_ckpts):
    from tests.moe_mesh_worker import NEW_TOKENS, prompts

    r = mesh_results[name]
    hf_tokens, hf_prompt_lp = _hf_reference(moe_ckpts[name], prompts(), NEW_TOKENS)
    assert r["mesh1"]["tokens"] == hf_tokens
    for placement in ("tp4", "ep4"):
        assert r[placement]["tokens"] == r["mesh1"]["tokens"], placement
        for i in range(len(hf_tokens)):
            _same_logprobs(r[placement]["logprobs"][i], r["mesh1"]["logprobs"][i], atol=1e-4)
            _same_logprobs(r[placement]["prompt_logprobs"][i], r["mesh1"]["prompt_logprobs"][i], atol=1e-4)
    for i, lp in enumerate(hf_prompt_lp):  # every prompt position's top 5 against HF's log-softmax
        for pos, entries in enumerate(r["ep4"]["prompt_logprobs"][i]):
            if entries is None:
                continue
            ids = sorted(entries, key=lambda t: -entries[t])   # values, not the order of near-ties below the top
            assert int(ids[0]) == int(np.argmax(lp[pos - 1])), (i, pos)
            np.testing.assert_allclose([entries[t] for t in ids], lp[pos - 1][[int(t) for t in ids]], atol=2e-4)


def test_expert_shardings_on_a_mesh_of_4(mesh_results):
    tp, ep = mesh_results["shared_norm"]["tp4"], mesh_results["shared_norm"]["ep4"]
    # tensor parallel: every expert's F = 24 split 4 ways
    assert tp["specs"]["model.layers.0.mlp.experts.gate_proj"] == [None, None, "tp"]
    assert tp["specs"]["model.layers.0.mlp.experts.down_proj"] == [None, "tp", None]
    assert tp["expert_shard_shape"] == [8, 64, 24 // 4] and tp["down_shard_shape"] == [8, 24 // 4, 64]
    # expert parallel: 8 whole experts split 4 ways
    for leaf in ("gate_proj", "up_proj", "down_proj"):
        assert ep["specs"][f"model.layers.0.mlp.experts.{leaf}"] == ["tp", None, None]
    assert ep["expert_shard_shape"] == [2, 64, 24] and ep["down_shard_shape"] == [2, 24, 64]
    dummy = mesh_results["shared_norm"]["dummy_ep4_specs"]  # load_format="dummy" places them the same way
    assert dummy["model.layers.0.mlp.experts.down_proj"] == ["tp", None, None]
    assert {k: dummy[k] for k in ep["specs"]} == ep["specs"]
    for r in (tp, ep):  # router replicated, shared expert tensor parallel in both (its gate/up fused)
        assert r["specs"]["model.layers.0.mlp.gate.kernel"] == []
        assert r["specs"]["model.layers.0.mlp.shared_expert.gate_up_proj.kernel"] == [None, "tp"]
        assert r["specs"]["model.layers.0.mlp.shared_expert.down_proj.kernel"] == ["tp", None]


def test_expert_parallel_needs_experts_divisible_by_the_mesh():
    import dataclasses

    from qwenjax.models.sharding import check_divisible

    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=56, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, max_position_embeddings=64, num_experts=6,
                      num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=0)
    check_divisible(cfg, 4)  # tensor parallel: F = 24 splits 4 ways
    with pytest.raises(ValueError, match=r"num_experts \(6\) must be divisible by tensor parallel size \(4\)"):
        check_divisible(dataclasses.replace(cfg, expert_parallel=True), 4)
    check_divisible(dataclasses.replace(cfg, expert_parallel=True, moe_intermediate_size=10), 2)  # F need not split
