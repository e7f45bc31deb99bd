"""Long prompts alone (issue 29): the steps the scheduler gives a lone long prompt (chunks as large as the budget and
the compiled buckets allow, each a one-row rectangular step, never packed), and the engine's tokens and logprobs
for a prompt that crosses chunk boundaries that way, against transformers (plain RoPE and YaRN)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qwenjax import LLM, SamplingParams
from qwenjax.core.block_manager import BlockManager
from qwenjax.core.scheduler import Scheduler
from qwenjax.core.sequence import Sequence
from qwenjax.scheduler_config import LONG_PREFILL_ROW, MIXED_CHUNK, SchedulerConfig
from tests.checkpoints import hf_greedy, hf_model, write_checkpoint

GREEDY = SamplingParams(temperature=0.0)


def _seq(n: int, rid: str) -> Sequence:
    return Sequence(request_id=rid, index=0, prompt_token_ids=[1 + i % 500 for i in range(n)], params=GREEDY,
                    seed=0, arrival_time=0.0)


def _steps(cfg: SchedulerConfig, lengths: list[int]) -> list[tuple]:
    """(kind, has_context, bucket, new tokens per row) of every step until the prompts are computed and each
    sampled one token; nothing else runs."""
    s = Scheduler(cfg, BlockManager(cfg.max_pages_per_seq * len(lengths) + 8, cfg.block_size,
                                    enable_prefix_caching=False))
    seqs = [_seq(n, f"r{i}") for i, n in enumerate(lengths)]
    for q in seqs:
        s.add(q)
    steps = []
    while any(not q.output_token_ids for q in seqs):
        out = s.schedule()
        steps.append((out.kind, out.has_context, out.bucket, [r.num_new_tokens for r in out.rows]))
        for r in out.rows:
            r.seq.num_computed += r.num_new_tokens
            if r.samples:
                r.seq.output_token_ids.append(7)
    return steps


def _config(max_model_len: int, budget: int | None, **kw) -> SchedulerConfig:
    return SchedulerConfig.build(max_model_len=max_model_len, max_num_seqs=kw.pop("max_num_seqs", 1024),
                                 max_num_batched_tokens=budget, block_size=16, **kw)


@pytest.mark.parametrize("max_model_len, budget, prompt, chunk, steps", [
    (131072, 16384, 131071, 16384, 8),   # an H100's offline budget (config.batch_defaults): 128k in 8 steps
    (131072, 8192, 32768, 8192, 4),      # the server's budget, 32k
    (32768, None, 20000, 8192, 3),       # the default budget elsewhere: min(8192, max_model_len)
    (131072, 40000, 100000, 32768, 4),   # a budget that is no power of two: the largest bucket within it
])
def test_lone_long_prompt_runs_in_budget_chunks_on_the_rectangular_path(max_model_len, budget, prompt, chunk,
                                                                         steps):
    cfg = _config(max_model_len, budget)
    assert cfg.max_prefill_chunk == chunk and (1, chunk) in cfg.prefill_buckets
    got = _steps(cfg, [prompt])
    assert len(got) == steps
    assert [n for *_, (n,) in got] == [chunk] * (steps - 1) + [prompt - chunk * (steps - 1)]
    for kind, has_context, (b, q), rows in got:
        # One row, on a compiled (1, Q) bucket: the smallest that holds it, reading its cached pages.
        assert kind == "prefill" and has_context and b == 1 and (1, q) in cfg.prefill_buckets
        assert q == min(x for _, x in cfg.prefill_buckets if x >= rows[0])
    # The shapes a 128k prompt uses are among a handful compiled at start-up, whatever the prompt's length.
    assert len(cfg.prefill_buckets) <= 6


def test_short_or_many_prompts_stay_packed():
    cfg = _config(32768, 8192)
    # A lone prompt of at most LONG_PREFILL_ROW tokens (a chat turn, the latency workload): packed as before.
    ((kind, has_context, bucket, rows),) = _steps(cfg, [LONG_PREFILL_ROW])
    assert kind == "prefill" and not has_context and rows == [LONG_PREFILL_ROW] and bucket in cfg.packed_buckets
    # A burst of prompts, long ones included, packs while they fit the budget.
    first = _steps(cfg, [3000, 3000, 1000])[0]
    assert first[:2] == ("prefill", False) and first[3] == [3000, 3000, 1000]
    # A long prompt that fills the budget alone, then two more: a rectangular step, then the others packed.
    got = _steps(cfg, [8192, 300, 400])
    assert got[0][:3] == ("prefill", True, (1, 8192)) and got[1][1] is False and got[1][3] == [300, 400]


def test_chunks_shrink_only_while_something_decodes():
    """A long prompt arriving while another sequence decodes joins the decode steps MIXED_CHUNK tokens at a time
    (the decodes' inter-token latency); alone it takes the whole chunk."""
    cfg = _config(32768, 8192, max_num_seqs=4, enable_chunked_prefill=True)
    s = Scheduler(cfg, BlockManager(2 * cfg.max_pages_per_seq + 8, 16, enable_prefix_caching=False))
    a, b = _seq(100, "a"), _seq(20000, "b")
    s.add(a)
    out = s.schedule()
    a.num_computed += 100
    a.output_token_ids.append(7)
    s.add(b)
    out = s.schedule()
    assert out.kind == "mixed" and out.rows[-1].seq is b and out.rows[-1].num_new_tokens == MIXED_CHUNK
    b.num_computed += MIXED_CHUNK
    a.output_token_ids.append(7)  # a's newest token counted, as the engine does
    a.num_computed += 1
    s.remove(a)  # a finishes: b is alone
    out = s.schedule()
    assert out.kind == "prefill" and out.has_context and out.rows[0].num_new_tokens == 8192


# ---- end to end against transformers -----------------------------------------------------------------------------
ORIGINAL, FACTOR, LONGEST = 512, 4.0, 2048
YARN = {"rope_type": "yarn", "factor": FACTOR, "original_max_position_embeddings": ORIGINAL}
# One 1,024-token chunk a step (the budget); buckets of 256 / 512 / 1024 tokens: a 1,400-token prompt alone runs as
# (1, 1024) then (1, 512), both rectangular (its first chunk is past LONG_PREFILL_ROW).
ENGINE = dict(dtype="float32", max_model_len=LONGEST, max_num_seqs=4, max_num_batched_tokens=1024, block_size=16,
              decode_buckets=(4,), prefill_token_buckets=(256, 512, 1024), num_kv_pages=LONGEST // 16 + 8)
NEW = 8


@pytest.fixture(scope="module")
def long_ckpts(ckpt_dir):
    return {"plain": write_checkpoint(ckpt_dir / "long_plain", max_position_embeddings=LONGEST, seed=21),
            "yarn": write_checkpoint(ckpt_dir / "long_yarn", max_position_embeddings=ORIGINAL, seed=21,
                                     rope_parameters=YARN)}


@pytest.mark.parametrize("kind", ["plain", "yarn"])
def test_lone_long_prompt_equals_hf(long_ckpts, kind):
    prompt = list(map(int, np.random.default_rng(5).integers(0, 512, 1400)))
    model = hf_model(long_ckpts[kind])
    want = hf_greedy(model, [prompt], NEW)[0]
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([prompt + want])).logits[0], -1).numpy()
    llm = LLM(str(long_ckpts[kind]), **ENGINE)
    assert llm.llm_engine.max_model_len == LONGEST
    sched = llm.llm_engine.scheduler
    seen = []
    schedule = sched.schedule

    def recording():
        out = schedule()
        if out is not None:
            seen.append((out.kind, out.has_context, out.bucket, [r.num_new_tokens for r in out.rows]))
        return out

    sched.schedule = recording
    params = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True, logprobs=1, prompt_logprobs=1)
    out = llm.generate(prompt_token_ids=[prompt], sampling_params=params, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == want
    assert seen[:2] == [("prefill", True, (1, 1024), [1024]), ("prefill", True, (1, 512), [376])]
    assert all(s[0] == "decode" for s in seen[2:])
    # Every prompt position's logprob (both chunks: the second reads the first's pages) and every sampled one.
    tokens = prompt + want
    lps = [e[t].logprob for e, t in zip(out.prompt_logprobs[1:], prompt[1:])]
    lps += [e[t].logprob for e, t in zip(out.outputs[0].logprobs, want)]
    expected = [ref[i, tokens[i + 1]] for i in range(len(tokens) - 1)]
    np.testing.assert_allclose(lps, expected, atol=2e-4)
