"""Any mesh size (models/mesh_padding.py): heads and FFN widths the mesh does not divide are zero-padded, and
greedy tokens match mesh 1 exactly. Meshes run in a subprocess with 8 CPU devices (tests/any_mesh_worker.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qwenjax.config import ModelConfig
from qwenjax.models.mesh_padding import ZeroPadded, describe, pad_for_mesh, padded_array
from qwenjax.models.sharding import check_divisible
from qwenjax.quantization.config import QuantConfig
from tests.checkpoints import write_checkpoint
from tests.test_tensor_parallel import run_with_devices

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "qwenjax" / "assets" / "configs").glob("*.json"))
MESHES = "3,4,8"


AWQ = QuantConfig("awq", 4, 128, checkpoint_format="gemm")


@pytest.mark.parametrize("quant", [None, AWQ], ids=["float", "awq-g128"])
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_packaged_config_pads_for_meshes_1_to_8(path, quant):
    real = ModelConfig.from_file(str(path))
    for n in range(1, 9):
        cfg = pad_for_mesh(real, n, quant)
        check_divisible(cfg, n)  # raises on anything left that the mesh does not divide
        N, K, H = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        assert N % n == 0 and cfg.q_per_kv == real.q_per_kv and N >= real.num_attention_heads
        assert (K % n == 0) or (N, K) == (real.num_attention_heads, real.num_key_value_heads)
        assert cfg.intermediate_size % n == 0 and cfg.intermediate_size >= real.intermediate_size
        if real.num_experts:
            assert cfg.moe_intermediate_size % n == 0 and cfg.shared_expert_intermediate_size % n == 0
        if quant is not None and cfg != real:  # padded rows of o_proj / down_proj are whole groups
            assert (N * H) % quant.group_size == 0 and cfg.intermediate_size % quant.group_size == 0
        if real.num_attention_heads % n == 0:  # heads the mesh divides are never padded
            assert (N, K) == (real.num_attention_heads, real.num_key_value_heads)


def test_start_up_log_says_what_padding_costs():
    real = ModelConfig.from_file(str(CONFIGS[0].with_name("qwen2-7b-instruct.json")))
    assert describe(real, pad_for_mesh(real, 4), 4) is None
    text = describe(real, pad_for_mesh(real, 8), 8)
    assert "q heads 28 -> 56, kv heads 4 -> 8 (KV cache 2.00x the bytes a token, 1 kv head(s) a device)" in text
    text = describe(real, pad_for_mesh(real, 7), 7)  # 28 q heads split 7 ways; 152064 tokens and 18944 do not
    assert "heads" not in text and "intermediate_size 18944 -> 19040" in text
    assert "vocabulary 152064 does not split 7 ways" in text and "2.03 GiB a device instead of 0.29 GiB" in text


def test_zero_padded_reads_only_its_slices():
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    padded = ZeroPadded(arr, (3, 6))
    full = np.zeros((3, 6), np.float32)
    full[:, :4] = arr
    np.testing.assert_array_equal(np.asarray(padded), full)
    for cols in (slice(0, 2), slice(2, 4), slice(4, 6), slice(3, 5)):
        np.testing.assert_array_equal(padded[(slice(None), cols)], full[:, cols])


def test_padded_array_refuses_what_is_not_a_padding():
    real = ModelConfig(vocab_size=64, hidden_size=56, intermediate_size=96, num_hidden_layers=1,
                       num_attention_heads=14, num_key_value_heads=2, head_dim=4, max_position_embeddings=64)
    cfg = pad_for_mesh(real, 4)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (28, 4)
    q = ("model", "layers", 0, "self_attn", "q_proj", "kernel")
    assert padded_array("q", np.ones((56, 56)), (56, 112), q, real, cfg).shape == (56, 112)
    with pytest.raises(ValueError, match=r"padded for the mesh from 56 to 112"):
        padded_array("q", np.ones((56, 48)), (56, 112), q, real, cfg)
    norm = ("model", "layers", 0, "input_layernorm", "weight")
    with pytest.raises(ValueError, match="has shape"):
        padded_array("norm", np.ones(50), (56,), norm, real, cfg)


def _generate(tmp_path, paths) -> dict:
    out = tmp_path / "result.json"
    proc = run_with_devices(["-m", "tests.any_mesh_worker", str(out), MESHES, *map(str, paths)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def _assert_same_as_mesh_1(res: dict, path, kv_heads: int) -> None:
    base = res[f"{path}|1"]
    for n in map(int, MESHES.split(",")):
        r = res[f"{path}|{n}"]
        assert r["tokens"] == base["tokens"], (path, n)
        np.testing.assert_allclose(np.concatenate(r["logprobs"]), np.concatenate(base["logprobs"]), atol=1e-4)
        if r["kv_heads"] != kv_heads:  # padded kv heads: one a device (or a whole group's worth), never replicated
            assert r["kv_heads"] % n == 0 and r["kv_shard_heads"] == r["kv_heads"] // n, (path, n, r)


def test_dense_heads_the_mesh_does_not_divide_give_mesh_1_tokens(tmp_path):
    """6 / 14 / 28 q heads over 2 / 2 / 4 kv heads at meshes 3, 4 and 8; the FFN width 100 splits neither 3 nor 8.
    The 14-head model's orbax conversion (convert.py: saved unpadded, padded on the devices) gives the same."""
    from qwenjax.models.convert import convert

    ckpts = {(q, kv): write_checkpoint(tmp_path / f"h{q}", hidden_size=8 * q, intermediate_size=100, num_heads=q,
                                       num_kv_heads=kv, seed=q) for q, kv in ((6, 2), (14, 2), (28, 4))}
    orbax = tmp_path / "h14-orbax"
    convert(ckpts[14, 2], orbax)
    res = _generate(tmp_path, [*ckpts.values(), orbax])
    for (q, kv), path in ckpts.items():
        _assert_same_as_mesh_1(res, path, kv)
    _assert_same_as_mesh_1(res, orbax, 2)
    assert res[f"{orbax}|1"]["tokens"] == res[f"{ckpts[14, 2]}|1"]["tokens"]
    assert res[f"{ckpts[14, 2]}|8"]["kv_heads"] == 8 and res[f"{ckpts[14, 2]}|3"]["kv_heads"] == 3


