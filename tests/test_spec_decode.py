"""Speculative decoding with n-gram proposals (issue 27): verify steps change how many tokens a step yields, never
which tokens (greedy: identical to the engine without speculation, under preemption too) nor their distribution
(sampled: the rejection sampler's output is distributed as the target's, checked by a chi-square test); seeded
requests repeat; acceptance is counted right; every page comes back.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwenjax import LLM, SamplingParams
from qwenjax.config import EngineArgs
from qwenjax.core.ngram_proposer import propose_ngram
from qwenjax.worker.rejection_sampler import rejection_sample
from qwenjax.worker.sampler import SamplingRow, build_tensors, choose_mode
from tests.checkpoints import write_checkpoint
from tests.conftest import SMALL_ENGINE, pythonpath_with

ROOT = Path(__file__).resolve().parents[1]

# Prompts with repetition, so the n-gram proposer finds matches (the tiny random model's greedy outputs loop too).
PROMPTS = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7], [1, 2, 3, 1, 2, 3, 1, 2], list(range(20, 40)), [9] * 10,
           [3, 4] * 20, [7, 8, 9] * 9]


def _spec(k: int, lo: int = 1, hi: int = 3) -> dict:
    return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": hi, "prompt_lookup_min": lo}


def _params():
    return [SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, repetition_penalty=1.2),
            SamplingParams(temperature=0.0, max_tokens=33, ignore_eos=True, logprobs=3),
            SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True, frequency_penalty=0.3,
                           presence_penalty=0.2),
            SamplingParams(temperature=0.0, max_tokens=37, stop_token_ids=[9, 11]),
            SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True),
            SamplingParams(temperature=0.0, max_tokens=45, ignore_eos=True, min_tokens=10)]


def _summary(outs):
    return [[(c.token_ids, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outs]


def _all_pages_back(llm) -> bool:
    eng = llm.llm_engine
    eng.blocks.check()
    return eng.blocks.num_free == eng.blocks.num_pages and not eng.has_unfinished_requests()


@pytest.fixture(scope="module")
def base(untied_gqa2):
    return LLM(str(untied_gqa2), **SMALL_ENGINE)


@pytest.fixture(scope="module")
def reference(base):
    return base.generate(prompt_token_ids=PROMPTS, sampling_params=_params(), use_tqdm=False)


# ------------------------------------------------------------------------------------------------ the engine


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_greedy_tokens_identical_with_speculation(untied_gqa2, reference, k):
    """Batched greedy rows (penalties, logprobs, stop ids, min_tokens among them): the same tokens, finish reasons
    and logprobs as without speculation, with proposals accepted along the way."""
    llm = LLM(str(untied_gqa2), **SMALL_ENGINE, speculative_config=_spec(k))
    outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=_params(), use_tqdm=False)
    assert _summary(outs) == _summary(reference)
    ref_lp, lp = reference[1].outputs[0], outs[1].outputs[0]
    for tok, a, b in zip(ref_lp.token_ids, ref_lp.logprobs, lp.logprobs):
        assert sorted(a) == sorted(b) and a[tok].rank == b[tok].rank
        assert all(abs(a[t].logprob - b[t].logprob) < 1e-4 for t in a)
    st = llm.llm_engine.stats
    assert st.spec_decode_verify_steps > 0 and st.spec_decode_num_accepted_tokens > 0  # speculation did happen
    assert st.spec_decode_num_accepted_tokens <= st.spec_decode_num_draft_tokens
    assert len(st.spec_decode_num_accepted_tokens_per_pos) == k
    assert sum(st.spec_decode_num_accepted_tokens_per_pos) == st.spec_decode_num_accepted_tokens
    per_pos = st.spec_decode_num_accepted_tokens_per_pos
    assert all(a >= b for a, b in zip(per_pos, per_pos[1:]))  # position i + 1 is accepted only after i
    assert _all_pages_back(llm)


def test_greedy_identical_under_preemption(untied_gqa2, reference):
    """A cache of 14 pages cannot hold the batch: sequences are preempted and recomputed, proposals find fewer pages
    to spare, and the tokens stay the same."""
    llm = LLM(str(untied_gqa2), **{**SMALL_ENGINE, "num_kv_pages": 14}, speculative_config=_spec(4))
    outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=_params(), use_tqdm=False)
    assert _summary(outs) == _summary(reference)
    st = llm.llm_engine.stats
    assert st.preemptions > 0 and st.spec_decode_num_accepted_tokens > 0
    assert _all_pages_back(llm)


@pytest.fixture(scope="module")
def spec4(untied_gqa2):
    return LLM(str(untied_gqa2), **SMALL_ENGINE, speculative_config=_spec(4))


def replay_acceptance(prompt, ref, k, lo, hi, async_scheduling=True):
    """The counters one greedy request's verify steps give: (verify steps, drafts, proposed, accepted, per position),
    replaying the n-gram proposer and greedy acceptance (a verify step accepts the proposals' longest prefix that
    matches `ref`, then adds one) over the engine's states (engine/spec_step.py): with async scheduling, "B" (m
    outputs known, output m in flight: a match in the known ones drains, else output m + 1 follows in flight) and
    "A" (nothing in flight: a verify step, or output m goes in flight); without, "A" alone."""
    steps = drafts = proposed = accepted = 0
    per_pos = [0] * k
    m, state = 1, "B" if async_scheduling else "A"  # the prefill step sampled the first output
    while m < len(ref):
        room = len(ref) - m - 1 - (state == "B")  # a PENDING output counts against the length limit
        d = propose_ngram(prompt + ref[:m], k=min(k, room), min_n=lo, max_n=hi) if room >= 1 else []
        if state == "B":
            m, state = m + 1, "A" if d else "B"
            continue
        if not d:
            state = "B" if async_scheduling else "A"
            m += not async_scheduling
            continue
        a = next((i for i, t in enumerate(d) if t != ref[m + i]), len(d))
        steps, drafts, proposed, accepted = steps + 1, drafts + 1, proposed + len(d), accepted + a
        for i in range(a):
            per_pos[i] += 1
        m += a + 1
    return steps, drafts, proposed, accepted, per_pos


def test_acceptance_counted_right(base, spec4):
    """One greedy request: the counters equal those of a replay of the n-gram proposer and greedy acceptance over
    the reference output, through the async engine's drains (replay_acceptance)."""
    prompt = [11, 12, 13, 11, 12, 13, 11, 12]
    p = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    ref = base.generate(prompt_token_ids=[prompt], sampling_params=p, use_tqdm=False)[0].outputs[0].token_ids
    st = spec4.llm_engine.stats
    before = (st.spec_decode_verify_steps, st.spec_decode_num_drafts, st.spec_decode_num_draft_tokens,
              st.spec_decode_num_accepted_tokens, list(st.spec_decode_num_accepted_tokens_per_pos))
    out = spec4.generate(prompt_token_ids=[prompt], sampling_params=p, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ref
    steps, drafts, proposed, accepted, per_pos = replay_acceptance(prompt, ref, 4, 1, 3)
    after = (st.spec_decode_verify_steps, st.spec_decode_num_drafts, st.spec_decode_num_draft_tokens,
             st.spec_decode_num_accepted_tokens, st.spec_decode_num_accepted_tokens_per_pos)
    assert accepted > 0
    assert (after[0] - before[0], after[1] - before[1], after[2] - before[2], after[3] - before[3]) == \
        (steps, drafts, proposed, accepted)
    assert [x - y for x, y in zip(after[4], before[4])] == per_pos
    assert 0 < st.spec_decode_acceptance_rate <= 1
    assert _all_pages_back(spec4)


def test_seeded_sampling_repeats(spec4):
    """Sampled rows (temperature, top-k, top-p, min-p, penalties) with seeds: the same outputs on a second run, and
    a seeded request alone gets the tokens it gets in a batch."""
    sp = [SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, seed=s, max_tokens=40, ignore_eos=True,
                         repetition_penalty=1.1) for s in range(len(PROMPTS))]
    first = _summary(spec4.generate(prompt_token_ids=PROMPTS, sampling_params=sp, use_tqdm=False))
    assert _summary(spec4.generate(prompt_token_ids=PROMPTS, sampling_params=sp, use_tqdm=False)) == first
    alone = _summary(spec4.generate(prompt_token_ids=PROMPTS[4:5], sampling_params=sp[4:5], use_tqdm=False))
    assert alone == first[4:5]
    assert _all_pages_back(spec4)


