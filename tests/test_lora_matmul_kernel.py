"""The batched LoRA matmul: its Pallas kernels (interpret mode on CPU) against the jnp reference, and the reference
against a plain per-row numpy loop (each row through its own slot's A and B)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.lora_matmul import group_by_slot, lora_matmul, lora_matmul_dense, lora_matmul_reference

CASES = {  # name -> (T, I, O, R, slots, row slot ids or None for random)
    "decode_mix": (8, 64, 96, 16, 4, [2, 0, 1, 3, 2, 2, 0, 1]),
    "prefill_runs": (40, 32, 48, 16, 3, [1] * 17 + [0] * 6 + [2] * 17),   # rows of a sequence are runs
    "random": (37, 64, 32, 32, 5, None),
    "no_adapter": (16, 32, 32, 16, 3, [0] * 16),                           # every row on slot 0: all zeros
    "one_slot": (24, 32, 64, 16, 9, [7] * 24),                             # 8 adapters, one used
    "batch1": (1, 32, 48, 16, 3, [2]),                                     # one decode row
    "batch1_none": (1, 32, 48, 16, 3, [0]),
}


def _inputs(name, dtype):
    T, I, O, R, S, ids = CASES[name]
    rng = np.random.default_rng(T * I + S)
    x = rng.normal(0, 1, (T, I)).astype(np.float32)
    a = rng.normal(0, 0.3, (S, I, R)).astype(np.float32)
    b = rng.normal(0, 0.3, (S, R, O)).astype(np.float32)
    a[0], b[0] = 0, 0  # slot 0: no adapter
    ids = np.asarray(ids if ids is not None else rng.integers(0, S, T), np.int32)
    return x, a, b, ids


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_matches_reference(name, dtype):
    x, a, b, ids = _inputs(name, dtype)
    args = (jnp.asarray(x, dtype), jnp.asarray(a, dtype), jnp.asarray(b, dtype), jnp.asarray(ids))
    ref = np.asarray(lora_matmul_reference(*args), np.float32)
    out = np.asarray(lora_matmul(*args, interpret=True), np.float32)
    tol = 1e-4 * max(1.0, np.abs(ref).max()) if dtype == jnp.float32 else 3e-2 * max(1.0, np.abs(ref).max())
    np.testing.assert_allclose(out, ref, atol=tol)
    assert not out[ids == 0].any()  # rows without an adapter get exactly zero
    np.testing.assert_allclose(np.asarray(lora_matmul_dense(*args), np.float32), ref, atol=tol)
    if dtype == jnp.float32:  # the reference is the per-row math
        loop = np.stack([x[t] @ a[ids[t]] @ b[ids[t]] for t in range(len(ids))])
        np.testing.assert_allclose(ref, loop, atol=1e-4 * max(1.0, np.abs(loop).max()))


def test_group_by_slot_orders_rows_by_adapter_with_slot_zero_last():
    ids = jnp.asarray([2, 0, 1, 2, 0, 1, 1], jnp.int32)
    order, inverse, sizes = group_by_slot(ids, 4)
    assert np.asarray(order).tolist() == [2, 5, 6, 0, 3, 1, 4]
    assert np.asarray(sizes).tolist() == [3, 2, 0]
    assert np.asarray(ids)[np.asarray(order)][np.asarray(inverse)].tolist() == np.asarray(ids).tolist()


def test_bad_shapes_are_refused():
    x, a, b, ids = _inputs("decode_mix", jnp.float32)
    with pytest.raises(ValueError, match="multiple of 16"):
        lora_matmul(jnp.asarray(x), jnp.asarray(a[:, :, :8]), jnp.asarray(b[:, :8]), jnp.asarray(ids), interpret=True)
    with pytest.raises(ValueError, match="shapes disagree"):
        lora_matmul(jnp.asarray(x[:, :32]), jnp.asarray(a), jnp.asarray(b), jnp.asarray(ids), interpret=True)


def test_a_precomputed_grouping_gives_the_same_result():
    x, a, b, ids = (jnp.asarray(v) for v in _inputs("random", jnp.float32))
    grouping = group_by_slot(ids, a.shape[0])
    np.testing.assert_array_equal(np.asarray(lora_matmul(x, a, b, ids, grouping, interpret=True)),
                                  np.asarray(lora_matmul(x, a, b, ids, interpret=True)))
