"""Fused residual add + RMSNorm kernel (Pallas interpret mode on CPU) against the jnp reference, and the decoder
layer's use of it: the model's hidden states do not depend on which of the two runs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.rms_norm import add_rms_norm, reference

BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32


def _inputs(t, d, dtype, seed):
    kx, kr, kw = jax.random.split(jax.random.key(seed), 3)
    x = (jax.random.normal(kx, (t, d), F32) * 3).astype(dtype)
    r = (jax.random.normal(kr, (t, d), F32) * 10).astype(dtype)
    w = (1 + 0.1 * jax.random.normal(kw, (d,), F32)).astype(dtype)
    return x, r, w


@pytest.mark.parametrize("t, d, dtype", [(1, 3584, BF16), (5, 896, BF16), (3, 100, F32), (4, 64, F16),
                                         (2, 8192, BF16)])
def test_matches_reference(t, d, dtype):
    x, r, w = _inputs(t, d, dtype, seed=t * 1000 + d)
    y, s = add_rms_norm(x, r, w, eps=1e-6, interpret=True)
    y_ref, s_ref = reference(x, r, w, eps=1e-6)
    assert y.dtype == s.dtype == dtype and y.shape == s.shape == (t, d)
    np.testing.assert_array_equal(np.asarray(s, np.float32), np.asarray(s_ref, np.float32))  # the same add
    tol = 1e-5 if dtype == F32 else 1.6e-2  # one rounding step of the model dtype at most (sum order differs)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref, np.float32), rtol=tol, atol=tol)


@pytest.mark.parametrize("t, d, dtype", [(1, 3584, BF16), (3, 100, F32), (2, 256, BF16)])
def test_fp8_rows_are_the_rule_of_the_written_rows(t, d, dtype):
    """fp8=True: the same (y, s), and y's rows quantized as quantization/fp8_quant.quantize_activations(y) does,
    bit for bit (the values the kernel wrote, not its unrounded float32 ones)."""
    from qwenjax.quantization.fp8_quant import quantize_activations

    x, r, w = _inputs(t, d, dtype, seed=d)
    y, s, q, scale = add_rms_norm(x, r, w, eps=1e-6, fp8=True, interpret=True)
    y0, s0 = add_rms_norm(x, r, w, eps=1e-6, interpret=True)
    want_q, want_scale = quantize_activations(y)
    bits = lambda a, u: np.asarray(jax.lax.bitcast_convert_type(a, u))  # noqa: E731
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y0, np.float32))
    np.testing.assert_array_equal(np.asarray(s, np.float32), np.asarray(s0, np.float32))
    np.testing.assert_array_equal(bits(q, jnp.uint8), bits(want_q, jnp.uint8))
    np.testing.assert_array_equal(bits(scale, jnp.uint32), bits(want_scale, jnp.uint32))


def test_scale_only_is_the_fp8_rows_scale():
    """scale_only: (y, s, scale), the same y, s and scale as fp8=True's, no float8 rows."""
    x, r, w = _inputs(3, 896, BF16, seed=11)
    y, s, q, scale = add_rms_norm(x, r, w, eps=1e-6, fp8=True, interpret=True)
    got = add_rms_norm(x, r, w, eps=1e-6, fp8=True, scale_only=True, interpret=True)
    assert len(got) == 3 and got[2].shape == (3, 1) and got[2].dtype == F32
    for a, b in zip(got, (y, s, scale)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_rows_are_independent():
    """Each row is normalized by its own statistics: changing one row leaves the others' outputs alone."""
    x, r, w = _inputs(4, 256, F32, seed=7)
    y, _ = add_rms_norm(x, r, w, eps=1e-6, interpret=True)
    y2, _ = add_rms_norm(x.at[2].multiply(100.0), r, w, eps=1e-6, interpret=True)
    np.testing.assert_array_equal(np.asarray(y)[[0, 1, 3]], np.asarray(y2)[[0, 1, 3]])
    assert not np.allclose(np.asarray(y)[2], np.asarray(y2)[2])


@pytest.mark.parametrize("shapes, match", [
    (((2, 8), (2, 9), (8,)), r"x must be \[T, D\] or float32 partials \[S, T, D\], residual \[T, D\]"),
    (((3, 2, 8), (2, 9), (8,)), r"x must be \[T, D\] or float32 partials"),
    (((2, 8), (2, 8), (9,)), r"weight must be \[D=8\]"),
])
def test_validation(shapes, match):
    xs, rs, ws = shapes
    with pytest.raises(ValueError, match=match):
        add_rms_norm(jnp.ones(xs), jnp.ones(rs), jnp.ones(ws), eps=1e-6, interpret=True)


def test_dtype_mismatch_is_refused():
    with pytest.raises(ValueError, match="x's the same"):
        add_rms_norm(jnp.ones((2, 8), BF16), jnp.ones((2, 8), F32), jnp.ones((8,), BF16), eps=1e-6, interpret=True)
    with pytest.raises(ValueError, match=r"float32 \(partials"):  # partials in the model dtype
        add_rms_norm(jnp.ones((2, 2, 8), BF16), jnp.ones((2, 8), BF16), jnp.ones((8,), BF16), eps=1e-6,
                     interpret=True)


@pytest.mark.parametrize("splits, t, d, fp8", [(2, 1, 3584, False), (5, 3, 896, True), (1, 2, 256, False)])
def test_partials_are_summed_then_rounded(splits, t, d, fp8):
    """x given as a K-split product's float32 partials [S, T, D]: the result is the kernel's on their float32 sum
    (split 0 first) rounded to the model dtype, bit for bit, fp8 rows included; and not that of any one split."""
    _, r, w = _inputs(t, d, BF16, seed=splits)
    parts = jax.random.normal(jax.random.key(splits), (splits, t, d), F32) * 2
    total = np.zeros((t, d), np.float32)
    for p in np.asarray(parts):  # numpy's float32 adds, in the kernel's order
        total = total + p
    got = add_rms_norm(parts, r, w, eps=1e-6, fp8=fp8, interpret=True)
    want = add_rms_norm(jnp.asarray(total).astype(BF16), r, w, eps=1e-6, fp8=fp8, interpret=True)
    assert len(got) == len(want) == (4 if fp8 else 2) and got[0].dtype == BF16
    for g, h in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g.astype(F32)), np.asarray(h.astype(F32)))
    y_ref, s_ref = reference(parts, r, w, eps=1e-6)
    np.testing.assert_allclose(np.asarray(got[1], np.float32), np.asarray(s_ref, np.float32), rtol=1e-2, atol=1e-2)
    if splits > 1:
        alone = add_rms_norm(parts[0].astype(BF16), r, w, eps=1e-6, interpret=True)[1]
        assert not np.allclose(np.asarray(alone, np.float32), np.asarray(got[1], np.float32), atol=1e-2)


