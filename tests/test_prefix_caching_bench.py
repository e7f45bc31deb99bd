"""benchmarks/prefix_caching.py on CPU: a tiny scale of the prefix-caching workload end to end (the tiny model's
config, random weights) and the shape of its result file. The figures mean nothing on CPU, so no speed is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_prefix_caching_benchmark_smoke(tmp_path):
    res, out = tmp_path / "results", tmp_path / "out"
    cmd = [sys.executable, str(REPO / "benchmarks" / "prefix_caching.py"), "--model", "tiny", "--scale", "0.05",
           "--skip-warmup", "--ceilings", "small", "--results-dir", str(res), "--out", str(out)]
    env = dict(os.environ, JAX_PLATFORMS="cpu", QWENJAX_COMMIT="smoke-test")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    files = list(res.glob("*.json"))
    assert len(files) == 1 and files[0].name.startswith("prefix-caching-tiny-cpu-")
    assert [p.name for p in out.glob("*.json")] == [files[0].name]
    r = json.loads(files[0].read_text())
    assert r["benchmark"] == "prefix-caching" and r["model"] == "tiny" and r["commit"] == "smoke-test"
    m, c = r["metrics"], r["config"]
    for run in ("cached", "uncached"):
        for k in ("ttft_ms_median", "ttft_ms_p50", "ttft_ms_mean", "tpot_ms_mean", "output_tok_s"):
            assert isinstance(m[f"{k}_{run}"], float) and m[f"{k}_{run}"] > 0, (k, run)
    # 10 requests of 51 shared + 3 own tokens, 8 req/s: the first computes the prefix, the later ones find its 3 full
    # pages (all 9 of them unless a prefill ran past the next arrival on a loaded machine).
    assert (c["num_requests"], c["prefix_len"], c["suffix_len"], c["output_len"]) == (10, 51, 3, 2)
    hits = m["prefix_cache_hits_cached"]
    assert 0 < hits <= 9 * 48 and hits % 48 == 0 and m["prefix_cache_queries_cached"] == 10 * 54
    assert m["prefix_cache_hits_uncached"] == 0 and m["prefix_cache_queries_uncached"] == 0
    assert abs(m["prefix_cache_hit_rate"] - hits / 540) < 1e-6
    assert c["runs"]["cached"]["engine"]["engine_args"]["enable_prefix_caching"] is True
    assert c["runs"]["uncached"]["engine"]["engine_args"]["enable_prefix_caching"] is False
    engine = c["runs"]["cached"]["engine"]
    assert engine["prefill_buckets"] == [[1, 6], [1, 54]]  # one-row steps over cached pages (the hits)
    assert [t for _, t in engine["packed_buckets"]][:2] == [16, 64]  # fresh rows: 6 and 54 rounded up to 16
    ratio = m["ttft_ms_p50_uncached"] / m["ttft_ms_p50_cached"]
    assert abs(m["speedup_vs_no_prefix_caching"] / ratio - 1) < 1e-3
    assert "== prefix-caching tiny" in proc.stdout and "speedup_vs_no_prefix_caching" in proc.stdout
