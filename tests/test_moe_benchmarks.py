"""Benchmarks on a Qwen2-MoE config: the floors count only the activated experts, moe_layer.py, latency.py and
throughput.py run end to end on CPU on a scaled-down copy of Qwen2-57B-A14B's config (same structure: 64 experts,
top 8, shared expert, GQA 7:1; tiny widths), and the KV cache falls back to free-memory sizing when the workload's
pages cannot fit beside the weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.moe_checkpoints import hf_param_counts
from tests.test_benchmarks_smoke import REPO, bench_modules

engine_setup, floors, model_specs, repo_paths = bench_modules("engine_setup", "floors", "model_specs", "repo_paths")

SCALED = dict(hidden_size=112, intermediate_size=192, num_hidden_layers=2, num_attention_heads=7, num_key_value_heads=1,
              moe_intermediate_size=32, shared_expert_intermediate_size=160, max_position_embeddings=4096)


def scaled_57b(d: Path) -> Path:
    cfg = json.loads((repo_paths.CONFIG_DIR / "qwen2-57b-a14b-instruct.json").read_text())
    cfg.update(SCALED)
    out = d / "qwen2-57b-a14b-scaled"
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg))
    return out / "config.json"


def hf_dense_param_count(config_path: Path) -> int:
    """Parameters of transformers' Qwen2ForCausalLM built from `config_path` on the meta device."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(**json.loads(config_path.read_text())))
    return sum(p.numel() for p in model.parameters())


def test_floors_count_activated_experts_only():
    cfg = model_specs.model_config(model_specs.resolve_model("qwen2-57b-a14b-instruct"))
    hf = hf_param_counts(repo_paths.CONFIG_DIR / "qwen2-57b-a14b-instruct.json")  # transformers' own modules, counted
    assert cfg.num_params() == hf["total"]
    # attention, norms, router, shared expert, 8 of 64 routed experts per layer, lm_head (untied)
    assert floors.active_params(cfg) == hf["active"]
    assert round((hf["active"] + hf["embedding"]) / 1e9) == 14  # the name's "A14B" counts the embedding table too
    assert floors.decode_weight_bytes(cfg) == 2 * hf["active"]
    assert floors.linear_flops_per_token(cfg) == 2 * hf["active"]
    # larger decode batches read more distinct experts, never more than all 64
    b8, b512 = floors.decode_weight_bytes(cfg, batch=8), floors.decode_weight_bytes(cfg, batch=512)
    assert floors.decode_weight_bytes(cfg) < b8 < b512 <= 2 * cfg.num_params(include_embedding=False)
    assert floors.experts_read(cfg, 1) == 8 and 63.9 < floors.experts_read(cfg, 512) <= 64
    floor = floors.decode_floor_seconds(cfg, [100, 200], 1.0)  # two batch-1 steps at 1 TB/s
    assert floor == pytest.approx((2 * floors.decode_weight_bytes(cfg) + 300 * floors.kv_bytes_per_token(cfg)) / 1e12)
    dense = model_specs.model_config(model_specs.resolve_model("qwen2-7b-instruct"))
    assert floors.decode_weight_bytes(dense, batch=64) == floors.decode_weight_bytes(dense)  # dense: unchanged


