"""Scheduler on the host: prefix hits through admission, n > 1 sharing, policy orders and preemption victims."""

from __future__ import annotations

import pytest

from qwenjax.config import SCHEDULING_POLICIES, EngineArgs
from qwenjax.core.block_manager import BlockManager
from qwenjax.core.policies import POLICIES, FairSharePolicy, make_policy
from qwenjax.core.scheduler import Scheduler
from qwenjax.core.sequence import Sequence
from qwenjax.sampling_params import SamplingParams
from qwenjax.scheduler_config import SchedulerConfig

PS = 16
GREEDY = SamplingParams(temperature=0.0)


def _config(**kw):
    # Chunked prefill (mixed steps) off unless a test turns it on: most tests here look at prefill steps.
    return SchedulerConfig.build(**{**dict(max_model_len=128, max_num_seqs=8, max_num_batched_tokens=256,
                                           block_size=PS, decode_buckets=(8,), prefill_token_buckets=(32, 128),
                                           enable_chunked_prefill=False),
                                    **kw})


def _sched(num_pages=64, caching=True, policy=None, **kw):
    return Scheduler(_config(**kw), BlockManager(num_pages, PS, enable_prefix_caching=caching), policy)


def _seq(tokens, t=0.0, rid="r", params=GREEDY, **kw):
    return Sequence(request_id=rid, index=0, prompt_token_ids=list(tokens), params=params, seed=0, arrival_time=t,
                    **kw)


def _run(s: Scheduler, out, token=1):
    """What the engine does after a step: count computed tokens, append a sampled token."""
    for r in out.rows:
        r.seq.num_computed += r.num_new_tokens
        if r.samples:
            r.seq.output_token_ids.append(token)


def test_config_names_every_registered_policy():
    """EngineArgs validates scheduling_policy against config's names (config sits below core): they must be the
    registry's."""
    assert tuple(POLICIES) == SCHEDULING_POLICIES
    with pytest.raises(ValueError, match="scheduling_policy must be one of 'fcfs', 'priority', 'spf', 'fair'"):
        EngineArgs(scheduling_policy="lifo")


def test_second_prompt_hits_the_first_ones_pages():
    s = _sched()
    prefix = list(range(100, 140))  # 40 tokens: 2 full blocks + 8
    a = _seq(prefix + [1, 2], rid="a")
    s.add(a)
    out = s.schedule()
    assert not out.has_context and a.block_table == [0, 1, 2] and out.rows[0].num_new_tokens == 42
    _run(s, out)
    b = _seq(prefix + [3, 4, 5], rid="b")
    s.add(b)
    out = s.schedule()
    assert out.kind == "prefill" and out.has_context and out.bucket == (1, 32)
    assert [r.seq for r in out.rows] == [b]
    assert b.block_table == [0, 1, 3] and b.num_computed == 32 and b.num_cached_tokens == 32
    assert out.rows[0].num_new_tokens == 11 and out.rows[0].samples
    assert (s.blocks.query_tokens, s.blocks.hit_tokens) == (43 + 42, 32)
    assert [s.blocks.ref_count(p) for p in range(4)] == [2, 2, 1, 1]
    _run(s, out)
    s.remove(a)
    s.remove(b)
    assert s.blocks.num_free == 64
    s.blocks.check()


def test_whole_prompt_cached_still_computes_its_last_block():
    s = _sched()
    p = list(range(32))  # exactly 2 blocks
    a = _seq(p, rid="a")
    s.add(a)
    _run(s, s.schedule())
    s.remove(a)
    assert s.blocks.num_cached_free == 2
    b = _seq(p, rid="b")
    s.add(b)
    out = s.schedule()
    # At most (32 - 1) // 16 = 1 block hits: the last block is recomputed into a fresh page, never a shared one.
    # Page 0 hits; page 1 (a's named last block) stays cached and free; the fresh page comes from the plain list.
    assert b.block_table == [0, 2] and b.num_computed == 16 and out.rows[0].num_new_tokens == 16
    assert out.has_context and s.blocks.ref_count(1) == 0 and s.blocks.num_cached_free == 1