def test_constrained_rows_and_prefix_hits(base, spec4):
    """Rows with allowed_token_ids / bad_words get no proposals but share verify steps with rows that do; every row
    gets the tokens the engine without speculation gives it. A prompt run again hits the prefix cache (only accepted
    tokens were named) and gives the same tokens."""
    p = [SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, allowed_token_ids=[5, 6, 7, 8, 9]),
         SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True),
         SamplingParams(temperature=0.9, seed=1, max_tokens=12, ignore_eos=True, bad_words=["the", "a"])]
    prompts = [PROMPTS[0], PROMPTS[4] + PROMPTS[1], PROMPTS[3]]
    ref = _summary(base.generate(prompt_token_ids=prompts, sampling_params=p, use_tqdm=False))
    st = spec4.llm_engine.stats
    accepted = st.spec_decode_num_accepted_tokens
    assert _summary(spec4.generate(prompt_token_ids=prompts, sampling_params=p, use_tqdm=False)) == ref
    assert st.spec_decode_num_accepted_tokens > accepted
    hits = spec4.llm_engine.blocks.hit_tokens
    assert _summary(spec4.generate(prompt_token_ids=prompts[1:], sampling_params=p[1:], use_tqdm=False)) == ref[1:]
    assert spec4.llm_engine.blocks.hit_tokens > hits
    assert _all_pages_back(spec4)


