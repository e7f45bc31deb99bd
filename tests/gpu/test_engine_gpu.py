"""GPU-only checks, run on the device machine with `pytest tests/gpu --gpu` (deselected elsewhere).

- every decode bucket's compiled step contains the Pallas paged-attention kernel (no silent jnp fallback), and the
  fused RoPE + K/V page-write kernel once a layer (no apply_rope / scatter kernels left);
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
import jax.numpy as jnp
import numpy as np
import pytest

from qwenjax import LLM, SamplingParams
from qwenjax.layers import attention
from qwenjax.layers.packed_routing import aligned_slots
from qwenjax.worker import packing
from qwenjax.worker.model_runner import dummy_input

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]
# skip_warmup: each test compiles only the buckets it lowers or runs (the warm-up compiled them all, per engine).
ENGINE = dict(max_model_len=512, max_num_seqs=64, decode_buckets=(1, 8, 64), prefill_token_buckets=(128, 512),
              num_kv_pages=256, load_format="dummy", skip_warmup=True)
# A small Qwen2 with head_dim 64 (the kernel's), random weights from a fixed seed: threefry gives the same values
# on every backend, so the CPU and GPU engines hold identical weights. A 4096-token vocabulary (ids past it are never
# sampled; the packaged tokenizer still decodes them): at Qwen2's 152k, compiling the float32 steps and sampler on
# both backends took minutes a test.
CONFIG = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 256, "intermediate_size": 512,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 4096,
          "max_position_embeddings": 1024, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
          "tie_word_embeddings": True, "torch_dtype": "float32"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpu-model")
    (d / "config.json").write_text(json.dumps(CONFIG))
    return str(d)


@pytest.fixture(scope="module")
def bf16_llm(model_dir):
    """One bf16 engine for the tests that lower its buckets."""
    return LLM(model_dir, dtype="bfloat16", **ENGINE)


def _kernel_in(hlo: str) -> bool:
    """Pallas' Triton lowering emits a custom call with this target (XLA's own Triton GEMM fusions do not)."""
    return "__gpu$xla.gpu.triton" in hlo


def test_kernel_in_every_decode_bucket(bf16_llm):
    llm = bf16_llm
    runner = llm.llm_engine.runner
    sc = llm.llm_engine.scheduler_config
    for b in sc.decode_buckets:
        inp = dummy_input(b, 1, runner.num_pages, runner.page_size, runner.block_table_width, runner.scratch_slot)
        i_buf, f_buf, layout = packing.pack(inp)
        with jax.set_mesh(runner.mesh):
            hlo = runner._step.lower(runner._param_leaves, runner.kv_cache, runner.penalties, runner.last_tokens,
                                     i_buf, f_buf,
                                     has_context=False, layout=layout).compile().as_text()
        calls = sorted({line.split("custom_call_target=")[1].split(",")[0] for line in hlo.splitlines()
                        if "custom_call_target=" in line})
        assert _kernel_in(hlo), f"decode bucket {b}: no Pallas kernel in the compiled step; custom calls: {calls}"
        # The fused residual add + RMSNorm: two a layer (the first layer's input norm has no add; the final norm does).
        norms = sum(_kernel_in(line) and "qwenjax_add_rms_norm" in line for line in hlo.splitlines())
        assert norms == 2 * CONFIG["num_hidden_layers"], f"decode bucket {b}: {norms} add_rms_norm kernels"
        ropes = _count(hlo, "qwenjax_rope_kv_write")
        assert ropes == CONFIG["num_hidden_layers"], f"decode bucket {b}: {ropes} rope_kv_write kernels"


def _count(hlo: str, name: str) -> int:
    """Pallas custom calls of the kernel named `name` in a compiled module's text."""
    return sum(_kernel_in(line) and name in line for line in hlo.splitlines())


