"""GPU-only checks of the fused RoPE + K/V page-write kernel (`pytest tests/gpu --gpu`): bit-identical to the jnp
path the engine ran before it (apply_rope + write_kv, jitted: what XLA computes on this GPU) over the page dtypes,
head dims, GQA shapes and step sizes; padding slots leave the pages alone; donated pages are updated in place."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.rope_kv_write import apply_rope, rope_kv_write
from qwenjax.layers.attention import write_kv
from qwenjax.layers.rotary import rope_cos_sin

pytestmark = pytest.mark.gpu
BF16, F16, F32, E5M2, E4M3 = jnp.bfloat16, jnp.float16, jnp.float32, jnp.float8_e5m2, jnp.float8_e4m3fn


def _bits(x):
    x = np.asarray(x)
    return x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


@jax.jit
def _old_path(q, k, v, cos, sin, k_pages, v_pages, slots, k_scale, v_scale):
    """The engine's path before the kernel (padding slots already moved past the cache's end)."""
    k = apply_rope(k, cos, sin)
    return apply_rope(q, cos, sin), write_kv(k_pages, k, slots, k_scale), write_kv(v_pages, v, slots, v_scale)


def _case(T, N, K, H, P, dtype, page_dtype, seed, S=16):
    rng = np.random.default_rng(seed)
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = (jax.random.normal(kq, (T, N, H), F32) * 2).astype(dtype)
    k = (jax.random.normal(kk, (T, K, H), F32) * 3).at[0, 0, :4].multiply(400.0).astype(dtype)
    v = (jax.random.normal(kv, (T, K, H), F32) * 3).at[-1, -1, -4:].multiply(-400.0).astype(dtype)
    cos, sin = rope_cos_sin(jnp.asarray(rng.integers(0, 32768, T), jnp.int32), H, 1e6)
    pages = jnp.full((K, P, S, H), 3.0, page_dtype)
    slots = rng.permutation(P * S)[:T].astype(np.int32)
    pad = rng.choice(T, size=T // 8, replace=False)
    slots[pad] = P * S + np.arange(len(pad), dtype=np.int32)  # the engine's padding: past the end, distinct
    return q, k, v, cos, sin, pages, jnp.asarray(slots)


CASES = [  # T, N, K, H, P, dtype, page dtype, k_scale, v_scale
    (1, 28, 4, 128, 2000, BF16, BF16, None, None),  # 7B decode at batch 1
    (64, 28, 4, 128, 2000, BF16, BF16, None, None),
    (4096, 28, 4, 128, 2000, BF16, BF16, None, None),  # a prefill step
    (33, 14, 2, 64, 300, BF16, BF16, None, None),  # 0.5B
    (64, 28, 4, 128, 500, F16, F16, None, None),
    (64, 28, 4, 128, 500, F32, F32, None, None),
    (64, 28, 4, 128, 500, BF16, F32, None, None),
    (256, 28, 4, 128, 500, BF16, E5M2, None, None),
    (256, 28, 4, 128, 500, BF16, E4M3, 0.37, 1.9),
    (256, 14, 2, 64, 500, F16, E4M3, 0.0123, 3.3),
    (256, 12, 2, 128, 500, F32, E4M3, 0.7, 0.09),
    (64, 7, 2, 64, 100, BF16, BF16, None, None),  # N not a multiple of K
]


@pytest.mark.parametrize("T, N, K, H, P, dtype, page_dtype, k_scale, v_scale", CASES)
def test_kernel_equals_the_jitted_jnp_path(T, N, K, H, P, dtype, page_dtype, k_scale, v_scale):
    q, k, v, cos, sin, pages, slots = _case(T, N, K, H, P, dtype, page_dtype, seed=T + N + H)
    ks, vs = (None if s is None else jnp.float32(s) for s in (k_scale, v_scale))
    want = _old_path(q, k, v, cos, sin, pages, pages, slots, ks, vs)
    got = rope_kv_write(q, k, v, cos, sin, pages, pages, slots, k_scale=ks, v_scale=vs)
    for name, g, w in zip(("q", "k_pages", "v_pages"), got, want):
        bad = _bits(g) != _bits(w)
        assert not bad.any(), f"{name}: {bad.sum()} of {bad.size} differ, e.g. at {np.argwhere(bad)[:4].tolist()}"


def test_fp8_scale_on_rounding_midpoints():
    """v on e4m3 rounding midpoints times the scale: the kernel must scale exactly as XLA compiles x / scale."""
    q, k, v, cos, sin, pages, slots = _case(512, 28, 4, 128, 500, F32, E4M3, seed=4)
    grid = np.asarray(jnp.arange(256, dtype=jnp.uint8).view(E4M3).astype(F32))
    grid = np.unique(grid[np.isfinite(grid)])
    s = jnp.float32(0.37)
    v = jnp.asarray(np.random.default_rng(3).choice((grid[1:] + grid[:-1]) / 2, v.shape) * 0.37, F32)
    want = _old_path(q, k, v, cos, sin, pages, pages, slots, s, s)
    got = rope_kv_write(q, k, v, cos, sin, pages, pages, slots, k_scale=s, v_scale=s)
    np.testing.assert_array_equal(_bits(got[2]), _bits(want[2]))


def test_padding_slots_write_nothing():
    q, k, v, cos, sin, pages, _ = _case(64, 28, 4, 128, 8, BF16, BF16, seed=5)
    slots = jnp.asarray(np.r_[np.arange(32), np.full(16, -1), 128 + np.arange(16)].astype(np.int32))
    _, kp, vp = rope_kv_write(q, k, v, cos, sin, pages, pages, slots)
    for p in (kp, vp):
        flat = np.asarray(p.astype(F32)).reshape(4, 128, 128)
        assert (flat[:, 32:] == 3.0).all() and not (flat[:, :32] == 3.0).all(axis=-1).any()


def test_donated_pages_are_written_in_place():
    """Under a jit that donates the pages, the kernel's outputs are the donated buffers (no copy of the cache)."""
    q, k, v, cos, sin, pages, slots = _case(8, 28, 4, 128, 2000, BF16, BF16, seed=6)
    step = jax.jit(lambda q, kp, vp: rope_kv_write(q, k, v, cos, sin, kp, vp, slots), donate_argnums=(1, 2))
    kp, vp = pages + 0, pages + 0
    ptrs = kp.unsafe_buffer_pointer(), vp.unsafe_buffer_pointer()
    _, kp2, vp2 = step(q, kp, vp)
    assert (kp2.unsafe_buffer_pointer(), vp2.unsafe_buffer_pointer()) == ptrs
    mem = step.lower(q, kp2, vp2).compile().memory_analysis()  # XLA GPU reports it (tests/gpu/test_moe_gpu.py)
    assert mem is not None and mem.temp_size_in_bytes < pages.nbytes // 4, mem


