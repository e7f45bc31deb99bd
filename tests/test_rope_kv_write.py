"""The fused RoPE + K/V page-write kernel (Pallas interpret mode on CPU) against its jnp reference, bit for bit, and
the engine's choice between it and the jnp path (`rope_and_write`)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.rope_kv_write import apply_rope, rope_kv_write, rope_kv_write_reference
from qwenjax.layers import attention
from qwenjax.layers.attention_metadata import AttentionMetadata, MixedMetadata, PackedMetadata
from qwenjax.layers.rotary import rope_cos_sin

BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32
E5M2, E4M3 = jnp.float8_e5m2, jnp.float8_e4m3fn
SENTINEL = 3.0  # what untouched page slots hold (exact in every page dtype)
# Under jit, as the engine runs it: XLA contracts RoPE's x * cos + r * sin to one FMA inside a fusion, which op-by-op
# (eager) evaluation does not, so the two differ in the last bit now and then. The kernel matches the jitted path.
reference = jax.jit(rope_kv_write_reference)


def _bits(x):
    """The array's raw bits (so -0.0 != 0.0 and fp8 codes compare exactly)."""
    x = np.asarray(x)
    return x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


def _case(T, N, K, H, P, S, dtype, page_dtype, seed, pad=3):
    """Fresh random q/k/v (a few k/v outliers past fp8 e4m3's range), positions, pages full of SENTINEL, and slots:
    a random permutation of the cache's slots for the live tokens, padding slots (-1, P * S, beyond) for `pad`."""
    rng = np.random.default_rng(seed)
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = (jax.random.normal(kq, (T, N, H), F32) * 2).astype(dtype)
    k = jax.random.normal(kk, (T, K, H), F32) * 3
    v = jax.random.normal(kv, (T, K, H), F32) * 3
    k = k.at[0, 0, :4].multiply(400.0).astype(dtype)  # saturate fp8 pages
    v = v.at[-1, -1, -4:].multiply(-400.0).astype(dtype)
    positions = jnp.asarray(rng.integers(0, 32768, T), jnp.int32)
    cos, sin = rope_cos_sin(positions, H, 1e6)
    pages = jnp.full((K, P, S, H), SENTINEL, page_dtype)
    slots = rng.permutation(P * S)[:T].astype(np.int32)
    padding = rng.choice(T, size=min(pad, T - 1), replace=False)
    slots[padding] = rng.choice(np.array([-1, -7, P * S, P * S + 3, 2 ** 30], np.int32), size=len(padding))
    return q, k, v, cos, sin, pages, jnp.asarray(slots)


def _check(out, ref, pages_in, slots):
    q, k_pages, v_pages = out
    for got, want in zip(out, ref):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(_bits(got), _bits(want))
    P, S = pages_in.shape[1:3]
    live = np.asarray(slots)[(np.asarray(slots) >= 0) & (np.asarray(slots) < P * S)]
    untouched = np.ones(P * S, bool)
    untouched[live] = False
    for pages in (k_pages, v_pages):
        flat = _bits(pages).reshape(pages.shape[0], P * S, -1)
        np.testing.assert_array_equal(flat[:, untouched], _bits(pages_in).reshape(flat.shape)[:, untouched])
        assert not (flat[:, live] == _bits(pages_in).reshape(flat.shape)[:, live]).all(axis=-1).any()


CASES = [  # T, N, K, H, P, S, dtype, page dtype, k_scale, v_scale, block_tokens
    (5, 8, 2, 128, 6, 16, BF16, BF16, None, None, None),
    (7, 14, 2, 64, 4, 16, BF16, BF16, None, None, 4),  # GQA 7, a last block of 3 tokens
    (4, 4, 4, 64, 3, 16, F16, F16, None, None, 1),  # MHA
    (6, 8, 2, 128, 4, 16, F32, F32, None, None, 2),
    (5, 6, 4, 64, 3, 32, BF16, F32, None, None, None),  # N not a multiple of K (a shard with replicated kv heads)
    (5, 8, 2, 64, 3, 16, F16, BF16, None, None, None),  # f16 values into bf16 pages
    (6, 8, 2, 128, 4, 16, BF16, E5M2, None, None, None),
    (6, 8, 2, 64, 4, 16, BF16, E4M3, 0.37, 1.7, None),
    (5, 8, 2, 128, 4, 16, F16, E4M3, 0.0123, 3.3, 4),
    (5, 8, 4, 64, 4, 16, F32, E4M3, 0.7, 0.09, None),  # float32 values: every quotient bit matters
    (5, 8, 2, 64, 4, 16, BF16, E5M2, 0.5, 3.0, None),  # to_pages divides whenever a scale is given
]


