"""benchmarks/spec_decode.py and latency.py --speculative-config on CPU: a tiny shape end to end (the tiny model's
config, random weights) and the shape of their result files. The figures mean nothing on CPU, so no speed is
asserted; what is asserted is that every figure the issue asks for is there, that the table follows from the measured
step costs, that the n-gram run really speculated and the no-match run never proposed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_spec_decode_benchmark_smoke(tmp_path):
    res, out = tmp_path / "results", tmp_path / "out"
    common = ["--model", "tiny", "--ceilings", "small", "--skip-warmup", "--results-dir", str(res), "--out", str(out)]
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO / 'benchmarks')!r})
        import latency, spec_decode
        a = {common!r}
        spec_decode.main(a + ["--batches", "1,3", "--ks", "1,2", "--iters", "2", "--context", "24",
                              "--prompt-len", "12", "--output-len", "16", "--measure-k", "2", "--draft-model",
                              "tiny", "--profile", "--profile-dir", {str(tmp_path / 'traces')!r}])
        latency.main(a + ["--prompt-len", "12", "--output-len", "16", "--repeats", "1",
                          "--speculative-config", '{{"method": "ngram", "num_speculative_tokens": 2, '
                          '"prompt_lookup_min": 1, "prompt_lookup_max": 2}}'])
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu", QWENJAX_COMMIT="smoke-test")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    files = {p.name: json.loads(p.read_text()) for p in res.glob("*.json")}
    assert sorted(p.name for p in out.glob("*.json")) == sorted(files)
    spec = next(r for n, r in files.items() if n.startswith("spec_decode-tiny-cpu-"))
    lat = next(r for n, r in files.items() if n.startswith("latency-spec-tiny-cpu-"))
    m, c = spec["metrics"], spec["config"]
    for b in (1, 3):
        assert m[f"decode_ms_b{b}"] > 0
        for k in (1, 2):
            assert m[f"verify_ms_b{b}_k{k}"] > 0
            assert abs(m[f"verify_over_decode_b{b}_k{k}"] - m[f"verify_ms_b{b}_k{k}"] / m[f"decode_ms_b{b}"]) < 1e-3
        for run in ("off", "ngram", "nomatch", "draft"):
            assert m[f"tok_s_{run}_b{b}"] > 0
        for run in ("ngram", "draft"):
            assert m[f"draft_tokens_{run}_b{b}"] > 0 and 0 <= m[f"acceptance_{run}_b{b}"] <= 1
        assert m[f"draft_tokens_nomatch_b{b}"] == 0
        assert m[f"draft_decode_ms_b{b}"] > 0
        assert abs(m[f"speedup_ngram_b{b}"] - m[f"tok_s_ngram_b{b}"] / m[f"tok_s_off_b{b}"]) < 1e-3 * \
            m[f"speedup_ngram_b{b}"]
    for b in (1, 3):  # the traced decode and verify (k = --measure-k) steps; CPU traces have no device plane
        for name in ("decode", "verify_k2"):
            prof = c[f"profile_{name}_b{b}"]
            assert prof["wall_ms_per_step"] > 0 and "no device plane" in prof["note"], prof
    assert "profile_verify_k1_b1" not in c
    rows = c["speedup_table"]
    assert {(r["batch"], r["k"], r["rate"]) for r in rows} == {(b, k, a) for b in (1, 3) for k in (1, 2)
                                                               for a in (0.5, 0.7, 0.9)}
    r = next(r for r in rows if (r["batch"], r["k"], r["rate"]) == (3, 2, 0.7))
    assert abs(r["tokens_per_step"] - (1 + 0.7 + 0.49)) < 1e-9
    assert abs(r["speedup"] - r["tokens_per_step"] * m["decode_ms_b3"] / m["verify_ms_b3_k2"]) < 1e-3 * r["speedup"]
    # BENCHMARKS.md's names, for k = --measure-k (2 here)
    r1 = next(r for r in rows if (r["batch"], r["k"], r["rate"]) == (1, 2, 0.7))
    assert abs(m["projected_speedup_a07"] - r1["speedup"]) < 1e-4 * r1["speedup"]  # the result file rounds
    for b in (1, 3):
        assert m[f"verify_cost_k2_b{b}"] == m[f"verify_over_decode_b{b}_k2"]
        ratio = m[f"tok_s_off_b{b}"] / m[f"tok_s_nomatch_b{b}"]
        assert abs(m[f"ngram_nomatch_slowdown_b{b}"] - ratio) < 1e-4 * ratio
    assert c["draft_model"] == "tiny"
    assert "speedup over speculation off" in proc.stdout
    assert lat["config"]["speculative_config"]["num_speculative_tokens"] == 2
    assert lat["metrics"]["spec_verify_steps"] > 0 and 0 <= lat["metrics"]["spec_acceptance_rate"] <= 1
