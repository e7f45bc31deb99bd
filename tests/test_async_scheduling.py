"""Async scheduling (step N+1 dispatched before step N's tokens are read) changes when the host learns tokens, never
which tokens: every output equals the one-step-at-a-time engine's, stale rows are discarded, and every page returns.
"""

from __future__ import annotations

import pytest

from qwenjax import LLM, SamplingParams
from qwenjax.core.sequence import PENDING
from tests.conftest import SMALL_ENGINE

PROMPTS = ["Hello there, how are you", "Tell me a story about a dragon", "1 2 3 4 5 6", "x", "The capital of"]


def _params():
    return [
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=1.0, top_k=20, top_p=0.9, seed=11, max_tokens=20, repetition_penalty=1.3,
                       presence_penalty=0.5, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0.7, seed=5, n=2, max_tokens=9, frequency_penalty=0.4, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=1),
        SamplingParams(temperature=0.9, seed=3, max_tokens=30, stop=[" the", "e"], min_tokens=2),
    ]


@pytest.fixture(scope="module")
def engines(real_vocab):
    return {mode: LLM(str(real_vocab), **SMALL_ENGINE, async_scheduling=mode) for mode in (True, False)}


def _summary(outs):
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason,
              None if c.logprobs is None else [{k: round(v.logprob, 4) for k, v in e.items()} for e in c.logprobs])
             for c in o.outputs] for o in outs]


def _all_pages_free(llm):
    blocks = llm.llm_engine.blocks
    return blocks.num_free == blocks.num_pages and not llm.llm_engine.has_unfinished_requests()


def test_async_outputs_equal_sync_outputs(engines):
    outs = {m: _summary(llm.generate(PROMPTS, _params(), use_tqdm=False)) for m, llm in engines.items()}
    assert outs[True] == outs[False]
    assert all(_all_pages_free(llm) for llm in engines.values())


def test_async_equal_sync_under_preemption(real_vocab):
    # 8 pages of 16 tokens for 8 sequences of up to ~70 tokens: preemption by recompute must happen.
    kw = {**SMALL_ENGINE, "num_kv_pages": 8, "max_model_len": 80}
    prompts = [f"Count with me: {i} {i + 1} {i + 2}" for i in range(8)]
    p = SamplingParams(temperature=0.8, seed=9, max_tokens=60, ignore_eos=True, repetition_penalty=1.2)
    res = {}
    for mode in (True, False):
        llm = LLM(str(real_vocab), **kw, async_scheduling=mode)
        res[mode] = _summary(llm.generate(prompts, p, use_tqdm=False))
        assert llm.llm_engine.scheduler.num_preemptions > 0
        assert _all_pages_free(llm)
    assert res[True] == res[False]


def test_no_step_is_spent_past_the_length_limit(engines):
    for llm in engines.values():
        eng = llm.llm_engine
        before = eng.stats.steps
        out = llm.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True), use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 5
        assert eng.stats.steps - before == 5  # 1 prefill + 4 decodes: the pending 5th token ends it, no 6th step


def test_stop_token_ends_in_time_and_stale_row_is_dropped(engines):
    greedy = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    ref = engines[False].generate(["Tell me a story about a dragon"], greedy, use_tqdm=False)[0].outputs[0].token_ids
    stop_id = ref[3]
    first = ref.index(stop_id)
    p = SamplingParams(temperature=0.0, max_tokens=10, stop_token_ids=[stop_id])
    for llm in engines.values():
        before = llm.llm_engine.stats.steps
        c = llm.generate(["Tell me a story about a dragon"], p, use_tqdm=False)[0].outputs[0]
        assert c.token_ids == ref[:first + 1] and c.finish_reason == "stop" and c.stop_reason == stop_id
        assert _all_pages_free(llm)
        steps = llm.llm_engine.stats.steps - before
        # Async computes one extra (discarded) row after the stop token; sync stops on it.
        assert steps == first + 1 + (1 if llm.llm_engine.args.async_scheduling else 0)


def test_streamed_outputs_never_show_a_placeholder_and_abort_in_flight_frees_pages(engines):
    llm = engines[True]
    eng = llm.llm_engine
    eng.final_only = False
    try:
        p = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
        eng.add_request("a", "Hello there, how are you", p)
        eng.add_request("b", "Tell me a story about a dragon", p)
        seen = []
        for _ in range(4):
            seen += eng.step()
        assert eng._in_flight is not None  # a step is on the device while its predecessor's tokens were read
        eng.abort_request("a")
        assert "a" not in eng.requests
        while eng.has_unfinished_requests():
            seen += eng.step()
        assert all(t != PENDING for o in seen for c in o.outputs for t in c.token_ids)
        final_b = [o for o in seen if o.request_id == "b" and o.finished][0].outputs[0].token_ids
        alone = engines[False].generate(["Tell me a story about a dragon"], p, use_tqdm=False)[0]
        assert final_b == alone.outputs[0].token_ids
        assert eng.blocks.num_free == eng.blocks.num_pages
        # The last step in flight holds only rows of ended sequences; the next step() discards it and goes on.
        eng.step()
        assert eng._in_flight is None
    finally:
        eng.final_only = True


def test_async_scheduling_flag_reaches_the_server():
    from server.__main__ import engine_args, make_parser

    assert engine_args(make_parser().parse_args([])).async_scheduling is True
    assert engine_args(make_parser().parse_args(["--async-scheduling", "false"])).async_scheduling is False
    assert engine_args(make_parser().parse_args(["--scheduling-policy", "priority"])).scheduling_policy == "priority"


def test_engine_start_freezes_the_gc_heap(engines):
    import gc

    assert gc.get_freeze_count() > 0  # start-up objects are out of the cyclic GC's full collections
