"""The Hopper (Mosaic GPU) paged prefill kernel against the packed-layout jnp reference on the GPU: GQA 1-8, head
dim 64 / 128, pages 16-128, bf16 / f16, both KV block sizes, 2-3 stages, rows of 1 to 2,048 new tokens over up to
7,680 cached ones, NaN in every slot past a row's length and in q at tokens of no row. Run with
`pytest tests/gpu --gpu` on an H100 / H200."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.paged_prefill import paged_prefill_reference, ragged_paged_prefill_reference
from pallas_kernels.paged_prefill_hopper import (HopperPrefillConfig, hopper_paged_prefill_attention,
                                                 hopper_ragged_prefill_attention)
from tests.test_paged_prefill_kernel import _covered, prefill_case, ragged_case

pytestmark = pytest.mark.gpu
BF16, F16 = jnp.bfloat16, jnp.float16
ALIGN = 128  # a program's tile: two warpgroups of 64 tokens

ROWS = ((1, 1), (1, 15), (130, 0), (37, 70), (64, 128), (300, 45))  # (new, cached): tails inside and past blocks
GAPS = (0, 1, 0, 0, 0, 0)
GRID = [  # group, head_dim, page_size, dtype, block_kv, num_stages
    (7, 128, 16, BF16, 128, 2),
    (7, 128, 16, BF16, 64, 3),
    (1, 64, 128, F16, 64, 2),
    (4, 64, 32, BF16, 128, 2),
    (8, 128, 64, F16, 128, 3),
    (2, 128, 128, BF16, 128, 2),
]
RECT = [((1, 1), (5, 300), (128, 0), (200, 1000)), ((512, 7680), (3, 0))]  # rectangular rows (new, cached)
LONG = [  # rows, gaps, group, page_size, block_kv
    (((512, 2048), (37, 0), (1, 4095), (512, 7680)), (0, 1, 0, 0), 7, 16, 128),
    (((2048, 0), (200, 900)), (0, 0), 7, 16, 64),
]


def _check(case, config, tol=1.5e-2):
    q, k, v, tables, seq_lens, query_lens, row_starts = case
    out = np.asarray(hopper_ragged_prefill_attention(q, k, v, tables, seq_lens, query_lens, row_starts,
                                                     row_align=ALIGN, config=config), np.float32)
    real = _covered(q.shape[0], row_starts, query_lens)
    ref = np.zeros_like(out)
    for r, (start, n) in enumerate(zip(np.asarray(row_starts), np.asarray(query_lens))):
        if n:  # row by row: the reference gathers each token's whole context (a [T, K, C, H] array)
            ref[start:start + n] = np.asarray(ragged_paged_prefill_reference(
                q[start:start + n], k, v, tables[r:r + 1], seq_lens[r:r + 1], query_lens[r:r + 1],
                jnp.zeros((1,), jnp.int32)), np.float32)
    assert np.isfinite(out).all() and (out[~real] == 0).all()
    np.testing.assert_allclose(out[real], ref[real], atol=tol, rtol=tol)


@pytest.mark.parametrize("group,head_dim,page_size,dtype,block_kv,num_stages", GRID)
def test_grid_on_gpu(group, head_dim, page_size, dtype, block_kv, num_stages):
    name = f"hopper-{group}-{head_dim}-{page_size}-{dtype.__name__}-{block_kv}-{num_stages}"
    case = ragged_case(name, ROWS, GAPS, group=group, head_dim=head_dim, page_size=page_size, q_dtype=dtype,
                       kv_dtype=dtype, row_align=ALIGN)
    _check(case, HopperPrefillConfig(block_kv=block_kv, num_stages=num_stages))


@pytest.mark.parametrize("rows,gaps,group,page_size,block_kv", LONG)
def test_long_contexts_on_gpu(rows, gaps, group, page_size, block_kv):
    name = f"hopper-long-{group}-{page_size}-{block_kv}-{len(rows)}"
    case = ragged_case(name, rows, gaps, group=group, head_dim=128, page_size=page_size, q_dtype=BF16,
                       kv_dtype=BF16, row_align=ALIGN)
    _check(case, HopperPrefillConfig(block_kv=block_kv))


@pytest.mark.parametrize("rows", RECT)
def test_rectangular_layout_on_gpu(rows):
    """The engine's context-prefill / mixed-step layout, q [B, Q, N, H] (`hopper_paged_prefill_attention`)."""
    q, k, v, tables, seq_lens, query_lens = prefill_case(f"hopper-rect-{len(rows)}", rows, group=7, head_dim=128,
                                                         page_size=16, q_dtype=BF16, kv_dtype=BF16)
    out = np.asarray(hopper_paged_prefill_attention(q, k, v, tables, seq_lens, query_lens), np.float32)
    ref = np.asarray(paged_prefill_reference(q, k, v, tables, seq_lens, query_lens), np.float32)
    real = np.arange(q.shape[1])[None, :] < np.asarray(query_lens)[:, None]
    assert np.isfinite(out).all() and (out[~real] == 0).all()
    np.testing.assert_allclose(out[real], ref[real], atol=1.5e-2, rtol=1.5e-2)


@pytest.mark.parametrize("row", [(8192, 0), (4096, 12288)])
def test_lone_long_chunk_on_gpu(row):
    """What a long prompt alone now gives the kernel (core/scheduler.py, LONG_PREFILL_ROW): its first chunk as one
    fresh rectangular row of 8,192 tokens, and a later chunk over a long cached prefix."""
    q, k, v, tables, seq_lens, query_lens = prefill_case(f"hopper-lone-{row[0]}-{row[1]}", (row,), group=7,
                                                         head_dim=128, page_size=16, q_dtype=BF16, kv_dtype=BF16)
    out = np.asarray(hopper_paged_prefill_attention(q, k, v, tables, seq_lens, query_lens), np.float32)
    ref = np.asarray(paged_prefill_reference(q, k, v, tables, seq_lens, query_lens), np.float32)
    real = np.arange(q.shape[1])[None, :] < np.asarray(query_lens)[:, None]
    assert np.isfinite(out).all() and (out[~real] == 0).all()
    np.testing.assert_allclose(out[real], ref[real], atol=1.5e-2, rtol=1.5e-2)
