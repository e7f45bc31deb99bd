"""Automatic prefix caching through the whole engine: greedy tokens equal with and without it, and equal to HF."""

from __future__ import annotations

import numpy as np
import pytest

from qwenjax import LLM, SamplingParams
from tests.checkpoints import hf_greedy, hf_model
from tests.conftest import SMALL_ENGINE

NEW = 10
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts():
    """A 50-token shared prefix (3 full pages of 16) with unique suffixes of 1 to 30 tokens, plus one unrelated."""
    rng = np.random.default_rng(7)
    prefix = list(map(int, rng.integers(0, 512, 50)))
    out = [prefix + list(map(int, rng.integers(0, 512, n))) for n in (1, 6, 14, 30)]
    out.append(prefix[:48])  # exactly 3 full pages, all cached after the first: its last page is recomputed
    out.append(list(map(int, rng.integers(0, 512, 20))))
    return out


@pytest.fixture(scope="module")
def hf_tokens(untied_gqa2, prompts):
    return hf_greedy(hf_model(untied_gqa2), prompts, NEW)


def _generate(llm, prompts, params=GREEDY):
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    return [[c.token_ids for c in o.outputs] for o in outs]


def test_prefix_caching_equals_hf_and_uncached(untied_gqa2, prompts, hf_tokens):
    plain = LLM(str(untied_gqa2), **SMALL_ENGINE, enable_prefix_caching=False)
    cached = LLM(str(untied_gqa2), **SMALL_ENGINE, enable_prefix_caching=True)
    want = [[t] for t in hf_tokens]
    assert _generate(plain, prompts) == want
    assert plain.llm_engine.stats.prefix_cache_hits == 0
    assert _generate(cached, prompts) == want
    stats = cached.llm_engine.stats
    # Prompts 2-4 find the prefix's 3 pages computed by prompt 1 in the same call; prompt 5 (the 48-token prefix
    # alone) takes 2, as its last token, hence its last page, must be computed.
    assert stats.prefix_cache_hits == 3 * 48 + 32
    assert stats.prefix_cache_queries == sum(len(p) for p in prompts)
    blocks = cached.llm_engine.blocks
    assert blocks.num_free == blocks.num_pages and blocks.num_cached_free > 0
    blocks.check()
    # A second call hits pages left cached by the first: every full page before each prompt's last token.
    before = stats.prefix_cache_hits
    assert _generate(cached, prompts) == want
    assert cached.llm_engine.stats.prefix_cache_hits - before == sum((len(p) - 1) // 16 * 16 for p in prompts)


def test_prefix_caching_under_preemption_and_eviction(untied_gqa2, prompts, hf_tokens):
    # 10 pages of 16 tokens for six sequences of up to 90 tokens: preemption, evictions and recomputes from hits.
    llm = LLM(str(untied_gqa2), **{**SMALL_ENGINE, "num_kv_pages": 10, "max_model_len": 96},
              enable_prefix_caching=True)
    assert _generate(llm, prompts) == [[t] for t in hf_tokens]
    eng = llm.llm_engine
    assert eng.scheduler.num_preemptions > 0 and eng.stats.prefix_cache_hits > 0 and eng.blocks.evictions > 0
    assert eng.blocks.num_free == 10
    eng.blocks.check()


def test_n_samples_share_the_prompt_pages(untied_gqa2, prompts):
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=NEW, n=3, ignore_eos=True)
    plain = LLM(str(untied_gqa2), **SMALL_ENGINE, enable_prefix_caching=False)
    cached = LLM(str(untied_gqa2), **SMALL_ENGINE, enable_prefix_caching=True)
    p = [prompts[3]]  # 80 tokens: 4 full pages shared by the 3 samples
    assert _generate(cached, p, params) == _generate(plain, p, params)
    # The copies fork from the first one's prompt pages (issue 24), with or without the cache: one prefill, no hits.
    for llm in (plain, cached):
        assert llm.llm_engine.stats.prefill_steps == 1 and llm.llm_engine.stats.prefix_cache_hits == 0


def test_priority_and_client_reach_the_scheduler(untied_gqa2, prompts):
    """One sequence at a time, so admission order is completion order: priority (lower first) decides it."""
    llm = LLM(str(untied_gqa2), **{**SMALL_ENGINE, "max_num_seqs": 1, "decode_buckets": (1,)},
              scheduling_policy="priority")
    assert llm.llm_engine.scheduler.policy.name == "priority"
    outs = llm.generate(prompt_token_ids=prompts[:4], sampling_params=GREEDY, priority=[3, 0, 2, 1], use_tqdm=False)
    firsts = [o.metrics.first_token_time for o in outs]
    assert sorted(range(4), key=firsts.__getitem__) == [1, 3, 2, 0]
    req = llm.llm_engine.add_request("c1", None, GREEDY, prompt_token_ids=prompts[5], client="tenant-a")
    assert req.seqs[0].client == "tenant-a"
    llm.llm_engine.abort_request("c1")


PENALIZED = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True, repetition_penalty=1.8)


@pytest.fixture(scope="module")
def hf_penalized(untied_gqa2, prompts):
    """HF's greedy generate with its repetition penalty (over prompt and output tokens, as vLLM's)."""
    return hf_greedy(hf_model(untied_gqa2), prompts, NEW, repetition_penalty=1.8)


def test_penalized_requests_hit_the_cache_and_still_see_the_whole_prompt(untied_gqa2, prompts, hf_penalized):
    """A row admitted with a prefix hit rebuilds its penalty history from the tokens it skips: HF's tokens with and
    without caching, and the hits counted (Qwen2-Instruct's generation_config asks repetition_penalty 1.05)."""
    want = [[t] for t in hf_penalized]
    for caching in (False, True):
        llm = LLM(str(untied_gqa2), **SMALL_ENGINE, enable_prefix_caching=caching)
        assert _generate(llm, prompts, PENALIZED) == want
        assert (llm.llm_engine.stats.prefix_cache_hits > 0) == caching
        assert _generate(llm, prompts, PENALIZED) == want  # the second call hits pages the first left cached


def test_penalties_with_hits_under_preemption(untied_gqa2, prompts):
    """Recomputed sequences re-enter through hits that cover output tokens too: those must count as outputs
    (frequency / presence penalties), the prompt's as prompt (repetition penalty). Same tokens as without caching."""
    p = SamplingParams(temperature=0.8, seed=3, max_tokens=40, ignore_eos=True, repetition_penalty=1.3,
                       presence_penalty=0.6, frequency_penalty=0.4)
    kw = {**SMALL_ENGINE, "num_kv_pages": 10, "max_model_len": 96}
    res = {}
    for caching in (False, True):
        llm = LLM(str(untied_gqa2), **kw, enable_prefix_caching=caching)
        res[caching] = _generate(llm, prompts, p)
        eng = llm.llm_engine
        assert eng.scheduler.num_preemptions > 0 and eng.blocks.num_free == 10
    assert res[True] == res[False]
    assert eng.stats.prefix_cache_hits > 0


def test_reset_prefix_cache_forgets_free_pages(untied_gqa2, prompts):
    llm = LLM(str(untied_gqa2), **SMALL_ENGINE, enable_prefix_caching=True)
    _generate(llm, prompts)
    stats = llm.llm_engine.stats
    assert llm.reset_prefix_cache() > 0
    before = stats.prefix_cache_hits
    _generate(llm, prompts[:1])  # its pages were cached by the first call; after the reset nothing is
    assert stats.prefix_cache_hits == before
    llm.llm_engine.blocks.check()
