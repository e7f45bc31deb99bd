"""Issue 24: the n copies of a request fork from one prefill of its prompt (they share its pages, one device page
copy each at most) and decode together; a request's copies that do not fit go behind later requests, so a huge n
cannot hold a small request back (the bound: it starts within one round of the other's copies)."""

from __future__ import annotations

import pytest

from qwenjax import LLM, SamplingParams
from tests.conftest import SMALL_ENGINE

GOLDEN = 0x9E3779B9  # the engine's seed stride between copies (LLMEngine.add_request)


@pytest.fixture(scope="module")
def llm(real_vocab):
    return LLM(str(real_vocab), **SMALL_ENGINE)


def run(engine, *requests, between=None):
    """Adds requests (id, prompt ids, params) and steps until all finished; returns {id: final output} and the
    steps taken. `between`: (after how many steps, request) added later."""
    for rid, ids, params in requests:
        engine.add_request(rid, None, params, prompt_token_ids=ids)
    done, steps, added_at = {}, 0, None
    while engine.has_unfinished_requests() or (between and added_at is None):
        if between and added_at is None and steps == between[0]:
            rid, ids, params = between[1]
            engine.add_request(rid, None, params, prompt_token_ids=ids)
            added_at = steps
        for out in engine.step():
            if out.finished:
                done[out.request_id] = (out, steps + 1)
        steps += 1
    return done, steps, added_at


def pages_back(engine):
    b = engine.blocks
    b.check()
    return b.num_free == b.num_pages and not engine.has_unfinished_requests()


@pytest.mark.parametrize("prompt_len", [20, 17])  # the last prompt token mid-page (a page copy) / first in a page
def test_copies_fork_after_one_prefill_and_decode_together(llm, prompt_len):
    engine = llm.llm_engine
    engine.final_only = True
    llm.reset_prefix_cache()
    ids = [(7 * i + 3) % 500 + 10 for i in range(prompt_len)]
    params = SamplingParams(n=6, temperature=1.0, seed=11, max_tokens=5, repetition_penalty=1.3,
                            presence_penalty=0.5, ignore_eos=True)
    before = dict(vars(engine.stats))
    done, steps, _ = run(engine, ("many", ids, params))
    s = engine.stats
    assert s.prefill_steps - before["prefill_steps"] == 1  # one prefill: the parent's (no step per copy)
    assert s.max_decode_batch >= 6  # every copy decodes in the same step
    assert steps <= 1 + 5 + 2  # prefill, 5 decodes (the copies' first token rides the parent's second), slack
    outs = done["many"][0].outputs
    assert [len(c.token_ids) for c in outs] == [5] * 6
    assert pages_back(engine)
    # each copy is exactly the request it stands for: same prompt, its own seed, penalties over its own tokens
    for i, comp in enumerate(outs):
        llm.reset_prefix_cache()
        alone, _, _ = run(engine, (f"alone{i}", ids, params.clone(n=1, seed=(11 + GOLDEN * i) & 0xFFFFFFFF)))
        assert alone[f"alone{i}"][0].outputs[0].token_ids == comp.token_ids, i
    assert pages_back(engine)


def test_a_huge_n_does_not_hold_back_a_small_request(llm):
    """40 copies of max_tokens 1 on 8 slots (SMALL_ENGINE: max_num_seqs 8) need at least 5 rounds; a 1-token request
    arriving after the first step finishes within 4 steps of its arrival, before the big request does."""
    engine = llm.llm_engine
    engine.final_only = True
    big = SamplingParams(n=40, temperature=1.0, seed=3, max_tokens=1, ignore_eos=True)
    small = SamplingParams(temperature=0.0, max_tokens=1)
    done, _, added = run(engine, ("big", [5, 6, 7, 8, 9] * 4, big),
                             between=(1, ("small", [11, 12, 13], small)))
    assert added == 1
    small_done, big_done = done["small"][1], done["big"][1]
    assert small_done - added <= 4, (small_done, added, big_done)
    assert small_done < big_done
    assert len(done["big"][0].outputs) == 40 and all(len(c.token_ids) == 1 for c in done["big"][0].outputs)
    assert pages_back(engine)


def test_aborting_a_request_with_waiting_copies_returns_every_page(llm):
    engine = llm.llm_engine
    engine.final_only = True
    engine.add_request("abort-me", None, SamplingParams(n=30, temperature=1.0, max_tokens=8, ignore_eos=True),
                       prompt_token_ids=list(range(100, 140)))
    for _ in range(3):
        engine.step()
    assert engine.scheduler.waiting  # copies still wait for slots
    engine.abort_request("abort-me")
    while engine.has_unfinished_requests():
        engine.step()
    engine.step()  # async scheduling: the step in flight is read
    assert pages_back(engine)
