"""pallas_kernels/fp8_gemv.py in Pallas interpret mode against a float32 product of the same float8 values."""
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.fp8_gemv import MAX_ROWS, fp8_gemv, heuristic, supported

F8 = jnp.float8_e4m3fn


def _operands(m, k, n, seed=0):
    rng = np.random.default_rng(seed)
    # values over the whole e4m3 range, subnormals (|v| < 2**-6) included
    def values(shape):  # e4m3 has no infinity: past 448 a cast gives NaN, so clip first
        v = np.clip(rng.normal(0, 1, shape) * np.exp2(rng.integers(-9, 8, shape)), -448, 448)
        return jnp.asarray(v, jnp.float32).astype(F8)

    xq, wq = values((m, k)), values((n, k))  # the weight [N, K], the model's [O, I]
    xs = jnp.asarray(rng.uniform(0.5, 2, (m, 1)), jnp.float32)
    ws = jnp.asarray(rng.uniform(0.001, 0.01, (1, n)), jnp.float32)
    return xq, xs, wq, ws


def _reference(xq, xs, wq, ws):
    f = lambda a: np.asarray(a, np.float64)  # noqa: E731
    return (f(xq) @ f(wq).T) * f(xs) * f(ws)


@pytest.mark.parametrize("m,k,n,kw", [
    (1, 256, 512, {}),                                      # the heuristic's tiles, K split
    (3, 192, 96, dict(block_n=32, block_k=16, num_splits=5)),  # splits that do not divide the blocks: the last short
    (MAX_ROWS, 128, 64, dict(block_n=64, block_k=8, num_splits=1)),
])
def test_matches_float_product(m, k, n, kw):
    check_matches_float_product(fp8_gemv, m, k, n, kw)


def test_output_dtype_and_rounding():
    check_output_dtype_and_rounding(fp8_gemv, 2, 128, 64)


def check_matches_float_product(kernel, m, k, n, kw):
    """`kernel` (fp8_gemv or fp8_skinny's, same contract) in interpret mode against the float64 product."""
    xq, xs, wq, ws = _operands(m, k, n)
    got = np.asarray(kernel(xq, xs, wq, ws, out_dtype=jnp.float32, interpret=True, **kw), np.float64)
    ref = _reference(xq, xs, wq, ws)
    # the same float8 values, exact products; only the float32 sums' order differs
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def check_output_dtype_and_rounding(kernel, m, k, n):
    """bf16 output is the float32 output rounded once."""
    xq, xs, wq, ws = _operands(m, k, n, seed=1)
    got = kernel(xq, xs, wq, ws, out_dtype=jnp.bfloat16, interpret=True)
    assert got.dtype == jnp.bfloat16 and got.shape == (m, n)
    f32 = kernel(xq, xs, wq, ws, out_dtype=jnp.float32, interpret=True)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(f32.astype(jnp.bfloat16), np.float32))


def test_bad_operands_are_refused_with_the_numbers():
    xq, xs, wq, ws = _operands(2, 128, 64)
    with pytest.raises(ValueError, match=r"1 to 8 rows of x, got 9"):
        fp8_gemv(jnp.zeros((9, 128), F8), jnp.ones((9, 1)), wq, ws, out_dtype=jnp.float32, interpret=True)
    with pytest.raises(ValueError, match=r"float8_e4m3fn x and weights, got float8_e4m3fn and bfloat16"):
        fp8_gemv(xq, xs, wq.astype(jnp.bfloat16), ws, out_dtype=jnp.float32, interpret=True)
    with pytest.raises(ValueError, match=r"block_n=48 must be a power of two >= 16 dividing 64"):
        fp8_gemv(xq, xs, wq, ws, out_dtype=jnp.float32, block_n=48, interpret=True)
    with pytest.raises(ValueError, match=r"x_scale \[M, 1\].*\[2, 2\]"):
        fp8_gemv(xq, jnp.ones((2, 2)), wq, ws, out_dtype=jnp.float32, interpret=True)


def test_heuristic_fits_the_7b_shapes():
    """Every fused 7B projection at 1..MAX_ROWS rows takes the kernel with its default tiles, at about the target
    number of programs."""
    for k, n in ((3584, 4608), (3584, 3584), (3584, 37888), (18944, 3584)):
        for m in range(1, MAX_ROWS + 1):
            assert supported(m, k, n)
            bn, bk, s, *_ = heuristic(m, k, n)
            assert k % bk == 0 and n % bn == 0 and (n // bn) * s >= min(528, (n // bn) * (k // bk))
    assert not supported(MAX_ROWS + 1, 3584, 3584)
