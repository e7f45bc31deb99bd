"""logit_bias, allowed_token_ids and bad_words offline (vLLM's SamplingParams fields; issue 25), against
transformers' logits on the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qwenjax import LLM, SamplingParams
from tests.checkpoints import hf_model
from tests.conftest import SMALL_ENGINE

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def llm(real_vocab):
    return LLM(str(real_vocab), **SMALL_ENGINE)


@pytest.fixture(scope="module")
def next_logits(real_vocab, llm):
    """transformers' logits for the token after PROMPT."""
    ids = llm.get_tokenizer().encode(PROMPT, add_special_tokens=False)
    with torch.no_grad():
        return hf_model(real_vocab)(torch.tensor([ids])).logits[0, -1].numpy().astype(np.float64)


def _first(llm, **kw):
    return llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=1, **kw))[0].outputs[0].token_ids[0]


def test_logit_bias_is_added_to_the_logits(llm, next_logits):
    order = np.argsort(-next_logits)
    best, second = int(order[0]), int(order[1])
    gap = next_logits[best] - next_logits[second]
    assert _first(llm) == best
    assert _first(llm, logit_bias={second: gap + 0.05}) == second  # added: just past the gap wins
    assert _first(llm, logit_bias={second: gap - 0.05}) == best  # just short of it does not
    assert _first(llm, logit_bias={best: -100}) == second
    assert _first(llm, logit_bias={str(second): 1e9}) == second  # JSON keys and out-of-range values: clamped to 100


def test_allowed_token_ids_restrict_every_token(llm, next_logits):
    allowed = [11, 220, 1879, 9707, 151643]
    assert _first(llm, allowed_token_ids=allowed) == allowed[int(np.argmax(next_logits[allowed]))]
    outs = llm.generate([PROMPT] * 4, [SamplingParams(temperature=1.0, seed=s, max_tokens=20, ignore_eos=True,
                                                      allowed_token_ids=allowed) for s in range(4)])
    seen = {t for o in outs for t in o.outputs[0].token_ids}
    assert seen <= set(allowed) and len(seen) > 1


def test_bad_words_never_appear(eos_chain):
    """The chain model's greedy output is ' one two three' then EOS: banning ' two three' (two tokens) lets ' two'
    through and bans ' three' right after it; banning 'one' bans its first token."""
    path, chain = eos_chain
    llm = LLM(str(path), **SMALL_ENGINE)
    greedy = SamplingParams(temperature=0.0, max_tokens=4)
    assert llm.generate(["hello"], greedy)[0].outputs[0].token_ids[:3] == chain
    out = llm.generate(["hello"], greedy.clone(bad_words=["two three"]))[0].outputs[0].token_ids
    assert out[:2] == chain[:2] and out[2] != chain[2]
    out = llm.generate(["hello"], greedy.clone(bad_words=["one"]))[0].outputs[0].token_ids
    assert out[0] != chain[0]


@pytest.mark.parametrize("kw, fragment", [
    ({"allowed_token_ids": []}, "allowed_token_ids must hold at least one token id"),
    ({"allowed_token_ids": [10**7]}, "allowed_token_ids must be token ids in [0, 151936)"),
    ({"logit_bias": {10**7: 1.0}}, "logit_bias must be token ids in [0, 151936)"),
    ({"logit_bias": {"x": 1.0}}, "logit_bias keys must be token ids"),
    ({"logit_bias": {1: float("nan")}}, "logit_bias values must be finite"),
    ({"logit_bias": {i: 1.0 for i in range(1025)}}, "logit_bias may hold at most 1024 entries, got 1025"),
    ({"bad_words": "word"}, "bad_words must be a list of strings"),
    ({"bad_words": [" "]}, "bad_words must be non-empty words"),
])
def test_bad_values_are_refused(llm, kw, fragment):
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        llm.generate([PROMPT], SamplingParams(**kw))
    blocks = llm.llm_engine.blocks
    assert blocks.num_free == blocks.num_pages