def test_kv_pages_fit_on_a_141gb_gpu(monkeypatch):
    """throughput-fixed's 512 x 768 tokens fit beside 7B's weights on an H200, not beside 57B-A14B's."""
    import argparse

    from qwenjax import compat

    class Dev:
        def memory_stats(self):
            return {"bytes_limit": limit}

    import jax

    monkeypatch.setattr(compat, "backends_initialized", lambda: True)
    monkeypatch.setattr(jax, "local_devices", lambda: [Dev()])
    limit = int(0.9 * 143771 * 2**20)
    pages = 512 * 48 + 1  # throughput-fixed: 512 sequences of 768 tokens in pages of 16, and the null page

    def fits_by_hand(model: str, mesh: int) -> bool:
        """bf16 weights (transformers' parameter count) and bf16 K and V of every layer's kv heads for every page's
        16 tokens, split over the mesh, and the engine's reserve, within the device's limit."""
        path = repo_paths.CONFIG_DIR / f"{model}.json"
        raw = json.loads(path.read_text())
        params = hf_param_counts(path)["total"] if "num_experts" in raw else hf_dense_param_count(path)
        head_dim = raw["hidden_size"] // raw["num_attention_heads"]
        kv_per_token = 2 * raw["num_hidden_layers"] * raw["num_key_value_heads"] * head_dim * 2
        return (2 * params + pages * 16 * kv_per_token) / mesh + engine_setup.KV_FIT_RESERVE <= limit

    # The cases that matter: 7B fits on one H200, 57B-A14B only over two (each holds half).
    for model, mesh, fits in (("qwen2-7b-instruct", 1, True), ("qwen2-57b-a14b-instruct", 1, False),
                              ("qwen2-57b-a14b-instruct", 2, True)):
        assert fits_by_hand(model, mesh) is fits, (model, mesh)
        args = argparse.Namespace(model=model, dtype="bfloat16", kv_cache_dtype="auto", block_size=16, mesh=mesh)
        assert engine_setup.kv_pages_fit(args, pages) is fits, (model, mesh)
    args = argparse.Namespace(model="qwen2-57b-a14b-instruct", dtype="bfloat16", kv_cache_dtype="auto", block_size=16,
                              mesh=1)
    assert engine_setup.kv_pages_fit(args, 25)  # latency's one sequence


def test_moe_benchmarks_run_on_a_scaled_57b_config(tmp_path):
    cfg_path = scaled_57b(tmp_path / "cfg")
    res, out = tmp_path / "results", tmp_path / "out"
    a = ["--model", str(cfg_path), "--results-dir", str(res), "--out", str(out), "--ceilings", "small"]
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO / 'benchmarks')!r})
        import latency, moe_layer, throughput
        a = {a!r}
        moe_layer.main(a + ["--tokens", "1,8", "--repeats", "2", "--inner", "2"])
        latency.main(a + ["--skip-warmup", "--prompt-len", "12", "--output-len", "6", "--repeats", "1"])
        # 6 requests of 10 + 12 tokens on 6 pages of 16: at most 3 run at once, the scheduler preempts the rest
        throughput.main(a + ["--skip-warmup", "--num-prompts", "6", "--prompt-len", "10", "--output-len", "12",
                             "--num-kv-pages", "6"])
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu", QWENJAX_COMMIT="smoke-test")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    files = {json.loads(p.read_text())["benchmark"]: json.loads(p.read_text()) for p in res.glob("*.json")}
    assert sorted(files) == ["latency", "moe-layer", "throughput-fixed"]
    assert all(r["model"] == "qwen2-57b-a14b-scaled" for r in files.values())
    moe = files["moe-layer"]
    for key in ("us_t1", "mbu_t1", "routed_us_t1", "activated_gb_t8", "unique_experts_t8", "mbu", "us"):
        assert moe["metrics"][key] > 0, key
    assert moe["metrics"]["unique_experts_t1"] == 8 and moe["config"]["shape"]["num_experts"] == 64
    per = moe["config"]["per_tokens"]["1"]  # 8 experts x 3 x D x F + shared + router + x in/out, bf16
    D, F, Fs, E = 112, 32, 160, 64
    assert per["activated_bytes"] == (8 * 3 * D * F + 3 * D * Fs + D + D * E + 2 * D) * 2
    lat = files["latency"]
    cfg = model_specs.model_config(model_specs.resolve_model(str(cfg_path)))
    assert lat["config"]["floor"]["decode_weight_bytes"] == floors.decode_weight_bytes(cfg)
    assert lat["metrics"]["mbu"] > 0
    thr = files["throughput-fixed"]
    assert thr["config"]["output_tokens"] == 6 * 12 and thr["config"]["num_kv_pages"] == 6
    assert thr["metrics"]["preemptions"] > 0 and thr["metrics"]["mfu"] > 0
