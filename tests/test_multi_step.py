"""Multi-step decode (num_scheduler_steps = K): K decode steps a dispatch change how often the host dispatches and
reads tokens, never which tokens: greedy and seeded outputs equal the one-step engine's (and HF's, greedy: tests/test_generate_vs_hf.py), stops and
length limits land exactly, pages all come back, and the loop updates the KV cache in place.
"""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest

from qwenjax import LLM, SamplingParams
from qwenjax.config import EngineArgs
from tests.conftest import SMALL_ENGINE

PROMPTS = ["Hello there, how are you", "Tell me a story about a dragon", "1 2 3 4 5 6", "x", "The capital of"]
K = 4


def _params():
    return [
        SamplingParams(temperature=0.0, max_tokens=13, ignore_eos=True),              # 13 = 1 + 3 x 4: no tail
        SamplingParams(temperature=1.0, top_k=20, seed=11, max_tokens=22, repetition_penalty=1.3,
                       presence_penalty=0.5, ignore_eos=True),                         # penalties from the device
        SamplingParams(temperature=0.7, seed=5, n=2, max_tokens=9, frequency_penalty=0.4, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=1),
        SamplingParams(temperature=0.9, seed=3, max_tokens=30, stop=[" the", "e"], min_tokens=2),
    ]


@pytest.fixture(scope="module")
def engines(real_vocab):
    return {k: LLM(str(real_vocab), **SMALL_ENGINE, num_scheduler_steps=k) for k in (1, K)}


def _summary(outs):
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outs]


def _all_pages_free(llm):
    blocks = llm.llm_engine.blocks
    return blocks.num_free == blocks.num_pages and not llm.llm_engine.has_unfinished_requests()


def test_multi_step_outputs_equal_single_step(engines):
    before = engines[K].llm_engine.stats.multi_steps
    outs = {k: _summary(llm.generate(PROMPTS, _params(), use_tqdm=False)) for k, llm in engines.items()}
    assert outs[K] == outs[1]
    assert engines[K].llm_engine.stats.multi_steps > before  # the K-step path ran
    assert engines[1].llm_engine.stats.multi_steps == 0
    assert all(_all_pages_free(llm) for llm in engines.values())


def test_lengths_and_step_counts(engines):
    """max_tokens = 1 + m*K + r: the prefill samples 1, then m K-step dispatches, then r single steps (a row with less
    than K outputs left never runs K steps: no token past its limit, no slot past max_model_len)."""
    eng = engines[K].llm_engine
    for max_tokens, multi, single in ((13, 3, 0), (15, 3, 2), (3, 0, 2)):
        s0, m0 = eng.stats.steps, eng.stats.multi_steps
        out = engines[K].generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
                                  use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == max_tokens
        assert eng.stats.multi_steps - m0 == multi
        assert eng.stats.steps - s0 == 1 + multi + single
    # up to max_model_len (128): the prompt's length leaves a number of outputs that K does not divide
    prompt = list(range(100, 100 + 61))
    p = SamplingParams(temperature=0.0, max_tokens=500, ignore_eos=True)
    outs = {k: llm.generate(prompt_token_ids=[prompt], sampling_params=p, use_tqdm=False)[0].outputs[0]
            for k, llm in engines.items()}
    assert len(outs[K].token_ids) == 128 - 61 and outs[K].finish_reason == "length"
    assert outs[K].token_ids == outs[1].token_ids
    assert _all_pages_free(engines[K])


def test_stop_inside_a_multi_step_dispatch(engines):
    """A stop token sampled at step k < K of a dispatch ends the sequence there: the dispatch's later tokens (and the
    next dispatch's, already on the device) are discarded and never reported."""
    greedy = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    ref = engines[1].generate(["Tell me a story about a dragon"], greedy, use_tqdm=False)[0].outputs[0].token_ids
    for pos in (2, 6, 7):  # inside the first and second K-step dispatches (outputs 1-4 and 5-8)
        stop_id = ref[pos]
        first = ref.index(stop_id)
        p = SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=[stop_id])
        c = engines[K].generate(["Tell me a story about a dragon"], p, use_tqdm=False)[0].outputs[0]
        assert c.token_ids == ref[:first + 1] and c.finish_reason == "stop" and c.stop_reason == stop_id
    assert _all_pages_free(engines[K])