def test_greedy_identical_over_a_mesh(untied_gqa2):
    """The verify step over a mesh of 2 CPU devices (a subprocess: the device-count flag must not leak), with n-gram
    proposals and with a draft model sharded like the target: tokens equal those of one device without speculation,
    and proposals were accepted."""
    script = textwrap.dedent(f"""
        import json, jax
        from qwenjax import LLM
        from tests.conftest import SMALL_ENGINE
        from tests.test_spec_decode import PROMPTS, _params, _spec, _summary
        assert jax.device_count() == 2
        ref = LLM({str(untied_gqa2)!r}, **SMALL_ENGINE).generate(prompt_token_ids=PROMPTS, sampling_params=_params(),
                                                                 use_tqdm=False)
        llm = LLM({str(untied_gqa2)!r}, **SMALL_ENGINE, tensor_parallel_size=2, speculative_config=_spec(3))
        outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=_params(), use_tqdm=False)
        draft = LLM({str(untied_gqa2)!r}, **SMALL_ENGINE, tensor_parallel_size=2,
                    speculative_config={{"model": {str(untied_gqa2)!r}, "num_speculative_tokens": 2}})
        d_outs = draft.generate(prompt_token_ids=PROMPTS, sampling_params=_params(), use_tqdm=False)
        print(json.dumps({{"same": _summary(outs) == _summary(ref) == _summary(d_outs),
                          "accepted": min(llm.llm_engine.stats.spec_decode_num_accepted_tokens,
                                          draft.llm_engine.stats.spec_decode_num_accepted_tokens),
                          "free": all(e.blocks.num_free == e.blocks.num_pages
                                      for e in (llm.llm_engine, draft.llm_engine))}}))
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": pythonpath_with(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["same"] and res["accepted"] > 0 and res["free"]


def test_disable_by_batch_size(untied_gqa2):
    """vLLM's disable_by_batch_size: decode steps of more rows than it run without speculation."""
    llm = LLM(str(untied_gqa2), **SMALL_ENGINE, speculative_config={**_spec(3), "disable_by_batch_size": 2})
    p = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    st = llm.llm_engine.stats
    llm.generate(prompt_token_ids=PROMPTS[:3], sampling_params=p, use_tqdm=False)  # 3 rows all along
    assert st.spec_decode_verify_steps == 0
    llm.generate(prompt_token_ids=PROMPTS[:2], sampling_params=p, use_tqdm=False)
    assert st.spec_decode_verify_steps > 0 and _all_pages_back(llm)


# ------------------------------------------------------------------------------------ start-up validation


@pytest.mark.parametrize("cfg, match", [
    ({"method": "eagle", "num_speculative_tokens": 2}, "method must be one of 'ngram', 'draft_model'"),
    ({"method": "ngram", "num_speculative_tokens": 0}, r"num_speculative_tokens must be an integer in \[1, 8\]"),
    ({"method": "ngram", "num_speculative_tokens": 9}, r"in \[1, 8\], got 9"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
     r"prompt_lookup_min \(4\) must be <= prompt_lookup_max \(2\)"),
    ({"method": "ngram"}, "needs num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 3}, r"unknown keys \['lookahead'\]"),
    ({"num_speculative_tokens": 2}, "needs 'method'"),
    ("{not json", "must be a JSON object"),
])
def test_bad_speculative_config(cfg, match):
    with pytest.raises(ValueError, match=match):
        EngineArgs(speculative_config=cfg)


def test_speculative_config_defaults_and_conflicts():
    args = EngineArgs(speculative_config='{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4}')
    spec = args.speculative()
    assert (spec.method, spec.num_speculative_tokens, spec.prompt_lookup_max, spec.prompt_lookup_min) == \
        ("ngram", 3, 4, 4)
    assert EngineArgs(speculative_config={"method": "ngram", "num_speculative_tokens": 1}).speculative() \
        .prompt_lookup_min == 5  # vLLM's default for both bounds
    assert args.async_scheduling  # n-gram speculation keeps async scheduling (draft-model: tests/test_spec_async.py)
    # verify steps of B * (k + 1) <= 512 rows: larger decode buckets run without speculation
    assert args.speculative().verify_batches((1, 8, 16, 32, 64, 128, 256)) == (1, 8, 16, 32, 64, 128)
    assert EngineArgs(speculative_config=_spec(7)).speculative().verify_batches((1, 8, 64, 128)) == (1, 8, 64)
    with pytest.raises(ValueError, match="disable_by_batch_size must be an integer >= 1"):
        EngineArgs(speculative_config={**_spec(2), "disable_by_batch_size": 0})
    with pytest.raises(ValueError, match="num_scheduler_steps=1"):
        EngineArgs(speculative_config=_spec(2), num_scheduler_steps=4)
    assert any("speculative_config" in m for m in
               EngineArgs(speculative_config=_spec(2), num_processes=2).unsupported())


def test_draft_model_must_share_the_vocabulary(untied_gqa2, tmp_path):
    other_vocab = write_checkpoint(tmp_path / "draft1024", vocab_size=1024, hidden_size=32, intermediate_size=32,
                                   num_layers=1, num_heads=2, num_kv_heads=1)
    with pytest.raises(ValueError, match="vocab_size 1024, more than the target's 512"):
        LLM(str(untied_gqa2), **SMALL_ENGINE, speculative_config={"model": str(other_vocab),
                                                                  "num_speculative_tokens": 2})


# ------------------------------------------------------------------------------------------- a draft model


@pytest.fixture(scope="module")
def small_draft(tmp_path_factory):
    """A 1-layer draft with the target's tokenizer and a smaller embedding (500 of the target's 512 ids, as
    Qwen2-0.5B's 151,936 under Qwen2-7B's 152,064); random, so it rarely agrees with the target."""
    return write_checkpoint(tmp_path_factory.mktemp("draft") / "d", vocab_size=500, hidden_size=32,
                            intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1, seed=4)


@pytest.mark.parametrize("draft, k, pages", [("self", 3, 64), ("small", 2, 64), ("self", 4, 14)],
                         ids=["self-k3", "small-k2", "self-k4-preempted"])
def test_draft_model_greedy_identical(untied_gqa2, small_draft, reference, draft, k, pages):
    """A draft model's proposals (the target itself as its own draft: they agree but for the penalised rows; a small
    random draft: they rarely agree) change no greedy token, also when a 14-page cache preempts."""
    path = untied_gqa2 if draft == "self" else small_draft
    llm = LLM(str(untied_gqa2), **{**SMALL_ENGINE, "num_kv_pages": pages},
              speculative_config={"model": str(path), "num_speculative_tokens": k})
    outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=_params(), use_tqdm=False)
    assert _summary(outs) == _summary(reference)
    st = llm.llm_engine.stats
    assert st.spec_decode_num_draft_tokens > 0
    if draft == "self":  # the draft's cache followed every step: it predicts the target's unpenalised rows
        assert st.spec_decode_num_accepted_tokens > 0.7 * st.spec_decode_num_draft_tokens
    if pages == 14:
        assert st.preemptions > 0
    assert _all_pages_back(llm)


def test_draft_memory_checked_at_start_up(small_draft, monkeypatch):
    """On a device with a memory pool, a draft that does not fit beside the target is refused with the numbers."""
    from qwenjax.engine import draft_model
    from qwenjax.worker.kv_cache import MemoryInfo

    args = EngineArgs(model=str(small_draft), dtype="float32")
    almost_full = MemoryInfo(limit=1 << 20, in_use=(1 << 20) - 4096, peak=0)
    monkeypatch.setattr(draft_model, "device_memory", lambda: almost_full)
    with pytest.raises(ValueError, match=r"needs 0\.\d+ GiB a device .*target's 64 pages.*gpu_memory_utilization"):
        draft_model.check_draft_memory(args, 64)
    monkeypatch.setattr(draft_model, "device_memory", lambda: MemoryInfo(limit=1 << 30, in_use=0, peak=0))
    draft_model.check_draft_memory(args, 64)  # fits


def test_draft_model_prefix_hits_forks_and_seeds(untied_gqa2):
    """The draft's cache mirrors the target's pages: a prompt run again (prefix-cache hits) and n > 1 copies (forked
    pages) keep the target-as-draft's proposals accepted; seeded sampled rows repeat."""
    llm = LLM(str(untied_gqa2), **SMALL_ENGINE, speculative_config={"model": str(untied_gqa2),
                                                                    "num_speculative_tokens": 3})
    greedy = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    prompt = PROMPTS[2] + PROMPTS[4]
    first = llm.generate(prompt_token_ids=[prompt], sampling_params=greedy, use_tqdm=False)[0].outputs[0].token_ids
    st, hits = llm.llm_engine.stats, llm.llm_engine.blocks.hit_tokens
    drafted, accepted = st.spec_decode_num_draft_tokens, st.spec_decode_num_accepted_tokens
    again = llm.generate(prompt_token_ids=[prompt], sampling_params=greedy, use_tqdm=False)[0].outputs[0].token_ids
    assert again == first and llm.llm_engine.blocks.hit_tokens > hits
    assert st.spec_decode_num_accepted_tokens - accepted > 0.9 * (st.spec_decode_num_draft_tokens - drafted)
    sampled = SamplingParams(temperature=0.8, top_p=0.9, seed=3, n=3, max_tokens=24, ignore_eos=True)
    a = _summary(llm.generate(prompt_token_ids=[prompt], sampling_params=sampled, use_tqdm=False))
    assert _summary(llm.generate(prompt_token_ids=[prompt], sampling_params=sampled, use_tqdm=False)) == a
    assert _all_pages_back(llm)


# --------------------------------------------------------------------------- rejection sampling's distribution


def _chi2_critical(df: int, z: float = 3.719) -> float:
    """The chi-square quantile at p = 1e-4 (z: the normal's), by Wilson and Hilferty's approximation."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _chi2(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    n = counts.sum()
    assert np.all(counts[probs == 0] == 0), "a token outside the target's support was drawn"
    keep = probs > 0
    expected = probs[keep] * n
    return float(((counts[keep] - expected) ** 2 / expected).sum()), int(keep.sum()) - 1


def _target(logits: np.ndarray, *, temperature: float, top_k: int, presence: np.ndarray) -> np.ndarray:
    """numpy: presence penalty, temperature, then top-k, renormalised."""
    x = (logits - presence) / temperature
    kth = np.sort(x)[::-1][top_k - 1]
    x = np.where(x < kth, -np.inf, x)
    p = np.exp(x - x.max())
    return p / p.sum()


def test_rejection_sampling_preserves_the_target_distribution():
    """8-token vocabulary, 2 drafts a row, 40000 rows with their own seeds. Position 0's token (the accepted draft
    or the residual draw) follows p_0; given draft 1 accepted, position 1's follows p_1, whose presence penalty
    counts draft 1; draft 1 is accepted with probability p_0(draft 1)."""
    V, N, rng = 8, 40000, np.random.default_rng(0)
    logits = rng.normal(0, 1.5, (2, V)).astype(np.float32)
    params = SamplingParams(temperature=0.7, top_k=6, presence_penalty=0.8, seed=0)
    p0 = _target(logits[0], temperature=0.7, top_k=6, presence=np.zeros(V))
    d1 = int(np.argsort(p0)[-2])  # the second most likely: accepted often, rejected often
    d2 = int(np.argmax(logits[1]))
    present = np.zeros(V)
    present[d1] = 0.8
    p1 = _target(logits[1], temperature=0.7, top_k=6, presence=present)
    rows = [SamplingRow(params=params, seed=s, output_ids=range(3 + j)) for s in range(N) for j in range(3)]
    tensors = build_tensors(rows, num_rows=3 * N, vocab_size=V, with_history=False)
    mode = choose_mode(rows)
    assert mode.penalties and not mode.all_greedy
    full = np.zeros((N, 3, V), np.float32)
    full[:, :2] = logits
    history = (jnp.zeros((N, V), bool), jnp.zeros((N, V), jnp.int32))
    drafts = np.tile(np.array([[d1, d2]], np.int32), (N, 1))
    out = jax.jit(rejection_sample, static_argnames="mode")(full, jax.tree.map(jnp.asarray, tensors), mode,
                                                            drafts, np.full((N,), 2, np.int32), history)
    tokens, accepted = np.asarray(out.token_ids), np.asarray(out.num_accepted)
    stat, df = _chi2(np.bincount(tokens[:, 0], minlength=V), p0)
    assert stat < _chi2_critical(df), (stat, df)
    took = accepted >= 1
    assert np.array_equal(took, tokens[:, 0] == d1)
    rate = took.mean()
    assert abs(rate - p0[d1]) < 4 * math.sqrt(p0[d1] * (1 - p0[d1]) / N)
    stat, df = _chi2(np.bincount(tokens[took, 1], minlength=V), p1)
    assert stat < _chi2_critical(df), (stat, df)


def test_rejection_sampling_greedy_rows():
    """Greedy rows accept the drafts' longest prefix that equals the argmax chain, then the argmax after it."""
    V = 16
    logits = np.full((3, 4, V), -1.0, np.float32)
    for j, t in enumerate((3, 5, 7, 9)):
        logits[:, j, t] = 2.0
    drafts = np.array([[3, 5, 7], [3, 6, 7], [3, 5, 0]], np.int32)
    num = np.array([3, 3, 2], np.int32)
    rows = [SamplingRow(params=SamplingParams(temperature=0.0), seed=0, output_ids=range(j)) for _ in range(3)
            for j in range(4)]
    tensors = build_tensors(rows, num_rows=12, vocab_size=V, with_history=False)
    out = rejection_sample(jnp.asarray(logits), tensors, choose_mode(rows), drafts, num)
    assert np.asarray(out.num_accepted).tolist() == [3, 1, 2]
    tok = np.asarray(out.token_ids)
    assert tok[0].tolist() == [3, 5, 7, 9] and tok[1, :2].tolist() == [3, 5] and tok[2, :3].tolist() == [3, 5, 7]


