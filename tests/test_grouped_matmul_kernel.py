"""The grouped-matmul kernel (the MoE experts on GPU) in Pallas interpret mode (CPU) against jax.lax.ragged_dot,
its contract: empty groups, one group holding every row, rows past the groups (zeros), partial row tiles."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.grouped_matmul import (default_settings, grouped_matmul, grouped_matmul_reference, supported,
                                           tile_table)

CASES = {  # name -> (M, K, N, group sizes, tiling)
    "uneven": (40, 32, 48, [3, 0, 17, 1, 9], dict(block_m=16, block_n=16, block_k=16)),
    "tail": (70, 64, 32, [5, 9, 0, 6, 13, 4, 7, 0], dict(block_m=16, block_n=32, block_k=32)),   # 26 rows past
    "one_group": (33, 32, 16, [0, 33, 0], dict(block_m=16, block_n=16, block_k=16)),
    "empty": (16, 32, 32, [0, 0, 0, 0], dict(block_m=16, block_n=16, block_k=16)),
    "defaults": (24, 64, 128, [8, 0, 16], {}),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_matches_ragged_dot(name, dtype):
    m, k, n, sizes, tiling = CASES[name]
    rng = np.random.default_rng(len(sizes) * m)
    x = jnp.asarray(rng.normal(0, 1, (m, k)), dtype)
    w = jnp.asarray(rng.normal(0, 0.2, (len(sizes), k, n)), dtype)
    gs = jnp.asarray(sizes, jnp.int32)
    out = np.asarray(grouped_matmul(x, w, gs, **tiling, interpret=True), np.float32)
    ref = np.asarray(jax.lax.ragged_dot(x.astype(jnp.float32), w.astype(jnp.float32), gs), np.float32)
    tol = 1e-4 if dtype == jnp.float32 else 2e-2 * np.abs(ref).max()
    np.testing.assert_allclose(out, ref, atol=tol)
    assert not out[sum(sizes):].any()  # rows past the groups are exactly zero
    np.testing.assert_allclose(np.asarray(grouped_matmul_reference(x, w, gs), np.float32), out, atol=tol)


def test_tile_table_covers_each_group_in_order():
    sizes = [3, 0, 17, 1, 9]
    group, row0, row1 = (np.asarray(a) for a in tile_table(jnp.asarray(sizes, jnp.int32), 40, 16))
    assert len(group) == 40 // 16 + 1 + len(sizes) + 1
    real = group <= len(sizes)  # groups 0..4 and the tail (5); 6 marks empty tiles
    assert list(group[real]) == [0, 2, 2, 3, 4, 5]
    assert list(row0[real]) == [0, 3, 19, 20, 21, 30] and list(row1[real]) == [3, 19, 20, 21, 30, 40]
    assert (row0[~real] == row1[~real]).all()   # empty: nothing loaded or stored


def test_default_settings_follow_rows_per_expert():
    """default_settings' docstring over a grid of shapes: 16-row tiles when the groups hold 16 rows or fewer on
    average (decode), else 128; the widest power-of-two tile of at most 128 columns and 64 of K that divides N and
    K; every tiling is one the kernel accepts."""
    for m, g, k, n in itertools.product((1, 8, 16 * 64, 16 * 64 + 64, 65536), (1, 8, 64), (16, 48, 3584, 4096),
                                        (16, 80, 2560, 4096)):
        bm, bn, bk = default_settings(m, k, n, g)
        assert bm == (16 if m / g <= 16 else 128), (m, g, bm)
        for b, dim, cap in ((bn, n, 128), (bk, k, 64)):
            assert b & (b - 1) == 0 and 16 <= b <= cap and dim % b == 0, (m, k, n, g, bn, bk)
            assert b == cap or dim % (2 * b), (dim, b)  # the widest that divides
    # Qwen2-57B-A14B's experts (64, K 3584, N 2560): one decode token's 8 (token, expert) pairs, an 8192-token prefill
    assert default_settings(8, 3584, 2560, 64)[0] == 16 and default_settings(8 * 8192, 3584, 2560, 64)[0] == 128
    assert supported(3584, 2560, jnp.bfloat16) and not supported(3584, 2561, jnp.bfloat16)
