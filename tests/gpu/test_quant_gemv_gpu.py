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


@pytest.fixture(autouse=True)
def _skinny_on(monkeypatch):
    """QuantLinear takes the skinny kernel only where QWENJAX_QUANT_SKINNY=1 (quant_linear.SKINNY_ENV): on here,
    since these tests check the GPU's own choice of it."""
    from qwenjax.layers.quant_linear import SKINNY_ENV

    monkeypatch.setenv(SKINNY_ENV, "1")


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
    d = qs.settings(m, k, n, fmt=fmt, bits=scheme.bits, group_size=scheme.group_size, mode=mode)
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
@pytest.mark.parametrize("mode", [None, "lop3_t"], ids=["default", "lop3_t"])
def test_skinny_7b_shapes_on_gpu(scheme, fmt, m, k, n, mode):
    """Qwen2-7B's fused qkv and gate_up, k/v and down at the default settings (what the model runs), and in the lop3_t
    mode (QWENJAX_QUANT_SKINNY=lop3): its inline PTX runs only here."""
    (x, *arrays), exact = _layer_64_rows(scheme, fmt, k, n)
    out = np.asarray(qs.quant_skinny(x[:m], *arrays, fmt=fmt, bits=scheme.bits, group_size=scheme.group_size,
                                     mode=mode), np.float64)
    np.testing.assert_allclose(out, exact[:m], atol=2.0 ** -7 * np.abs(exact[:m]).max(), rtol=0)


# ------------------------------------------------------------- act-order and tensor parallelism (QuantLinear's paths)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from qwenjax.layers import quant_linear as ql, quant_sharded  # noqa: E402
from qwenjax.models.sharding import make_mesh  # noqa: E402
from qwenjax.quantization import QuantConfig, act_order, repack  # noqa: E402
from tests.quant_writer import layer_tensors, quantize  # noqa: E402

ACT_ORDER = Scheme("gptq", bits=4, group_size=128, sym=True, desc_act=True)
AWQ = Scheme("awq", group_size=128)


def _layer(scheme, k, n, seed):
    """A [k, n] layer quantized by the test writer, in QuantLinear's layout (act-order sorted, AWQ repacked, as the
    loader leaves them): (qweight, qzeros, scales bf16, g_idx, perm, quant), and its exact dequantized weight."""
    rng = np.random.default_rng(seed)
    grid = quantize(rng.normal(0, 0.02, (k, n)), scheme, rng)
    t, perm = layer_tensors(grid, scheme), None
    if scheme.method == "awq":
        t["qweight"], t["qzeros"] = repack.awq_to_kpacked(t["qweight"]), repack.awq_zeros_natural(t["qzeros"])
        quant = QuantConfig("awq", 4, scheme.group_size, checkpoint_format="gemm")
    else:
        quant = QuantConfig("gptq", 4, scheme.group_size, desc_act=scheme.desc_act, sym=scheme.sym)
        if scheme.desc_act:
            perm = act_order.group_order(t["g_idx"], scheme.group_size)
            t["qweight"] = act_order.permute_qweight(t["qweight"], perm, 4)
            t["g_idx"] = np.arange(k, dtype=np.int32) // scheme.group_size
    arrays = (t["qweight"], t["qzeros"], t["scales"].astype(jnp.bfloat16), t.get("g_idx"), perm)
    return arrays, quant, grid.dequantized()


def _counted(monkeypatch):
    calls, kernel = [], qs.quant_skinny

    def counted(x, qw, qz, s, **kw):
        calls.append((x.shape[0], x.shape[1], s.shape[-1]))
        return kernel(x, qw, qz, s, **kw)

    monkeypatch.setattr(qs, "quant_skinny", counted)
    return calls


@pytest.mark.parametrize("m", [1, 4, 16, 64])
@pytest.mark.parametrize("k, n", [(3584, 4608), (18944, 3584)])
def test_act_order_takes_the_skinny_kernel_on_gpu(k, n, m, monkeypatch):
    (qw, qz, s, g_idx, perm), quant, w = _layer(ACT_ORDER, k, n, seed=k + m)
    calls = _counted(monkeypatch)
    x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
    y = jax.jit(lambda x, *a: ql.quant_matmul(x, *a, quant=quant, perm=perm))(x, qw, qz, s, g_idx)
    assert calls == [(m, k, n)]
    exact = np.asarray(x, np.float64) @ w
    np.testing.assert_allclose(np.asarray(y, np.float64), exact, atol=2.0 ** -7 * np.abs(exact).max(), rtol=0)


def _fits_on_device(m, k, n, gs, *, dtype, quant):
    assert ql.skinny_fits(m, k, n, dtype, quant, group_size=gs), (m, k, n, gs)  # the GPU's own choice
    return True


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("scheme", [ACT_ORDER, AWQ], ids=lambda s: s.name)
@pytest.mark.parametrize("split, k, n", [("out", 3584, 4608), ("in", 18944, 3584)])
def test_skinny_kernel_per_device_on_gpus(split, k, n, scheme, m, monkeypatch):
    """quant_sharded.py on a mesh of every GPU present (one GPU: a mesh of one, the shard_map and float32 psum
    compiled all the same; QuantLinear takes this path only on several): the kernel on each device's columns / rows
    (act-order: x gathered through perm first, as QuantLinear does), equal to the exact product."""
    devices = jax.device_count()
    mesh = make_mesh(devices)
    (qw, qz, s, g_idx, perm), quant, w = _layer(scheme, k, n, seed=k + m)
    spec = P(None, "tp") if split == "out" else P("tp", None)
    qw, qz, s = (jax.device_put(a, NamedSharding(mesh, spec)) for a in (qw, qz, s))
    calls = _counted(monkeypatch)
    x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
    fits = functools.partial(_fits_on_device, dtype=x.dtype, quant=quant)

    def product(x, qw, qz, s):  # QuantLinear's order: x's columns gathered through perm, then the sharded kernel
        x = x if perm is None else jnp.take(x, perm, axis=-1)
        return quant_sharded.sharded_skinny(x, qw, qz, s, split=split, fmt=ql.kernel_format(quant), bits=4,
                                            group_size=quant.group_size, fits=fits,
                                            interpret=jax.default_backend() != "gpu")

    with jax.set_mesh(mesh):
        y = jax.jit(product)(x, qw, qz, s)
    assert calls == [(m, k, n // devices) if split == "out" else (m, k // devices, n)]
    exact = np.asarray(x, np.float64) @ w
    np.testing.assert_allclose(np.asarray(y, np.float64), exact, atol=2.0 ** -7 * np.abs(exact).max(), rtol=0)