# ------------------------------------------------------------------------------------------------- the server


def test_server_flag_and_metrics(spec4):
    """`--speculative-config JSON` reaches EngineArgs; /metrics carries vLLM's spec_decode counters."""
    from server.__main__ import engine_args, make_parser
    from server.metrics import ServerMetrics

    ns = make_parser().parse_args(["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3, '
                                   '"prompt_lookup_max": 4, "prompt_lookup_min": 2}'])
    spec = engine_args(ns).speculative()
    assert (spec.method, spec.num_speculative_tokens, spec.prompt_lookup_max, spec.prompt_lookup_min) == \
        ("ngram", 3, 4, 2)
    spec4.generate(prompt_token_ids=PROMPTS[:2], sampling_params=_params()[:2], use_tqdm=False)
    st = spec4.llm_engine.stats
    text = ServerMetrics(spec4.llm_engine, "m").render().decode()
    assert f'vllm:spec_decode_num_drafts_total{{model_name="m"}} {float(st.spec_decode_num_drafts)}' in text
    assert f'vllm:spec_decode_num_draft_tokens_total{{model_name="m"}} ' \
           f'{float(st.spec_decode_num_draft_tokens)}' in text
    assert f'vllm:spec_decode_num_accepted_tokens_total{{model_name="m"}} ' \
           f'{float(st.spec_decode_num_accepted_tokens)}' in text
    for i, n in enumerate(st.spec_decode_num_accepted_tokens_per_pos):
        assert f'vllm:spec_decode_num_accepted_tokens_per_pos_total{{model_name="m",position="{i}"}} ' \
               f'{float(n)}' in text
    assert st.spec_decode_num_accepted_tokens > 0
