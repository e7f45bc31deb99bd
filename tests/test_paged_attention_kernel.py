"""Paged decode attention kernel (Pallas interpret mode on CPU) against the jnp reference."""
import functools
import itertools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import paged_attention as pa
from pallas_kernels.paged_attention import (
    default_settings,
    paged_attention,
    paged_attention_reference,
)

BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32
E5M2, E4M3 = jnp.float8_e5m2, jnp.float8_e4m3fn
LENGTHS = (1, 15, 16, 17, 70)


def make_case(name, *, group, head_dim, page_size, q_dtype, kv_dtype, lengths=LENGTHS,
              num_kv_heads=2, spare_pages=3, kv_range=1.0):
    """Random q / pages / permuted block tables, with NaN wherever the kernel must not read.

    NaN goes into: slots past each sequence's length in its last page, every unused page, and the
    page that block-table entries past a row's length point to.
    """
    key = jax.random.key(zlib.crc32(name.encode()))  # a fresh key per case
    kq, kk, kv, kp = jax.random.split(key, 4)
    seqs = len(lengths)
    max_pages = max(1, -(-max(lengths) // page_size)) + 1  # one table entry past the longest row
    num_pages = seqs * max_pages + spare_pages
    q = jax.random.normal(kq, (seqs, num_kv_heads * group, head_dim), F32).astype(q_dtype)
    shape = (num_kv_heads, num_pages, page_size, head_dim)
    k = np.array(kv_range * jax.random.normal(kk, shape, F32))
    v = np.array(kv_range * jax.random.normal(kv, shape, F32))
    perm = np.array(jax.random.permutation(kp, num_pages))
    poison = int(perm[-1])  # never holds data
    tables = np.full((seqs, max_pages), poison, np.int32)
    used = set()
    for s, n in enumerate(lengths):
        pages = perm[s * max_pages: s * max_pages + -(-n // page_size)]
        tables[s, :len(pages)] = pages
        used.update(int(p) for p in pages)
        if n % page_size:
            for x in (k, v):
                x[:, pages[-1], n % page_size:] = np.nan
    for p in set(range(num_pages)) - used:
        k[:, p] = np.nan
        v[:, p] = np.nan
    return (q, jnp.asarray(k, kv_dtype), jnp.asarray(v, kv_dtype), jnp.asarray(tables),
            jnp.asarray(lengths, jnp.int32))


CASES = [  # group, head_dim, page_size, q dtype, kv dtype, num_splits
    (1, 64, 16, F32, F32, 1),
    (2, 128, 16, BF16, BF16, 1),
    (7, 128, 16, BF16, BF16, 3),
    (4, 64, 32, F16, F16, 2),
    (8, 128, 64, BF16, BF16, None),
    (7, 64, 128, F32, F32, 2),
    (2, 64, 16, BF16, E5M2, 1),
    (4, 128, 32, F16, E5M2, 2),
    (7, 64, 16, BF16, E4M3, 2),
    (1, 128, 16, F16, E4M3, 1),
    (2, 64, 32, F16, BF16, 1),
]


@pytest.mark.parametrize("group,head_dim,page_size,q_dtype,kv_dtype,num_splits", CASES)
def test_matches_reference(group, head_dim, page_size, q_dtype, kv_dtype, num_splits):
    name = f"ref-{group}-{head_dim}-{page_size}-{q_dtype.__name__}-{kv_dtype.__name__}-{num_splits}"
    fp8 = kv_dtype in (E5M2, E4M3)
    # e4m3 holds scaled values: stored * scale is the true value.
    k_scale, v_scale = (0.5, 2.0) if kv_dtype == E4M3 else (1.0, 1.0)
    q, k, v, tables, lengths = make_case(name, group=group, head_dim=head_dim, page_size=page_size,
                                         q_dtype=q_dtype, kv_dtype=kv_dtype,
                                         kv_range=3.0 if kv_dtype == E4M3 else 1.0)
    out = paged_attention(q, k, v, tables, lengths, k_scale=k_scale, v_scale=v_scale,
                          pages_per_compute_block=2 if page_size <= 32 else None,
                          num_splits=num_splits, interpret=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    if fp8:  # reference on the dequantized cache
        k, v = k.astype(F32) * k_scale, v.astype(F32) * v_scale
    ref = paged_attention_reference(q, k, v, tables, lengths)
    atol = 1e-5 if q_dtype == F32 else (3e-2 if v_scale != 1.0 else 1.5e-2)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                               atol=atol, rtol=1e-2)


def test_splits_agree_with_single_pass():
    q, k, v, tables, lengths = make_case("splits", group=4, head_dim=64, page_size=16, q_dtype=F32,
                                         kv_dtype=F32, lengths=(3, 64, 65, 130, 200))
    run = functools.partial(paged_attention, q, k, v, tables, lengths, interpret=True,
                            pages_per_compute_block=2)
    one = run(num_splits=1)
    for splits in (3, 16):  # 16 > pages: empty splits must drop out of the merge
        np.testing.assert_allclose(run(num_splits=splits), one, atol=1e-5, rtol=1e-5)


def test_padding_rows_are_zero():
    q, k, v, tables, lengths = make_case("padding", group=2, head_dim=64, page_size=16,
                                         q_dtype=BF16, kv_dtype=BF16, lengths=(0, 20, 0))
    for splits in (1, 2):
        out = np.asarray(paged_attention(q, k, v, tables, lengths, num_splits=splits, interpret=True),
                         np.float32)
        assert np.isfinite(out).all()
        assert not out[0].any() and not out[2].any()
        ref = paged_attention_reference(q, k, v, tables, lengths)
        np.testing.assert_allclose(out, np.asarray(ref, np.float32), atol=1.5e-2, rtol=1e-2)


def test_custom_softmax_scale():
    q, k, v, tables, lengths = make_case("sm_scale", group=2, head_dim=64, page_size=16,
                                         q_dtype=F32, kv_dtype=F32)
    out = paged_attention(q, k, v, tables, lengths, sm_scale=0.3, interpret=True)
    ref = paged_attention_reference(q, k, v, tables, lengths, sm_scale=0.3)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_fp8_pages_with_q_beyond_f16_range_stay_finite():
    # fp8 pages run the dots in f16; q is clamped to the f16 range rather than overflowing to inf.
    q, k, v, tables, lengths = make_case("q-range", group=2, head_dim=64, page_size=16, q_dtype=BF16,
                                         kv_dtype=E5M2, lengths=(5, 40))
    out = paged_attention(q * 1e6, k, v, tables, lengths, interpret=True)
    assert np.isfinite(np.asarray(out, np.float32)).all()


def test_default_settings_follow_their_rules():
    """default_settings' docstring, checked over a grid of shapes (its constants are sweep results; how they are
    applied is what is checked): a compute block holds at most _BLOCK_BYTES of K and _MAX_BLOCK_TOKENS tokens and is
    the largest such block a power-of-two cover of the table allows; tables of at most _SINGLE_PASS_BLOCKS blocks run
    in one pass; otherwise splits are added until K x S x C reaches the program target, while each split keeps
    _MIN_BLOCKS_PER_SPLIT blocks."""
    for batch, heads, max_pages, page, head_dim, dtype in itertools.product(
            (1, 2, 64, 512), (1, 4), (1, 5, 24, 40, 256, 2048), (16, 64, 256), (64, 128), (BF16, F32, E5M2)):
        ppcb, splits = default_settings(batch, heads, max_pages, page, head_dim, dtype)
        itemsize = jnp.dtype(dtype).itemsize
        target = pa._TARGET_PROGRAMS_FP8 if itemsize == 1 else pa._TARGET_PROGRAMS

        def block_ok(n):
            return (n * page * head_dim * itemsize <= pa._BLOCK_BYTES and n * page <= pa._MAX_BLOCK_TOKENS
                    and n <= 1 << (max_pages - 1).bit_length())

        case = (batch, heads, max_pages, page, head_dim, dtype, ppcb, splits)
        assert ppcb >= 1 and (ppcb == 1 or block_ok(ppcb)) and not block_ok(ppcb + 1), case
        blocks = -(-max_pages // ppcb)
        if blocks <= pa._SINGLE_PASS_BLOCKS:
            assert splits == 1, case
            continue
        assert splits == 1 or splits * pa._MIN_BLOCKS_PER_SPLIT <= blocks, case
        enough = batch * heads * splits >= target
        assert enough or (splits + 1) * pa._MIN_BLOCKS_PER_SPLIT > blocks, case  # more programs, if they fit
        assert splits == 1 or batch * heads * (splits - 1) < target, case  # no more than the target needs
    # What the rules are for: one long sequence is split wide; a big batch fills the GPU without a combine step;
    # batch-1 latency's 384-token context (24 pages of 16) runs in one pass.
    assert default_settings(1, 4, 2048, 16)[1] > 8
    assert default_settings(512, 4, 256, 16)[1] == 1
    assert default_settings(1, 4, 24, 16)[1] == 1


def _spec(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


GOOD = dict(q=_spec((2, 8, 64), BF16), k=_spec((2, 10, 16, 64), BF16),
            v=_spec((2, 10, 16, 64), BF16), tables=_spec((2, 4), jnp.int32),
            lengths=_spec((2,), jnp.int32))


@pytest.mark.parametrize("change,kwargs,match", [
    (dict(q=_spec((2, 9, 64), BF16)), {}, "multiple of kv heads"),
    (dict(q=_spec((2, 18, 64), BF16)), {}, "GQA ratio"),
    (dict(q=_spec((2, 8, 96), BF16), k=_spec((2, 10, 16, 96), BF16),
          v=_spec((2, 10, 16, 96), BF16)), {}, "head_dim must be 64 or 128"),
    (dict(k=_spec((2, 10, 16, 128), BF16), v=_spec((2, 10, 16, 128), BF16)), {}, "head_dim"),
    (dict(k=_spec((2, 10, 8, 64), BF16), v=_spec((2, 10, 8, 64), BF16)), {}, "page_size"),
    (dict(k=_spec((2, 10, 24, 64), BF16), v=_spec((2, 10, 24, 64), BF16)), {}, "page_size"),
    (dict(k=_spec((2, 10, 16, 64), jnp.int8), v=_spec((2, 10, 16, 64), jnp.int8)), {}, "KV page"),
    (dict(v=_spec((2, 10, 16, 64), F16)), {}, "must match"),
    (dict(q=_spec((2, 8, 64), E5M2)), {}, "q dtype"),
    (dict(tables=_spec((2, 4), jnp.int64 if jax.config.x64_enabled else jnp.int16)), {},
     "block_tables"),
    (dict(tables=_spec((3, 4), jnp.int32)), {}, "block_tables"),
    (dict(lengths=_spec((3,), jnp.int32)), {}, "lengths"),
    ({}, dict(pages_per_compute_block=3), "power of two"),
    ({}, dict(num_splits=0), "num_splits"),
])
def test_validation_errors(change, kwargs, match):
    args = {**GOOD, **change}
    fn = functools.partial(paged_attention, interpret=True, **kwargs)
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(fn, args["q"], args["k"], args["v"], args["tables"], args["lengths"])


def test_attention_backend_override(monkeypatch):
    """QWENJAX_ATTENTION_BACKEND=reference makes a GPU trace the jnp reference (the benchmarks' end-to-end
    comparison); unset, a GPU picks the kernel; an unknown value is an error naming the allowed ones."""
    from qwenjax.layers import attention, attention_kernels

    monkeypatch.setattr(attention_kernels, "platform", lambda: "gpu")
    monkeypatch.delenv(attention.BACKEND_ENV, raising=False)
    assert attention.decode_backend(128) == "pallas"
    assert attention.decode_backend(96) == "reference"  # no kernel for this head dim
    monkeypatch.setenv(attention.BACKEND_ENV, "reference")
    assert attention.decode_backend(128) == "reference"
    monkeypatch.setenv(attention.BACKEND_ENV, "triton")
    with pytest.raises(ValueError, match="'triton': expected one of auto, reference"):
        attention.decode_backend(128)
