"""benchmarks/lora.py and benchmarks/lora_kernel.py on CPU with the tiny model's shape: each runs end to end and
writes a complete result (the kernels in Pallas interpret mode; the figures mean nothing on CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(module: str, tmp_path: Path, args: list[str]) -> tuple[dict, str]:
    """benchmarks/<module>.py's main(args) in a CPU subprocess, writing into tmp_path: (its one result, stdout)."""
    res, out = tmp_path / "results", tmp_path / "out"
    args = ["--model", "tiny", "--results-dir", str(res), "--out", str(out), "--ceilings", "none", *args]
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO / 'benchmarks')!r})
        import {module}
        {module}.main({args!r})
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu", QWENJAX_COMMIT="smoke-test")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (path,) = res.glob("*.json")
    assert [p.name for p in out.glob("*.json")] == [path.name]
    return json.loads(path.read_text()), proc.stdout


def test_lora_benchmark_writes_its_result(tmp_path):
    result, stdout = _run("lora", tmp_path, ["--skip-warmup", "--num-prompts", "4", "--prompt-len", "24",
                                             "--output-len", "4", "--latency-prompt-len", "12", "--num-loras", "2",
                                             "--repeats", "1", "--profile", "--profile-dir",
                                             str(tmp_path / "traces")])
    assert result["benchmark"] == "lora"
    m = result["metrics"]
    for key in ("throughput_ratio", "latency_ratio", "base_output_tok_s", "lora_output_tok_s",
                "lora_engine_no_adapter_tok_s", "base_tpot_ms", "lora_tpot_ms"):
        assert m[key] is not None and m[key] > 0, key
    assert (m["speedup_vs_base"], m["latency_ratio_vs_base"]) == (m["throughput_ratio"], m["latency_ratio"])
    assert result["config"]["num_loras"] == 2 and result["config"]["engine_args"]["enable_lora"] is True
    assert result["config"]["tokens_per_run"] == 16
    assert "throughput_ratio (>= 0.85)" in stdout
    for name in ("base", "lora"):  # the throughput runs repeated under the profiler; CPU traces have no device plane
        prof = result["config"][f"profile_{name}"]
        assert prof["trace_dir"] == str(tmp_path / "traces" / name) and "device_busy not computed" in prof["note"], prof
        assert prof["engine_stats"]["steps"] > 0 and m[f"device_busy_{name}"] is None


def test_lora_benchmark_latency_only(tmp_path):
    """--latency-only: the batch-1 figures alone, engines sized for one request; --profile traces a batch-1 request
    of each kind; --tag names the variant's file."""
    result, stdout = _run("lora", tmp_path, ["--skip-warmup", "--output-len", "4", "--latency-prompt-len", "12",
                                             "--num-loras", "2", "--repeats", "1", "--latency-only", "--profile",
                                             "--tag", "fuse"])
    m, cfg = result["metrics"], result["config"]
    assert m["latency_ratio"] > 0 and m["base_tpot_ms"] > 0 and m["lora_tpot_ms"] > 0
    assert m["throughput_ratio"] is None and m["base_output_tok_s"] is None
    assert cfg["latency_only"] is True and cfg["tag"] == "fuse" and cfg["num_prompts"] == 1
    assert cfg["engine_args"]["max_num_seqs"] == 1 and cfg["engine_args"]["decode_buckets"] == [1]
    assert set(k for k in cfg if k.startswith("profile_")) == {"profile_b1_base", "profile_b1_lora"}
    assert cfg["profile_b1_lora"]["engine_stats"]["decode_steps"] > 0
    assert "latency_ratio (<= 1.1)" in stdout


def test_lora_kernel_benchmark_writes_its_result(tmp_path):
    result, _ = _run("lora_kernel", tmp_path, ["--rows", "3", "--num-loras", "2", "--repeats", "1", "--inner", "1",
                                               "--sweep", "--sweep-configs", "1"])
    assert result["benchmark"] == "lora-kernel"
    m, cfg = result["metrics"], result["config"]
    for impl in ("decode", "grouped", "dense"):
        assert m[f"step_ms_{impl}_t3"] > 0
        for group in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
            assert m[f"us_{impl}_{group}_t3"] > 0
            assert cfg["cases"][f"{group}_t3"][f"{impl}_rel_err"] < 2e-2, (impl, group)  # bfloat16 vs float32
    assert cfg["groups"]["qkv_proj"] == [64, 48, 128]  # tiny: D 64, 3 x rank 16, q 64 + 2 x kv 32
    assert [(s["group"], s["rows"]) for s in cfg["sweep"]] == [(g, 3) for g in cfg["groups"]]
    assert all("us" in r for s in cfg["sweep"] for r in s["results"])
