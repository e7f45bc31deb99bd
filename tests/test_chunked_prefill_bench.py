"""benchmarks/chunked_prefill.py on CPU: a tiny scale of the chunked-prefill workload end to end (the tiny model's
config, random weights) and the shape of its result file. The figures mean nothing on CPU, so no speed is asserted;
what is asserted is that the chunked run really mixed prompt chunks into decode steps and the unchunked one never did.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_chunked_prefill_benchmark_smoke(tmp_path):
    res, out = tmp_path / "results", tmp_path / "out"
    # A 1000-token long prompt against the 512-token mixed chunk: two chunks ride along with the streams.
    cmd = [sys.executable, str(REPO / "benchmarks" / "chunked_prefill.py"), "--model", "tiny", "--scale", "0.05",
           "--long-prompt-len", "1000", "--ceilings", "small", "--skip-warmup", "--results-dir", str(res),
           "--out", str(out)]
    env = dict(os.environ, JAX_PLATFORMS="cpu", QWENJAX_COMMIT="smoke-test")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    files = list(res.glob("*.json"))
    assert len(files) == 1 and files[0].name.startswith("chunked-prefill-tiny-cpu-")
    assert [p.name for p in out.glob("*.json")] == [files[0].name]
    r = json.loads(files[0].read_text())
    assert r["benchmark"] == "chunked-prefill" and r["model"] == "tiny" and r["commit"] == "smoke-test"
    m, c = r["metrics"], r["config"]
    for run in ("chunked", "unchunked"):
        for k in ("itl_ms_mean", "itl_ms_p50", "itl_ms_p99", "long_ttft_ms_mean"):
            assert isinstance(m[f"{k}_{run}"], float) and m[f"{k}_{run}"] > 0, (k, run)
    assert (c["streams"], c["num_long"], c["long_prompt_len"]) == (2, 1, 1000)
    assert m["mixed_steps_unchunked"] == 0 and m["mixed_steps_chunked"] >= 2
    assert abs(m["speedup_vs_no_chunked_prefill"] - m["itl_ms_p99_unchunked"] / m["itl_ms_p99_chunked"]) < 1e-3
    assert c["runs"]["chunked"]["engine"]["engine_args"]["enable_chunked_prefill"] is True
    assert c["runs"]["unchunked"]["engine"]["engine_args"]["enable_chunked_prefill"] is False
