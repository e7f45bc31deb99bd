"""The benchmark scripts on CPU: a tiny scale of each workload end to end, and the shape of their result files.

One subprocess runs latency, throughput (fixed and random) and prefill with the built-in tiny model's config
(random weights) so imports and the tokenizer load once; the figures themselves mean nothing on CPU.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def bench_modules(*names: str) -> list:
    """benchmarks/ helper modules by name. benchmarks/ is not a package and its modules import each other by name, so
    they are imported with it on the path, which is taken off again after (no later import finds one by accident)."""
    path = str(REPO / "benchmarks")
    sys.path.insert(0, path)
    try:
        return [importlib.import_module(name) for name in names]
    finally:
        sys.path.remove(path)


floors, model_specs, peers, profiling, result_files = bench_modules("floors", "model_specs", "peers", "profiling",
                                                                    "result_files")

TOP_FIELDS = ("benchmark", "model", "device", "mesh", "commit", "config", "ceilings", "metrics", "peers")
METRICS = {
    "latency": ("tok_s", "ms_per_token", "mbu"),
    "throughput-fixed": ("output_tok_s", "total_tok_s", "mfu", "wall_s"),
    "throughput-random": ("output_tok_s", "total_tok_s", "mfu", "wall_s"),
    "prefill": ("tok_s", "mfu", "speedup_vs_dense_forward"),
    "structured": ("speedup_vs_unconstrained", "tpot_ratio_batch1", "grammar_compile_ms"),
    "dispatch": ("build_us", "pack_us", "enqueue_step_us", "enqueue_sample_us", "enqueue_noop_us", "roundtrip_us",
                 "pipelined_us"),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    res = tmp_path_factory.mktemp("results")
    out = tmp_path_factory.mktemp("out")
    common_args = ["--model", "tiny", "--results-dir", str(res), "--out", str(out), "--ceilings", "small"]
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO / 'benchmarks')!r})
        import latency, throughput, prefill, dispatch, structured
        a = {common_args!r}
        latency.main(a + ["--skip-warmup", "--prompt-len", "12", "--output-len", "6", "--repeats", "2", "--profile"])
        throughput.main(a + ["--skip-warmup", "--num-prompts", "6", "--prompt-len", "40", "--output-len", "5",
                             "--profile"])
        throughput.main(a + ["--skip-warmup", "--workload", "random", "--num-prompts", "5", "--prompt-range", "4,20",
                             "--output-range", "2,6", "--decode-buckets", "5", "--prefill-buckets", "20"])
        prefill.main(a + ["--skip-warmup", "--batch", "2", "--prompt-len", "24", "--repeats", "2"])
        dispatch.main(a + ["--skip-warmup", "--iters", "5", "--context", "64", "--tag", "smoke"])
        structured.main(a + ["--skip-warmup", "--batch", "3", "--prompt-len", "8", "--max-tokens", "40",
                             "--repeats", "1"])
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu", QWENJAX_COMMIT="smoke-test")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    files = {json.loads(p.read_text())["benchmark"]: json.loads(p.read_text()) for p in res.glob("*.json")}
    return {"files": files, "names": sorted(p.name for p in res.glob("*.json")),
            "out": sorted(p.name for p in out.glob("*.json")), "stdout": proc.stdout}


def test_every_benchmark_wrote_a_complete_result(results):
    files = results["files"]
    assert sorted(files) == sorted(METRICS)
    for bench, res in files.items():
        for f in TOP_FIELDS:
            assert f in res, (bench, f)
        assert res["model"] == "tiny" and res["mesh"] == 1 and res["commit"] == "smoke-test"
        assert res["device"].startswith("cpu")
        if bench != "dispatch":  # host timings: no ceilings
            assert res["ceilings"]["copy_tbps"] > 0 and res["ceilings"]["matmul_tflops"] > 0
        for m in METRICS[bench]:
            assert isinstance(res["metrics"][m], (int, float)) and res["metrics"][m] > 0, (bench, m)
        assert res["config"]["dtype"] == "bfloat16" and res["config"]["kv_cache_dtype"] == "auto"
        assert res["config"]["num_kv_pages"] > 0 and res["config"]["decode_buckets"]
    assert results["names"] == results["out"]  # --out got a copy of each
    for name in results["names"]:
        assert name.endswith(f"-tiny-cpu-{result_files.today()}.json")


def test_latency_over_a_mesh_of_two(tmp_path):
    """benchmarks/latency.py --mesh 2 on two CPU devices, single-step and multi-step decode: the sampler and the
    K-step program run with the vocabulary split over the mesh (worker/vocab_split.py)."""
    res = tmp_path / "res"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO / 'benchmarks')!r})
        import latency
        a = ["--model", "tiny", "--results-dir", {str(res)!r}, "--out", {str(tmp_path / 'out')!r}, "--ceilings",
             "small", "--mesh", "2", "--skip-warmup", "--prompt-len", "12", "--repeats", "1"]
        latency.main(a + ["--output-len", "6"])
        latency.main(a + ["--output-len", "8", "--num-scheduler-steps", "4"])
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu", QWENJAX_COMMIT="smoke-test",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    files = [json.loads(p.read_text()) for p in sorted(res.glob("*.json"))]
    assert len(files) == 2 and all(f["mesh"] == 2 and f["metrics"]["tok_s"] > 0 for f in files)
    assert sorted(f["config"]["engine_args"].get("num_scheduler_steps", 1) for f in files) == [1, 4]


def test_workload_details(results):
    files = results["files"]
    lat = files["latency"]
    assert (lat["config"]["batch"], lat["config"]["prompt_len"], lat["config"]["output_len"]) == (1, 12, 6)
    assert abs(lat["metrics"]["tok_s"] * lat["metrics"]["ms_per_token"] - 1000) < 1e-3 * 1000
    assert "device_busy" in lat["metrics"]  # None on CPU: the trace has no device plane
    assert "note" in lat["config"]["profile"]
    # The host's share of each step, from the engine's counters: dispatching it and waiting for its token.
    assert lat["metrics"]["dispatch_ms_per_step"] > 0 and lat["metrics"]["wait_ms_per_step"] >= 0
    assert all(r["dispatch_ms_per_step"] > 0 for r in lat["config"]["runs"])
    disp = files["dispatch"]
    assert disp["config"]["tag"] == "smoke" and "dispatch-smoke-tiny" in " ".join(results["names"])
    hlo = disp["config"]["decode_step_hlo"]
    assert hlo["fusion"] > 0  # the compiled decode step's entry computation was found and counted
    # a step (model + sampler) costs more than a no-op dispatch of the same arguments
    assert disp["metrics"]["roundtrip_us"] > disp["metrics"]["enqueue_noop_us"]
    fixed = files["throughput-fixed"]
    assert fixed["config"]["output_tokens"] == 6 * 5 and fixed["config"]["prompt_tokens"] == 6 * 40
    # The profiled repeat runs the timed run's workload: the same steps, from a cold prefix cache (the prompts'
    # full blocks, cached by the timed run, would otherwise make each prompt a one-row context step).
    timed, profiled = fixed["config"]["engine_stats"], fixed["config"]["profile"]["engine_stats"]
    assert {k: profiled[k] for k in ("steps", "prefill_steps", "decode_steps", "prefix_cache_hits")} == \
        {k: timed[k] for k in ("steps", "prefill_steps", "decode_steps", "prefix_cache_hits")}
    rnd = files["throughput-random"]
    assert rnd["config"]["num_requests"] == 5 and 5 * 2 <= rnd["config"]["output_tokens"] <= 5 * 6
    pre = files["prefill"]
    assert pre["metrics"]["dense_token_agreement"] >= 0.5  # same weights, same prompts: the same greedy token
    assert "prefill tiny" in results["stdout"] and "throughput-fixed tiny" in results["stdout"]


def test_floors_match_benchmarks_md():
    cfg = model_specs.model_config(model_specs.resolve_model("qwen2-7b-instruct"))
    assert abs(floors.decode_weight_bytes(cfg) / 1e9 - 14.14) < 0.01  # "14.14 GB of such weights"
    assert abs(floors.linear_flops_per_token(cfg) / 1e9 - 14.1) < 0.1  # "about 14 GFLOP per token"
    fl = floors.sum_flops([floors.request_flops(cfg, 512, 256)] * 512)
    assert abs(fl["linear"] / 1e15 - 5.56) < 0.05  # "about 393k tokens and 5.5 PFLOP"
    assert 0 < fl["attention"] < 0.1 * fl["linear"]
    tiny = model_specs.model_config(model_specs.resolve_model("qwen2-0.5b-instruct"))
    # Tied embeddings: the table is the lm_head, counted once.
    assert floors.decode_weight_bytes(tiny) == 2 * tiny.num_params()


def test_union_and_merge():
    assert profiling._union_ns([(0, 10), (5, 15), (20, 30), (21, 22)]) == 25
    res = {"benchmark": "throughput-fixed", "model": "m", "metrics": {"output_tok_s": 1000.0},
           "config": {"num_requests": 4, "prompt_len": 8, "output_len": 4, "seed": 0}, "peers": {}}
    peer = {"benchmark": "throughput-fixed", "model": "m", "device": "d", "commit": "c",
            "metrics": {"output_tok_s": 250.0}, "ceilings": {"copy_tbps": 1.0},
            "config": dict(res["config"], peer="transformers", peer_key="transformers_generate_batch",
                           compare_metric="output_tok_s", speedup_key="speedup_vs_transformers")}
    peers.merge_peer(res, peer)
    assert res["metrics"]["speedup_vs_transformers"] == 4.0
    assert res["peers"]["transformers_generate_batch"]["ceilings"] == {"copy_tbps": 1.0}


def test_device_busy_from_a_gpu_shaped_trace(tmp_path):
    """device_busy is the union of the GPU stream lines' events over wall; derived lines do not count."""
    from jax.profiler import ProfileData

    text = """
    planes { id: 1 name: "/device:GPU:0"
      lines { id: 1 name: "Stream #13(Kernel)" timestamp_ns: 1000
        events { metadata_id: 1 offset_ps: 0 duration_ps: 10000000 }
        events { metadata_id: 1 offset_ps: 5000000 duration_ps: 10000000 } }
      lines { id: 2 name: "Stream #14(MemcpyH2D)" timestamp_ns: 1000
        events { metadata_id: 2 offset_ps: 20000000 duration_ps: 5000000 } }
      lines { id: 3 name: "XLA Modules" timestamp_ns: 1000
        events { metadata_id: 3 offset_ps: 0 duration_ps: 30000000 } }
      event_metadata { key: 1 value { id: 1 name: "fusion_1" } }
      event_metadata { key: 2 value { id: 2 name: "MemcpyH2D" } }
      event_metadata { key: 3 value { id: 3 name: "jit_step" } } }
    """
    d = tmp_path / "plugins" / "profile" / "run"
    d.mkdir(parents=True)
    (d / "host.xplane.pb").write_bytes(ProfileData.text_proto_to_serialized_xspace(text))
    info = profiling.device_busy_from_trace(str(tmp_path), 40e-6)  # 40 us of wall
    assert info["device_busy"] == 0.5  # [0, 15) us of kernels + [20, 25) us of copy = 20 us
    assert info["kernel_busy"] == 0.375
    assert info["module_busy"] == 0.75
