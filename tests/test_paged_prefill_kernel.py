"""Paged prefill (chunk over cached pages) attention kernel, Pallas interpret mode on CPU, against the references.

Rows bring (new, cached) token counts such as (1, 1), (1, 15), (16, 0), (37, 70): the chunk's K/V are in the pages
already, as the engine writes them before attending. Slots past each row's length hold NaN, as do unused pages.
Both layouts of q: rectangular [B, Q, N, H] and packed ("ragged") [T, N, H], rows back to back at aligned starts
(there, tokens of no row hold NaN in q).
"""
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.paged_prefill import (paged_prefill_attention, paged_prefill_reference,
                                           ragged_paged_prefill_attention, ragged_paged_prefill_reference)
from qwenjax.layers.attention import paged_attention_reference
from qwenjax.layers.attention_metadata import AttentionMetadata
from tests.test_paged_attention_kernel import make_case

BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32
E5M2, E4M3 = jnp.float8_e5m2, jnp.float8_e4m3fn
ROWS = ((1, 1), (1, 15), (16, 0), (37, 70), (5, 128))  # (new tokens, cached tokens) per row


def prefill_case(name, rows, *, group, head_dim, page_size, q_dtype, kv_dtype, num_kv_heads=2, kv_range=1.0,
                 pad_q=8):
    lengths = tuple(n + c for n, c in rows)
    _, k, v, tables, seq_lens = make_case(name, group=group, head_dim=head_dim, page_size=page_size,
                                          q_dtype=q_dtype, kv_dtype=kv_dtype, lengths=lengths,
                                          num_kv_heads=num_kv_heads, kv_range=kv_range)
    Q = max(n for n, _ in rows) + pad_q  # padded chunk length: tokens past each row's chunk are padding
    key = jax.random.key(zlib.crc32((name + "q").encode()))
    q = jax.random.normal(key, (len(rows), Q, num_kv_heads * group, head_dim), F32).astype(q_dtype)
    query_lens = jnp.asarray([n for n, _ in rows], jnp.int32)
    return q, k, v, tables, seq_lens, query_lens


CASES = [  # group, head_dim, page_size, q dtype, kv dtype, block_q
    (1, 64, 16, F32, F32, 16),
    (7, 128, 16, BF16, BF16, None),
    (4, 64, 32, F16, F16, 8),
    (8, 128, 64, BF16, BF16, 16),
    (2, 64, 16, BF16, E5M2, None),
    (7, 64, 16, F16, E4M3, 16),
]


@pytest.mark.parametrize("group,head_dim,page_size,q_dtype,kv_dtype,block_q", CASES)
def test_matches_reference(group, head_dim, page_size, q_dtype, kv_dtype, block_q):
    name = f"prefill-{group}-{head_dim}-{page_size}-{q_dtype.__name__}-{kv_dtype.__name__}"
    k_scale, v_scale = (0.5, 2.0) if kv_dtype == E4M3 else (1.0, 1.0)
    q, k, v, tables, seq_lens, query_lens = prefill_case(name, ROWS, group=group, head_dim=head_dim,
                                                         page_size=page_size, q_dtype=q_dtype, kv_dtype=kv_dtype,
                                                         kv_range=3.0 if kv_dtype == E4M3 else 1.0)
    out = paged_prefill_attention(q, k, v, tables, seq_lens, query_lens, k_scale=k_scale, v_scale=v_scale,
                                  block_q=block_q, pages_per_block=2 if page_size <= 32 else None, interpret=True)
    ref = paged_prefill_reference(q, k, v, tables, seq_lens, query_lens, k_scale=k_scale, v_scale=v_scale)
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(out).all()
    real = np.arange(q.shape[1])[None, :] < np.asarray(query_lens)[:, None]
    assert (out[~real] == 0).all()  # padding tokens
    tol = 1e-5 if q_dtype == F32 and kv_dtype == F32 else (3e-2 if kv_dtype in (E5M2, E4M3) else 1.5e-2)
    np.testing.assert_allclose(out[real], ref[real], atol=tol, rtol=tol)


def test_reference_agrees_with_engine_reference():
    """The kernel file's reference and the engine's (attention.paged_attention_reference) on the same rows."""
    q, k, v, tables, seq_lens, query_lens = prefill_case("agree", ROWS, group=4, head_dim=64, page_size=16,
                                                         q_dtype=F32, kv_dtype=F32)
    Q = q.shape[1]
    start = np.asarray(seq_lens - query_lens)
    positions = start[:, None] + np.arange(Q)[None, :]
    meta = AttentionMetadata(positions=jnp.asarray(positions, jnp.int32), slot_mapping=jnp.zeros_like(positions),
                             block_tables=tables, seq_lens=seq_lens, query_lens=query_lens)
    a = np.asarray(paged_prefill_reference(q, k, v, tables, seq_lens, query_lens))
    b = np.asarray(paged_attention_reference(q, k, v, meta, sm_scale=q.shape[-1] ** -0.5))
    real = np.arange(Q)[None, :] < np.asarray(query_lens)[:, None]
    np.testing.assert_allclose(a[real], b[real], atol=1e-5, rtol=1e-5)