def test_n_siblings_share_the_prompt_pages():
    s = _sched()
    p = list(range(40))
    sibs = [Sequence(request_id="r", index=i, prompt_token_ids=p, params=GREEDY, seed=i, arrival_time=0.0)
            for i in range(3)]
    other = _seq([9] * 5, t=1.0, rid="o")
    for q in sibs + [other]:
        s.add(q)
    out = s.schedule()
    # Sibling 0 computes the two full blocks; siblings 1 and 2 wait for them as hits, `other` joins the batch.
    assert [r.seq for r in out.rows] == [sibs[0], other] and not out.has_context
    _run(s, out)
    out = s.schedule()
    assert [r.seq for r in out.rows] == [sibs[1]] and out.has_context and sibs[1].block_table[:2] == [0, 1]
    _run(s, out)
    out = s.schedule()
    assert [r.seq for r in out.rows] == [sibs[2]] and sibs[2].block_table[:2] == [0, 1]
    assert s.blocks.ref_count(0) == 3 and s.blocks.hit_tokens == 64


def test_penalised_sequences_take_hits_and_their_step_rebuilds_the_history():
    from qwenjax.worker.step_input import build_step_input

    s = _sched()
    p = list(range(40))
    a = _seq(p, rid="a")
    s.add(a)
    _run(s, s.schedule())
    b = _seq(p, rid="b", params=SamplingParams(temperature=0.0, repetition_penalty=1.1))
    s.add(b)
    out = s.schedule()
    assert out.has_context and b.num_computed == 32 and b.block_table[:2] == a.block_table[:2]
    inp = build_step_input(out, page_size=16, num_pages=s.blocks.num_pages, max_pages_per_seq=s.config.max_pages_per_seq,
                           scratch_slot=99)
    # The admitting step clears b's penalty row and refills it with the 32 tokens it skips; nothing else.
    assert inp.reset.tolist() == [True] and inp.history.shape == (1, s.config.max_pages_per_seq * 16)
    assert inp.history[0, :32].tolist() == p[:32] and (inp.history[0, 32:] == -1).all()


def test_preempted_sequence_recomputes_from_its_own_cached_pages():
    s = _sched(num_pages=5, max_model_len=80)
    a = _seq(list(range(32)), t=0.0, rid="a")  # 2 pages
    b = _seq(list(range(50, 82)), t=1.0, rid="b")  # 2 pages
    s.add(a)
    s.add(b)
    out = s.schedule()
    assert a.block_table == [0, 1] and b.block_table == [2, 3]
    _run(s, out)
    out = s.schedule()  # decode: both at 33 tokens need a third page; one free: b (newest) is preempted
    assert out.kind == "decode" and [r.seq for r in out.rows] == [a] and out.preempted == [b]
    assert a.block_table == [0, 1, 4]
    _run(s, out)
    s.remove(a)
    out = s.schedule()
    # b's two full blocks (pages 2, 3) were named before release and are still cached: only its newest token runs.
    assert out.has_context and [r.seq for r in out.rows] == [b] and b.block_table[:2] == [2, 3]
    assert b.num_computed == 32 and out.rows[0].num_new_tokens == 1 and out.rows[0].samples


# ---- policies

def test_policy_names_and_engine_args():
    assert set(POLICIES) == {"fcfs", "priority", "spf", "fair"}
    assert EngineArgs(scheduling_policy="priority").scheduling_policy == "priority"
    with pytest.raises(ValueError, match="scheduling_policy must be one of 'fcfs', 'priority', 'spf', 'fair'"):
        EngineArgs(scheduling_policy="lifo")
    with pytest.raises(ValueError, match="got 'x'"):
        make_policy("x")


def _admitted(policy, seqs, max_num_seqs=1):
    s = _sched(caching=False, policy=policy, max_num_seqs=max_num_seqs, decode_buckets=(max_num_seqs,))
    for q in seqs:
        s.add(q)
    order = []
    while s.has_work():
        out = s.schedule()
        if out.kind == "prefill":
            order += [r.seq.request_id for r in out.rows]
        for r in out.rows:
            s.remove(r.seq)  # finish at once: the next one is admitted
    return order


def test_admission_orders():
    seqs = lambda: [_seq([1] * 30, t=0, rid="a", priority=2), _seq([1] * 5, t=1, rid="b", priority=0),
                    _seq([1] * 20, t=2, rid="c", priority=1), _seq([1] * 10, t=3, rid="d", priority=0)]
    assert _admitted("fcfs", seqs()) == ["a", "b", "c", "d"]
    assert _admitted("priority", seqs()) == ["b", "d", "c", "a"]
    assert _admitted("spf", seqs()) == ["b", "d", "c", "a"]


