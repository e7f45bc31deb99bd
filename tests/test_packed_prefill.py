"""Packed prefill steps: fresh rows back to back on one token axis (scheduler, step input, attention, penalties).

The end-to-end check (greedy tokens and logprobs against Hugging Face with prompts of different lengths in one packed
step) is in test_generate_vs_hf.py; here each piece is checked against the [B, Q] layout it replaces.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwenjax.core.block_manager import BlockManager
from qwenjax.core.scheduler import Scheduler
from qwenjax.core.sequence import Sequence
from qwenjax.layers.attention import (
    packed_attention,
    packed_kernels,
    paged_attention_reference,
    prefill_attention_dense,
    sharded_ragged_prefill_kernel,
    write_kv,
)
from qwenjax.layers.attention_metadata import AttentionMetadata, PackedMetadata
from qwenjax.sampling_params import SamplingParams
from qwenjax.scheduler_config import PACKED_ROW_ALIGN, SchedulerConfig, packed_len
from qwenjax.worker import penalty_state
from qwenjax.worker.step_input import build_step_input

PS = 16
GREEDY = SamplingParams(temperature=0.0)
F32_PAGES = jnp.zeros((2, 1, 16, 16), jnp.float32)  # only their dtype matters to the CPU path


def _sched(num_pages=256, caching=True, **kw):
    cfg = SchedulerConfig.build(**{**dict(max_model_len=512, max_num_seqs=16, max_num_batched_tokens=256,
                                          block_size=PS, decode_buckets=(16,), prefill_token_buckets=(32, 128),
                                          enable_chunked_prefill=False), **kw})
    return Scheduler(cfg, BlockManager(num_pages, PS, enable_prefix_caching=caching))


def _seq(n, rid, first=1):
    return Sequence(request_id=rid, index=0, prompt_token_ids=list(range(first, first + n)), params=GREEDY, seed=0,
                    arrival_time=0.0)


def test_packed_buckets():
    c = _sched().config
    # T at each Q value (32, 128), at the budget (256, which is not above 4 x the chunk): R = T // 16, at most 16.
    assert c.packed_buckets == ((2, 32), (8, 128), (16, 256))
    assert c.prefill_buckets == ((1, 32), (1, 128))  # one-row steps over cached pages
    big = SchedulerConfig.build(max_model_len=2048, max_num_seqs=1000, max_num_batched_tokens=16384, block_size=16,
                                prefill_token_buckets=(511, 1023))
    assert big.packed_buckets == ((32, 512), (64, 1024), (256, 4096), (1000, 16384))
    assert all(t % PACKED_ROW_ALIGN == 0 for _, t in big.packed_buckets)
    assert big.max_prefill_chunk == 1023 and packed_len(1023) == 1024 and packed_len(1) == 16


def test_rows_pack_by_their_own_lengths_up_to_the_budget():
    """The [B, Q] layout admitted rows while rows x longest <= budget; packing counts each row's aligned length."""
    s = _sched()
    lens = [100, 20, 33, 70, 40]  # aligned: 112, 32, 48, 80, 48 slots
    seqs = [_seq(n, f"r{i}", first=1000 * i) for i, n in enumerate(lens)]
    for q in seqs:
        s.add(q)
    out = s.schedule()
    assert out.kind == "prefill" and out.packed and not out.has_context
    assert [r.seq for r in out.rows] == seqs[:3]  # 112 + 32 + 48 = 192; + 80 = 272 > 256
    assert out.bucket == (16, 256) and out.num_slots == 256
    for r in out.rows:
        r.seq.num_computed += r.num_new_tokens
        r.seq.output_token_ids.append(5)
    out = s.schedule()  # the other two: 80 + 48 = 128 slots, 2 rows
    assert [r.seq for r in out.rows] == seqs[3:] and out.bucket == (8, 128)


def test_prefix_hit_runs_alone_over_its_pages():
    s = _sched()
    a = _seq(40, "a")
    s.add(a)
    out = s.schedule()
    assert out.packed and out.bucket == (8, 128)  # 48 slots
    a.num_computed = 40
    a.output_token_ids.append(7)
    b, c = _seq(40, "b"), _seq(20, "c", first=500)
    s.add(b)
    s.add(c)
    out = s.schedule()  # b hits a's two full pages: a context step of its own, c waits
    assert [r.seq for r in out.rows] == [b] and out.has_context and not out.packed and out.bucket == (1, 32)


