import copy
import dataclasses
import inspect
import pickle
import re

import pytest

from qwenjax.sampling_params import SamplingParams, SamplingType

QWEN2_GENERATION_CONFIG = {  # qwenjax/assets/qwen2-tokenizer/generation_config.json
    "bos_token_id": 151643,
    "pad_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
    "repetition_penalty": 1.05,
    "temperature": 0.7,
    "top_p": 0.8,
    "top_k": 20,
}


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert p.seed is None and p.stop == [] and p.stop_token_ids == []
    assert (p.max_tokens, p.min_tokens, p.logprobs, p.prompt_logprobs) == (16, 0, None, None)
    assert p.skip_special_tokens and p.spaces_between_special_tokens and p.detokenize
    assert not p.ignore_eos and not p.include_stop_str_in_output and p.priority == 0
    assert p.explicitly_set == frozenset()


def test_constructor_parameters_are_the_fields():
    params = list(inspect.signature(SamplingParams.__init__).parameters)[1:]
    assert params[-1] == "guided_decoding"  # vLLM's older name of structured_outputs: an alias, not a field
    assert params[:-1] == [f.name for f in dataclasses.fields(SamplingParams)]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n": 0}, "n must be at least 1, got 0."),
        ({"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2], got 2.5."),
        ({"frequency_penalty": -3}, "frequency_penalty must be in [-2, 2], got -3.0."),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be greater than zero, got 0.0."),
        ({"temperature": -1.0}, "temperature must be non-negative, got -1.0."),
        ({"temperature": float("nan")}, "temperature must be non-negative, got nan."),
        ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5."),
        ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0."),
        ({"top_k": -5}, "top_k must be -1 (disable), or at least 1, got -5."),
        ({"top_k": 2.5}, "top_k must be an integer, got 2.5."),
        ({"min_p": 1.1}, "min_p must be in [0, 1], got 1.1."),
        ({"max_tokens": 0}, "max_tokens must be at least 1, got 0."),
        ({"min_tokens": -1}, "min_tokens must be greater than or equal to 0, got -1."),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens must be less than or equal to max_tokens=4, got 5."),
        ({"logprobs": -1}, "logprobs must be non-negative, got -1."),
        ({"prompt_logprobs": -2}, "prompt_logprobs must be non-negative, got -2."),
        ({"temperature": 0.0, "n": 2}, "n must be 1 when using greedy sampling (temperature 0), got 2."),
        ({"stop": "x", "detokenize": False}, "stop strings need detokenize=True"),
        ({"stop": ["a", 3]}, "stop must be a string or a list of strings"),
        ({"stop_token_ids": [1, -2]}, "stop_token_ids must be non-negative token ids"),
        ({"seed": "7"}, "seed must be an integer, got '7'."),
        ({"ignore_eos": 1}, "ignore_eos must be True or False, got 1."),
    ],
)
def test_validation_messages(kwargs, message):
    with pytest.raises(ValueError) as err:
        SamplingParams(**kwargs)
    assert message in str(err.value)


def test_normalisation():
    p = SamplingParams(top_k=-1, stop="###", stop_token_ids=(7, 8), temperature=1, max_tokens=None)
    assert p.top_k == 0 and p.stop == ["###"] and p.stop_token_ids == [7, 8]
    assert isinstance(p.temperature, float) and p.max_tokens is None
    assert SamplingParams(top_k=0).top_k == 0


def test_greedy_clears_filters_and_sampling_type():
    g = SamplingParams(temperature=0.0, top_p=0.5, top_k=3, min_p=0.2, seed=1)
    assert g.is_greedy and g.sampling_type is SamplingType.GREEDY
    assert (g.top_p, g.top_k, g.min_p) == (1.0, 0, 0.0)
    assert SamplingParams(temperature=1e-6).is_greedy
    assert SamplingParams(seed=3).sampling_type is SamplingType.RANDOM_SEED
    assert SamplingParams().sampling_type is SamplingType.RANDOM