@pytest.mark.parametrize("T, N, K, H, P, S, dtype, page_dtype, k_scale, v_scale, bt", CASES)
def test_kernel_matches_reference_bit_for_bit(T, N, K, H, P, S, dtype, page_dtype, k_scale, v_scale, bt):
    q, k, v, cos, sin, pages, slots = _case(T, N, K, H, P, S, dtype, page_dtype, seed=T * 100 + N * 10 + H)
    scales = dict(k_scale=k_scale, v_scale=v_scale)
    out = rope_kv_write(q, k, v, cos, sin, pages, pages, slots, block_tokens=bt, interpret=True, **scales)
    ref = reference(q, k, v, cos, sin, pages, pages, slots, **scales)
    _check(out, ref, pages, slots)


def test_reference_is_apply_rope_then_write_kv():
    """With no padding slots the reference is exactly the engine's jnp path, and its q is apply_rope's."""
    q, k, v, cos, sin, pages, slots = _case(6, 8, 2, 64, 4, 16, BF16, E4M3, seed=5, pad=0)
    got = reference(q, k, v, cos, sin, pages, pages, slots, k_scale=0.37, v_scale=2.0)
    want = jax.jit(lambda q, k, v, cos, sin, pages, slots: (
        apply_rope(q, cos, sin), attention.write_kv(pages, apply_rope(k, cos, sin), slots, jnp.float32(0.37)),
        attention.write_kv(pages, v, slots, jnp.float32(2.0))))(q, k, v, cos, sin, pages, slots)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(_bits(g), _bits(w))


def test_a_token_per_slot_over_a_whole_cache():
    """Every slot of a small cache written once, in a random order: nothing is left at the sentinel."""
    q, k, v, cos, sin, pages, slots = _case(32, 4, 2, 64, 2, 16, BF16, BF16, seed=9, pad=0)
    out = rope_kv_write(q, k, v, cos, sin, pages, pages, slots, interpret=True)
    _check(out, reference(q, k, v, cos, sin, pages, pages, slots), pages, slots)
    assert len(np.unique(np.asarray(slots))) == 32


def test_xla_divides_by_a_scale_as_a_multiplication_by_its_reciprocal():
    """What the kernel's fp8 path relies on: under jit, to_pages' float32 x / scale (a scalar, broadcast) is
    x * (1 / scale) bit for bit (XLA's algebraic simplifier rewrites it so), not the correctly rounded quotient."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(100_000) * 40, F32)
    for s in (0.37, 3.3, 0.0123, 1.0):
        s = jnp.float32(s)
        got = jax.jit(lambda x, s: x / s)(x, s)
        want = jax.jit(lambda x, s: x * (1.0 / s))(x, s)
        np.testing.assert_array_equal(_bits(got), _bits(want))
        assert (np.asarray(got) != np.asarray(x) / np.float32(s)).any() or s == 1.0  # not IEEE division


def test_fp8_scale_on_rounding_midpoints():
    """v on e4m3 rounding midpoints times v_scale: x * (1 / scale) and IEEE x / scale land on different sides of
    some midpoints, so only the reference's own formula passes (the kernel would fail with a true division)."""
    q, k, v, cos, sin, pages, slots = _case(8, 4, 2, 64, 2, 16, F32, E4M3, seed=11, pad=2)
    grid = np.asarray(jnp.arange(256, dtype=jnp.uint8).view(E4M3).astype(F32))
    grid = np.unique(grid[np.isfinite(grid)])
    mids = (grid[1:] + grid[:-1]) / 2  # exact in float32
    scale = np.float32(0.37)
    v = jnp.asarray(np.random.default_rng(3).choice(mids, v.shape) * scale, F32)
    out = rope_kv_write(q, k, v, cos, sin, pages, pages, slots, k_scale=scale, v_scale=scale, interpret=True)
    ref = reference(q, k, v, cos, sin, pages, pages, slots, k_scale=scale, v_scale=scale)
    _check(out, ref, pages, slots)
    ieee = jnp.clip(np.asarray(v) / scale, -448, 448).astype(E4M3)
    assert (_bits(ieee) != _bits(jnp.clip(v * (1 / jnp.float32(scale)), -448, 448).astype(E4M3))).any()


