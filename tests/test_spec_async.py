"""n-gram speculation under async scheduling (issue 27): while no row would get a proposal, steps are dispatched
async as without speculation; a match in a row's known tokens drains the in-flight step and the next step verifies.
Which steps verify changes how many tokens a step yields, never which: outputs equal speculation off and speculation
one step at a time (async_scheduling=False), through stops, length limits and aborts inside a drain; pages all return.
"""

from __future__ import annotations

import pytest

from qwenjax import LLM, SamplingParams
from qwenjax.config import EngineArgs
from tests.conftest import SMALL_ENGINE
from tests.test_spec_decode import _all_pages_back, replay_acceptance

# No repeats in the prompts: proposals appear only once the (looping) greedy outputs repeat themselves.
PROMPTS = [list(range(20, 32)), list(range(40, 47)), list(range(60, 80)), [3, 9, 4, 1, 7], list(range(90, 99))]


def _spec(lo: int = 2, hi: int = 3, k: int = 3) -> dict:
    return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": lo, "prompt_lookup_max": hi}


def _params():
    return [SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True),
            SamplingParams(temperature=0.0, max_tokens=23, ignore_eos=True, logprobs=2, repetition_penalty=1.1),
            SamplingParams(temperature=0.0, max_tokens=31, stop_token_ids=[9, 11]),
            SamplingParams(temperature=0.8, seed=7, max_tokens=35, ignore_eos=True, top_k=10),
            SamplingParams(temperature=0.0, max_tokens=17, ignore_eos=True, min_tokens=5)]


def _summary(outs):
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outs]


@pytest.fixture(scope="module")
def engines(untied_gqa2):
    return {"off": LLM(str(untied_gqa2), **SMALL_ENGINE),
            "async": LLM(str(untied_gqa2), **SMALL_ENGINE, speculative_config=_spec()),
            "sync": LLM(str(untied_gqa2), **SMALL_ENGINE, speculative_config=_spec(), async_scheduling=False)}


def _delta(st, before: dict) -> dict:
    return {k: getattr(st, k) - v for k, v in before.items()}


def _counters(st) -> dict:
    keys = ("steps", "async_steps", "spec_decode_verify_steps", "spec_decode_drains", "spec_decode_num_draft_tokens",
            "spec_decode_num_accepted_tokens")
    return {k: getattr(st, k) for k in keys}


def test_async_kept_for_ngram_only():
    assert EngineArgs(speculative_config=_spec()).async_scheduling
    assert not EngineArgs(speculative_config=_spec(), async_scheduling=False).async_scheduling
    assert not EngineArgs(speculative_config={"model": "x", "num_speculative_tokens": 2}).async_scheduling


def test_late_matches_identical_to_off_and_to_one_at_a_time(engines):
    """Proposals appear in some steps only: the async engine drains, verifies, and goes back to async steps; its
    outputs equal speculation off and speculation one step at a time, twice over (seeded rows repeat)."""
    ref = _summary(engines["off"].generate(prompt_token_ids=PROMPTS, sampling_params=_params(), use_tqdm=False))
    st = engines["async"].llm_engine.stats
    before = _counters(st)
    for _ in range(2):
        got = engines["async"].generate(prompt_token_ids=PROMPTS, sampling_params=_params(), use_tqdm=False)
        assert _summary(got) == ref
    d = _delta(st, before)
    assert d["async_steps"] > 0 and d["spec_decode_drains"] > 0 and d["spec_decode_verify_steps"] > 0
    assert d["spec_decode_num_accepted_tokens"] > 0
    sync = engines["sync"]
    s_before = _counters(sync.llm_engine.stats)
    assert _summary(sync.generate(prompt_token_ids=PROMPTS, sampling_params=_params(), use_tqdm=False)) == ref
    s = _delta(sync.llm_engine.stats, s_before)
    assert s["async_steps"] == 0 and s["spec_decode_drains"] == 0 and s["spec_decode_verify_steps"] > 0
    assert _all_pages_back(engines["async"]) and _all_pages_back(sync)


def test_no_match_runs_every_step_async(untied_gqa2, engines):
    """A lookup that never matches: not one drain or verify step, and the same steps (async ones included) as the
    engine without speculation."""
    nomatch = LLM(str(untied_gqa2), **SMALL_ENGINE, speculative_config=_spec(lo=64, hi=64))
    off = engines["off"]
    before = _counters(off.llm_engine.stats)
    ref = _summary(off.generate(prompt_token_ids=PROMPTS, sampling_params=_params(), use_tqdm=False))
    assert _summary(nomatch.generate(prompt_token_ids=PROMPTS, sampling_params=_params(), use_tqdm=False)) == ref
    got, want = _counters(nomatch.llm_engine.stats), _delta(off.llm_engine.stats, before)
    assert got["spec_decode_verify_steps"] == got["spec_decode_drains"] == 0
    assert got["async_steps"] == want["async_steps"] > 0 and got["steps"] == want["steps"]
    assert got["async_steps"] == got["steps"] - 1  # only the first step found nothing in flight
    assert _all_pages_back(nomatch)


