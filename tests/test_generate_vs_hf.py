"""Greedy generation through the whole engine (scheduler, pages, sampler) equals transformers' generate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qwenjax import LLM, SamplingParams
from tests.checkpoints import hf_greedy, hf_model
from tests.conftest import SMALL_ENGINE

NEW = 12
LENGTHS = [1, 3, 15, 16, 17, 31, 40, 70]  # 8 prompts around page and bucket edges


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(11)
    return [list(map(int, rng.integers(0, 512, n))) for n in LENGTHS]


@pytest.fixture(scope="module")
def hf_tokens(untied_gqa2, prompts):
    return hf_greedy(hf_model(untied_gqa2), prompts, NEW)


GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)


def _generate(path, prompts, **overrides):
    llm = LLM(str(path), **{**SMALL_ENGINE, **overrides})
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY, use_tqdm=False)
    return llm, [o.outputs[0].token_ids for o in outs]


def test_batched_greedy_equals_hf(untied_gqa2, prompts, hf_tokens):
    llm, ours = _generate(untied_gqa2, prompts)
    assert ours == hf_tokens
    assert llm.llm_engine.stats.max_decode_batch == 8  # all eight really decoded together
    assert llm.llm_engine.blocks.num_free == llm.llm_engine.blocks.num_pages


def test_one_sequence_at_a_time_equals_hf(untied_gqa2, prompts, hf_tokens):
    llm, ours = _generate(untied_gqa2, prompts, max_num_seqs=1, decode_buckets=(1,))
    assert ours == hf_tokens
    assert llm.llm_engine.stats.max_decode_batch == 1


def test_multi_step_decode_equals_hf(untied_gqa2, prompts, hf_tokens):
    """num_scheduler_steps=4: 12 tokens = the prefill's 1, two 4-step dispatches, then 3 single steps."""
    llm, ours = _generate(untied_gqa2, prompts, num_scheduler_steps=4)
    assert ours == hf_tokens
    assert llm.llm_engine.stats.multi_steps == 2
    assert llm.llm_engine.blocks.num_free == llm.llm_engine.blocks.num_pages


def test_multi_step_decode_under_preemption_equals_hf(untied_gqa2, prompts, hf_tokens):
    llm, ours = _generate(untied_gqa2, prompts, num_kv_pages=10, max_model_len=96, num_scheduler_steps=4)
    assert llm.llm_engine.scheduler.num_preemptions > 0
    assert llm.llm_engine.stats.multi_steps > 0
    assert ours == hf_tokens


def test_preemption_keeps_tokens_identical(untied_gqa2, prompts, hf_tokens):
    # 10 pages of 16 tokens for 8 sequences needing up to 6 pages each: preemption by recompute must happen.
    llm, ours = _generate(untied_gqa2, prompts, num_kv_pages=10, max_model_len=96)
    assert llm.llm_engine.scheduler.num_preemptions > 0
    assert ours == hf_tokens
    assert llm.llm_engine.blocks.num_free == 10


def test_repetition_penalty_equals_hf(untied_gqa2, prompts):
    """The device-resident penalty history (prompt mask + output counts) matches HF's logits processor, including
    after preemption, where the history is rebuilt by the recompute."""
    ref = hf_greedy(hf_model(untied_gqa2), prompts, NEW, repetition_penalty=1.8)
    params = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True, repetition_penalty=1.8)
    for overrides in ({}, {"num_kv_pages": 10, "max_model_len": 96}):
        llm = LLM(str(untied_gqa2), **{**SMALL_ENGINE, **overrides})
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == ref
    assert llm.llm_engine.scheduler.num_preemptions > 0


def test_prompt_logprobs_equal_hf(untied_gqa2, prompts):
    p = prompts[5]  # 31 tokens
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(untied_gqa2)(torch.tensor([p])).logits[0], -1).numpy()
    llm = LLM(str(untied_gqa2), **SMALL_ENGINE)
    out = llm.generate(prompt_token_ids=[p], sampling_params=SamplingParams(max_tokens=1, prompt_logprobs=3),
                       use_tqdm=False)[0]
    lps = out.prompt_logprobs
    assert len(lps) == len(p) and lps[0] is None
    for i, entry in enumerate(lps[1:]):
        tok = p[i + 1]
        assert entry[tok].logprob == pytest.approx(float(ref[i, tok]), abs=2e-4)
        top = np.argsort(-ref[i])[:3]
        assert all(int(t) in entry for t in top)
        assert entry[tok].rank == 1 + int((ref[i] > ref[i, tok] + 1e-6).sum())
