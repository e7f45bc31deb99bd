"""Benchmarks of FP8 weights on CPU: latency, throughput-fixed and prefill with --quantization fp8 at a tiny scale,
the fp8_matmul probe on tiny shapes, and the fp8 decode floor's bytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from tests.test_benchmarks_smoke import REPO, bench_modules

floors, model_specs, result_files = bench_modules("floors", "model_specs", "result_files")


def test_fp8_decode_floor_counts_one_byte_a_weight():
    cfg = model_specs.model_config(model_specs.resolve_model("qwen2-7b-instruct"))
    D, F, L, H = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.head_dim
    kv = cfg.num_key_value_heads * H
    per_layer = [(D, D), (D, kv), (D, kv), (D, D), (D, F), (D, F), (F, D)]
    weights = L * sum(i * o for i, o in per_layer)
    scales = L * sum(o for _, o in per_layer) * 4   # one float32 scale per output column
    fp8 = floors.load_time_quantization("fp8")
    want = floors.decode_weight_bytes(cfg) - 2 * weights + weights + scales   # bf16 -> one byte, plus the scales
    assert floors.decode_weight_bytes(cfg, quant=fp8) == want
    assert floors.load_time_quantization(None) is None


def test_fp8_benchmarks_write_results(tmp_path):
    res = tmp_path / "results"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO / 'benchmarks')!r})
        import latency, throughput, prefill, fp8_matmul, fp8_skinny_sweep
        a = ["--model", "tiny", "--quantization", "fp8", "--results-dir", {str(res)!r}, "--ceilings", "small",
             "--skip-warmup"]
        latency.main(a + ["--prompt-len", "12", "--output-len", "5", "--repeats", "1"])
        throughput.main(a + ["--num-prompts", "4", "--prompt-len", "10", "--output-len", "4"])
        prefill.main(a + ["--batch", "2", "--prompt-len", "24", "--repeats", "1"])
        fp8_matmul.main(["--tiny", "--rows", "1,16", "--layers", "qkv", "--reps", "1", "--inner", "1",
                         "--results-dir", {str(res)!r}])
        fp8_skinny_sweep.main(["--interpret", "--layers", "qkv", "--budget-s", "30", "--reps", "1", "--inner", "1",
                               "--results-dir", {str(res)!r}])
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu", QWENJAX_COMMIT="smoke-test")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = {p.name: json.loads(p.read_text()) for p in res.glob("*.json")}
    lat = results[result_files.result_name("latency", "tiny-fp8", "cpu")]
    assert lat["model"] == "tiny-fp8" and lat["config"]["engine_args"]["quantization"] == "fp8"
    assert lat["metrics"]["tok_s"] > 0
    assert lat["config"]["floor"]["decode_weight_bytes"] == floors.decode_weight_bytes(
        model_specs.model_config(model_specs.resolve_model("tiny")), quant=floors.load_time_quantization("fp8"))
    fixed = results[result_files.result_name("throughput-fixed", "tiny-fp8", "cpu")]
    assert fixed["metrics"]["output_tok_s"] > 0 and fixed["config"]["engine_args"]["quantization"] == "fp8"
    pre = next(v for k, v in results.items() if k.startswith("prefill") and "tiny-fp8" in k)
    assert pre["config"]["engine_args"]["quantization"] == "fp8"
    probe = results[result_files.result_name("fp8-matmul", "qwen2-7b-instruct-tiny", "cpu")]
    m = probe["metrics"]
    for form in ("bf16", "fp8_plain", "fp8_dot", "fp8_layer", "fp8_xla"):
        for rows in (1, 16):
            key = f"{form}_qkv_m{rows}"
            assert m[f"{key}_us"] > 0 and m[f"{key}_rel_err"] < 2e-2, key
            assert m[f"{key}_cublaslt_f8"] is False   # no cuBLASLt on a CPU: the probe reads the compiled HLO
            assert isinstance(probe["config"]["custom_calls"][key], list)
    assert probe["config"]["errors"] == {}
    sweep = results[result_files.result_name("fp8-skinny-sweep", "qwen2-7b-instruct-tiny", "cpu")]
    runs = {(r["variant"], tuple(r.get("cfg", ()))): r for r in sweep["config"]["runs"]}
    assert all(r["status"] in ("ok", "skipped") for r in runs.values()), runs
    for variant in ("bf16", "xla", "act", "fused"):   # the baselines run before the budget can stop anything
        assert runs[(variant, ())]["status"] == "ok" and runs[(variant, ())]["us"] > 0
        assert variant == "bf16" or runs[(variant, ())]["rel_err"] < 2e-2, variant   # against the float32 product
    default = [r for r in sweep["config"]["runs"] if r["variant"] == "skinny"][0]
    assert default["status"] == "ok" and default["rel_err"] < 2e-2   # the kernel against the float32 product
    sm = sweep["metrics"]
    assert abs(sm["skinny_qkv_m1_default_us"] - default["us"]) < 1e-2   # metrics keep 3 decimals
    assert sm["skinny_qkv_m1_best_us"] <= default["us"] + 1e-2