def test_shortest_prompt_first_order():
    seqs = [_seq([1] * 30, t=0, rid="a"), _seq([1] * 5, t=1, rid="b"), _seq([1] * 20, t=2, rid="c"),
            _seq([1] * 10, t=3, rid="d")]
    assert _admitted("spf", seqs) == ["b", "d", "c", "a"]


def test_fair_share_alternates_clients():
    # Client x sends four requests before client y's two; fair share interleaves them by tokens served.
    seqs = [_seq([1] * 10, t=i, rid=f"x{i}", client="x") for i in range(4)] + \
           [_seq([1] * 10, t=10 + i, rid=f"y{i}", client="y") for i in range(2)]
    assert _admitted("fcfs", list(seqs)) == ["x0", "x1", "x2", "x3", "y0", "y1"]
    seqs = [_seq([1] * 10, t=i, rid=f"x{i}", client="x") for i in range(4)] + \
           [_seq([1] * 10, t=10 + i, rid=f"y{i}", client="y") for i in range(2)]
    assert _admitted("fair", seqs) == ["x0", "y0", "x1", "y1", "x2", "x3"]


def test_client_defaults_to_the_request_id():
    assert _seq([1], rid="q7").client == "q7"


def test_fair_share_newcomer_starts_at_the_least_usage():
    p = FairSharePolicy()
    p.usage.update({"x": 500, "y": 300})
    assert p.key(_seq([1], rid="z"))[0] == 300


@pytest.mark.parametrize("policy,victim", [("fcfs", "c"), ("priority", "a"), ("spf", "a"), ("fair", "b")])
def test_preemption_victim_per_policy(policy, victim):
    a = _seq([1] * 40, t=0, rid="a", priority=5, client="k")
    b = _seq([1] * 10, t=1, rid="b", priority=0, client="heavy")
    c = _seq([1] * 20, t=2, rid="c", priority=1, client="k2")
    pol = make_policy(policy)
    if policy == "fair":
        pol.usage.update({"k": 10, "heavy": 900, "k2": 20})
    assert pol.victim([a, b, c]).request_id == victim


# ------------------------------------------------------------------ chunked prefill: mixed steps


def test_mixed_buckets_follow_the_prefill_buckets_up_to_the_chunk():
    c = _config(enable_chunked_prefill=True, decode_buckets=(1, 8), prefill_token_buckets=(32, 128, 512, 2048),
                max_model_len=4096, max_num_batched_tokens=4096)
    assert c.mixed_chunks == (32, 128, 512)
    assert c.mixed_buckets == tuple((d, 1, q) for d in (1, 8) for q in (32, 128, 512))
    assert _config(enable_chunked_prefill=False).mixed_buckets == ()


def test_new_request_joins_running_decodes():
    s = _sched(enable_chunked_prefill=True)
    a = _seq(range(40), rid="a")
    s.add(a)
    out = s.schedule()
    assert out.kind == "prefill" and [r.seq for r in out.rows] == [a]
    _run(s, out)
    b = _seq(range(100, 120), rid="b")
    s.add(b)
    out = s.schedule()
    # a decodes, b's whole prompt (20 tokens, bucket Q 32) rides along, after the decode segment's D = 8 rows.
    assert out.kind == "mixed" and [r.seq for r in out.rows] == [a, b]
    assert [r.num_new_tokens for r in out.rows] == [1, 20] and out.rows[1].samples
    assert out.bucket == (1, 32) and out.decode_bucket == 8 and out.num_decode == 1 and out.has_context
    assert out.num_rows == 9 and [out.row_index(i) for i in range(2)] == [0, 8]
    assert b.slot is not None and b in s.running and not s.waiting