def test_awq_and_moe_at_meshes_that_do_not_divide_them(tmp_path):
    """AWQ and GPTQ act-order (group 32): 14 q heads pad in whole groups of o_proj rows (mesh 3: 2 -> 6 kv heads),
    the FFN width 160 to 192 at mesh 3. MoE: 6 q heads, experts' width 20 and the shared expert's 40 padded on F;
    with enable_expert_parallel too."""
    from tests.moe_checkpoints import write_moe_checkpoint
    from tests.quant_writer import Scheme, write_quantized

    src = write_checkpoint(tmp_path / "f14", hidden_size=224, intermediate_size=160, num_heads=14, num_kv_heads=2,
                           seed=6)
    awq, gptq = tmp_path / "awq14", tmp_path / "gptq14"
    write_quantized(src, awq, None, Scheme("awq", group_size=32), seed=1)
    write_quantized(src, gptq, None, Scheme("gptq", bits=4, group_size=32, desc_act=True), seed=2)
    moe = write_moe_checkpoint(tmp_path / "moe6", hidden_size=48, intermediate_size=80, num_heads=6, num_kv_heads=2,
                               moe_intermediate_size=20, shared_expert_intermediate_size=40, seed=3)
    res = _generate(tmp_path, [awq, gptq, moe, f"ep:{moe}"])
    _assert_same_as_mesh_1(res, awq, 2)
    _assert_same_as_mesh_1(res, gptq, 2)
    _assert_same_as_mesh_1(res, moe, 2)
    # enable_expert_parallel: 8 experts split over 4 and 8 devices; over 3 they split on their width instead
    _assert_same_as_mesh_1(res, f"ep:{moe}", 2)
    assert res[f"ep:{moe}|1"]["tokens"] == res[f"{moe}|1"]["tokens"]
    assert [res[f"ep:{moe}|{n}"]["expert_parallel"] for n in (3, 4, 8)] == [False, True, True]
    assert res[f"{awq}|3"]["kv_heads"] == 6 and res[f"{awq}|3"]["kv_shard_heads"] == 2


def test_7b_57b_and_0_5b_sharded_layouts_at_mesh_8(tmp_path):
    """Shapes only (abstract arrays in their shardings, no weights): 28 and 14 q heads become 56 over 8 kv heads,
    one kv head and 7 q heads a device; every split divides."""
    out = tmp_path / "layouts.json"
    names = ["qwen2-7b-instruct.json", "qwen2-57b-a14b-instruct.json", "qwen2-0.5b-instruct.json"]
    proc = run_with_devices(["-m", "tests.any_mesh_worker", "layouts", str(out), "8", *names])
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    for name in names:
        r = res[name]
        H = r["kv_shard"][-1]
        assert r["heads"] == [56, 8] and r["kv_shard"][0] == 1
        q_kv = r["shards"]["model.layers.0.self_attn.qkv_proj.kernel"]
        assert q_kv[0] == [None, "tp"] and q_kv[1][1] == (7 + 2) * H  # 7 q heads, 1 k and 1 v head a device
        assert r["shards"]["model.layers.0.self_attn.o_proj.kernel"][1][0] == 7 * H
    moe = res["qwen2-57b-a14b-instruct.json"]["shards"]
    assert moe["model.layers.0.mlp.experts.gate_proj"][1] == [64, 3584, 2560 // 8]


RANDOM_WORKER = """
import numpy as np, jax
from flax import nnx
from qwenjax.config import ModelConfig
from qwenjax.models.random_weights import random_params
from qwenjax.models.sharding import make_mesh
from qwenjax.quantization.config import QuantConfig
cfg = ModelConfig(vocab_size=64, hidden_size=112, intermediate_size=100, num_hidden_layers=1, num_attention_heads=14,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
for quant in (None, QuantConfig("awq", 4, 16, checkpoint_format="gemm")):
    _, state = random_params(cfg, jax.numpy.float32, mesh=make_mesh(8), quant=quant)
    flat = {".".join(map(str, p[3:])): np.asarray(v[...]) for p, v in nnx.to_flat_state(state) if p[2:3] == (0,)}
    if quant is None:
        o, down = flat["self_attn.o_proj.kernel"], flat["mlp.down_proj.kernel"]
        assert o.shape[0] == 56 * 8 and not o[14 * 8:].any() and o[:14 * 8].all(), o.shape
        assert down.shape[0] == 128 and not down[100:].any() and down[:100].all(), down.shape
    else:
        o, down = flat["self_attn.o_proj.scales"], flat["mlp.down_proj.scales"]
        assert o.shape[0] == 56 * 8 // 16 and not o[14 * 8 // 16:].any() and o[:14 * 8 // 16].any(), o.shape
        assert down.shape[0] * 16 > 100 and not down[-(-100 // 16):].any(), down.shape
print("ok")
"""


def test_random_weights_zero_the_padded_rows():
    """Benchmarks' random weights on a padded mesh: o_proj / down_proj rows of padded heads and FFN columns are zero
    (quantized: their groups' scales), so padded parts never reach the residual stream."""
    proc = run_with_devices(["-c", RANDOM_WORKER])
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-4000:]
