"""The GEMV decode kernel compiled for the GPU (Triton lowering): the CPU test's cases, every x-load variant, and the
Qwen2-7B shapes at the default settings, against the exact product. Run with `pytest tests/gpu --gpu`."""

from __future__ import annotations

import numpy as np
import pytest

from pallas_kernels import quant_gemv as qg
from tests.quant_writer import Scheme
from tests.test_quant_matmul_kernel import GEMV_CASES, _gemv_args

pytestmark = pytest.mark.gpu


def _check(scheme, fmt, m, k, n, settings, seed):
    args, exact = _gemv_args(scheme, fmt, m, k, n, seed=seed)
    out = np.asarray(qg.quant_gemv(*args, fmt=fmt, bits=scheme.bits, group_size=scheme.group_size, **settings),
                     np.float64)
    np.testing.assert_allclose(out, exact, atol=2.0 ** -7 * np.abs(exact).max(), rtol=0)


@pytest.mark.parametrize("xload", qg.XLOADS)
@pytest.mark.parametrize("scheme, fmt, m, k, n, settings", GEMV_CASES,
                         ids=[f"{c[1]}-{c[0].bits}b-g{c[0].group_size}-m{c[2]}" for c in GEMV_CASES])
def test_cases_on_gpu(scheme, fmt, m, k, n, settings, xload):
    _check(scheme, fmt, m, k, n, dict(settings, xload=xload), seed=m * 131 + n)


@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("k, n", [(3584, 512), (3584, 18944), (18944, 3584)])
@pytest.mark.parametrize("scheme, fmt", [(Scheme("gptq", bits=4, group_size=128, sym=True), "gptq"),
                                         (Scheme("awq", group_size=128), "awq_kp")])
def test_7b_shapes_on_gpu(scheme, fmt, m, k, n):
    _check(scheme, fmt, m, k, n, {}, seed=k + n + m)
