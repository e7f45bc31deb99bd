"""Multi-LoRA serving through the whole engine, against PEFT on transformers (the oracle), on CPU.

Two adapters written by `peft` (rank 8 on q/v/down with lora_alpha 16; rank 16 rsLoRA on all seven projections)
and the base model, mixed in one batch: each row's greedy tokens equal PeftModel's with that row's adapter, and the
log-probabilities of those tokens match within float32 tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest

from qwenjax import LLM, LoRARequest, SamplingParams
from tests.conftest import SMALL_ENGINE
from tests.lora_adapters import ALL_SEVEN, peft_greedy, peft_logprobs, peft_model, write_adapter

NEW = 8
LENGTHS = [5, 17, 33, 9, 40, 16]


@pytest.fixture(scope="module")
def adapters(untied_gqa2, tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    a = write_adapter(untied_gqa2, d / "a", r=8, alpha=16, targets=("q_proj", "v_proj", "down_proj"), seed=1)
    b = write_adapter(untied_gqa2, d / "b", r=16, alpha=8, targets=ALL_SEVEN, seed=2, use_rslora=True)
    return {"a": LoRARequest("a", 1, str(a)), "b": LoRARequest("b", 2, str(b))}


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(5)
    return [list(map(int, rng.integers(0, 512, n))) for n in LENGTHS]


@pytest.fixture(scope="module")
def oracle(untied_gqa2, adapters, prompts):
    """name -> (PEFT model, greedy tokens of every prompt); None is the base model."""
    out = {}
    for name in (None, "a", "b"):
        model = peft_model(untied_gqa2, None if name is None else adapters[name].lora_path)
        out[name] = (model, peft_greedy(model, prompts, NEW))
    return out


GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True, logprobs=0)
MIX = ["a", "b", None, "a", "b", None]


def _llm(path, **kw):
    return LLM(str(path), **{**SMALL_ENGINE, "enable_lora": True, "max_loras": 2, "max_lora_rank": 16, **kw})


def test_mixed_batch_equals_peft(untied_gqa2, adapters, prompts, oracle):
    llm = _llm(untied_gqa2)
    reqs = [None if m is None else adapters[m] for m in MIX]
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY, lora_request=reqs, use_tqdm=False)
    for i, (m, out) in enumerate(zip(MIX, outs)):
        model, tokens = oracle[m]
        got = out.outputs[0].token_ids
        assert got == tokens[i], f"row {i} (adapter {m})"
        ours = [lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, got)]
        np.testing.assert_allclose(ours, peft_logprobs(model, prompts[i], got), atol=2e-4, rtol=1e-4)
    # the adapters really change the output: each differs from the base model somewhere
    assert oracle["a"][1] != oracle[None][1] and oracle["b"][1] != oracle[None][1]
    engine = llm.llm_engine
    assert engine.stats.max_decode_batch == 6  # all six decoded together, three adapters in one batch
    assert engine.blocks.num_free == engine.blocks.num_pages
    assert engine.lora.slots.num_swaps == 0
    engine.lora.slots.check()
