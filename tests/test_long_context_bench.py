"""benchmarks/long_context.py on CPU: two tiny contexts end to end (the tiny model's config with YaRN x4, random
weights, a 1,024-token step budget so the longer prompt takes two chunks) and the shape of its result file. The
figures mean nothing on CPU, so no speed is asserted; what is asserted: every per-context metric, the FLOPs the MFU
counts (attention included), the dense forward run where allowed and skipped with its reason where not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_long_context_benchmark_smoke(tmp_path):
    res, out = tmp_path / "results", tmp_path / "out"
    cmd = [sys.executable, str(REPO / "benchmarks" / "long_context.py"), "--model", "tiny", "--contexts", "600,1100",
           "--output-len", "4", "--repeats", "1", "--max-num-batched-tokens", "1024", "--dense-max-context", "700",
           "--ceilings", "small", "--skip-warmup", "--results-dir", str(res), "--out", str(out)]
    env = dict(os.environ, JAX_PLATFORMS="cpu", QWENJAX_COMMIT="smoke-test")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    files = list(res.glob("*.json"))
    assert len(files) == 1 and files[0].name.startswith("long-context-tiny-cpu-")
    assert [p.name for p in out.glob("*.json")] == [files[0].name]
    r = json.loads(files[0].read_text())
    assert r["benchmark"] == "long-context" and r["model"] == "tiny" and r["commit"] == "smoke-test"
    m, c = r["metrics"], r["config"]
    assert c["hf_overrides"]["rope_scaling"] == {"type": "yarn", "factor": 4.0,
                                                 "original_max_position_embeddings": 2048}
    assert c["max_model_len"] == 1104 and c["prefill_chunk"] == 1024 and c["prompt_lens"] == [596, 1096]
    for t in ("600", "1100"):
        for k in ("prefill_tok_s", "ttft_ms", "mfu", "ms_per_token", "decode_mbu", "attention_tflops",
                  "attention_speedup_vs_cudnn"):
            assert isinstance(m[f"{k}_{t}"], float) and m[f"{k}_{t}"] > 0, (k, t)
    assert isinstance(m["prefill_speedup_vs_dense_600"], float) and "prefill_speedup_vs_dense_1100" not in m
    short, long = c["cases"]
    assert short["dense_forward"]["token_agreement"] in (0.0, 1.0) and short["dense_forward"]["ms"] > 0
    assert "dense-max-context 700" in long["dense_forward"]["skipped"]
    # The longer prompt ran as two prefill steps (1,024 then 72 tokens), then its 3 decode steps.
    assert long["engine_steps"][0]["prefill_steps"] == 2 and long["engine_steps"][0]["decode_steps"] == 3
    # MFU's FLOPs: 2 x non-embedding params a token plus causal attention, 2 x N x P^2 x H a layer (tiny: 2 layers,
    # 4 heads of 16).
    for case in (short, long):
        P = case["prompt_len"]
        assert case["flops"]["attention"] == 2 * 2 * 4 * P * P * 16
        assert case["flops"]["total"] == case["flops"]["linear"] + case["flops"]["attention"]
    assert abs(m["prefill_tok_s_1100"] - 1096 / (m["ttft_ms_1100"] / 1e3)) < 1e-3 * m["prefill_tok_s_1100"]