@pytest.mark.parametrize("change, match", [
    (dict(q=jnp.ones((4, 8, 64), BF16)), "share T >= 1 tokens"),
    (dict(q=jnp.ones((5, 8, 96), BF16), k=jnp.ones((5, 2, 96), BF16), v=jnp.ones((5, 2, 96), BF16)),
     "head_dim must be a power of two"),
    (dict(k=jnp.ones((5, 2, 64), BF16), v=jnp.ones((5, 3, 64), BF16)), "k, v both"),
    (dict(q=jnp.ones((5, 8, 64), jnp.int32)), "q dtype must be"),
    (dict(cos=jnp.ones((5, 64), BF16)), r"cos must be float32 \[T=5, H=64\]"),
    (dict(k_pages=jnp.ones((2, 4, 16, 64), jnp.int8), v_pages=jnp.ones((2, 4, 16, 64), jnp.int8)),
     "page dtype must be"),
    (dict(v_pages=jnp.ones((2, 4, 16, 64), F16)), "k_pages and v_pages must both be"),
    (dict(k_pages=jnp.ones((3, 4, 16, 64), BF16), v_pages=jnp.ones((3, 4, 16, 64), BF16)), "K=2 kv heads"),
    (dict(slots=jnp.zeros((5,), jnp.uint32)), r"slots must be int32 \[T=5\]"),
    (dict(k_scale=jnp.ones((2,))), "k_scale must be a scalar"),
    (dict(block_tokens=3), "block_tokens must be a power of two"),
    (dict(num_warps=16), "num_warps must be a power of two"),
])
def test_argument_checks(change, match):
    args = dict(q=jnp.ones((5, 8, 64), BF16), k=jnp.ones((5, 2, 64), BF16), v=jnp.ones((5, 2, 64), BF16),
                cos=jnp.ones((5, 64), F32), sin=jnp.ones((5, 64), F32), k_pages=jnp.ones((2, 4, 16, 64), BF16),
                v_pages=jnp.ones((2, 4, 16, 64), BF16), slots=jnp.zeros((5,), jnp.int32))
    args.update(change)
    with pytest.raises(ValueError, match=match):
        rope_kv_write(**args, interpret=True)


# ------------------------------------------------------------------------------ the engine's choice (rope_and_write)


def _decode_meta(B, slots):
    z = jnp.zeros((B, 1), jnp.int32)
    return AttentionMetadata(positions=z, slot_mapping=jnp.asarray(slots, jnp.int32).reshape(B, 1),
                             block_tables=jnp.zeros((B, 2), jnp.int32), seq_lens=jnp.ones((B,), jnp.int32),
                             query_lens=jnp.ones((B,), jnp.int32))


def _prefill_meta(B, Q, slots):
    return AttentionMetadata(positions=jnp.zeros((B, Q), jnp.int32),
                             slot_mapping=jnp.asarray(slots, jnp.int32).reshape(B, Q),
                             block_tables=jnp.zeros((B, 2), jnp.int32), seq_lens=jnp.full((B,), Q, jnp.int32),
                             query_lens=jnp.full((B,), Q, jnp.int32))


def _packed_meta(T, slots):
    return PackedMetadata(positions=jnp.zeros((T,), jnp.int32), slot_mapping=jnp.asarray(slots, jnp.int32),
                          block_tables=jnp.zeros((1, 2), jnp.int32), seq_lens=jnp.full((1,), T, jnp.int32),
                          query_lens=jnp.full((1,), T, jnp.int32), row_starts=jnp.zeros((1,), jnp.int32))


def _step_case(T, page_dtype, seed):
    q, k, v, cos, sin, pages, slots = _case(T, 8, 2, 64, 4, 16, BF16, page_dtype, seed=seed, pad=1)
    slots = jnp.where(slots < 0, 64 + jnp.arange(T, dtype=jnp.int32), slots)  # the engine pads with P * S and past
    return q, k, v, cos, sin, pages, slots