def test_decoder_uses_the_kernel_path_with_the_same_result(monkeypatch):
    """RMSNorm.add on the GPU path (the kernel, interpreted here) gives the jnp path's result."""
    from qwenjax.layers import norm

    x, r, w = _inputs(3, 128, F32, seed=3)
    layer = norm.RMSNorm(128, 1e-6, dtype=F32)
    layer.weight[...] = w
    want = layer.add(x, r)  # CPU: jnp
    monkeypatch.setattr(norm, "platform", lambda: "gpu")
    real = norm.fused_add_rms_norm
    monkeypatch.setattr(norm, "fused_add_rms_norm",
                        lambda *a, **k: real(*a, **{**k, "interpret": True}))
    got = layer.add(x, r)
    for g, e in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-5, atol=1e-5)


def test_add_fp8_kernel_path_matches_the_jnp_path(monkeypatch):
    """RMSNorm.add_fp8 on the GPU path (the kernel, interpreted) against its jnp path (add, then
    quantize_activations): the same (y, s), and float8 rows within one float8 step of each other (the two sums of
    squares differ in order, so a y near a rounding boundary may round to the neighbouring value)."""
    from qwenjax.layers import norm

    x, r, w = _inputs(3, 128, F32, seed=5)
    layer = norm.RMSNorm(128, 1e-6, dtype=F32)
    layer.weight[...] = w
    want_y, want_s, (want_q, want_scale) = layer.add_fp8(x, r)  # CPU: jnp
    monkeypatch.setattr(norm, "platform", lambda: "gpu")
    real = norm.fused_add_rms_norm
    monkeypatch.setattr(norm, "fused_add_rms_norm", lambda *a, **k: real(*a, **{**k, "interpret": True}))
    y, s, (q, scale) = layer.add_fp8(x, r)
    np.testing.assert_allclose(np.asarray(y), np.asarray(want_y), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(s), np.asarray(want_s))
    np.testing.assert_allclose(np.asarray(scale), np.asarray(want_scale), rtol=1e-5)
    got, want = np.asarray(q.astype(F32)), np.asarray(want_q.astype(F32))
    assert (np.abs(got - want) <= np.maximum(np.abs(want) / 8, 2.0 ** -9)).all()
    assert (got == want).mean() > 0.99