def test_step_input_layout():
    s = _sched()
    seqs = [_seq(n, f"r{i}", first=10 * i + 1) for i, n in enumerate((5, 16, 17))]
    for q in seqs:
        s.add(q)
    out = s.schedule()
    assert out.bucket == (8, 128)
    inp = build_step_input(out, page_size=PS, num_pages=256, max_pages_per_seq=32, scratch_slot=99)
    m = inp.meta
    assert isinstance(m, PackedMetadata) and inp.input_ids.shape == (128,) and m.block_tables.shape == (8, 32)
    assert m.row_starts.tolist() == [0, 16, 32] + [128] * 5  # aligned to 16; padding rows at the end
    assert m.query_lens.tolist() == m.seq_lens.tolist() == [5, 16, 17] + [0] * 5
    for q, o in zip(seqs, (0, 16, 32)):
        n = len(q.prompt_token_ids)
        assert inp.input_ids[o:o + n].tolist() == q.prompt_token_ids
        assert m.positions[o:o + n].tolist() == list(range(n))
        want = [q.block_table[p // PS] * PS + p % PS for p in range(n)]
        assert m.slot_mapping[o:o + n].tolist() == want
    assert inp.logits_index.tolist()[:3] == [4, 31, 48]
    real = np.zeros(128, bool)
    for o, n in ((0, 5), (16, 16), (32, 17)):
        real[o:o + n] = True
    assert (m.slot_mapping[~real] >= 256 * PS).all() and len(set(m.slot_mapping.tolist())) == 128  # dropped, unique
    assert inp.reset.tolist() == [True] * 3 + [False] * 5
    assert inp.slots.tolist()[3:] == [99] * 5
    row, valid = jax.jit(PackedMetadata.token_rows)(jax.tree.map(jnp.asarray, m))
    assert np.array_equal(np.asarray(valid), real)
    assert np.asarray(row)[real].tolist() == [0] * 5 + [1] * 16 + [2] * 17


def _packed_case(lens, *, N=4, K=2, H=16, T=None, seed=0):
    """Rows of `lens` fresh tokens: the packed layout and the same rows padded to [B, Q]."""
    rng = np.random.default_rng(seed)
    starts, o = [], 0
    for n in lens:
        starts.append(o)
        o += packed_len(n)
    T = T or o
    Q = max(lens)
    q = rng.standard_normal((T, N, H)).astype(np.float32)
    k = rng.standard_normal((T, K, H)).astype(np.float32)
    v = rng.standard_normal((T, K, H)).astype(np.float32)
    pos = np.zeros(T, np.int32)
    for s, n in zip(starts, lens):
        pos[s:s + n] = np.arange(n)
    R = len(lens) + 1  # one padding row
    meta = PackedMetadata(positions=jnp.asarray(pos), slot_mapping=jnp.zeros(T, jnp.int32),
                          block_tables=jnp.zeros((R, 1), jnp.int32),
                          seq_lens=jnp.asarray(list(lens) + [0], jnp.int32),
                          query_lens=jnp.asarray(list(lens) + [0], jnp.int32),
                          row_starts=jnp.asarray(starts + [T], jnp.int32))
    idx = np.array([[min(s + i, T - 1) for i in range(Q)] for s in starts])
    return q, k, v, meta, idx, starts


def test_packed_reference_equals_dense_rows():
    lens = (1, 15, 16, 40, 300)  # 300: more than one reference tile
    q, k, v, meta, idx, starts = _packed_case(lens, T=448)
    out = np.asarray(packed_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), F32_PAGES, F32_PAGES, meta,
                                      sm_scale=0.25))
    dense = np.asarray(prefill_attention_dense(jnp.asarray(q[idx]), jnp.asarray(k[idx]), jnp.asarray(v[idx]),
                                               jnp.asarray(lens, jnp.int32), sm_scale=0.25))
    covered = np.zeros(q.shape[0], bool)
    for b, (s, n) in enumerate(zip(starts, lens)):
        np.testing.assert_allclose(out[s:s + n], dense[b, :n], atol=2e-5, rtol=2e-5)
        covered[s:s + n] = True
    assert (out[~covered] == 0).all()