def test_long_context_split_blocks():
    """A 600-token cached prefix and a 40-token chunk: many KV blocks, a causal edge inside the last ones."""
    q, k, v, tables, seq_lens, query_lens = prefill_case("long", ((40, 600), (3, 0)), group=7, head_dim=128,
                                                         page_size=16, q_dtype=BF16, kv_dtype=BF16)
    out = paged_prefill_attention(q, k, v, tables, seq_lens, query_lens, interpret=True)
    ref = paged_prefill_reference(q, k, v, tables, seq_lens, query_lens)
    real = np.arange(q.shape[1])[None, :] < np.asarray(query_lens)[:, None]
    np.testing.assert_allclose(np.asarray(out, np.float32)[real], np.asarray(ref, np.float32)[real], atol=1.5e-2,
                               rtol=1.5e-2)


@pytest.mark.parametrize("bad,match", [
    (dict(block_q=12), "block_q must be a power of two"),
    (dict(pages_per_block=3), "pages_per_block must be a power of two"),
])
def test_rejects_bad_settings(bad, match):
    q, k, v, tables, seq_lens, query_lens = prefill_case("bad", ((2, 3),), group=2, head_dim=64, page_size=16,
                                                         q_dtype=F32, kv_dtype=F32)
    with pytest.raises(ValueError, match=match):
        paged_prefill_attention(q, k, v, tables, seq_lens, query_lens, interpret=True, **bad)


def test_rejects_bad_gqa():
    q = jnp.zeros((1, 4, 5, 64), F32)
    pages = jnp.zeros((2, 4, 16, 64), F32)
    one = jnp.ones((1,), jnp.int32)
    with pytest.raises(ValueError, match=r"q heads \(5\) must be a multiple of kv heads \(2\)"):
        paged_prefill_attention(q, pages, pages, jnp.zeros((1, 2), jnp.int32), one, one, interpret=True)


# --- packed ("ragged") layout ------------------------------------------------------------------------------------
# (new, cached) per row; (0, 0) is a padding row of no tokens, here given the previous row's start (rows of no tokens
# are ignored wherever they start). GAPS: free row_align slots after each row.
RAGGED_ROWS = ((1, 0), (1, 15), (0, 0), (17, 0), (40, 70), (5, 128))
GAPS = (1, 0, 0, 2, 1, 0)


