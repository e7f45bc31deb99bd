"""pallas_kernels/fp8_act_quant.py in Pallas interpret mode: the same float8 values and scales as
quantization/fp8_quant.quantize_activations (XLA's form), bit for bit, eager and jitted."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.fp8_act_quant import MAX_WIDTH, quantize_rows
from qwenjax.quantization.fp8_quant import FP8_MAX, quantize_activations


def _rows(t, k, dtype, seed=0):
    rng = np.random.default_rng(seed)
    # magnitudes over 2^-14 .. 2^9: float8 subnormals after scaling, and values that round up to 448
    v = rng.normal(0, 1, (t, k)) * np.exp2(rng.integers(-14, 9, (t, k)))
    x = jnp.asarray(v, jnp.float32).astype(dtype)
    return x.at[-1].set(0) if t > 1 else x   # an all-zero row: scale 1, zeros out


def _bits(a):
    return np.asarray(jax.lax.bitcast_convert_type(a, jnp.uint8 if a.dtype.itemsize == 1 else jnp.uint32))


@pytest.mark.parametrize("t,k,dtype", [(1, 3584, jnp.bfloat16), (3, 100, jnp.float32), (5, 18944, jnp.bfloat16),
                                       (2, 4096, jnp.float16)])
def test_same_values_as_xla(t, k, dtype):
    x = _rows(t, k, dtype)
    q, s = quantize_rows(x, interpret=True)
    assert q.dtype == jnp.float8_e4m3fn and q.shape == (t, k) and s.dtype == jnp.float32 and s.shape == (t, 1)
    for want_q, want_s in (quantize_activations(x), jax.jit(quantize_activations)(x)):
        np.testing.assert_array_equal(_bits(q), _bits(want_q))
        np.testing.assert_array_equal(_bits(s), _bits(want_s))
    if t > 1:
        assert float(s[-1, 0]) == 1.0 and not np.asarray(q[-1].astype(jnp.float32)).any()
    assert np.abs(np.asarray(q.astype(jnp.float32))).max() == FP8_MAX   # each row's largest value maps to 448


def test_bad_input_is_refused_with_the_numbers():
    with pytest.raises(ValueError, match=r"x \[T, K\] in bfloat16, float16 or float32; got int32 \[2, 8\]"):
        quantize_rows(jnp.zeros((2, 8), jnp.int32), interpret=True)
    with pytest.raises(ValueError, match=rf"rows of 1 to {MAX_WIDTH} values, got {MAX_WIDTH + 1}"):
        quantize_rows(jnp.zeros((1, MAX_WIDTH + 1), jnp.bfloat16), interpret=True)


@pytest.mark.parametrize("t,f,dtype", [(1, 18944, jnp.bfloat16), (3, 100, jnp.float32), (2, 384, jnp.bfloat16)])
def test_swiglu_rows_are_the_rule_of_torchs_h(t, f, dtype):
    """swiglu_quantize_rows(y) = the rule applied to h = silu(gate) * up as torch computes it in the model dtype
    (silu in float32 rounded to the dtype, the product rounded; numpy here), bit for bit."""
    import ml_dtypes

    from pallas_kernels.fp8_act_quant import swiglu_quantize_rows

    y = (jax.random.normal(jax.random.key(f), (t, 2 * f), jnp.float32) * 3).astype(dtype)
    q, s = swiglu_quantize_rows(y, interpret=True)
    assert q.shape == (t, f) and s.shape == (t, 1)
    rnd = (lambda a: a.astype(ml_dtypes.bfloat16).astype(np.float32)) if dtype == jnp.bfloat16 else (lambda a: a)
    gate, up = np.asarray(y[:, :f], np.float32), np.asarray(y[:, f:], np.float32)
    h = rnd(rnd(gate / (1 + np.exp(-gate))) * up)
    amax = np.abs(h).max(axis=1, keepdims=True)
    want_s = np.where(amax > 0, amax * np.float32(1 / FP8_MAX), np.float32(1)).astype(np.float32)
    want_q = np.clip(h / want_s, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)
    assert (_bits(q) != want_q.view(np.uint8)).sum() == 0
    np.testing.assert_array_equal(_bits(s), want_s.view(np.uint32))
    with pytest.raises(ValueError, match="an even width; got 7"):
        swiglu_quantize_rows(jnp.ones((1, 7), dtype), interpret=True)
