"""GPU-only checks of the MoE experts (`pytest tests/gpu/test_moe_gpu.py --gpu`, deselected elsewhere).

- the Pallas grouped matmul equals jax.lax.ragged_dot at Qwen2-57B-A14B's expert shapes (64 experts, D 3584,
  F 2560), bf16, for decode-sized and prefill-sized row counts, with empty groups and rows past the groups;
- a compiled MoE block runs the kernel (three Triton custom calls) and its temporary memory stays far below the
  dense [E, rows, D] expansion that XLA makes of ragged_dot on CUDA;
- a small Qwen2-MoE engine gives the same greedy tokens on the GPU as on the CPU (float32 on both sides).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]
E, D, F, K = 64, 3584, 2560, 8
CONFIG = {"architectures": ["Qwen2MoeForCausalLM"], "hidden_size": 256, "intermediate_size": 512,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 4096,
          "max_position_embeddings": 1024, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
          "tie_word_embeddings": False, "torch_dtype": "float32", "num_experts": 16, "num_experts_per_tok": 4,
          "moe_intermediate_size": 128, "shared_expert_intermediate_size": 256, "norm_topk_prob": False}
# Few buckets, compiled on first use: the CPU side compiles the same steps in a subprocess.
ENGINE = dict(max_model_len=256, max_num_seqs=4, max_num_batched_tokens=128, decode_buckets=(4,),
              prefill_token_buckets=(64,), num_kv_pages=64, load_format="dummy", skip_warmup=True)


@pytest.mark.parametrize("tokens", [1, 64, 1024])
def test_kernel_equals_ragged_dot_at_57b_shapes(tokens):
    from pallas_kernels.grouped_matmul import grouped_matmul

    rng = np.random.default_rng(tokens)
    m = tokens * K
    sizes = np.bincount(rng.integers(0, E, m - m // 8), minlength=E).astype(np.int32)  # 1/8 of the rows past
    kx, kw = jax.random.split(jax.random.key(tokens))  # made on the device: 587M weights, seconds in numpy
    x = jax.random.normal(kx, (m, D), jnp.bfloat16)
    w = 0.02 * jax.random.normal(kw, (E, D, F), jnp.bfloat16)
    gs = jnp.asarray(sizes)
    out = np.asarray(jax.jit(grouped_matmul)(x, w, gs), np.float32)
    ref = np.asarray(jax.lax.ragged_dot(x, w, gs, preferred_element_type=jnp.float32))
    np.testing.assert_allclose(out, ref, atol=2e-2 * np.abs(ref).max())
    assert not out[sizes.sum():].any()


def test_moe_block_runs_the_kernel_in_bounded_memory():
    from flax import nnx

    from qwenjax.config import ModelConfig
    from qwenjax.models.qwen2_moe import Qwen2MoeSparseMoeBlock

    cfg = ModelConfig.from_file(str(ROOT / "qwenjax/assets/configs/qwen2-57b-a14b-instruct.json"))
    make = lambda: Qwen2MoeSparseMoeBlock(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(nnx.eval_shape(make))
    T = 8192  # a prefill step's tokens: the dense expansion would need a 64 x 65536 x 3584 bf16 copy (30 GB)
    x = jax.ShapeDtypeStruct((T, cfg.hidden_size), jnp.bfloat16)
    compiled = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, x).compile()
    hlo = compiled.as_text()
    assert sum('custom_call_target="__gpu$xla.gpu.triton"' in line for line in hlo.splitlines()) == 3
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < 8 * T * K * cfg.hidden_size * 2, f"{temp / 2**30:.2f} GiB of temporaries"


def test_moe_gpu_tokens_equal_cpu_tokens(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    model_dir = str(tmp_path)
    from qwenjax import LLM, SamplingParams

    jax.config.update("jax_default_matmul_precision", "highest")  # no TF32: float32 on both sides
    prompts = [[1, 2, 3, 4, 5], list(range(100, 140))]
    p = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    gpu = LLM(model_dir, dtype="float32", **ENGINE).generate(prompt_token_ids=prompts, sampling_params=p,
                                                             use_tqdm=False)
    code = ("import json,sys,jax; jax.config.update('jax_default_matmul_precision', 'highest'); "
            "from qwenjax import LLM, SamplingParams; "
            f"o = LLM({model_dir!r}, dtype='float32', **{ENGINE!r}).generate(prompt_token_ids={prompts!r}, "
            "sampling_params=SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False); "
            "print(json.dumps([x.outputs[0].token_ids for x in o]))")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert [o.outputs[0].token_ids for o in gpu] == json.loads(out.stdout.strip().splitlines()[-1])