def test_long_prompt_chunks_ride_with_decodes():
    s = _sched(enable_chunked_prefill=True, max_model_len=512, max_num_batched_tokens=512,
               prefill_token_buckets=(32, 128))
    a = _seq(range(10), rid="a")
    s.add(a)
    _run(s, s.schedule())
    long = _seq(range(1000, 1300), rid="long")  # 300 tokens: chunks of at most 128 (the largest mixed Q)
    s.add(long)
    chunks = []
    for _ in range(3):
        out = s.schedule()
        assert out.kind == "mixed" and out.rows[0].seq is a and out.rows[-1].seq is long
        chunks.append((long.num_computed, out.rows[-1].num_new_tokens, out.rows[-1].samples))
        _run(s, out)
    assert chunks == [(0, 128, False), (128, 128, False), (256, 44, True)]
    assert len(long.block_table) == -(-301 // PS)  # pages for the prompt and the sampled token's slot to come


def test_burst_of_requests_runs_as_a_prefill_step():
    s = _sched(enable_chunked_prefill=True)
    a = _seq(range(10), rid="a")
    s.add(a)
    _run(s, s.schedule())
    b, c = _seq(range(100, 110), rid="b"), _seq(range(200, 210), rid="c")
    s.add(b)
    s.add(c)
    out = s.schedule()  # two can start: one prefill step of both, the decode waits a step
    assert out.kind == "prefill" and [r.seq for r in out.rows] == [b, c]


def test_prefix_hit_joins_decodes_with_its_cached_pages():
    s = _sched(enable_chunked_prefill=True)
    prefix = list(range(500, 532))  # two full pages
    a = _seq(prefix + [1, 2], rid="a")
    s.add(a)
    _run(s, s.schedule())
    b = _seq(prefix + [7, 8, 9], rid="b")
    s.add(b)
    out = s.schedule()
    assert out.kind == "mixed" and out.rows[-1].seq is b
    assert b.num_computed == 32 and b.num_cached_tokens == 32 and out.rows[-1].num_new_tokens == 3
    assert b.block_table[:2] == a.block_table[:2]


def test_no_room_for_the_chunk_leaves_a_decode_step():
    s = _sched(num_pages=4, enable_chunked_prefill=True)
    a = _seq(range(40), rid="a")  # 3 pages of 4
    s.add(a)
    _run(s, s.schedule())
    b = _seq(range(100, 140), rid="b")  # needs 3 more pages: does not fit
    s.add(b)
    out = s.schedule()
    assert out.kind == "decode" and [r.seq for r in out.rows] == [a] and b in s.waiting and not b.block_table


def _copies(tokens, n, rid="many"):
    """An n > 1 request's sequences as LLMEngine.add_request links them: copies 1..n-1 fork from copy 0."""
    seqs = [_seq(tokens, rid=rid) for _ in range(n)]
    for i, c in enumerate(seqs):
        c.index = i
        if i:
            c.parent, c.copy_pending = seqs[0], True
    seqs[0].num_unforked = n - 1
    return seqs


def test_copies_fork_from_the_parents_prompt_pages_with_exact_ids():
    """A 40-token prompt: the parent prefills once (pages 0, 1, 2); at the next step the 2 copies share pages 0 and 1
    (positions 0..31), each gets a page of its own for position 39 with a device copy of page 2 (positions 32..38),
    and both decode with the parent. Pins go once every copy started; all pages come back."""
    s = _sched(num_pages=16)
    parent, c1, c2 = _copies(range(100, 140), 3)
    for q in (parent, c1, c2):
        s.add(q)
    out = s.schedule()
    assert [r.seq for r in out.rows] == [parent] and out.kind == "prefill" and not out.forks
    assert parent.block_table == [0, 1, 2] and parent.fork_pages == [0, 1, 2]  # pinned: 40 - 1 positions
    _run(s, out)
    out = s.schedule()
    assert [(f.src, f.dst, f.slot) for f in out.forks] == [(2, 3, c1.slot), (2, 4, c2.slot)]
    assert c1.block_table == [0, 1, 3] and c2.block_table == [0, 1, 4] and c1.num_computed == 39
    assert out.kind == "decode" and {r.seq for r in out.rows} == {parent, c1, c2}
    assert parent.fork_pages is None and s.num_waiting_copies == 0  # every copy started: pins released
    assert [s.blocks.ref_count(p) for p in range(5)] == [3, 3, 1, 1, 1]
    _run(s, out)
    for q in (parent, c1, c2):
        s.remove(q)
    s.blocks.check()
    assert s.blocks.num_free == 16


def test_copies_that_do_not_fit_go_behind_later_requests():
    s = _sched(max_num_seqs=2, decode_buckets=(2,))
    seqs = _copies(range(100, 110), 4)
    for q in seqs:
        s.add(q)
    _run(s, s.schedule())  # the parent's prefill
    late = _seq(range(200, 205), t=1.0, rid="late")
    s.add(late)
    out = s.schedule()  # one slot left: one copy forks, the other two go behind `late`
    assert [f.slot for f in out.forks] == [seqs[1].slot]
    assert list(s.waiting) == [late, seqs[2], seqs[3]]
