"""The paged prefill kernel compiled for the GPU (Triton lowering) against the jnp reference: the CPU test's grid
plus long contexts (a 512-token chunk after 2k and 7.5k cached tokens), in the rectangular and the packed ("ragged")
layouts, run with `pytest tests/gpu --gpu`."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.paged_prefill import (paged_prefill_attention, paged_prefill_reference,
                                          ragged_paged_prefill_attention, ragged_paged_prefill_reference)
from tests.test_paged_prefill_kernel import CASES, RAGGED_CASES, ROWS, _covered, prefill_case, ragged_case

pytestmark = pytest.mark.gpu
BF16, E5M2, E4M3 = jnp.bfloat16, jnp.float8_e5m2, jnp.float8_e4m3fn

LONG = [  # rows, group, head_dim, page_size, kv dtype
    (((512, 2048), (37, 0), (512, 7680)), 7, 128, 16, BF16),
    (((512, 2048), (200, 900)), 4, 64, 32, BF16),
    (((512, 2048), (1, 4095)), 7, 128, 16, E5M2),
    (((256, 1000),), 8, 128, 64, E4M3),
]


def _check(q, k, v, tables, seq_lens, query_lens, *, tol, **kw):
    out = np.asarray(paged_prefill_attention(q, k, v, tables, seq_lens, query_lens, **kw), np.float32)
    scales = {x: kw[x] for x in ("k_scale", "v_scale") if x in kw}
    ref = np.asarray(paged_prefill_reference(q, k, v, tables, seq_lens, query_lens, **scales), np.float32)
    real = np.arange(q.shape[1])[None, :] < np.asarray(query_lens)[:, None]
    assert np.isfinite(out).all() and (out[~real] == 0).all()
    np.testing.assert_allclose(out[real], ref[real], atol=tol, rtol=tol)


@pytest.mark.parametrize("group,head_dim,page_size,q_dtype,kv_dtype,block_q", CASES)
def test_grid_on_gpu(group, head_dim, page_size, q_dtype, kv_dtype, block_q):
    name = f"gpu-prefill-{group}-{head_dim}-{page_size}-{q_dtype.__name__}-{kv_dtype.__name__}"
    scales = dict(k_scale=0.5, v_scale=2.0) if kv_dtype == E4M3 else {}
    case = prefill_case(name, ROWS, group=group, head_dim=head_dim, page_size=page_size, q_dtype=q_dtype,
                        kv_dtype=kv_dtype, kv_range=3.0 if kv_dtype == E4M3 else 1.0)
    tol = 2e-3 if q_dtype == jnp.float32 and kv_dtype == jnp.float32 else \
        (3e-2 if kv_dtype in (E5M2, E4M3) else 1.5e-2)
    _check(*case, tol=tol, block_q=block_q, **scales)


@pytest.mark.parametrize("rows,group,head_dim,page_size,kv_dtype", LONG)
def test_long_contexts_on_gpu(rows, group, head_dim, page_size, kv_dtype):
    name = f"gpu-long-{group}-{head_dim}-{page_size}-{kv_dtype.__name__}-{len(rows)}"
    scales = dict(k_scale=0.5, v_scale=2.0) if kv_dtype == E4M3 else {}
    case = prefill_case(name, rows, group=group, head_dim=head_dim, page_size=page_size, q_dtype=BF16,
                        kv_dtype=kv_dtype, kv_range=3.0 if kv_dtype == E4M3 else 1.0)
    _check(*case, tol=3e-2 if kv_dtype != BF16 else 1.5e-2, **scales)


LONG_RAGGED = [  # rows, gaps (row_align slots after each row), group, head_dim, page_size, kv dtype
    (((512, 2048), (37, 0), (1, 4095), (512, 7680)), (0, 1, 0, 0), 7, 128, 16, BF16),
    (((200, 900), (512, 2048), (1, 0)), (2, 0, 0), 4, 64, 32, E5M2),
    (((256, 1000), (17, 15)), (0, 0), 8, 128, 64, E4M3),
]


def _check_ragged(q, k, v, tables, seq_lens, query_lens, row_starts, *, tol, **kw):
    out = np.asarray(ragged_paged_prefill_attention(q, k, v, tables, seq_lens, query_lens, row_starts, **kw),
                     np.float32)
    scales = {x: kw[x] for x in ("k_scale", "v_scale") if x in kw}
    ref = np.asarray(ragged_paged_prefill_reference(q, k, v, tables, seq_lens, query_lens, row_starts, **scales),
                     np.float32)
    real = _covered(q.shape[0], row_starts, query_lens)
    assert np.isfinite(out).all() and (out[~real] == 0).all()
    np.testing.assert_allclose(out[real], ref[real], atol=tol, rtol=tol)


@pytest.mark.parametrize("group,head_dim,page_size,q_dtype,kv_dtype,row_align,block_q", RAGGED_CASES)
def test_ragged_grid_on_gpu(group, head_dim, page_size, q_dtype, kv_dtype, row_align, block_q):
    name = f"gpu-ragged-{group}-{head_dim}-{page_size}-{q_dtype.__name__}-{kv_dtype.__name__}-{row_align}"
    scales = dict(k_scale=0.5, v_scale=2.0) if kv_dtype == E4M3 else {}
    case = ragged_case(name, group=group, head_dim=head_dim, page_size=page_size, q_dtype=q_dtype,
                       kv_dtype=kv_dtype, row_align=row_align, kv_range=3.0 if kv_dtype == E4M3 else 1.0)
    tol = 2e-3 if q_dtype == jnp.float32 and kv_dtype == jnp.float32 else \
        (3e-2 if kv_dtype in (E5M2, E4M3) else 1.5e-2)
    _check_ragged(*case, tol=tol, row_align=row_align, block_q=block_q, **scales)


@pytest.mark.parametrize("rows,gaps,group,head_dim,page_size,kv_dtype", LONG_RAGGED)
def test_ragged_long_contexts_on_gpu(rows, gaps, group, head_dim, page_size, kv_dtype):
    name = f"gpu-ragged-long-{group}-{head_dim}-{page_size}-{kv_dtype.__name__}-{len(rows)}"
    scales = dict(k_scale=0.5, v_scale=2.0) if kv_dtype == E4M3 else {}
    case = ragged_case(name, rows, gaps, group=group, head_dim=head_dim, page_size=page_size, q_dtype=BF16,
                       kv_dtype=kv_dtype, kv_range=3.0 if kv_dtype == E4M3 else 1.0)
    _check_ragged(*case, tol=3e-2 if kv_dtype != BF16 else 1.5e-2, **scales)