@pytest.mark.parametrize("page_dtype, scales", [(BF16, (None, None)), (E5M2, (None, None)), (E4M3, (0.37, 1.9))])
def test_rope_and_write_picks_the_kernel_with_the_old_paths_result(monkeypatch, page_dtype, scales):
    """The engine's dispatch (rope_and_write, jitted) on a decode step: the fused kernel, and the same q and pages
    as with the jnp path forced."""
    from qwenjax.layers import attention

    q, k, v, cos, sin, pages, slots = _case(64, 28, 4, 128, 500, BF16, page_dtype, seed=7)
    meta = attention.AttentionMetadata(positions=jnp.zeros((64, 1), jnp.int32), slot_mapping=slots.reshape(64, 1),
                                       block_tables=jnp.zeros((64, 4), jnp.int32),
                                       seq_lens=jnp.ones((64,), jnp.int32), query_lens=jnp.ones((64,), jnp.int32))
    ks, vs = (None if s is None else jnp.float32(s) for s in scales)

    def run():
        f = jax.jit(lambda *a: attention.rope_and_write(*a, meta, has_context=False, k_scale=ks, v_scale=vs))
        return f(q, k, v, cos, sin, pages, pages), f.lower(q, k, v, cos, sin, pages, pages).as_text()

    (q1, k1, _, kp1, vp1), text = run()
    assert k1 is None and "qwenjax_rope_kv_write" in text
    monkeypatch.setattr(attention, "fused_rope_write", lambda *a, **kw: False)
    (q0, k0, _, kp0, vp0), _ = run()
    assert k0 is not None
    for name, g, w in (("q", q1, q0), ("k_pages", kp1, kp0), ("v_pages", vp1, vp0)):
        bad = _bits(g) != _bits(w)
        assert not bad.any(), f"{name}: {bad.sum()} of {bad.size} differ"
