"""Issue 32, offline: `LLM(data_parallel_size=2)` spreads a generate() call's prompts over two engine replicas (two
engine core processes of this host, each with its own XLA CPU devices) and returns what one engine returns.

Oracles: transformers' greedy tokens on the same checkpoint (tests/checkpoints.hf_greedy) and one offline engine
(`LLM()`, data_parallel_size 1) with the same arguments. One pair of replicas serves the module; the replica-death
test kills one of them, and the shutdown test stops both: they run last.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from qwenjax import LLM, LoRARequest, SamplingParams
from qwenjax.core.routing import make_router
from qwenjax.engine.offline_data_parallel import ReplicaDiedError
from qwenjax.sampling_params import StructuredOutputsParams
from tests.checkpoints import hf_greedy, hf_model
from tests.lora_adapters import peft_greedy, peft_model, write_adapter

ARGS = dict(dtype="float32", max_model_len=96, max_num_seqs=4, max_num_batched_tokens=64, block_size=16,
            decode_buckets=(4,), prefill_token_buckets=(64,), num_kv_pages=32, enable_lora=True, max_loras=1,
            max_lora_rank=8, generation_config="vllm")  # no defaults from generation_config.json: plain greedy
PROMPTS = [list(map(int, np.random.default_rng(i).integers(2, 512, 3 + 5 * i))) for i in range(6)]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def llm_dp(real_vocab):
    llm = LLM(str(real_vocab), **ARGS, data_parallel_size=2)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def llm_one(real_vocab):
    return LLM(str(real_vocab), **ARGS)


def replica_prompt_tokens(llm) -> list[int]:
    return [view.stats.prompt_tokens for _, view in llm.llm_engine.replica_views()]


def test_two_replicas_give_the_greedy_tokens_of_one_engine_and_of_transformers(llm_dp, llm_one, real_vocab):
    before = replica_prompt_tokens(llm_dp)
    got = llm_dp.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY, use_tqdm=False)
    want = llm_one.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == hf_greedy(hf_model(real_vocab), PROMPTS, 8, repetition_penalty=1.0)
    for a, b in zip(got, want):  # prompt by prompt, the same RequestOutput (timings aside)
        assert (a.prompt, a.prompt_token_ids, a.finished, a.prompt_logprobs, a.lora_request) == \
            (b.prompt, b.prompt_token_ids, b.finished, b.prompt_logprobs, b.lora_request)
        assert a.outputs == b.outputs
    after = replica_prompt_tokens(llm_dp)
    assert all(x > y for x, y in zip(after, before)), (before, after)  # both replicas got prompts
    assert sum(after) - sum(before) == sum(map(len, PROMPTS))
    stats = llm_dp.llm_engine.stats  # the replicas' counters summed
    assert stats.prompt_tokens == sum(after)
    assert stats.generation_tokens == sum(v.stats.generation_tokens for _, v in llm_dp.llm_engine.replica_views())
    dropped = llm_dp.reset_prefix_cache()  # every replica's, summed: the pages one engine drops for the same prompts
    assert dropped == llm_one.reset_prefix_cache() > 0
    assert not hasattr(llm_dp.llm_engine, "runner")
    with pytest.raises(NotImplementedError, match="llm_engine.runner is not available with data_parallel_size=2"):
        llm_dp.llm_engine.runner


def test_seeded_sampling_n_and_logprobs_equal_one_engine(llm_dp, llm_one):
    params = [SamplingParams(temperature=0.9, top_p=0.9, seed=100 + i, n=2, logprobs=2, max_tokens=6, ignore_eos=True,
                             prompt_logprobs=1 if i < 2 else None) for i in range(len(PROMPTS))]
    got = llm_dp.generate(prompt_token_ids=PROMPTS, sampling_params=params, use_tqdm=False)
    want = llm_one.generate(prompt_token_ids=PROMPTS, sampling_params=params, use_tqdm=False)
    for a, b in zip(got, want):
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
        assert (a.prompt_logprobs is None) == (b.prompt_logprobs is None)
        for pa, pb in zip(a.prompt_logprobs or [], b.prompt_logprobs or []):
            assert (pa is None) == (pb is None)
            if pa is not None:
                assert pa.keys() == pb.keys()
                assert [pa[t].logprob for t in pa] == pytest.approx([pb[t].logprob for t in pa], abs=1e-5)
        for ca, cb in zip(a.outputs, b.outputs):
            assert ca.cumulative_logprob == pytest.approx(cb.cumulative_logprob, abs=1e-5)
            for la, lb in zip(ca.logprobs, cb.logprobs):
                assert la.keys() == lb.keys()
                assert [la[t].logprob for t in la] == pytest.approx([lb[t].logprob for t in la], abs=1e-5)


def test_a_too_long_prompt_raises_one_engines_error_and_the_llm_serves_on(llm_dp, llm_one):
    prompts = [PROMPTS[0], list(range(2, 2 + ARGS["max_model_len"] + 1)), PROMPTS[1]]
    with pytest.raises(ValueError) as one:
        llm_one.generate(prompt_token_ids=prompts, sampling_params=GREEDY, use_tqdm=False)
    with pytest.raises(ValueError) as dp:
        llm_dp.generate(prompt_token_ids=prompts, sampling_params=GREEDY, use_tqdm=False)
    assert str(dp.value) == str(one.value)
    assert str(dp.value).startswith("prompt 1: the prompt has 97 tokens, longer than max_model_len=96")
    got = llm_dp.generate(prompt_token_ids=PROMPTS[:2], sampling_params=GREEDY, use_tqdm=False)
    want = llm_one.generate(prompt_token_ids=PROMPTS[:2], sampling_params=GREEDY, use_tqdm=False)
    assert [o.outputs for o in got] == [o.outputs for o in want]
    engine = llm_dp.llm_engine
    deadline = time.monotonic() + 60  # the replicas' last snapshots arrive after the outputs (a hang guard only)
    while engine.has_unfinished_requests() or engine.blocks.num_free != engine.blocks.num_pages:
        assert time.monotonic() < deadline, (engine.blocks.num_free, engine.blocks.num_pages)
        time.sleep(0.01)


def test_per_prompt_lora_requests_structured_outputs_and_chat_equal_one_engine(llm_dp, llm_one, real_vocab,
                                                                               tmp_path):
    adapter = LoRARequest("a", 1, str(write_adapter(real_vocab, tmp_path / "a", r=8, alpha=16,
                                                    targets=("q_proj", "v_proj", "down_proj"), seed=1)))
    loras = [adapter, None, adapter, None]
    got = llm_dp.generate(prompt_token_ids=PROMPTS[:4], sampling_params=GREEDY, lora_request=loras, use_tqdm=False)
    want = llm_one.generate(prompt_token_ids=PROMPTS[:4], sampling_params=GREEDY, lora_request=loras, use_tqdm=False)
    assert [o.outputs for o in got] == [o.outputs for o in want]
    assert [o.lora_request for o in got] == loras
    assert [got[i].outputs[0].token_ids for i in (0, 2)] == \
        peft_greedy(peft_model(real_vocab, adapter.lora_path), [PROMPTS[0], PROMPTS[2]], 8)
    choice = SamplingParams(temperature=0, max_tokens=8, structured_outputs=StructuredOutputsParams(
        choice=["yes", "no", "maybe"]))
    texts = ["Is it raining?", "Is the sky green?", "Shall we?"]
    got = [o.outputs[0].text for o in llm_dp.generate(texts, choice, use_tqdm=False)]
    assert got == [o.outputs[0].text for o in llm_one.generate(texts, choice, use_tqdm=False)]
    assert set(got) <= {"yes", "no", "maybe"}
    chats = [[{"role": "user", "content": t}] for t in texts]
    assert [o.outputs for o in llm_dp.chat(chats, GREEDY, use_tqdm=False)] == \
        [o.outputs for o in llm_one.chat(chats, GREEDY, use_tqdm=False)]


def test_unknown_replica_options_and_memory_source_are_refused_by_name(real_vocab):
    with pytest.raises(ValueError, match=r"\['data_parallel_routing'\] only apply with data_parallel_size > 1"):
        LLM(str(real_vocab), **ARGS, data_parallel_routing="round_robin")
    with pytest.raises(ValueError, match="router must be one of 'round_robin', 'least_loaded', 'prefix_aware'"):
        LLM(str(real_vocab), **ARGS, data_parallel_size=2, data_parallel_routing="busiest")
    with pytest.raises(NotImplementedError, match="memory_source with data_parallel_size > 1"):
        LLM(str(real_vocab), **ARGS, data_parallel_size=2, memory_source=object())


def test_a_killed_replica_raises_naming_it_keeps_the_others_outputs_and_the_llm_serves_on(llm_dp, llm_one):
    dp = llm_dp.llm_engine.dp
    dp.router = make_router("round_robin")
    victim = dp.replicas[1].engine.engine_pid
    params = SamplingParams(temperature=0, max_tokens=80, ignore_eos=True)
    prompts = [[5, 6, 7, i] for i in range(4)]
    result = {}

    def run():
        try:
            result["outputs"] = llm_dp.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
        except BaseException as e:  # noqa: BLE001 - checked below
            result["error"] = e

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 300
    while sum(1 for s, _ in list(dp.replicas[1].inflight.values()) if s.first_token_time is not None) < 2:
        assert time.monotonic() < deadline, "replica 1's requests did not start"
        time.sleep(0.005)
    os.kill(victim, signal.SIGKILL)
    worker.join(300)
    assert not worker.is_alive()
    err = result.get("error")
    assert isinstance(err, ReplicaDiedError), result
    assert "2 prompts lost on data parallel replica 1 (" in str(err)
    assert "data parallel replica 1: the engine process was killed by signal 9" in str(err)
    assert "prompts 1, 3" in str(err)  # round robin: prompts 1 and 3 went to replica 1
    want = llm_one.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    assert [o is None for o in err.outputs] == [False, True, False, True]
    assert [err.outputs[i].outputs for i in (0, 2)] == [want[i].outputs for i in (0, 2)]
    assert [h["healthy"] for h in llm_dp.llm_engine.health()] == [True, False]
    got = llm_dp.generate(prompt_token_ids=PROMPTS[:3], sampling_params=GREEDY, use_tqdm=False)  # all on replica 0
    assert [o.outputs for o in got] == \
        [o.outputs for o in llm_one.generate(prompt_token_ids=PROMPTS[:3], sampling_params=GREEDY, use_tqdm=False)]


def test_shutdown_stops_every_replica_process(llm_dp):
    replicas = llm_dp.llm_engine.dp.replicas
    processes = [r.engine._client.process for r in replicas]
    assert processes[0].is_alive()
    llm_dp.shutdown()
    assert [p.is_alive() for p in processes] == [False, False]
    assert processes[0].exitcode == 0  # replica 0 stopped cleanly (replica 1 was killed above)
    with pytest.raises(RuntimeError, match="the LLM was shut down: its data parallel replicas are stopped"):
        llm_dp.generate(prompt_token_ids=PROMPTS[:1], sampling_params=GREEDY, use_tqdm=False)
