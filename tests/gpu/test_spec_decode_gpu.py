"""Speculative decoding on the GPU (`pytest tests/gpu --gpu`; deselected elsewhere): the verify step attends its
k + 1 positions a row through the verify kernel (pallas_kernels/paged_verify_attention.py; never the jnp reference
nor a prefill kernel), and greedy tokens with n-gram speculation equal those of plain decoding on the same GPU
(float32, no TF32)."""

from __future__ import annotations

import dataclasses

import jax
import pytest

from qwenjax import LLM, SamplingParams
from qwenjax.worker import packing
from qwenjax.worker.sampler import WARMUP_MODES, build_tensors
from qwenjax.worker.spec_verify import build_verify_input
from tests.gpu.test_engine_gpu import CONFIG, ENGINE, model_dir  # noqa: F401 (model_dir: a fixture)

pytestmark = pytest.mark.gpu
SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}


def test_verify_step_attends_through_the_kernels(model_dir):  # noqa: F811
    llm = LLM(model_dir, dtype="bfloat16", **ENGINE, speculative_config=SPEC)
    runner = llm.llm_engine.runner
    for b in llm.llm_engine.scheduler_config.decode_buckets:
        inp, d, n = build_verify_input([], [], rows=b, num_positions=5, page_size=runner.page_size,
                                       num_pages=runner.num_pages, max_pages_per_seq=runner.block_table_width,
                                       scratch_slot=runner.scratch_slot)
        tensors = build_tensors([], num_rows=5 * b, vocab_size=runner.vocab_size, with_history=False)
        i_buf, f_buf, layout = packing.pack((inp, tensors, d, n))
        with jax.set_mesh(runner.mesh):
            hlo = runner._verify.lower(runner._param_leaves, runner.kv_cache, runner.penalties, runner.last_tokens,
                                       i_buf, f_buf, layout=layout,
                                       mode=dataclasses.replace(WARMUP_MODES[0], penalties=False)).compile().as_text()
        calls = sum("__gpu$xla.gpu.triton" in line and "qwenjax_paged_verify" in line for line in hlo.splitlines())
        others = sum(("__gpu$xla.gpu.triton" in line and "qwenjax_paged_prefill" in line)
                     or 'custom_call_target="mosaic_gpu' in line for line in hlo.splitlines())
        assert (calls, others) == (CONFIG["num_hidden_layers"], 0), f"verify bucket B={b}: {calls} verify kernel " \
            f"calls, {others} prefill kernel calls"


def test_gpu_greedy_tokens_with_and_without_speculation(model_dir):  # noqa: F811
    jax.config.update("jax_default_matmul_precision", "highest")  # no TF32: float32 on both sides
    prompts = [[5, 6, 7, 8] * 4, [1, 2, 3] * 5, list(range(100, 140)), [9] * 12]
    p = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    ref = LLM(model_dir, dtype="float32", **ENGINE).generate(prompt_token_ids=prompts, sampling_params=p,
                                                             use_tqdm=False)
    llm = LLM(model_dir, dtype="float32", **ENGINE, speculative_config=SPEC)
    out = llm.generate(prompt_token_ids=prompts, sampling_params=p, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in out] == [o.outputs[0].token_ids for o in ref]
    st = llm.llm_engine.stats
    assert st.spec_decode_num_accepted_tokens > 0
    assert llm.llm_engine.blocks.num_free == llm.llm_engine.blocks.num_pages
