"""The engine's contract: bad input gets a clear error and loses nothing; sampling and stops behave as vLLM's."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from qwenjax import LLM, SamplingParams
from qwenjax.models.loader import ModelNotFoundError
from qwenjax.worker.kv_cache import KVCacheTooSmallError, MemoryInfo
from tests.conftest import SMALL_ENGINE


@pytest.fixture(scope="module")
def llm(real_vocab):
    return LLM(str(real_vocab), **SMALL_ENGINE, skip_warmup=False)  # test_no_compiles_after_warmup needs it


def _all_pages_free(llm):
    blocks = llm.llm_engine.blocks
    return blocks.num_free == blocks.num_pages and not llm.llm_engine.has_unfinished_requests()


BAD = [
    (lambda: ("",), {}, ValueError, "empty"),
    (lambda: ("word " * 200,), {}, ValueError, "max_model_len=128"),
    (lambda: ("hi",), {"max_tokens": 0}, ValueError, "max_tokens must be at least 1, got 0"),
    (lambda: ("hi",), {"temperature": -1.0}, ValueError, "temperature must be non-negative"),
    (lambda: ("hi",), {"top_p": 0.0}, ValueError, "top_p must be in (0, 1]"),
    (lambda: ("hi",), {"top_p": 1.5}, ValueError, "top_p must be in (0, 1]"),
    # issue 24: fields that reach fixed-width device arrays are bounded at add_request
    (lambda: ("hi",), {"stop_token_ids": [2**31]}, ValueError, "stop_token_ids must be token ids in [0, "),
    (lambda: ("hi",), {"logprobs": 21}, ValueError, "logprobs must be in [0, 20] (max_logprobs), got 21"),
    (lambda: ("hi",), {"prompt_logprobs": 10**6}, ValueError, "prompt_logprobs must be in [0, 20] (max_logprobs)"),
    (lambda: ("hi",), {"n": 129, "temperature": 1.0}, ValueError, "n must be in [1, 128] (max_n), got 129"),
]


def test_top_k_past_the_vocabulary_is_clamped_offline(llm):
    """vLLM's rule (issue 24: 10**30 once overflowed the sampler's int32 inputs and killed the engine)."""
    out = llm.generate(["Hello there"], SamplingParams(top_k=10**30, temperature=1.0, seed=1, max_tokens=3),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3 and _all_pages_free(llm)


@pytest.mark.parametrize("prompt,kwargs,exc,msg", BAD)
def test_bad_input_is_refused_and_loses_nothing(llm, prompt, kwargs, exc, msg):
    good = ["Hello there", "How are you"]
    with pytest.raises(exc, match=msg.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        llm.generate(good + list(prompt()), SamplingParams(**kwargs), use_tqdm=False)
    assert _all_pages_free(llm)
    out = llm.generate(good, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in out] == [4, 4]
    assert _all_pages_free(llm)


def test_prompt_length_error_gives_both_numbers(llm):
    with pytest.raises(ValueError) as e:
        llm.generate(prompt_token_ids=[[5] * 200], sampling_params=SamplingParams(max_tokens=2), use_tqdm=False)
    assert "200 tokens" in str(e.value) and "max_model_len=128" in str(e.value)


def test_a_prompt_must_leave_room_for_one_token(llm):
    """vLLM's rule: a prompt of max_model_len tokens is refused (it once ended by length with no token); one token
    shorter gets exactly one."""
    with pytest.raises(ValueError, match=r"128 tokens, as long as max_model_len=128, which leaves no room"):
        llm.generate(prompt_token_ids=[[5] * 128], sampling_params=SamplingParams(max_tokens=2), use_tqdm=False)
    assert _all_pages_free(llm)
    out = llm.generate(prompt_token_ids=[[5] * 127], sampling_params=SamplingParams(max_tokens=2), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 1 and out[0].outputs[0].finish_reason == "length"
    assert _all_pages_free(llm)


def test_missing_model_path_is_clear():
    with pytest.raises(ModelNotFoundError, match="not a directory"):
        LLM("/nonexistent/qwen2", **SMALL_ENGINE)
    with pytest.raises(ModelNotFoundError, match="not available offline"):
        LLM("Qwen/Qwen2-does-not-exist", **SMALL_ENGINE)


@pytest.mark.parametrize("kwargs,name", [({"trust_remote_code": True}, "trust_remote_code=True")])
def test_unbuilt_features_are_named(real_vocab, kwargs, name):
    with pytest.raises(NotImplementedError, match=name.replace("(", r"\(")):
        LLM(str(real_vocab), **{**SMALL_ENGINE, **kwargs})


def test_unknown_argument_is_a_type_error(real_vocab):
    with pytest.raises(TypeError, match="unknown arguments"):
        LLM(str(real_vocab), not_an_arg=1)


def test_seeded_sampling_reproducible_whatever_the_batch(llm):
    p = SamplingParams(temperature=1.0, top_k=40, top_p=0.9, seed=1234, max_tokens=10, ignore_eos=True)
    alone = llm.generate(["Tell me a story"], p, use_tqdm=False)[0].outputs[0].token_ids
    other = SamplingParams(temperature=0.8, seed=7, max_tokens=6, ignore_eos=True)
    mixed = llm.generate(["Some other prompt entirely", "Tell me a story", "x"], [other, p, other], use_tqdm=False)
    assert mixed[1].outputs[0].token_ids == alone
    unseeded = [llm.generate(["Tell me a story"], SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True),
                             use_tqdm=False)[0].outputs[0].token_ids for _ in range(2)]
    assert unseeded[0] != unseeded[1]  # fresh randomness per request without a seed


def test_n_samples_share_a_prompt_and_differ(llm):
    out = llm.generate(["Once upon a time"], SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=8,
                                                             ignore_eos=True), use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3
    assert _all_pages_free(llm)


def test_stop_token_ids_and_min_tokens(llm):
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    ref = llm.generate(["The weather today"], greedy, use_tqdm=False)[0].outputs[0].token_ids
    stop_id = ref[5]
    first = ref.index(stop_id)
    out = llm.generate(["The weather today"], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_id],
                                                             ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ref[:first + 1] and out.finish_reason == "stop" and out.stop_reason == stop_id
    # min_tokens bans the stop id until reached: the sequence then differs from the unconstrained one or runs on
    out = llm.generate(["The weather today"], SamplingParams(temperature=0, max_tokens=12, min_tokens=first + 2,
                                                             stop_token_ids=[stop_id], ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert stop_id not in out.token_ids[:first + 2]


def test_stop_strings_cut_the_text(llm):
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    full = llm.generate(["A B C"], greedy, use_tqdm=False)[0].outputs[0]
    assert len(full.text) > 6
    stop = full.text[3:6]
    cut = llm.generate(["A B C"], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == full.text[:full.text.index(stop)]
    kept = llm.generate(["A B C"], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=[stop],
                                                  include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert kept.text == full.text[:full.text.index(stop) + len(stop)]


def test_eos_ends_generation(eos_chain):
    """A checkpoint whose greedy continuation of any prompt is " one two three" and then EOS (transformers'
    generate agrees): EOS ends the request with finish_reason "stop" at exactly that length, greedy or sampled;
    ignore_eos runs on to max_tokens; a max_tokens that stops short of EOS is "length"."""
    import torch

    from tests.checkpoints import EOS_CHAIN_WORDS, hf_model

    path, chain = eos_chain
    eos = 151645
    prompts = [[1, 2, 3], [9707, 1879, 13, 220]]
    hf = hf_model(path)
    for ids in prompts:
        got = hf.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, eos_token_id=eos,
                          pad_token_id=eos)[0, len(ids):].tolist()
        assert got == chain + [eos], got  # the checkpoint does what it is built for
    llm = LLM(str(path), **SMALL_ENGINE)
    assert eos in llm.llm_engine.eos_token_ids
    text = "".join(EOS_CHAIN_WORDS)
    for params in (SamplingParams(temperature=0, max_tokens=20), SamplingParams(temperature=1.0, seed=3, max_tokens=20),
                   SamplingParams(temperature=0, max_tokens=len(chain) + 1)):  # EOS as the last token allowed
        for out in llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False):
            o = out.outputs[0]
            assert (o.finish_reason, o.stop_reason, o.token_ids, o.text) == ("stop", None, chain + [eos], text), params
    ignoring = llm.generate(prompt_token_ids=prompts[:1], use_tqdm=False,
                            sampling_params=SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    o = ignoring[0].outputs[0]
    assert o.finish_reason == "length" and o.token_ids == ((chain + [eos]) * 3)[:10]  # EOS maps back to " one"
    short = llm.generate(prompt_token_ids=prompts[:1], use_tqdm=False,
                         sampling_params=SamplingParams(temperature=0, max_tokens=len(chain)))[0].outputs[0]
    assert short.finish_reason == "length" and short.token_ids == chain
    assert _all_pages_free(llm)


def test_logprobs(llm):
    out = llm.generate(["Hi"], SamplingParams(temperature=0, max_tokens=5, logprobs=3, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 5
    total = 0.0
    for tok, entry in zip(out.token_ids, out.logprobs):
        assert tok in entry and entry[tok].rank == 1  # greedy picks the most likely token
        assert len(entry) == 3
        ranked = sorted(entry.values(), key=lambda l: l.rank)
        assert all(a.logprob >= b.logprob for a, b in zip(ranked, ranked[1:]))
        assert all(l.logprob <= 0 for l in entry.values())
        total += entry[tok].logprob
    assert out.cumulative_logprob == pytest.approx(total, rel=1e-5)


def test_sampled_token_rank_is_its_rank_in_the_vocabulary(llm):
    out = llm.generate(["Hi"], SamplingParams(temperature=5.0, seed=11, max_tokens=6, logprobs=0, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    ranks = [entry[tok].rank for tok, entry in zip(out.token_ids, out.logprobs)]
    assert all(len(e) == 1 for e in out.logprobs)
    assert all(r >= 1 for r in ranks) and max(ranks) > 1  # hot sampling picks tokens below the top


def test_generation_config_defaults_apply_where_unset(llm):
    engine = llm.llm_engine
    req = engine.add_request("defaults-1", "hi", SamplingParams(max_tokens=2, top_k=5))
    p = req.params
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (0.7, 0.8, 5, 1.05)
    engine.abort_request("defaults-1")
    assert _all_pages_free(llm)


def test_chat_applies_the_template(llm):
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Tell me something about large language models."}]
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)[0]
    assert out.prompt.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert out.prompt.endswith("<|im_start|>assistant\n")


def test_no_compiles_after_warmup(llm):
    """A long run with changing batch composition reuses the warm-up's executables: zero new compilations."""
    compiles = []

    def listener(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        rng = np.random.default_rng(0)
        for round_ in range(4):
            n = int(rng.integers(1, 12))
            prompts = [list(map(int, rng.integers(0, 151000, int(rng.integers(1, 100))))) for _ in range(n)]
            params = [SamplingParams(temperature=float(rng.choice([0.0, 0.8])), top_k=int(rng.choice([0, 20])),
                                     top_p=1.0, max_tokens=int(rng.integers(1, 20)), ignore_eos=True)
                      for _ in range(n)]
            llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    finally:
        jax.monitoring.clear_event_listeners()
    assert compiles == [], f"{len(compiles)} compilations after warm-up"


def test_warmup_names_its_slow_buckets(llm, monkeypatch, caplog):
    """A warm-up bucket over WARMUP_SLOW_S is logged by name (a long start says what it spent its time on); with
    the threshold at 0 every bucket is, and the engine serves after."""
    import logging

    from qwenjax.worker import model_runner, sampler

    monkeypatch.setattr(model_runner, "WARMUP_SLOW_S", 0.0)
    with caplog.at_level(logging.INFO, logger="qwenjax"):
        llm.llm_engine.runner.warmup([(8, 1, False, 0), (1, 32, False, 0)], list(sampler.WARMUP_MODES[:1]))
    assert "warm-up: bucket (rows 8, tokens 1) took" in caplog.text
    assert "warm-up: bucket (rows 1, tokens 32) took" in caplog.text
    assert llm.generate("hi", SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids


def test_kv_cache_sizing_from_device_memory(real_vocab):
    gib = 1 << 30
    mem = lambda: MemoryInfo(limit=int(0.9 * 2 * gib), in_use=0, peak=0)  # noqa: E731
    args = {k: v for k, v in SMALL_ENGINE.items() if k != "num_kv_pages"}
    llm = LLM(str(real_vocab), memory_source=mem, **args, kv_cache_memory_bytes=4 << 20)
    # 4 MiB of pages: per page 2 (k, v) x 2 layers x 1 kv head x 16 x 16 dims x 4 bytes = 4 KiB -> 1024 pages
    assert llm.llm_engine.blocks.num_pages == 1024


def test_too_small_cache_names_the_fixes(real_vocab):
    args = {k: v for k, v in SMALL_ENGINE.items() if k != "num_kv_pages"}
    mem = lambda: MemoryInfo(limit=1 << 30, in_use=0, peak=0)  # noqa: E731
    with pytest.raises(KVCacheTooSmallError) as e:
        LLM(str(real_vocab), memory_source=mem, **args, kv_cache_memory_bytes=4096 * 5)
    msg = str(e.value)
    assert "max_model_len=128" in msg and "--max-model-len" in msg and "--gpu-memory-utilization" in msg
    assert "80 tokens" in msg  # 5 pages of 16


@pytest.mark.parametrize("device_gib, kind, usage, expect", [
    (80, "NVIDIA H100 80GB HBM3", "llm", (1024, 16384)),
    (141, "NVIDIA H200", "server", (1024, 8192)),
    (80, "NVIDIA A100-SXM4-80GB", "llm", (256, None)),
    (48, "NVIDIA L40S", "llm", (256, None)),
    (None, "cpu", "llm", (256, None)),
])
def test_batch_defaults_follow_vllm(device_gib, kind, usage, expect):
    from qwenjax.config import batch_defaults

    assert batch_defaults(usage, None if device_gib is None else device_gib << 30, kind) == expect


@pytest.mark.parametrize("limit_gib, expect", [(0.9 * 80, (1024, 16384)), (0.9 * 40, (256, 2048))])
def test_engine_takes_the_batch_defaults_of_its_device(untied_gqa2, limit_gib, expect):
    """max_num_seqs / max_num_batched_tokens left unset: the engine asks the device (here a stand-in reporting the
    pool of an 80 GiB or a 40 GiB device), as vLLM does; set ones win. The 40 GiB device keeps the engine's own
    budget, max(2048, min(8192, max_model_len))."""
    args = {k: v for k, v in SMALL_ENGINE.items() if k not in ("max_num_seqs", "max_num_batched_tokens")}
    mem = lambda: MemoryInfo(limit=int(limit_gib * (1 << 30)), in_use=0, peak=0)  # noqa: E731
    llm = LLM(str(untied_gqa2), memory_source=mem, **args, skip_warmup=True)
    sc = llm.llm_engine.scheduler_config
    assert (sc.max_num_seqs, sc.max_num_batched_tokens) == expect
    out = llm.generate(prompt_token_ids=[[1, 2, 3]], sampling_params=SamplingParams(max_tokens=2, ignore_eos=True),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2
    set_ = LLM(str(untied_gqa2), memory_source=mem, **args, max_num_seqs=4, max_num_batched_tokens=64,
               skip_warmup=True).llm_engine.scheduler_config
    assert (set_.max_num_seqs, set_.max_num_batched_tokens) == (4, 64)


def test_usage_context_is_checked():
    from qwenjax.config import EngineArgs

    with pytest.raises(ValueError, match="usage_context must be one of 'llm', 'server', got 'batch'"):
        EngineArgs(usage_context="batch")