def _drive(llm, prompts, params, on_drain=None):
    """Steps the engine by hand; on_drain(engine) runs inside each drain (after the decision, before the read)."""
    eng = llm.llm_engine
    for i, (p, sp) in enumerate(zip(prompts, params)):
        eng.add_request(f"r{i}", None, sp, prompt_token_ids=p)
    done, drains = {}, eng.stats.spec_decode_drains

    def dispatched():
        nonlocal drains
        if eng.stats.spec_decode_drains != drains:
            drains = eng.stats.spec_decode_drains
            if on_drain is not None:
                on_drain(eng)

    while eng.has_unfinished_requests():
        for out in eng.step(on_dispatch=dispatched):
            if out.finished:
                done[out.request_id] = out
    return done


def test_length_limits_and_abort_inside_a_drain(engines):
    """Many max_tokens, so that rows end inside accepted runs and on drained steps; a request aborted inside a
    drain ends with 'abort', the others get speculation off's outputs, and every page comes back."""
    prompts = PROMPTS * 2
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (3, 7, 12, 18, 26, 33, 9, 14,
                                                                                       21, 29)]
    ref = engines["off"].generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    ref = {f"r{i}": o.outputs[0].token_ids for i, o in enumerate(ref)}
    eng = engines["async"].llm_engine
    aborted = []

    def abort_one(e):
        live = sorted(rid for rid in e.requests if rid.startswith("r"))
        if live and not aborted:
            aborted.append(live[-1])
            e.abort_request(live[-1])

    drains = eng.stats.spec_decode_drains
    done = _drive(engines["async"], prompts, params, on_drain=abort_one)
    assert eng.stats.spec_decode_drains > drains and aborted
    assert set(done) == set(ref) - set(aborted)  # an aborted request reports nothing more
    for rid, out in done.items():
        assert (out.outputs[0].token_ids, out.outputs[0].finish_reason) == (ref[rid], "length")
    assert _all_pages_back(engines["async"])


def test_stop_strings_with_async_speculation(real_vocab):
    """Stop strings cut inside accepted runs and drained steps exactly where the engine without speculation does."""
    prompts = ["one two three one two three one two", "Hello there, how are you", "a b a b a b a b"]
    off = LLM(str(real_vocab), **SMALL_ENGINE)
    base = off.generate(prompts, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True), use_tqdm=False)
    # The tiny model repeats one token: its text n times first appears at output n (inside accepted runs).
    texts = [o.outputs[0].text for o in base]
    assert all(t == t[:len(t) // 40] * 40 for t in texts)
    stops = [[t[:len(t) // 40 * n]] for t, n in zip(texts, (13, 22, 30))]
    params = [SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop=s) for s in stops]
    ref = _summary(off.generate(prompts, params, use_tqdm=False))
    assert [len(o[0][0]) for o in ref] == [13, 22, 30] and all(o[0][2] == "stop" for o in ref)
    spec = LLM(str(real_vocab), **SMALL_ENGINE, speculative_config=_spec(lo=1, hi=3))
    assert _summary(spec.generate(prompts, params, use_tqdm=False)) == ref
    st = spec.llm_engine.stats
    assert st.async_steps > 0 and st.spec_decode_verify_steps > 0
    assert _all_pages_back(spec)


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_acceptance_counters_replayed(engines, mode):
    """vLLM's spec-decode counters equal a replay of the engine's states over the reference output: drains before
    verify steps with async scheduling, every proposal verified at once without."""
    prompt = [11, 12, 13, 11, 12, 13, 11, 12]
    p = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    ref = engines["off"].generate(prompt_token_ids=[prompt], sampling_params=p, use_tqdm=False)[0].outputs[0].token_ids
    st = engines[mode].llm_engine.stats
    keys = ("spec_decode_verify_steps", "spec_decode_num_drafts", "spec_decode_num_draft_tokens",
            "spec_decode_num_accepted_tokens")
    before, per_pos = [getattr(st, k) for k in keys], list(st.spec_decode_num_accepted_tokens_per_pos)
    out = engines[mode].generate(prompt_token_ids=[prompt], sampling_params=p, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ref
    *want, want_pos = replay_acceptance(prompt, ref, 3, 2, 3, async_scheduling=mode == "async")
    assert want[3] > 0 and [getattr(st, k) - b for k, b in zip(keys, before)] == want
    assert [a - b for a, b in zip(st.spec_decode_num_accepted_tokens_per_pos, per_pos)] == want_pos
    assert _all_pages_back(engines[mode])
