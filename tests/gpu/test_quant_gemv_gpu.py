"""The GEMV decode kernel and the skinny kernel after it, compiled for the GPU (Triton lowering): the CPU tests'
cases (every x-load variant; every skinny mode that fits), and the Qwen2-7B shapes at the default settings, against
the exact product. Run with `pytest tests/gpu --gpu`."""

from __future__ import annotations

import functools

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


# ------------------------------------------------------------------ the skinny kernel (pallas_kernels/quant_skinny.py)

from pallas_kernels import quant_skinny as qs  # noqa: E402
from tests.test_quant_skinny_kernel import CASES as SKINNY_CASES, _id as _skinny_id  # noqa: E402


def _check_skinny(scheme, fmt, m, k, n, settings, seed):
    args, exact = _gemv_args(scheme, fmt, m, k, n, seed=seed)
    out = np.asarray(qs.quant_skinny(*args, fmt=fmt, bits=scheme.bits, group_size=scheme.group_size, **settings),
                     np.float64)
    np.testing.assert_allclose(out, exact, atol=2.0 ** -7 * np.abs(exact).max(), rtol=0)


def _fits(case, mode):
    scheme, fmt, m, k, n, settings = case
    d = qs.settings(m, k, n, fmt=fmt, bits=scheme.bits, group_size=scheme.group_size)
    bn, bkw, splits = (settings.get(key, dflt) for key, dflt in zip(("block_n", "block_kw", "num_splits"), d[1:4]))
    return qs._valid(m, k, n, fmt, scheme.bits, scheme.group_size, mode, bn, bkw, splits) is None


SKINNY_GRID = [(*c[:5], dict(c[5], mode=mode)) for c in SKINNY_CASES for mode in qs.MODES if _fits(c, mode)]


@pytest.mark.parametrize("scheme, fmt, m, k, n, settings", SKINNY_GRID,
                         ids=[_skinny_id(c) for c in SKINNY_GRID])
def test_skinny_cases_on_gpu(scheme, fmt, m, k, n, settings):
    """The CPU test's cases compiled, each in every mode that fits it."""
    _check_skinny(scheme, fmt, m, k, n, settings, seed=m * 131 + n)


@functools.lru_cache(maxsize=1)
def _layer_64_rows(scheme, fmt, k, n):
    """One 7B-shaped layer with 64 rows of x (the tests of one shape run one after another: M varies fastest)."""
    return _gemv_args(scheme, fmt, 64, k, n, seed=k + n)


@pytest.mark.parametrize("m", [1, 3, 4, 16, 33, 64])
@pytest.mark.parametrize("k, n", [(3584, 4608), (3584, 37888), (3584, 512), (18944, 3584)])
@pytest.mark.parametrize("scheme, fmt", [(Scheme("gptq", bits=4, group_size=128, sym=True), "gptq"),
                                         (Scheme("awq", group_size=128), "awq_kp")], ids=["gptq", "awq_kp"])
def test_skinny_7b_shapes_on_gpu(scheme, fmt, m, k, n):
    """Qwen2-7B's fused qkv and gate_up, k/v and down at the default settings (what the model runs)."""
    (x, *arrays), exact = _layer_64_rows(scheme, fmt, k, n)
    out = np.asarray(qs.quant_skinny(x[:m], *arrays, fmt=fmt, bits=scheme.bits, group_size=scheme.group_size),
                     np.float64)
    np.testing.assert_allclose(out, exact[:m], atol=2.0 ** -7 * np.abs(exact[:m]).max(), rtol=0)
