"""pallas_kernels/fp8_skinny.py in Pallas interpret mode against a float64 product of the same float8 values."""
import jax.numpy as jnp
import pytest

from pallas_kernels.fp8_skinny import MAX_ROWS, fp8_skinny, heuristic, supported
from tests.test_fp8_gemv_kernel import F8, _operands, check_matches_float_product, check_output_dtype_and_rounding


@pytest.mark.parametrize("m,k,n,kw", [
    (1, 512, 256, {}),                                                   # the heuristic's tiles: K split, rows padded
    (20, 384, 96, dict(block_m=16, block_n=32, block_k=64, num_splits=4)),  # two row blocks; splits of 2, 2, 2, 0
    (33, 256, 128, dict(block_m=64, block_n=64, block_k=32, num_splits=1)),  # one split, rows padded 33 -> 64
])
def test_matches_float_product(m, k, n, kw):
    check_matches_float_product(fp8_skinny, m, k, n, kw)


def test_output_dtype_and_rounding():
    check_output_dtype_and_rounding(fp8_skinny, 2, 256, 128)


def test_bad_operands_are_refused_with_the_numbers():
    xq, xs, wq, ws = _operands(2, 128, 64)
    with pytest.raises(ValueError, match=rf"1 to {MAX_ROWS} rows of x, got {MAX_ROWS + 1}"):
        fp8_skinny(jnp.zeros((MAX_ROWS + 1, 128), F8), jnp.ones((MAX_ROWS + 1, 1)), wq, ws, out_dtype=jnp.float32,
                   interpret=True)
    with pytest.raises(ValueError, match=r"float8_e4m3fn x and weights, got float8_e4m3fn and bfloat16"):
        fp8_skinny(xq, xs, wq.astype(jnp.bfloat16), ws, out_dtype=jnp.float32, interpret=True)
    with pytest.raises(ValueError, match=r"block_k=48 must be a power of two >= 16 dividing 128"):
        fp8_skinny(xq, xs, wq, ws, out_dtype=jnp.float32, block_k=48, interpret=True)
    with pytest.raises(ValueError, match=r"w_scale \[1, N\].*\[1, 32\]"):
        fp8_skinny(xq, xs, wq, jnp.ones((1, 32)), out_dtype=jnp.float32, interpret=True)


def test_heuristic_fits_the_7b_shapes():
    """Every fused 7B projection at 1..MAX_ROWS rows takes the kernel with its default tiles; K is split only where
    the tiles alone are fewer than the target, and the float32 partials stay within half the weight's bytes."""
    for k, n in ((3584, 4608), (3584, 3584), (3584, 37888), (18944, 3584)):
        for m in (1, 2, 8, 16, 17, 64, 100, 128, 256, 512):
            assert supported(m, k, n)
            bm, bn, bk, s, warps, _ = heuristic(m, k, n)
            tiles = -(-m // bm) * (n // bn)
            assert k % bk == 0 and n % bn == 0 and bm >= 16 and warps in (4, 8)
            assert s == 1 or tiles * (s - 1) < 264 <= tiles * s or s == k // bk or s == k // (8 * (-(-m // bm) * bm))
            assert s == 1 or s * -(-m // bm) * bm * n * 4 <= k * n / 2
    assert not supported(MAX_ROWS + 1, 3584, 3584)