def test_packed_attention_reads_what_fp8_pages_store():
    """On CPU the reference rounds the fresh K/V through the page dtype, as the GPU kernel reads them back."""
    lens = (7, 20)
    q, k, v, meta, idx, starts = _packed_case(lens)
    args = (jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
    e5m2 = np.asarray(packed_attention(*args, jnp.zeros((2, 1, 16, 16), jnp.float8_e5m2),
                                       jnp.zeros((2, 1, 16, 16), jnp.float8_e5m2), meta, sm_scale=0.25))
    kq, vq = (jnp.asarray(x).astype(jnp.float8_e5m2).astype(jnp.float32) for x in (k, v))
    want = np.asarray(packed_attention(jnp.asarray(q), kq, vq, F32_PAGES, F32_PAGES, meta, sm_scale=0.25))
    np.testing.assert_allclose(e5m2, want, atol=1e-6)
    plain = np.asarray(packed_attention(*args, F32_PAGES, F32_PAGES, meta, sm_scale=0.25))
    assert np.abs(e5m2 - plain).max() > 1e-3  # the rounding is really applied


def test_ragged_kernel_in_engine_layout_equals_reference():
    """The ragged Pallas kernel (interpret mode) over pages written from the packed layout, against the paged jnp
    reference of the same rows as [B, Q]."""
    lens = (3, 16, 29)
    N, K, H = 4, 2, 64
    q, k, v, meta, idx, starts = _packed_case(lens, N=N, K=K, H=H, T=80)
    T = q.shape[0]
    num_pages = 12
    tables = np.zeros((len(lens) + 1, 2), np.int32)
    slots = np.full(T, num_pages * PS, np.int32) + np.arange(T, dtype=np.int32)
    perm = np.random.default_rng(1).permutation(num_pages)
    for b, (s, n) in enumerate(zip(starts, lens)):
        tables[b] = perm[2 * b:2 * b + 2]
        p = np.arange(n)
        slots[s:s + n] = tables[b][p // PS] * PS + p % PS
    pages = jnp.full((K, num_pages, PS, H), jnp.nan, jnp.float32)
    kp, vp = write_kv(pages, jnp.asarray(k), jnp.asarray(slots)), write_kv(pages, jnp.asarray(v), jnp.asarray(slots))
    meta = PackedMetadata(positions=meta.positions, slot_mapping=jnp.asarray(slots), block_tables=jnp.asarray(tables),
                          seq_lens=meta.seq_lens, query_lens=meta.query_lens, row_starts=meta.row_starts)
    kernels = packed_kernels(jnp.asarray(q), kp, sm_scale=H ** -0.5, interpret=True)
    out = np.asarray(sharded_ragged_prefill_kernel(jnp.asarray(q), kp, vp, meta.block_tables, meta.seq_lens,
                                                   meta.query_lens, meta.row_starts, mesh=None, kernels=kernels))
    Q = max(lens)
    rect = AttentionMetadata(positions=jnp.asarray(np.tile(np.arange(Q, dtype=np.int32), (len(lens), 1))),
                             slot_mapping=jnp.zeros((len(lens), Q), jnp.int32), block_tables=jnp.asarray(tables[:-1]),
                             seq_lens=jnp.asarray(lens, jnp.int32), query_lens=jnp.asarray(lens, jnp.int32))
    ref = np.asarray(paged_attention_reference(jnp.asarray(q[idx]), kp, vp, rect, sm_scale=H ** -0.5))
    covered = np.zeros(T, bool)
    for b, (s, n) in enumerate(zip(starts, lens)):
        np.testing.assert_allclose(out[s:s + n], ref[b, :n], atol=2e-5, rtol=2e-5)
        covered[s:s + n] = True
    assert np.isfinite(out).all() and (out[~covered] == 0).all()


@pytest.mark.parametrize("seed", [0, 1])
def test_packed_penalty_update_equals_rows(seed):
    """update_packed adds the same prompt mask and output counts as update on the rows laid out as [B, Q]."""
    rng = np.random.default_rng(seed)
    V, lens, prompt_lens = 50, (5, 16, 9), (5, 10, 9)  # row 1 recomputes: positions >= 10 are outputs
    q, k, v, meta, idx, starts = _packed_case(lens)
    T = q.shape[0]
    ids = rng.integers(0, V, size=T).astype(np.int32)
    slots = np.array([3, 1, 4, 6], np.int32)  # the padding row writes the scratch row 6
    state = penalty_state.PenaltyState(jnp.asarray(rng.random((7, V)) < 0.3), jnp.asarray(rng.integers(0, 3, (7, V))))
    reset = np.array([True, True, True, False])
    row, real = meta.token_rows()
    got = penalty_state.update_packed(state, jnp.asarray(ids), meta.positions, row, real,
                                      jnp.asarray(prompt_lens + (0,), jnp.int32), jnp.asarray(slots),
                                      jnp.asarray(reset))
    Q = max(lens)
    rect_ids = np.where(np.arange(Q)[None] < np.array(lens)[:, None], ids[idx], 0)
    want = penalty_state.update(state, jnp.asarray(rect_ids), jnp.asarray(np.tile(np.arange(Q), (3, 1))),
                                jnp.asarray(lens, jnp.int32), jnp.asarray(prompt_lens, jnp.int32),
                                jnp.asarray(slots[:3]), jnp.asarray(reset[:3]), jnp.zeros((3, 0), jnp.int32))
    for a, b in ((got.prompt_mask, want.prompt_mask), (got.output_counts, want.output_counts)):
        assert np.array_equal(np.asarray(a)[:6], np.asarray(b)[:6])
    assert np.asarray(got.output_counts)[1].sum() == 6  # positions 10..15 of row 1
