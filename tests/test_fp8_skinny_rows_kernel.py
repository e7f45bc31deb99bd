"""pallas_kernels/fp8_skinny_rows.py in Pallas interpret mode against a float64 product of the activations quantized
by XLA's CPU form of the rule (quantization/fp8_quant.py, IEEE division on CPU): x given as those float8 values and
scales, or as the float values for the kernel to quantize."""
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.fp8_skinny import MAX_ROWS
from pallas_kernels.fp8_skinny_rows import fp8_skinny_rows, supported
from qwenjax.quantization.fp8_quant import quantize_activations

F8 = jnp.float8_e4m3fn


def _operands(m, k, n, seed=0, x_dtype=jnp.bfloat16):
    rng = np.random.default_rng(seed)
    # rows over many magnitudes (float8 subnormals after scaling included), one row all zeros (scale 1) unless M = 1
    x = rng.normal(0, 1, (m, k)) * np.exp2(rng.integers(-12, 8, (m, k)))
    x[0, -1] = 2 * np.abs(x).max()   # the first row's maximum in its last column: the maxima must read all of K
    if m > 1:
        x[m // 2] = 0
    wq = jnp.asarray(np.clip(rng.normal(0, 64, (n, k)), -448, 448), jnp.float32).astype(F8)
    ws = jnp.asarray(rng.uniform(0.001, 0.01, (1, n)), jnp.float32)
    return jnp.asarray(x, x_dtype), wq, ws


def _reference(x, wq, ws):
    xq, xs = quantize_activations(x)
    f = lambda a: np.asarray(a, np.float64)  # noqa: E731
    return (f(xq) @ f(wq).T) * f(xs) * f(ws)


@pytest.mark.parametrize("m,k,n,kw", [
    (1, 512, 256, {}),                                                   # the heuristic's tiles: K split
    (20, 384, 96, dict(block_m=16, block_n=32, block_k=64, num_splits=4)),  # two row blocks; splits of 2, 2, 2, 0
    (33, 256, 128, dict(block_m=64, block_n=64, block_k=32, num_splits=1)),  # no split: the scaled output written
    (3, 256, 64, dict(block_m=16, block_n=64, block_k=64, num_splits=1)),    # no split, swapped dot
    (1, 384, 128, dict(block_n=64, num_splits=1)),   # one row: maxima over 512 lanes, 384 real
    (1, 8320, 64, {}),                               # one row: maxima in chunks of 4,096, the last partial
])
@pytest.mark.parametrize("x_dtype", [jnp.bfloat16, jnp.float32, "float8", "scaled"])
def test_matches_quantized_float_product(m, k, n, kw, x_dtype):
    """float x quantized inside, or the float8 rows and scales XLA's form gave (x_dtype "float8"), or bf16 x with
    those scales given ("scaled": quantized inside by them)."""
    x, wq, ws = _operands(m, k, n, x_dtype=x_dtype if x_dtype == jnp.float32 else jnp.bfloat16)
    given = {"float8": quantize_activations(x), "scaled": (x, quantize_activations(x)[1])}.get(x_dtype, (x,))
    got = np.asarray(fp8_skinny_rows(given[0], wq, ws, *given[1:], out_dtype=jnp.float32, interpret=True, **kw),
                     np.float64)
    ref = _reference(x, wq, ws)
    assert got.shape == (m, n) and (m == 1 or (got[m // 2] == 0).all()) and np.abs(ref).max() > 0
    # the same float8 values and scales (a value off by one float8 step would move its output far past this),
    # exact products; only the float32 sums' order and the split partials' scaling differ
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("m", [1, 3])
def test_given_scales_are_used(m):
    """bf16 x with scales given: x quantized by those scales (here 4x the rule's, so no value saturates), not by the
    ones its maxima would give: the product of cast_fp8(x, scale), which is not the rule's."""
    from qwenjax.quantization.fp8_quant import cast_fp8

    x, wq, ws = _operands(m, 512, 128, seed=2)
    scale = quantize_activations(x)[1] * 4
    got = np.asarray(fp8_skinny_rows(x, wq, ws, scale, out_dtype=jnp.float32, interpret=True), np.float64)
    f = lambda a: np.asarray(a, np.float64)  # noqa: E731
    want = (f(cast_fp8(x, scale)) @ f(wq).T) * f(scale) * f(ws)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert not np.allclose(got, _reference(x, wq, ws), rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("splits", [1, 2])
def test_output_dtype_and_rounding(splits):
    """bf16 output is the float32 output rounded once, in the kernel (no split) or after XLA's sum."""
    x, wq, ws = _operands(2, 256, 128, seed=1)
    kw = dict(block_k=64, num_splits=splits, interpret=True)
    got = fp8_skinny_rows(x, wq, ws, out_dtype=jnp.bfloat16, **kw)
    assert got.dtype == jnp.bfloat16 and got.shape == (2, 128)
    f32 = fp8_skinny_rows(x, wq, ws, out_dtype=jnp.float32, **kw)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(f32.astype(jnp.bfloat16), np.float32))


def test_bad_operands_are_refused_with_the_numbers():
    x, wq, ws = _operands(2, 128, 64)
    xq, xs = quantize_activations(x)
    with pytest.raises(ValueError, match=rf"1 to {MAX_ROWS} rows of x, got {MAX_ROWS + 1}"):
        fp8_skinny_rows(jnp.zeros((MAX_ROWS + 1, 128), jnp.bfloat16), wq, ws, out_dtype=jnp.float32,
                        interpret=True)
    with pytest.raises(ValueError, match=r"float8_e4m3fn / bfloat16 / float16 / float32 x and float8_e4m3fn "
                                         r"weights, got int8 and float8_e4m3fn"):
        fp8_skinny_rows(x.astype(jnp.int8), wq, ws, out_dtype=jnp.float32, interpret=True)
    with pytest.raises(ValueError, match=r"float8 x comes with its x_scale \[M, 1\] \(float x may: its rows' "
                                         r"scales by the rule, else found inside\); got x float8_e4m3fn and no "
                                         r"x_scale"):
        fp8_skinny_rows(xq, wq, ws, out_dtype=jnp.float32, interpret=True)
    with pytest.raises(ValueError, match=r"block_k=48 must be a power of two >= 16 dividing 128"):
        fp8_skinny_rows(x, wq, ws, out_dtype=jnp.float32, block_k=48, interpret=True)
    with pytest.raises(ValueError, match=r"w_scale \[1, N\].*\[1, 32\]"):
        fp8_skinny_rows(x, wq, jnp.ones((1, 32)), out_dtype=jnp.float32, interpret=True)
    with pytest.raises(ValueError, match=r"x_scale \[M, 1\] or none; got .*\[3, 1\]"):
        fp8_skinny_rows(xq, wq, ws, jnp.ones((3, 1)), out_dtype=jnp.float32, interpret=True)
    assert supported(1, 18944, 3584) and supported(1, 3584, 3584, x_dtype=jnp.float8_e4m3fn)
    assert not supported(MAX_ROWS + 1, 3584, 3584)


@pytest.mark.parametrize("m, x_dtype", [(1, jnp.bfloat16), (3, jnp.bfloat16), (2, "float8")])
def test_swiglu_is_torchs_h_of_the_fused_output(m, x_dtype):
    """swiglu=True: h = silu(gate) * up computed by torch (bf16, CPU) from the same kernel's fused gate/up output
    (gate's F rows of wq, then up's), at every value but a few exp roundings (one bf16 step at most); swapping gate
    and up is far off."""
    import torch

    x, wq, ws = _operands(m, 256, 2 * 192, seed=5)
    given = quantize_activations(x) if x_dtype == "float8" else (x,)
    kw = dict(out_dtype=jnp.bfloat16, block_n=64, interpret=True)
    y = fp8_skinny_rows(given[0], wq, ws, *given[1:], num_splits=1, **kw)          # [M, 2F]: gate, then up
    h = fp8_skinny_rows(given[0], wq, ws, *given[1:], swiglu=True, **kw)            # [M, F]
    t = torch.from_numpy(np.array(y.astype(jnp.float32))).to(torch.bfloat16)
    want = (torch.nn.functional.silu(t[:, :192]) * t[:, 192:]).float().numpy()
    got = np.asarray(h.astype(jnp.float32))
    assert h.shape == (m, 192) and h.dtype == jnp.bfloat16 and np.abs(want).max() > 0
    assert (got != want).mean() <= 1e-3, (got != want).sum()
    np.testing.assert_allclose(got, want, rtol=2 ** -7, atol=0)
    swapped = (torch.nn.functional.silu(t[:, 192:]) * t[:, :192]).float().numpy()
    assert not np.allclose(got, swapped, rtol=2 ** -7, atol=0)


def test_swiglu_refuses_an_odd_width_and_a_split():
    x, wq, ws = _operands(1, 256, 130)
    with pytest.raises(ValueError, match=r"gate and up side by side \(an even N, got 129\)"):
        fp8_skinny_rows(x, wq[:129], ws[:, :129], out_dtype=jnp.bfloat16, swiglu=True, interpret=True)
    with pytest.raises(ValueError, match=r"K not split \(got num_splits=2\)"):
        fp8_skinny_rows(x, wq, ws, out_dtype=jnp.bfloat16, swiglu=True, num_splits=2, interpret=True)