def test_gpu_tokens_equal_cpu_tokens(model_dir):
    jax.config.update("jax_default_matmul_precision", "highest")  # no TF32: float32 on both sides
    prompts = [[1, 2, 3, 4, 5], list(range(100, 140))]
    p = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    # Both prompts start together (a prefill step, never a mixed one): chunked prefill off spares the CPU side
    # compiling the mixed buckets.
    engine = {**ENGINE, "enable_chunked_prefill": False}
    gpu = LLM(model_dir, dtype="float32", **engine).generate(prompt_token_ids=prompts, sampling_params=p,
                                                             use_tqdm=False)
    code = ("import json,sys,jax; jax.config.update('jax_default_matmul_precision', 'highest'); "
            "from qwenjax import LLM, SamplingParams; "
            f"o = LLM({model_dir!r}, dtype='float32', **{engine!r}).generate(prompt_token_ids={prompts!r}, "
            "sampling_params=SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False); "
            "print(json.dumps([x.outputs[0].token_ids for x in o]))")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    cpu = json.loads(out.stdout.strip().splitlines()[-1])
    assert [o.outputs[0].token_ids for o in gpu] == cpu
    assert jax.default_backend() == "gpu"


def test_prefill_kernel_in_every_packed_context_and_mixed_bucket(bf16_llm):
    """Packed prefill, context-prefill and mixed steps attend through the Pallas prefill kernel (a mixed step also
    runs the decode kernel, a packed step with room for a long row the Hopper kernel too): one Pallas custom call per
    layer and kernel, never the jnp reference."""
    llm = bf16_llm
    runner = llm.llm_engine.runner
    sc = llm.llm_engine.scheduler_config
    layers = CONFIG["num_hidden_layers"]
    shapes = [(r, t, 0, False) for r, t in sc.packed_buckets]
    shapes += [(1, q, 0, True) for _, q in sc.prefill_buckets]
    shapes += [(b, q, d, True) for d, b, q in sc.mixed_buckets]
    assert any(d for _, _, d, _ in shapes), "no mixed buckets: chunked prefill should be on by default"
    assert len(sc.packed_buckets) >= 2
    for b, q, d, ctx in shapes:
        inp = dummy_input(b, q, runner.num_pages, runner.page_size, runner.block_table_width, runner.scratch_slot,
                          has_context=ctx, decode_rows=d)
        i_buf, f_buf, layout = packing.pack(inp)
        with jax.set_mesh(runner.mesh):
            hlo = runner._step.lower(runner._param_leaves, runner.kv_cache, runner.penalties, runner.last_tokens,
                                     i_buf, f_buf, has_context=ctx, layout=layout).compile().as_text()
        n = sum(_kernel_in(line) and "qwenjax_paged" in line for line in hlo.splitlines())
        hopper = sum('custom_call_target="mosaic_gpu' in line for line in hlo.splitlines())
        # Context and mixed steps attend their chunk with the Hopper (Mosaic GPU) kernel where it applies; under
        # QWENJAX_PREFILL_KERNEL=routed, packed steps with room for a long row route those rows to it and keep the
        # Triton kernel for the others (by default packed steps take the Triton kernel alone).
        picked = attention.prefill_kernel(jnp.bfloat16, runner.kv_cache[0][0].dtype,
                                          CONFIG["hidden_size"] // CONFIG["num_attention_heads"], runner.page_size,
                                          CONFIG["num_attention_heads"] // CONFIG["num_key_value_heads"]) == "hopper"
        routed = (not ctx and picked and aligned_slots(q) > 0
                  and os.environ.get(attention.PREFILL_KERNEL_ENV, "auto") == "routed")
        want_hopper = (ctx and picked) or routed
        assert hopper == (layers if want_hopper else 0), f"bucket (D={d}, B={b}, Q={q}, context={ctx}): {hopper} " \
            f"Mosaic GPU attention calls (Hopper kernel expected: {want_hopper})"
        assert n + hopper == layers * (2 if d or routed else 1), f"bucket (D={d}, B={b}, Q={q}, context={ctx}): " \
            f"{n} Pallas Triton + {hopper} Mosaic GPU attention calls for {layers} layers"
        # RoPE + page writes: the fused kernel where rope_and_write picks it (attention reads the pages alone).
        fused = attention.fused_rope_write(inp.meta, has_context=ctx, head_dim=CONFIG["hidden_size"] // 4)
        ropes = _count(hlo, "qwenjax_rope_kv_write")
        assert ropes == (layers if fused else 0), f"bucket (D={d}, B={b}, Q={q}, context={ctx}): {ropes} " \
            f"rope_kv_write kernels (fused: {fused})"


MIXED_ENGINE = dict(max_model_len=256, max_num_seqs=8, decode_buckets=(8,), prefill_token_buckets=(32,),
                    max_num_batched_tokens=64, num_kv_pages=128, load_format="dummy", skip_warmup=True)
_STAGGERED = """
import json, jax
jax.config.update('jax_default_matmul_precision', 'highest')
from qwenjax import SamplingParams
from qwenjax.config import EngineArgs
from qwenjax.engine.llm_engine import LLMEngine
eng = LLMEngine(EngineArgs(model={model!r}, dtype='float32', **{engine!r}))
prompts = [list(range(1, 6)), list(range(200, 300)), list(range(400, 417))]  # the 100-token one takes 4 chunks
p = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=0)
done, pending = {{}}, list(enumerate(prompts))
while pending or eng.has_unfinished_requests():
    if pending:
        i, ids = pending.pop(0)
        eng.add_request(str(i), None, p, prompt_token_ids=ids)
    for _ in range(2 if pending else 1):
        for out in eng.step():
            if out.finished:
                c = out.outputs[0]
                done[out.request_id] = (c.token_ids, [e[t].logprob for t, e in zip(c.token_ids, c.logprobs)])
print(json.dumps({{"tokens": [done[str(i)][0] for i in range(3)], "logprobs": [done[str(i)][1] for i in range(3)],
                  "mixed": eng.stats.mixed_steps}}))
"""


def test_gpu_mixed_steps_equal_cpu_tokens(model_dir):
    """Requests arriving while others decode (chunks of a long prompt and late arrivals in mixed steps, through the
    Pallas prefill and decode kernels) give the CPU engine's greedy tokens and their logprobs (float32 on both
    sides; random weights repeat tokens, so the logprobs are what shows an attention difference)."""
    code = _STAGGERED.format(model=model_dir, engine=MIXED_ENGINE)
    runs = {}
    for platform in ("gpu", "cpu"):
        env = {**os.environ, **({"JAX_PLATFORMS": "cpu"} if platform == "cpu" else {})}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                             cwd=ROOT)
        assert out.returncode == 0, out.stderr[-2000:]
        runs[platform] = json.loads(out.stdout.strip().splitlines()[-1])
    assert runs["gpu"]["mixed"] >= 4 and runs["gpu"]["mixed"] == runs["cpu"]["mixed"], runs
    assert runs["gpu"]["tokens"] == runs["cpu"]["tokens"], runs
    np.testing.assert_allclose(np.concatenate(runs["gpu"]["logprobs"]), np.concatenate(runs["cpu"]["logprobs"]),
                               atol=1e-3)


def test_n_copies_fork_on_the_gpu(model_dir):
    """n > 1 copies start from one prefill of the prompt (ModelRunner.fork copies, on the device, the page that holds
    the prompt's positions before its last token): each seeded copy's tokens equal the CPU engine's, and every page
    comes back."""
    jax.config.update("jax_default_matmul_precision", "highest")  # no TF32: float32 on both sides
    prompt = list(range(200, 221))  # 21 tokens: the last one sits on page 1 after positions 16..19, so it is copied
    engine = {**ENGINE, "enable_prefix_caching": False}
    sampled = dict(n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    llm = LLM(model_dir, dtype="float32", **engine)
    gpu = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(**sampled), use_tqdm=False)[0]
    code = ("import json,sys,jax; jax.config.update('jax_default_matmul_precision', 'highest'); "
            "from qwenjax import LLM, SamplingParams; "
            f"o = LLM({model_dir!r}, dtype='float32', **{engine!r}).generate(prompt_token_ids=[{prompt!r}], "
            f"sampling_params=SamplingParams(**{sampled!r}), use_tqdm=False)[0]; "
            "print(json.dumps([c.token_ids for c in o.outputs]))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True,
                         text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert [c.token_ids for c in gpu.outputs] == json.loads(out.stdout.strip().splitlines()[-1])
    assert len({tuple(c.token_ids) for c in gpu.outputs}) > 1  # the copies sample apart
    blocks = llm.llm_engine.blocks
    assert blocks.num_free == blocks.num_pages