def test_multi_step_program_updates_the_cache_in_place(engines):
    """The loop carries the KV cache: no copy of a cache-sized buffer in the compiled program (a copy per step
    would read and write the whole cache every token)."""
    eng = engines[K].llm_engine
    runner = eng.runner
    from qwenjax.engine.llm_engine import WARMUP_MODES
    from qwenjax.worker import packing, sampler
    from qwenjax.worker.model_runner import dummy_input

    b = eng.scheduler_config.decode_buckets[0]
    inp = dummy_input(b, 1, runner.num_pages, runner.page_size, eng.scheduler_config.max_pages_per_seq,
                      runner.scratch_slot)
    tensors = sampler.build_tensors([], num_rows=b, vocab_size=eng.model_config.vocab_size, with_history=False)
    i_buf, f_buf, layout = packing.pack((inp, tensors))
    with jax.set_mesh(runner.mesh):
        text = runner._decode_steps.lower(runner._param_leaves, runner.kv_cache, runner.penalties, runner.last_tokens,
                                          i_buf, f_buf, layout=layout, mode=WARMUP_MODES[0],
                                          num_steps=K).compile().as_text()
    pages = runner.kv_cache[0][0]
    shape = ",".join(map(str, pages.shape))
    assert re.search(rf"\[{shape}\]", text), "the cache's shape should appear in the program"
    copies = [ln for ln in text.splitlines() if re.search(rf"\[{shape}\]", ln) and re.search(r"\bcopy(-start)?\(", ln)]
    assert not copies, copies[:3]
    assert re.search(r"\bwhile\(", text)  # one loop, not K unrolled models


def test_num_scheduler_steps_validation():
    with pytest.raises(ValueError, match=r"num_scheduler_steps must be in \[1, 64\], got 0"):
        EngineArgs(num_scheduler_steps=0)
    missing = EngineArgs(num_scheduler_steps=4, num_processes=2).unsupported()
    assert any("num_scheduler_steps=4 with num_processes=2" in m for m in missing)


def test_logprobs_rows_fall_back_to_single_steps(engines):
    """Logprobs are not produced by the K-step program: a batch with such a row runs one step a dispatch, and its
    outputs equal the single-step engine's."""
    eng = engines[K].llm_engine
    m0 = eng.stats.multi_steps
    p = [SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True, logprobs=2),
         SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True)]
    outs = {k: llm.generate(PROMPTS[:2], p, use_tqdm=False) for k, llm in engines.items()}
    for a, b in zip(outs[K], outs[1]):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    lp = [[{t: round(v.logprob, 5) for t, v in e.items()} for e in o.outputs[0].logprobs] for o in (outs[K][0],
                                                                                                     outs[1][0])]
    assert lp[0] == lp[1]
    # once the logprobs row finished, the other one may take K steps; while both ran, none did
    assert eng.stats.multi_steps - m0 <= 1
    assert np.all([_all_pages_free(llm) for llm in engines.values()])


def test_prefix_cache_names_pages_by_known_tokens(engines):
    """A page filled by a K-step dispatch is named only once its tokens are read (before that they are placeholders on
    the host): a later prompt that continues the first one's output hits every full page of it."""
    llm = engines[K]
    blocks = llm.llm_engine.blocks
    prompt = list(range(300, 320))
    first = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(temperature=0.0, max_tokens=41,
                                                                                      ignore_eos=True),
                         use_tqdm=False)[0].outputs[0].token_ids
    again = prompt + first[:36]  # 56 tokens: its first 3 pages (48 tokens) are the first request's
    h0 = blocks.hit_tokens
    out = llm.generate(prompt_token_ids=[again], sampling_params=SamplingParams(temperature=0.0, max_tokens=5,
                                                                                  ignore_eos=True), use_tqdm=False)
    assert blocks.hit_tokens - h0 == 48
    assert out[0].outputs[0].token_ids == first[36:41]
