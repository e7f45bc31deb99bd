"""The batched LoRA matmul: both kernel pairs (the grouped one of prefill, the split-K one of decode steps) in Pallas
interpret mode on CPU against the jnp reference, and the reference against a plain per-row numpy loop (each row
through its own slot's A and B)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.lora_decode import default_settings, lora_decode_expand, lora_decode_matmul, plan
from pallas_kernels.lora_matmul import group_by_slot, lora_matmul, lora_matmul_dense, lora_matmul_reference

CASES = {  # name -> (T, I, O, R, slots, row slot ids or None for random)
    "decode_mix": (8, 64, 96, 16, 4, [2, 0, 1, 3, 2, 2, 0, 1]),
    "prefill_runs": (40, 32, 48, 16, 3, [1] * 17 + [0] * 6 + [2] * 17),   # rows of a sequence are runs
    "random": (37, 64, 32, 32, 5, None),
    "no_adapter": (16, 32, 32, 16, 3, [0] * 16),                           # every row on slot 0: all zeros
    "one_slot": (24, 32, 64, 16, 9, [7] * 24),                             # 8 adapters, one used
    "batch1": (1, 32, 48, 16, 3, [2]),                                     # one decode row
    "batch1_none": (1, 32, 48, 16, 3, [0]),
    "qkv_group": (13, 128, 80, 48, 9, None),                               # G * R = 48: three rank-16 parts
    "long_k": (5, 720, 48, 16, 3, None),                                   # 45 K-slices of 16: 3 sum tiles
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


def _tol(ref, dtype):
    return (1e-4 if dtype == jnp.float32 else 3e-2) * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_kernel_matches_reference(name, dtype):
    x, a, b, ids = _inputs(name, dtype)
    args = (jnp.asarray(x, dtype), jnp.asarray(a, dtype), jnp.asarray(b, dtype))
    ref = np.asarray(lora_matmul_reference(*args, jnp.asarray(ids)), np.float32)
    out = np.asarray(lora_decode_matmul(*args, plan(jnp.asarray(ids), a.shape[0]), interpret=True), np.float32)
    np.testing.assert_allclose(out, ref, atol=_tol(ref, dtype))
    assert not out[ids == 0].any()  # rows without an adapter get exactly zero (never written, masked)


def _folded_shrink(x, a, dtype):
    """Every slot's shrink side by side, [T, (S - 1) * R] in row order: what the base projection's extra columns
    hold in the fold (x @ [A_1 | ... | A_{S-1}], accumulated in float32, rounded to dtype)."""
    h = np.einsum("ti,sir->tsr", x.astype(np.float64), a[1:].astype(np.float64))
    return jnp.asarray(h.reshape(x.shape[0], -1), jnp.float32).astype(dtype)


@pytest.mark.parametrize("name", ["decode_mix", "random", "no_adapter", "batch1", "qkv_group", "one_slot"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_expand_of_a_folded_shrink(name, dtype):
    """lora_decode_expand reads each row's own slot's columns of the folded shrink: each row equals its own
    h @ B[slot] (a numpy loop over rows), rows of slot 0 exactly zero."""
    x, a, b, ids = _inputs(name, dtype)
    h_all = _folded_shrink(x, a, dtype)
    R = a.shape[2]
    hb = np.asarray(h_all, np.float64)
    want = np.stack([hb[t, (s - 1) * R:s * R] @ np.asarray(jnp.asarray(b[s], dtype), np.float64) if s else
                     np.zeros(b.shape[2]) for t, s in enumerate(ids)])
    bd = jnp.asarray(b, dtype)
    # col0: the slots' columns read in place after 24 base columns (the projection's whole output), never those
    whole = jnp.concatenate([jnp.full((h_all.shape[0], 24), 1e4, dtype), h_all], axis=1)
    for kw, h in (({}, h_all), (dict(block_r=16, block_n=16), h_all), (dict(col0=24), whole)):
        got = np.asarray(lora_decode_expand(h, bd, plan(jnp.asarray(ids), a.shape[0]), interpret=True, **kw),
                         np.float32)
        np.testing.assert_allclose(got, want, atol=_tol(want, dtype), rtol=1e-2 if dtype == jnp.bfloat16 else 1e-5)
        assert not got[ids == 0].any()
    with pytest.raises(ValueError, match=r"h_all must be .*\[T, col0 \+ \(S - 1\) \* R\]"):
        lora_decode_expand(h_all[:, :-16], bd, plan(jnp.asarray(ids), a.shape[0]), interpret=True)


@pytest.mark.parametrize("parts", [(48, 16, 16), (32, 48), (16, 16, 16)])
def test_decode_expand_reads_only_each_parts_block(parts):
    """With `parts`, a group's block-diagonal B: each output column block reads only its part's rank rows. Against
    a B whose off-diagonal blocks hold values: the result is that of the block-diagonal B (the other blocks are not
    read), equal to the full expand of the masked B."""
    from pallas_kernels.lora_decode import block_diagonal

    rng = np.random.default_rng(len(parts))
    S, R, T, G = 4, 16, 9, len(parts)
    ids = jnp.asarray(rng.integers(0, S, T), jnp.int32)
    b = rng.normal(0, 0.3, (S, G * R, sum(parts))).astype(np.float32)
    b[0] = 0
    mask = np.zeros_like(b[0])
    for g, (c0, w) in enumerate(zip(np.cumsum((0,) + parts[:-1]), parts)):
        mask[g * R:(g + 1) * R, c0:c0 + w] = 1
    h_all = jnp.asarray(rng.normal(0, 1, (T, (S - 1) * G * R)).astype(np.float32))
    p = plan(ids, S)
    got = lora_decode_expand(h_all, jnp.asarray(b), p, parts=parts, interpret=True)
    want = lora_decode_expand(h_all, jnp.asarray(b * mask), p, interpret=True)
    full = lora_decode_expand(h_all, jnp.asarray(b), p, interpret=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    assert not np.allclose(np.asarray(got), np.asarray(full), atol=1e-3)  # the off-diagonal blocks were skipped
    assert block_diagonal(parts, G * R) == (parts, 16)
    assert block_diagonal((3584, 512, 512), 48) == ((3584, 512, 512), 128)  # the 7B's q/k/v: 128-column tiles
    assert block_diagonal((40, 8), 32) == ((), None)  # no 16-wide tiling: every tile reads all rows
    with pytest.raises(ValueError, match=r"parts \[48, 16\] must add up to B's"):
        lora_decode_expand(h_all, jnp.asarray(b), p, parts=(48, 16), interpret=True)


@pytest.mark.parametrize("settings", [dict(split_k=32, block_k=16), dict(split_k=64, block_k=32, block_r=16),
                                      dict(split_k=16, block_n=16, block_m=32), dict(block_m=64),
                                      dict(split_k=32, block_k=16, fuse_reduction=True),
                                      dict(split_k=16, block_r=16, block_m=32, fuse_reduction=True),
                                      dict(case="long_k", split_k=16, block_k=16, fuse_reduction=True)])
def test_decode_kernel_tilings(settings):
    """Several K-slices (partials summed by XLA or inside the expand, there in tiles of 16 slices, the last one
    partly masked), the rank axis in column blocks, other tile heights: the same result."""
    kw = dict(settings)
    x, a, b, ids = (jnp.asarray(v) for v in _inputs(kw.pop("case", "qkv_group"), jnp.float32))
    p = plan(ids, a.shape[0], block_m=kw.pop("block_m", None))
    ref = np.asarray(lora_matmul_reference(x, a, b, ids))
    np.testing.assert_allclose(np.asarray(lora_decode_matmul(x, a, b, p, interpret=True, **kw)), ref,
                               atol=_tol(ref, jnp.float32))


@pytest.mark.parametrize("fuse_reduction", [False, True])
def test_decode_kernel_adds_into_base(fuse_reduction):
    """With base, the expand adds into base's buffer: rows of an adapter are base + the delta rounded as y + delta
    rounds it, rows of none are base bit for bit."""
    x, a, b, ids = _inputs("decode_mix", jnp.bfloat16)
    args = (jnp.asarray(x, jnp.bfloat16), jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16))
    p = plan(jnp.asarray(ids), a.shape[0])
    base = jnp.asarray(np.random.default_rng(3).normal(size=(x.shape[0], b.shape[2])), jnp.bfloat16)
    delta = lora_decode_matmul(*args, p, fuse_reduction=fuse_reduction, interpret=True)
    got = lora_decode_matmul(*args, p, fuse_reduction=fuse_reduction, base=base, interpret=True)
    assert got.dtype == jnp.bfloat16 and got.shape == base.shape
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(base + delta, np.float32))
    np.testing.assert_array_equal(np.asarray(got, np.float32)[ids == 0], np.asarray(base, np.float32)[ids == 0])
    with pytest.raises(ValueError, match=r"base must be bfloat16\[\d+, \d+\]"):
        lora_decode_matmul(*args, p, base=base[:, :-1], interpret=True)


def test_decode_plan_tiles_only_adapter_rows():
    """Tiles of block_m sorted rows within one adapter's group; the slot-0 rows' tiles are the empty group S - 1."""
    ids = jnp.asarray([2, 0, 1, 2, 0] + [1] * 17, jnp.int32)  # slot 1: 18 rows, slot 2: 2, slot 0: 2
    p = plan(ids, 3, block_m=16)
    assert np.asarray(p.order).tolist()[:20] == [2] + list(range(5, 22)) + [0, 3]
    real = np.asarray(p.group) < 2
    assert np.asarray(p.group)[real].tolist() == [0, 0, 1]
    assert list(zip(np.asarray(p.row0)[real].tolist(), np.asarray(p.row1)[real].tolist())) == [(0, 16), (16, 18),
                                                                                               (18, 20)]


def test_decode_settings_split_k_at_the_7b_shapes():
    """The split aims at TARGET_PROGRAMS programs: batch 1 splits I as finely as allowed, 256 rows less."""
    assert default_settings(1, 3584, 48, 4608, 16) == dict(block_k=64, split_k=128, block_r=16, block_n=128)
    assert default_settings(1, 18944, 16, 3584, 16)["split_k"] == 128
    assert default_settings(256, 3584, 48, 4608, 32)["split_k"] == 256       # 8 tiles x 14 slices x 3 columns
    assert default_settings(256, 18944, 16, 3584, 32)["split_k"] == 512      # 8 tiles x 37 slices


def test_decode_kernel_refuses_bad_settings():
    x, a, b, ids = (jnp.asarray(v) for v in _inputs("decode_mix", jnp.float32))
    with pytest.raises(ValueError, match="split_k=48 must be >= 16 dividing 64"):
        lora_decode_matmul(x, a, b, plan(ids, a.shape[0]), split_k=48, block_k=16, interpret=True)
    with pytest.raises(ValueError, match="block_m must be a power of two"):
        plan(ids, a.shape[0], block_m=24)


def _as_on_a_gpu(monkeypatch, kernels, max_rows) -> list:
    """layers/lora.py as on a GPU: `kernels` (its names) run in interpret mode and log their calls into the list
    returned; steps of more than max_rows tokens take the grouped kernels."""
    from qwenjax import compat
    from qwenjax.layers import lora

    calls = []
    for name in kernels:
        kernel = getattr(lora, name)
        monkeypatch.setattr(lora, name, lambda *a, _k=kernel, _n=name, **kw: calls.append(_n) or _k(*a, **kw,
                                                                                                     interpret=True))
    monkeypatch.setattr(compat, "platform", lambda: "gpu")
    monkeypatch.setattr(lora, "SPLIT_K_MAX_ROWS", max_rows)
    return calls


@pytest.mark.parametrize("max_rows", [1024, 4])  # 7 rows: the decode kernels; past a limit of 4: the grouped pair
def test_model_side_takes_the_gpu_kernels_by_step_size(monkeypatch, max_rows):
    """layers/lora.py as on a GPU (kernels in interpret mode): LoRAInputs.build makes the grouping once, and every
    projection group's delta equals the CPU path's (the reference)."""
    from qwenjax.layers import lora

    rng = np.random.default_rng(3)
    S, R, T = 4, 16, 7
    shapes = {"qkv_proj": (64, 3 * R, 96), "o_proj": (64, R, 64)}
    stacks = [{g: tuple(jnp.asarray(rng.normal(0, 0.3, s).astype(np.float32)).at[0].set(0)
                        for s in ((S, i, r), (S, r, o))) for g, (i, r, o) in shapes.items()}]
    ids = jnp.asarray([2, 0, 1, 3, 2, 0, 1], jnp.int32)
    x = jnp.asarray(rng.normal(0, 1, (T, 64)).astype(np.float32))
    ys = (jnp.ones((T, 32)), jnp.ones((T, 32)), jnp.ones((T, 32)))

    def run():
        inputs = lora.LoRAInputs.build(stacks, ids)
        return inputs, (*lora.add_lora_parts(ys, x, inputs, 0, "qkv_proj"),
                        lora.add_lora(jnp.ones((T, 64)), x, inputs, 0, "o_proj"))

    _, want = run()  # CPU: the jnp reference
    calls = _as_on_a_gpu(monkeypatch, ("lora_decode_matmul", "lora_matmul"), max_rows)
    inputs, got = run()
    assert (inputs.plan is not None, inputs.grouping is not None) == ((True, False) if max_rows >= T else
                                                                      (False, True))
    assert calls == ["lora_decode_matmul" if max_rows >= T else "lora_matmul"] * 2
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4)


@pytest.mark.parametrize("max_rows", [1024, 4])
def test_model_side_expands_a_folded_shrink(monkeypatch, max_rows):
    """layers/lora.py with the fold's stacks (A None: the shrink came out of the base projection as `folded`
    columns): on a GPU (kernels in interpret mode) decode-sized steps take lora_decode_expand and larger ones the
    grouped expand, and both give the CPU path's delta, which is each row's h @ B[slot]."""
    from qwenjax.layers import lora

    rng = np.random.default_rng(5)
    S, R, T = 4, 16, 7
    ids = jnp.asarray([2, 0, 1, 3, 2, 0, 1], jnp.int32)
    diag = np.kron(np.eye(3), np.ones((R, 32)))  # as the stacks hold a group: B block-diagonal over q, k, v
    b = jnp.asarray(rng.normal(0, 0.3, (S, 3 * R, 96)).astype(np.float32) * diag).at[0].set(0)
    stacks = [{"qkv_proj": (None, b)}]
    tail = jnp.asarray(rng.normal(0, 1, (T, (S - 1) * 3 * R)).astype(np.float32))
    ys = (jnp.ones((T, 32)), jnp.ones((T, 32)), jnp.ones((T, 32)))
    folded = jnp.concatenate(ys + (tail,), axis=1)  # the projection's whole output: base columns, then the slots'
    h = np.asarray(tail).reshape(T, S - 1, 3 * R)
    want = np.stack([h[t, s - 1] @ np.asarray(b[s]) if s else np.zeros(96) for t, s in enumerate(np.asarray(ids))])

    def run():
        return lora.add_lora_parts(ys, None, lora.LoRAInputs.build(stacks, ids), 0, "qkv_proj", folded)

    np.testing.assert_allclose(np.concatenate(run(), axis=1) - 1, want, atol=1e-4)  # CPU: the jnp reference
    calls = _as_on_a_gpu(monkeypatch, ("lora_decode_expand", "folded_expand_grouped"), max_rows)
    np.testing.assert_allclose(np.concatenate(run(), axis=1) - 1, want, atol=1e-4)
    assert calls == ["lora_decode_expand" if max_rows >= T else "folded_expand_grouped"]
    # QWENJAX_LORA_FOLD_INPLACE=1: the decode expand reads the slots' columns from the whole output (col0 = 96)
    monkeypatch.setenv(lora.FOLD_INPLACE_ENV, "1")
    seen, expand = [], lora.lora_decode_expand
    monkeypatch.setattr(lora, "lora_decode_expand", lambda h, *a, **kw: seen.append((h.shape, kw.get("col0"))) or
                        expand(h, *a, **kw))
    np.testing.assert_allclose(np.concatenate(run(), axis=1) - 1, want, atol=1e-4)
    assert seen == ([((T, 96 + (S - 1) * 3 * R), 96)] if max_rows >= T else [])