def test_frozen_repr_and_equality():
    p = SamplingParams(temperature=0.5, seed=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 1.0  # type: ignore[misc]
    assert repr(p).startswith("SamplingParams(n=1, presence_penalty=0.0,")
    assert "temperature=0.5" in repr(p) and "_explicit" not in repr(p)
    assert p == SamplingParams(seed=3, temperature=0.5) != SamplingParams(seed=4, temperature=0.5)
    assert pickle.loads(pickle.dumps(p)) == p and copy.deepcopy(p).explicitly_set == {"temperature", "seed"}


def test_clone_copies_and_validates():
    p = SamplingParams(stop=["a"], temperature=0.5)
    q = p.clone()
    assert q == p and q.stop is not p.stop and q.explicitly_set == p.explicitly_set
    r = p.clone(max_tokens=100)
    assert r.max_tokens == 100 and r.explicitly_set == {"stop", "temperature", "max_tokens"}
    with pytest.raises(ValueError, match="top_p must be in"):
        p.clone(top_p=2.0)
    with pytest.raises(ValueError, match="no field"):
        p.clone(topp=0.5)


def test_generation_defaults_fill_only_unset_fields():
    p = SamplingParams(temperature=0.2, top_k=-1, max_tokens=64)
    q = p.apply_generation_defaults(QWEN2_GENERATION_CONFIG)
    # Explicit values win, including an explicit "disabled" top_k; unrelated config keys are ignored.
    assert (q.temperature, q.top_k, q.max_tokens) == (0.2, 0, 64)
    assert (q.top_p, q.repetition_penalty) == (0.8, 1.05)
    assert q.explicitly_set == p.explicitly_set
    assert q.apply_generation_defaults(QWEN2_GENERATION_CONFIG) == q
    # A default never overrides a value the user passed, even when it equals the field's default.
    assert SamplingParams(top_p=1.0).apply_generation_defaults({"top_p": 0.8}).top_p == 1.0
    assert SamplingParams().apply_generation_defaults({"max_new_tokens": 300, "min_p": None}).max_tokens == 300


def test_generation_defaults_keep_greedy_greedy():
    q = SamplingParams(temperature=0.0).apply_generation_defaults(QWEN2_GENERATION_CONFIG)
    assert q.is_greedy and (q.top_p, q.top_k, q.repetition_penalty) == (1.0, 0, 1.05)


def test_generation_defaults_are_validated():
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingParams().apply_generation_defaults({"top_p": 0.0})


def test_stop_ids_and_min_tokens_bans():
    eos = [151645, 151643]
    p = SamplingParams(stop_token_ids=[5], min_tokens=2)
    assert p.stop_token_id_set(eos) == {5, 151645, 151643}
    assert p.banned_token_ids(0, eos) == (5, 151643, 151645)
    assert p.banned_token_ids(2, eos) == ()
    q = SamplingParams(ignore_eos=True, min_tokens=3, max_tokens=10)
    assert q.stop_token_id_set(eos) == frozenset() and q.banned_token_ids(1, eos) == ()


# ---------------------------------------------------------------------------------------------- issue 24: bounds
def test_verified_bounds_every_field_that_reaches_a_device_array():
    v = dict(vocab_size=1000, max_logprobs=20, max_n=128)
    assert SamplingParams(top_k=10**30, temperature=1.0).verified(**v).top_k == 0  # clamped: keeps every token
    assert SamplingParams(top_k=1000, temperature=1.0).verified(**v).top_k == 0
    assert SamplingParams(top_k=999, temperature=1.0).verified(**v).top_k == 999
    p = SamplingParams(top_k=10**30, temperature=1.0)
    assert "top_k" in p.verified(**v).explicitly_set
    ok = SamplingParams(logprobs=20, prompt_logprobs=20, n=128, stop_token_ids=[0, 999], temperature=1.0)
    assert ok.verified(**v) is ok
    for kwargs, fragment in [(dict(logprobs=21), "logprobs must be in [0, 20] (max_logprobs), got 21"),
                             (dict(prompt_logprobs=10**6), "prompt_logprobs must be in [0, 20] (max_logprobs), got"),
                             (dict(n=129, temperature=1.0), "n must be in [1, 128] (max_n), got 129"),
                             (dict(stop_token_ids=[2**31]), "stop_token_ids must be token ids in [0, 1000)"),
                             (dict(stop_token_ids=[1000]), "got 1000"),
                             (dict(stop_token_ids=list(range(1000)) * 2), "at most 1024 token ids, got 2000"),
                             (dict(stop=["s"] * 1025), "stop may hold at most 1024 strings, got 1025")]:
        with pytest.raises(ValueError, match=re.escape(fragment)):
            SamplingParams(**kwargs).verified(**v)
    # max_logprobs -1: the vocabulary, as vLLM
    assert SamplingParams(logprobs=1000).verified(vocab_size=1000, max_logprobs=-1, max_n=1).logprobs == 1000
    with pytest.raises(ValueError, match=re.escape("[0, 1000]")):
        SamplingParams(logprobs=1001).verified(vocab_size=1000, max_logprobs=-1, max_n=1)


def test_seed_is_a_signed_64_bit_integer():
    assert SamplingParams(seed=2**63 - 1).seed == 2**63 - 1 and SamplingParams(seed=-2**63).seed == -2**63
    for bad in (2**63, -2**63 - 1, 10**30):
        with pytest.raises(ValueError, match=re.escape(f"seed must be in [{-2**63}, {2**63 - 1}]") + ".*" + str(bad)):
            SamplingParams(seed=bad)
