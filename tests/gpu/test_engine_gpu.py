"""GPU-only checks, run on the device machine with `pytest tests/gpu --gpu` (deselected elsewhere).

- every decode bucket's compiled step contains the Pallas paged-attention kernel (no silent jnp fallback);
- the engine on one GPU (mesh 1) gives the same greedy tokens as on CPU for the same checkpoint (bf16 on both
  sides would differ by rounding, so both run float32 here).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from qwenjax import LLM, SamplingParams
from qwenjax.runner import dummy_input

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]
ENGINE = dict(max_model_len=512, max_num_seqs=64, decode_buckets=(1, 8, 64), prefill_token_buckets=(128, 512),
              num_kv_pages=256)


def _kernel_in(hlo: str) -> bool:
    """Pallas' Triton lowering emits a custom call with this target (XLA's own Triton GEMM fusions do not)."""
    return "__gpu$xla.gpu.triton" in hlo


def test_kernel_in_every_decode_bucket():
    llm = LLM(None, dtype="bfloat16", **ENGINE)
    runner = llm.llm_engine.runner
    sc = llm.llm_engine.scheduler_config
    for b in sc.decode_buckets:
        inp = dummy_input(b, 1, runner.num_pages, runner.page_size, runner.kv_cache_width, runner.scratch_slot)
        hlo = runner._step.lower(runner.params, runner.kv_cache, runner.penalties, inp,
                                 has_context=False).compile().as_text()
        calls = sorted({line.split("custom_call_target=")[1].split(",")[0] for line in hlo.splitlines()
                        if "custom_call_target=" in line})
        assert _kernel_in(hlo), f"decode bucket {b}: no Pallas kernel in the compiled step; custom calls: {calls}"


def test_gpu_tokens_equal_cpu_tokens(tmp_path):
    prompts = [[1, 2, 3, 4, 5], list(range(100, 140))]
    p = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    gpu = LLM(None, dtype="float32", **ENGINE).generate(prompt_token_ids=prompts, sampling_params=p, use_tqdm=False)
    code = ("import json,sys; from qwenjax import LLM, SamplingParams; "
            f"o = LLM(None, dtype='float32', **{ENGINE!r}).generate(prompt_token_ids={prompts!r}, "
            "sampling_params=SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False); "
            "print(json.dumps([x.outputs[0].token_ids for x in o]))")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    cpu = json.loads(out.stdout.strip().splitlines()[-1])
    assert [o.outputs[0].token_ids for o in gpu] == cpu
    assert jax.default_backend() == "gpu"
