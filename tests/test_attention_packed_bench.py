"""benchmarks/attention_packed.py on CPU: both kernels replaced by their jnp stand-ins (`--reference`), tiny cases;
the figures mean nothing here, the plumbing and the result file's shape are what is checked. The GPU run:
`bash benchmarks/gpu_campaign.sh attn-packed`."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_attention_packed_runs_on_cpu(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        bench = importlib.import_module("attention_packed")
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    result = bench.main(["--reference", "--cases", "tiny", "--sweep", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("attention-packed-*.json")
    assert json.loads(path.read_text())["metrics"] == result["metrics"]
    for field in ("benchmark", "model", "device", "mesh", "commit", "config", "ceilings", "metrics", "peers"):
        assert field in result
    mixed, short = result["cases"]
    # tiny-mixed: rows of 600 and 530 tokens take the Hopper stand-in, 40 and 1 the Triton one; same output
    assert (mixed["hopper_rows"], mixed["rows"], mixed["aligned_slots"]) == (2, 4, 1408)
    assert mixed["routed_max_abs_diff_vs_triton"] <= 1e-2
    assert {"routed", "triton", "hopper_aligned", "cudnn"} <= set(mixed)
    assert [(c["block_kv"], c["num_stages"], c["schedule_barrier"]) for c in mixed["sweep"]] == [(128, 3, True),
                                                                                              (128, 2, True)]
    assert all(c["us"] > 0 for c in mixed["sweep"])
    assert mixed["routed"]["speedup_vs_triton"] > 0 and mixed["routed"]["speedup_vs_cudnn"] > 0
    # tiny-short: no long row fits a step of 128 slots: the Triton kernel alone, as before
    assert short["aligned_slots"] == 0 and "routed" not in short and short["triton"]["speedup_vs_cudnn"] > 0
    assert result["metrics"]["routed_speedup_vs_triton_tiny-mixed"] == mixed["routed"]["speedup_vs_triton"]


def test_prefill_benchmark_records_the_prefill_kernel(tmp_path):
    """`prefill.py --prefill-kernel triton` (campaign stage prefill-triton-M, the before of prefill-M): the engine
    runs with QWENJAX_PREFILL_KERNEL=triton, the result says so and its file name carries -triton."""
    import os
    import subprocess

    script = (f"import sys; sys.path.insert(0, {str(REPO / 'benchmarks')!r}); import prefill; "
              f"prefill.main(['--model', 'tiny', '--results-dir', {str(tmp_path)!r}, '--ceilings', 'none', "
              "'--skip-warmup', '--batch', '2', '--prompt-len', '32', '--repeats', '1', '--prefill-kernel', 'triton'])")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    (path,) = tmp_path.glob("prefill-triton-tiny-*.json")
    result = json.loads(path.read_text())
    assert result["config"]["prefill_kernel"] == "triton" and result["metrics"]["tok_s"] > 0