def _rope_and_write(q, k, v, cos, sin, pages, meta, has_context, scales):
    """rope_and_write under jit (traced now: the monkeypatched dispatch of the caller is what it sees)."""
    return jax.jit(lambda *a: attention.rope_and_write(*a, has_context=has_context, **scales))(
        q, k, v, cos, sin, pages, pages, meta)


@pytest.mark.parametrize("page_dtype, scales", [(BF16, {}), (E4M3, dict(k_scale=jnp.float32(0.37),
                                                                          v_scale=jnp.float32(1.9)))])
def test_rope_and_write_on_cpu_is_the_old_path(page_dtype, scales):
    """On CPU rope_and_write is apply_rope + write_kv (the path before the kernel), for decode, mixed, packed and
    dense prefill steps, and hands attend the rotated k and v."""
    q, k, v, cos, sin, pages, slots = _step_case(8, page_dtype, seed=1)
    metas = {"decode": _decode_meta(8, slots), "prefill": _prefill_meta(2, 4, slots), "packed": _packed_meta(8, slots),
             "mixed": MixedMetadata(decode=_decode_meta(4, slots[:4]), prefill=_prefill_meta(1, 4, slots[4:]))}
    ks, vs = (attention.page_scale(page_dtype, scales.get(n)) for n in ("k_scale", "v_scale"))

    def old(q, k, v, cos, sin, pages, slots):
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v, attention.write_kv(pages, k, slots, ks), attention.write_kv(pages, v, slots, vs)

    want = jax.jit(old)(q, k, v, cos, sin, pages, slots)
    for name, meta in metas.items():
        for has_context in (False, True):
            assert not attention.fused_rope_write(meta, has_context=has_context, head_dim=64)
            got = _rope_and_write(q, k, v, cos, sin, pages, meta, has_context, scales)
            for g, w in zip(got, want):
                np.testing.assert_array_equal(_bits(g), _bits(w), err_msg=name)


def test_rope_and_write_fused_path_equals_the_old_path(monkeypatch):
    """With the Pallas attention (faked here: the kernel interpreted), decode, packed and mixed-with-context steps
    take the fused kernel and give the jnp path's q and pages; steps whose attention reads the fresh k/v (dense
    prefill rows) keep the jnp path."""
    q, k, v, cos, sin, pages, slots = _step_case(8, E4M3, seed=2)
    scales = dict(k_scale=jnp.float32(0.37), v_scale=jnp.float32(1.9))
    mixed = MixedMetadata(decode=_decode_meta(4, slots[:4]), prefill=_prefill_meta(1, 4, slots[4:]))
    metas = [(_decode_meta(8, slots), False), (_packed_meta(8, slots), False), (mixed, True)]
    want = [_rope_and_write(q, k, v, cos, sin, pages, m, c, scales) for m, c in metas]
    monkeypatch.setattr(attention, "decode_backend", lambda head_dim: "pallas")
    real = attention.sharded_rope_kv_write
    calls = []
    monkeypatch.setattr(attention, "sharded_rope_kv_write",
                        lambda *a, **kw: calls.append(1) or real(*a, **{**kw, "interpret": True}))
    for (meta, has_context), w in zip(metas, want):
        assert attention.fused_rope_write(meta, has_context=has_context, head_dim=64)
        gq, gk, gv, gkp, gvp = _rope_and_write(q, k, v, cos, sin, pages, meta, has_context, scales)
        assert gk is None and gv is None  # attend reads the pages alone on these steps
        for g, e in zip((gq, gkp, gvp), (w[0], w[3], w[4])):
            np.testing.assert_array_equal(_bits(g), _bits(e))
    assert len(calls) == len(metas)
    dense = _prefill_meta(2, 4, slots)
    assert not attention.fused_rope_write(dense, has_context=False, head_dim=64)
    assert attention.fused_rope_write(dense, has_context=True, head_dim=64)
    assert not attention.fused_rope_write(mixed, has_context=False, head_dim=64)
    long = attention.FUSED_ROPE_WRITE_MAX_TOKENS  # long prefill steps keep the XLA path (no faster there)
    assert attention.fused_rope_write(_packed_meta(long, jnp.zeros(long)), has_context=False, head_dim=64)
    assert not attention.fused_rope_write(_packed_meta(long + 16, jnp.zeros(long + 16)), has_context=False,
                                          head_dim=64)
