"""The low-bit matmul kernel in Pallas interpret mode (CPU) against the jnp reference and the writer's integer grid."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.quant_matmul import quant_matmul, quant_matmul_reference, supported
from tests.quant_writer import Scheme, layer_tensors, quantize

CASES = [  # scheme, kernel format, M, K, N, settings
    (Scheme("awq", group_size=128), "awq", 3, 256, 256, {}),
    (Scheme("awq", group_size=64), "awq", 20, 256, 128, dict(num_splits=2)),  # float32 partials, 2 M blocks
    (Scheme("gptq", bits=4, group_size=128, sym=True), "gptq", 5, 512, 64, dict(num_splits=3)),
    (Scheme("gptq", bits=4, group_size=-1, sym=False, checkpoint_format="gptq_v2"), "gptq_v2", 33, 256, 32, {}),
    (Scheme("gptq", bits=8, group_size=128, sym=False), "gptq", 2, 256, 64, {}),
]


@pytest.mark.parametrize("scheme, fmt, m, k, n, settings", CASES, ids=lambda c: getattr(c, "name", None))
def test_kernel_matches_grid(scheme, fmt, m, k, n, settings):
    rng = np.random.default_rng(m)
    grid = quantize(rng.normal(0, 0.05, (k, n)), scheme, rng)
    t = layer_tensors(grid, scheme)
    x = jnp.asarray(rng.normal(0, 1, (m, k)), jnp.bfloat16)
    args = (x, jnp.asarray(t["qweight"]), jnp.asarray(t["qzeros"]), jnp.asarray(t["scales"], jnp.bfloat16))
    kw = dict(fmt=fmt, bits=scheme.bits, group_size=scheme.group_size)
    out = np.asarray(quant_matmul(*args, **kw, **settings, interpret=True), np.float32)
    ref = np.asarray(quant_matmul_reference(*args, **kw), np.float32)
    # Exact product with the scales as the kernel sees them (bfloat16); the kernel's error is float32 accumulation
    # plus one rounding of the output to bfloat16.
    s = np.asarray(jnp.asarray(grid.s, jnp.bfloat16), np.float64)
    exact = np.asarray(x, np.float64) @ ((grid.q - grid.z[grid.g_idx]) * s[grid.g_idx])
    tol = 2.0 ** -7 * np.abs(exact).max()
    np.testing.assert_allclose(out, exact, atol=tol, rtol=0)
    np.testing.assert_allclose(ref, exact, atol=tol, rtol=0)
    assert supported(m, k, n, fmt=fmt, bits=scheme.bits, group_size=scheme.group_size, dtype=jnp.bfloat16)


def test_kernel_rejects_what_it_cannot_do():
    x = jnp.zeros((4, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match="x must be bfloat16 or float16"):
        quant_matmul(x.astype(jnp.float32), jnp.zeros((32, 64), jnp.int32), jnp.zeros((2, 8), jnp.int32),
                     jnp.zeros((2, 64)), fmt="gptq", bits=4, group_size=128, interpret=True)
    with pytest.raises(ValueError, match="qweight must be int32"):
        quant_matmul(x, jnp.zeros((16, 64), jnp.int32), jnp.zeros((2, 8), jnp.int32), jnp.zeros((2, 64)),
                     fmt="gptq", bits=4, group_size=128, interpret=True)
    assert not supported(4, 256, 64, fmt="gptq", bits=4, group_size=32, dtype=jnp.bfloat16)  # slab K 4 < 16
    assert not supported(4, 256, 64, fmt="awq", bits=4, group_size=128, dtype=jnp.bfloat16)   # N/8 = 8 < 16
    assert not supported(4, 256, 64, fmt="gptq", bits=4, group_size=128, dtype=jnp.float32)