def ragged_case(name, rows=RAGGED_ROWS, gaps=GAPS, *, group, head_dim, page_size, q_dtype, kv_dtype, row_align=16,
                pad_rows=2, tail=5, num_kv_heads=2, kv_range=1.0):
    """Packed q [T, N, H]: rows at multiples of row_align with `gaps` between them, `pad_rows` padding rows at the
    end (start T), T = the last row's end + `tail`. q holds NaN at tokens of no row; pages as `make_case`.

    Returns (q, k_pages, v_pages, block_tables, seq_lens, query_lens, row_starts)."""
    lengths = tuple(n + c for n, c in rows) + (0,) * pad_rows
    _, k, v, tables, seq_lens = make_case(name, group=group, head_dim=head_dim, page_size=page_size,
                                          q_dtype=q_dtype, kv_dtype=kv_dtype, lengths=lengths,
                                          num_kv_heads=num_kv_heads, kv_range=kv_range)
    starts, cursor, prev = [], 0, 0
    for (n, _), gap in zip(rows, gaps):
        start = cursor if n else prev
        starts.append(start)
        if n:
            prev = start
            cursor = start + (-(-n // row_align) + gap) * row_align
    T = max(s + n for s, (n, _) in zip(starts, rows)) + tail
    starts += [T] * pad_rows
    query_lens = [n for n, _ in rows] + [0] * pad_rows
    key = jax.random.key(zlib.crc32((name + "q").encode()))
    q = np.array(jax.random.normal(key, (T, num_kv_heads * group, head_dim), F32))
    q[~_covered(T, starts, query_lens)] = np.nan
    return (jnp.asarray(q, q_dtype), k, v, tables, seq_lens, jnp.asarray(query_lens, jnp.int32),
            jnp.asarray(starts, jnp.int32))


def _covered(T, row_starts, query_lens):
    """[T] bool: tokens that belong to a row."""
    cov = np.zeros(T, bool)
    for s, n in zip(np.asarray(row_starts), np.asarray(query_lens)):
        cov[s:s + n] = True
    return cov


RAGGED_CASES = [  # group, head_dim, page_size, q dtype, kv dtype, row_align, block_q
    (1, 64, 16, F32, F32, 16, None),
    (7, 128, 16, BF16, BF16, 32, 16),
    (4, 64, 32, F16, F16, 16, 8),
    (2, 64, 16, F16, E4M3, 64, None),  # tiles of 64 tokens
]


@pytest.mark.parametrize("group,head_dim,page_size,q_dtype,kv_dtype,row_align,block_q", RAGGED_CASES)
def test_ragged_matches_reference(group, head_dim, page_size, q_dtype, kv_dtype, row_align, block_q):
    name = f"ragged-{group}-{head_dim}-{page_size}-{q_dtype.__name__}-{kv_dtype.__name__}-{row_align}"
    k_scale, v_scale = (0.5, 2.0) if kv_dtype == E4M3 else (1.0, 1.0)
    case = ragged_case(name, group=group, head_dim=head_dim, page_size=page_size, q_dtype=q_dtype,
                       kv_dtype=kv_dtype, row_align=row_align, kv_range=3.0 if kv_dtype == E4M3 else 1.0)
    q, query_lens, row_starts = case[0], case[5], case[6]
    assert q.shape[0] % 16  # T is not a multiple of the tile
    out = ragged_paged_prefill_attention(*case, k_scale=k_scale, v_scale=v_scale, row_align=row_align,
                                         block_q=block_q, pages_per_block=2 if page_size <= 32 else None,
                                         interpret=True)
    ref = ragged_paged_prefill_reference(*case, k_scale=k_scale, v_scale=v_scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    real = _covered(q.shape[0], row_starts, query_lens)
    assert np.isfinite(out).all()
    assert (out[~real] == 0).all() and (ref[~real] == 0).all()  # padding tokens (NaN in q)
    tol = 1e-5 if q_dtype == F32 and kv_dtype == F32 else (3e-2 if kv_dtype in (E5M2, E4M3) else 1.5e-2)
    np.testing.assert_allclose(out[real], ref[real], atol=tol, rtol=tol)


def test_ragged_reference_agrees_with_rectangular():
    """The packed reference and the rectangular one on the same rows, laid out packed vs padded."""
    q, k, v, tables, seq_lens, query_lens, row_starts = ragged_case("ragged-agree", group=4, head_dim=64,
                                                                    page_size=16, q_dtype=F32, kv_dtype=F32)
    starts, lens = np.asarray(row_starts), np.asarray(query_lens)
    Q = int(lens.max()) + 3
    q_np = np.asarray(q)
    rect = np.zeros((len(lens), Q) + q.shape[1:], np.float32)
    for r, (s, n) in enumerate(zip(starts, lens)):
        rect[r, :n] = q_np[s:s + n]
    a = np.asarray(ragged_paged_prefill_reference(q, k, v, tables, seq_lens, query_lens, row_starts))
    b = np.asarray(paged_prefill_reference(jnp.asarray(rect), k, v, tables, seq_lens, query_lens))
    for r, (s, n) in enumerate(zip(starts, lens)):
        np.testing.assert_allclose(a[s:s + n], b[r, :n], atol=1e-5, rtol=1e-5)
    real = _covered(q.shape[0], starts, lens)
    assert real.sum() == lens.sum() and (a[~real] == 0).all()


def _bad_dtype(case, i):
    case = list(case)
    case[i] = case[i].astype(jnp.float32)
    return case


def _bad_rows(case):
    case = list(case)
    case[6] = case[6][:-1]
    return case


@pytest.mark.parametrize("bad,edit,match", [
    (dict(row_align=24), None, r"row_align must be a power of two \(int\); got 24"),
    (dict(block_q=32), None, r"block_q must be a power of two dividing row_align \(16\), .*got 32"),
    (dict(block_q=12), None, r"block_q must be a power of two dividing row_align \(16\), .*got 12"),
    (dict(pages_per_block=3), None, "pages_per_block must be a power of two; got 3"),
    (dict(row_align=4), None, (r"at least 16 rows .*block_q \(4, from block_q=None, row_align=4\) x padded GQA "
                               r"group \(2\) = 8")),
    ({}, lambda c: _bad_dtype(c, 6), r"row_starts must be int32 \[R=5\]; got float32\(5,\)"),
    ({}, lambda c: _bad_dtype(c, 5), r"query_lens must be int32 \[R=5\]; got float32\(5,\)"),
    ({}, _bad_rows, r"row_starts must be int32 \[R=5\]; got int32\(4,\)"),
    ({}, lambda c: [c[0][None]] + list(c[1:]), r"q must be \[T, N, H\] \(packed tokens\)"),
])
def test_ragged_rejects_bad_arguments(bad, edit, match):
    case = ragged_case("ragged-bad", ((2, 3), (1, 0), (3, 1)), (0, 0, 0), group=2, head_dim=64, page_size=16,
                       q_dtype=F32, kv_dtype=F32)
    if edit is not None:
        case = edit(case)
    with pytest.raises(ValueError, match=match):
        ragged_paged_prefill_attention(*case, interpret=True, **bad)
