"""Chunked prefill: prompt chunks and new requests ride along with running decodes in mixed steps, and nothing about
the outputs changes. Greedy tokens equal transformers' generate (the oracle), and seeded sampling with penalties
equals the engine with chunked prefill off, for requests that arrive while others decode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qwenjax import SamplingParams
from qwenjax.config import EngineArgs
from qwenjax.engine.llm_engine import LLMEngine
from tests.checkpoints import hf_model
from tests.conftest import SMALL_ENGINE

# max_model_len 256 and a 32-token largest prefill Q: a 150-token prompt takes 5 chunks.
ENGINE = {**SMALL_ENGINE, "max_model_len": 256, "prefill_token_buckets": (16, 32), "max_num_batched_tokens": 64}
LENGTHS = [5, 150, 17, 40, 3]  # arrival order; each arrives after the previous one has run two steps


def _engine(path, **kw):
    return LLMEngine(EngineArgs(model=str(path), **{**ENGINE, **kw}))


def _staggered(engine, prompts, params):
    """Adds request i after two more steps, then runs to the end; returns {request id: CompletionOutputs}."""
    done, pending = {}, list(enumerate(prompts))
    while pending or engine.has_unfinished_requests():
        if pending:
            i, p = pending.pop(0)
            engine.add_request(str(i), None, params[i], prompt_token_ids=p)
        for _ in range(2 if pending else 1):
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.outputs
    assert all(engine.blocks.ref_count(p) == 0 for p in range(engine.blocks.num_pages))
    return done


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(5)
    return [list(map(int, rng.integers(0, 512, n))) for n in LENGTHS]


def test_greedy_equals_hf_with_mixed_steps(untied_gqa2, prompts):
    new = 10
    engine = _engine(untied_gqa2)
    greedy = [SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)] * len(prompts)
    done = _staggered(engine, prompts, greedy)
    assert engine.stats.mixed_steps >= 6  # the long prompt's chunks and the later arrivals joined decodes
    model = hf_model(untied_gqa2)
    with torch.no_grad():
        for i, p in enumerate(prompts):
            # The reference recomputes the whole sequence for every token (no cache of its own). At one step of
            # these prompts transformers' cached `generate` picks another token than its own full forward, whose top
            # two logits are 0.016 apart there; the engine agrees with the full forward, the stricter oracle.
            ref = list(p)
            for _ in range(new):
                ref.append(int(model(torch.tensor([ref])).logits[0, -1].argmax()))
            assert done[str(i)][0].token_ids == ref[len(p):], f"request {i} ({len(p)} prompt tokens)"


def test_sampling_with_penalties_equals_chunked_prefill_off(untied_gqa2, prompts):
    params = [SamplingParams(temperature=0.9, top_k=40, seed=100 + i, max_tokens=12, ignore_eos=True,
                             repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.2, logprobs=1)
              for i in range(len(prompts))]
    results, mixed = {}, {}
    for on in (True, False):
        engine = _engine(untied_gqa2, enable_chunked_prefill=on)
        done = _staggered(engine, prompts, params)
        results[on] = {k: [(c.token_ids, [e[t].logprob for t, e in zip(c.token_ids, c.logprobs)]) for c in v]
                       for k, v in done.items()}
        mixed[on] = engine.stats.mixed_steps
    assert mixed[True] >= 6 and mixed[False] == 0
    assert results[True].keys() == results[False].keys()
    for k, outs in results[True].items():  # the same tokens; logprobs within float32 rounding (the steps differ)
        for (tokens, lps), (tokens_off, lps_off) in zip(outs, results[False][k]):
            assert tokens == tokens_off, f"request {k}"
            np.testing.assert_allclose(lps, lps_off, atol=1e-5, err_msg=f"request {k}")
