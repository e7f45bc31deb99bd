"""Decode at long context (issue 29): the decode kernel's split-K over the context. The split count the kernel picks
for one sequence at 128k fills an H100's SMs, and split and unsplit runs agree (Pallas interpret mode) over a few
thousand tokens in small pages, where the split count is the one the defaults choose."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import paged_attention as pa
from pallas_kernels.paged_attention import default_settings, paged_attention, paged_attention_reference
from tests.test_paged_attention_kernel import make_case

H100_SMS = 132


@pytest.mark.parametrize("kv_heads", [4, 2, 1])  # the 7B's 4 kv heads on one device, and split over a mesh of 2 / 4
@pytest.mark.parametrize("page_size", [16, 64])
@pytest.mark.parametrize("kv_dtype", [jnp.bfloat16, jnp.float8_e5m2])
def test_one_sequence_at_128k_fills_the_sms(kv_heads, page_size, kv_dtype):
    max_pages = 131072 // page_size
    ppcb, splits = default_settings(1, kv_heads, max_pages, page_size, 128, kv_dtype)
    programs = kv_heads * 1 * splits  # the grid (K, S, C)
    assert programs >= H100_SMS, (programs, splits)
    # Each split still walks enough blocks to pay for its share of the combine.
    assert splits * ppcb * pa._MIN_BLOCKS_PER_SPLIT <= max_pages
    # The kernel's grid really has that many splits (none dropped for starting past the table).
    pages_per_split = -(-(-(-max_pages // splits)) // ppcb) * ppcb
    assert -(-max_pages // pages_per_split) == splits


def test_split_equals_unsplit_at_a_long_context():
    """Two sequences of 3,000 and 4,000 tokens in 16-token pages (a 251-page table), head_dim 64, 2 kv heads of 2 q
    heads: the default settings split the context 31 ways; the merge by log-sum-exp equals one pass and the
    reference (NaN in every slot the kernel must not read)."""
    q, k, v, tables, lengths = make_case("long-split", group=2, head_dim=64, page_size=16, q_dtype=jnp.float32,
                                         kv_dtype=jnp.float32, lengths=(3000, 4000))
    ppcb, splits = default_settings(2, 2, tables.shape[1], 16, 64, jnp.float32)
    assert splits >= 16
    _split_equals_one_pass_and_reference(q, k, v, tables, lengths)


def test_a_short_row_in_a_wide_table_spreads_over_the_splits():
    """The engine's tables are as wide as max_model_len: an 8k row in a table sized for 128k (the long_context
    benchmark's decode at 8k) still keeps the SMs busy, because splits divide the row's own pages."""
    max_pages = 131072 // 16
    ppcb, splits = default_settings(1, 4, max_pages, 16, 128, jnp.bfloat16)
    for context in (8192, 32768, 131072):
        row_pages = context // 16
        per = int(pa.split_pages(row_pages, splits, ppcb))
        active = -(-row_pages // per)
        assert per % ppcb == 0 and active <= splits and (active - 1) * per < row_pages <= active * per
        assert 4 * active >= H100_SMS, (context, active)
    # A short row keeps at least _MIN_BLOCKS_PER_SPLIT blocks a split (fewer splits, not slivers).
    assert int(pa.split_pages(10, splits, ppcb)) == pa._MIN_BLOCKS_PER_SPLIT * ppcb


def test_split_equals_unsplit_in_a_wide_table():
    """A 3,000-token row whose table is 1,024 pages wide (entries past the row point at a NaN page): 128 splits by
    default, the row's 188 pages spread over them, equal to one pass and to the reference."""
    q, k, v, tables, lengths = make_case("wide-split", group=2, head_dim=64, page_size=16, q_dtype=jnp.float32,
                                         kv_dtype=jnp.float32, lengths=(3000,))
    poison = int(tables[0, -1])  # the entry past the row: a page that holds NaN
    tables = jnp.pad(tables, ((0, 0), (0, 1024 - tables.shape[1])), constant_values=poison)
    assert default_settings(1, 2, 1024, 16, 64, jnp.float32)[1] == 128
    _split_equals_one_pass_and_reference(q, k, v, tables, lengths)


def _split_equals_one_pass_and_reference(q, k, v, tables, lengths):
    split = paged_attention(q, k, v, tables, lengths, interpret=True)
    one = paged_attention(q, k, v, tables, lengths, num_splits=1, interpret=True)
    ref = paged_attention_reference(q, k, v, tables, lengths)
    assert np.isfinite(np.asarray(split)).all()
    np.testing.assert_allclose(split, one, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(split, ref, atol=1e-5, rtol=1e-5)
