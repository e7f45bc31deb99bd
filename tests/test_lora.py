"""Multi-LoRA serving through the whole engine, against PEFT on transformers (the oracle), on CPU.

Two adapters written by `peft` (rank 8 on q/v/down with lora_alpha 16; rank 16 rsLoRA on all seven projections)
and the base model, mixed in one batch: each row's greedy tokens equal PeftModel's with that row's adapter, and the
log-probabilities of those tokens match within float32 tolerance.
"""

from __future__ import annotations

import re

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
        assert out.lora_request == reqs[i]
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


def test_steps_without_an_adapter_run_the_base_program(untied_gqa2, adapters, prompts, oracle):
    """A step in which no row has an adapter runs the base model's program (the runner passes no LoRA stacks), one
    with an adapter row the LoRA program; warmup compiled both variants of every bucket, so neither recompiles."""
    llm = _llm(untied_gqa2, skip_warmup=False, prefill_token_buckets=(128,))  # few buckets: compiled twice
    runner = llm.llm_engine.runner
    step, calls = runner._step, []

    def recording(*args, **kw):
        calls.append(args[6] is not None)  # (params, kv, penalties, last_tokens, i_buf, f_buf, lora_stacks)
        return step(*args, **kw)

    runner._step = recording
    compiled = step._cache_size()
    outs = llm.generate(prompt_token_ids=prompts[:3], sampling_params=GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == oracle[None][1][:3]
    assert calls and not any(calls)  # every step ran without the stacks
    calls.clear()
    reqs = [adapters["a"], None, None]
    outs = llm.generate(prompt_token_ids=prompts[:3], sampling_params=GREEDY, lora_request=reqs, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [oracle["a"][1][0], *oracle[None][1][1:3]]
    assert any(calls)  # the steps holding the adapter's row (a prompt's prefill alone may run without it)
    assert step._cache_size() == compiled, "a step compiled after warmup"
    assert llm.llm_engine.blocks.num_free == llm.llm_engine.blocks.num_pages


def test_slots_swap_under_load_and_chunked_prefill(untied_gqa2, adapters, prompts, oracle):
    """max_loras=1 with two adapters in flight: a request whose adapter has no free slot waits while the other's
    run, then its adapter is written over the idle one. Two sequences at a time with different lengths, so a new row
    joins the other's decodes as a mixed (chunked-prefill) step; 4-step decode dispatches too."""
    llm = _llm(untied_gqa2, max_loras=1, max_num_seqs=2, decode_buckets=(2,), num_scheduler_steps=4)
    reqs = [None if m is None else adapters[m] for m in MIX]
    lengths = [NEW - 3 * (i % 2) for i in range(len(MIX))]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, lora_request=reqs, use_tqdm=False)
    for i, (m, out) in enumerate(zip(MIX, outs)):
        assert out.outputs[0].token_ids == oracle[m][1][i][:lengths[i]], f"row {i} (adapter {m})"
    engine = llm.llm_engine
    assert engine.lora.slots.num_swaps >= 2  # a -> b -> a at least
    assert engine.stats.mixed_steps > 0 and engine.stats.multi_steps > 0
    assert engine.blocks.num_free == engine.blocks.num_pages
    assert sum(engine.lora.slots.refs.values()) == 0
    engine.lora.slots.check()


def test_prefix_cache_keys_on_the_adapter(untied_gqa2, adapters, oracle):
    """One 40-token prompt (2 full pages) under adapter a, then b, then a again, then the base model: only the
    second a (and never b or the base) finds cached pages, and every run equals PEFT's tokens."""
    prompt = list(map(int, np.random.default_rng(9).integers(0, 512, 40)))
    want = {m: peft_greedy(oracle[m][0], [prompt], NEW)[0] for m in (None, "a", "b")}
    llm = _llm(untied_gqa2)
    blocks = llm.llm_engine.blocks
    hits = []
    for m in ("a", "b", "a", None):
        before = blocks.hit_tokens
        out = llm.generate(prompt_token_ids=[prompt], sampling_params=GREEDY,
                           lora_request=None if m is None else adapters[m], use_tqdm=False)[0]
        assert out.outputs[0].token_ids == want[m], m
        hits.append(blocks.hit_tokens - before)
    assert hits == [0, 0, 32, 0]
    blocks.check()


def test_bad_inputs_fail_alone(untied_gqa2, adapters, prompts, oracle, tmp_path):
    """Each bad adapter or request raises a clear error naming the problem; nothing is queued, every page stays
    free, and the engine then serves a good request."""
    import json
    import shutil

    from tests.lora_adapters import write_adapter

    big = write_adapter(untied_gqa2, tmp_path / "big", r=32, alpha=32, targets=("q_proj",), seed=3)
    embed = write_adapter(untied_gqa2, tmp_path / "embed", r=4, alpha=8, targets=("q_proj", "embed_tokens"), seed=3)
    dora = write_adapter(untied_gqa2, tmp_path / "dora", r=4, alpha=8, targets=("q_proj",), seed=3, use_dora=True)
    nofile = tmp_path / "nofile"
    shutil.copytree(adapters["a"].lora_path, nofile)
    (nofile / "adapter_model.safetensors").unlink()
    biased = tmp_path / "biased"
    shutil.copytree(adapters["a"].lora_path, biased)
    conf = json.loads((biased / "adapter_config.json").read_text())
    (biased / "adapter_config.json").write_text(json.dumps({**conf, "bias": "all"}))
    llm = _llm(untied_gqa2)
    cases = [(LoRARequest("big", 3, str(big)), "rank r=32 exceeds max_lora_rank=16"),
             (LoRARequest("embed", 4, str(embed)), "['embed_tokens'] are not supported"),
             (LoRARequest("dora", 5, str(dora)), "use_dora=true (DoRA)"),
             (LoRARequest("nofile", 6, str(nofile)), "missing file"),
             (LoRARequest("nodir", 7, str(tmp_path / "absent")), "is not a directory"),
             (LoRARequest("biased", 8, str(biased)), "bias='all'"),
             (LoRARequest("other", 1, adapters["b"].lora_path), "lora_int_id 1 is already adapter 'a'")]
    llm.generate(prompt_token_ids=prompts[:1], sampling_params=GREEDY, lora_request=adapters["a"], use_tqdm=False)
    for req, msg in cases:
        with pytest.raises(ValueError, match=re.escape(msg)):
            llm.generate(prompt_token_ids=prompts[:2], sampling_params=GREEDY, lora_request=[adapters["b"], req],
                         use_tqdm=False)
    engine = llm.llm_engine
    assert not engine.requests and engine.blocks.num_free == engine.blocks.num_pages
    with pytest.raises(ValueError, match="got 1 lora_request for 2 prompts"):
        llm.generate(prompt_token_ids=prompts[:2], sampling_params=GREEDY, lora_request=[adapters["a"]])
    with pytest.raises(ValueError, match="lora_int_id must be an integer >= 1"):
        LoRARequest("zero", 0, "/x")
    with pytest.raises(TypeError, match="lora_request must be a LoRARequest, got str"):
        llm.generate(prompt_token_ids=prompts[:1], sampling_params=GREEDY, lora_request="a", use_tqdm=False)
    with pytest.raises(NotImplementedError, match="prompt_logprobs with a lora_request"):
        llm.generate(prompt_token_ids=prompts[:1], sampling_params=SamplingParams(max_tokens=2, prompt_logprobs=1),
                     lora_request=adapters["a"], use_tqdm=False)
    out = llm.generate(prompt_token_ids=prompts[1:2], sampling_params=GREEDY, lora_request=adapters["b"],
                       use_tqdm=False)[0]
    assert out.outputs[0].token_ids == oracle["b"][1][1]
    base = LLM(str(untied_gqa2), **SMALL_ENGINE)
    with pytest.raises(ValueError, match="enable_lora=True"):
        base.generate(prompt_token_ids=prompts[:1], lora_request=adapters["a"], use_tqdm=False)
    with pytest.raises(ValueError, match="max_lora_rank must be one of"):
        LLM(str(untied_gqa2), **{**SMALL_ENGINE, "enable_lora": True, "max_lora_rank": 12})


def test_not_built_yet_is_refused_by_name(tmp_path):
    """LoRA on Qwen2-MoE and over several hosts: NotImplementedError naming what is missing."""
    from qwenjax import EngineArgs
    from tests.moe_checkpoints import write_moe_checkpoint

    moe = write_moe_checkpoint(tmp_path / "moe")
    with pytest.raises(NotImplementedError, match="enable_lora with a Qwen2-MoE model"):
        LLM(str(moe), **{**SMALL_ENGINE, "enable_lora": True})
    args = EngineArgs(enable_lora=True, num_processes=2)
    assert any("enable_lora with num_processes=2" in m for m in args.unsupported())


def test_tensor_parallel_meshes(untied_gqa2, adapters, oracle):
    """Meshes of 1, 2, 3 and 4 CPU devices (a subprocess): the same tokens as PEFT for each row's adapter, the same
    logprobs as one device; A / B split like their base weights (B on O for column-parallel projections, A on I
    for row-parallel ones), and padded to the mesh-padded widths where the mesh does not divide the heads."""
    import json

    from tests.test_tensor_parallel import run_with_devices

    out = untied_gqa2.parent / "lora_mesh.json"
    proc = run_with_devices(["-m", "tests.lora_mesh_worker", str(untied_gqa2), adapters["a"].lora_path,
                             adapters["b"].lora_path, str(out)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    want = [peft_greedy(oracle[m][0], [p], NEW)[0] for m, p in zip(("a", "b", None), res["prompts"])]
    for n in ("1", "2", "3", "4"):
        assert res[n]["tokens"] == want, f"mesh {n}"
        np.testing.assert_allclose(np.concatenate(res[n]["logprobs"]), np.concatenate(res["1"]["logprobs"]),
                                   atol=1e-4)
    assert res["2"]["specs"]["q_proj"] == [[], ["None", "None", "tp"]]
    assert res["2"]["specs"]["k_proj"] == [[], ["None", "None", "tp"]]  # 2 kv heads split over 2
    assert res["4"]["specs"]["k_proj"] == [[], []]                      # kv heads replicated on 4, as k_proj
    assert res["2"]["specs"]["o_proj"] == [["None", "tp", "None"], []]
    assert res["2"]["specs"]["down_proj"] == [["None", "tp", "None"], []]
    assert res["3"]["shapes"]["q_proj"][1] == [3, 16, 6 * 16]  # 4 q heads padded to 6 for 3 devices
    # one device: q/k/v and gate/up as groups, B block-diagonal (64 + 2 x 32 q/k/v columns); A folded into the
    # base weight as 2 slots x 3 x 16 extra columns (worker/lora_fold.py); over a mesh A stays in the stacks
    assert sorted(res["1"]["shapes"]) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    assert res["1"]["shapes"]["qkv_proj"] == [None, [3, 48, 128]]
    assert res["1"]["qkv_kernel"] == [64, 128 + 2 * 48] and res["2"]["qkv_kernel"] == [64, 128]


def test_preemption_and_n_copies_keep_their_adapter(untied_gqa2, adapters, prompts, oracle):
    """A KV cache too small for the batch: sequences are preempted (their adapter's slot reference dropped) and
    recomputed (taken again); n=2 copies fork from their parent and decode with its adapter. Every row still equals
    PEFT's tokens, and no slot reference or page is left behind."""
    llm = _llm(untied_gqa2, num_kv_pages=10, max_model_len=64)
    reqs = [None if m is None else adapters[m] for m in MIX]
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY, lora_request=reqs, use_tqdm=False)
    for i, (m, out) in enumerate(zip(MIX, outs)):
        assert out.outputs[0].token_ids == oracle[m][1][i], f"row {i} (adapter {m})"
    engine = llm.llm_engine
    assert engine.scheduler.num_preemptions > 0
    two = SamplingParams(temperature=1.0, top_k=1, max_tokens=NEW, ignore_eos=True, n=2)  # greedy, 2 copies
    out = llm.generate(prompt_token_ids=prompts[1:2], sampling_params=two, lora_request=adapters["b"],
                       use_tqdm=False)[0]
    assert [c.token_ids for c in out.outputs] == [oracle["b"][1][1]] * 2
    assert engine.blocks.num_free == engine.blocks.num_pages and sum(engine.lora.slots.refs.values()) == 0
    engine.lora.slots.check()


def test_speculative_decoding_keeps_each_rows_adapter(untied_gqa2, adapters, oracle):
    """n-gram speculation over a batch mixing two adapters and the base model: the verify steps score each row's
    proposals under its own adapter, so the tokens are PEFT's greedy tokens row by row, with proposals verified.
    One step at a time: these rows' matches last one token, which async scheduling's drain comes too late for
    (engine/spec_step.py; its own tests are tests/test_spec_async.py)."""
    prompts = [list(range(10, 18)) * 4, list(range(40, 46)) * 5, list(range(70, 79)) * 3]
    mix = ["a", "b", None]
    want = [peft_greedy(oracle[m][0], [p], 12)[0] for m, p in zip(mix, prompts)]
    llm = _llm(untied_gqa2, speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                                                "prompt_lookup_max": 3, "prompt_lookup_min": 1},
               async_scheduling=False)
    reqs = [None if m is None else adapters[m] for m in mix]
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(temperature=0.0, max_tokens=12,
                                                                                   ignore_eos=True),
                        lora_request=reqs, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == want
    stats = llm.llm_engine.stats
    assert stats.spec_decode_verify_steps > 0 and stats.spec_decode_num_draft_tokens > 0
    assert llm.llm_engine.blocks.num_free == llm.llm_engine.blocks.num_pages
