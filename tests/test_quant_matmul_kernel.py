"""The low-bit matmul kernel in Pallas interpret mode (CPU) against the jnp reference and the writer's integer grid."""

from __future__ import annotations

import re
import zlib

import jax
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


# ------------------------------------------------------------------ the GEMV decode kernel (pallas_kernels/quant_gemv.py)

from pallas_kernels import quant_gemv as qg  # noqa: E402
from qwenjax.quantization import repack  # noqa: E402
from tests.quant_writer import pack_awq_kp, pack_cols  # noqa: E402

GEMV_CASES = [  # scheme, kernel format, M, K, N, settings (None: the defaults)
    (Scheme("awq", group_size=128), "awq_kp", 1, 256, 128, {}),
    (Scheme("awq", group_size=64), "awq_kp", 3, 256, 64, dict(block_n=16, num_splits=2, xload="bcast")),
    (Scheme("awq", group_size=128), "awq_kp", 8, 256, 128, dict(block_n=64, block_kw=2)),
    (Scheme("awq", group_size=64), "awq_kp", 16, 128, 64, {}),
    (Scheme("gptq", bits=4, group_size=128, sym=True), "gptq", 1, 512, 64, dict(num_splits=3, xload="bcast1")),
    (Scheme("gptq", bits=4, group_size=64, sym=False), "gptq", 3, 256, 128, dict(block_n=32, unpack="shift")),
    (Scheme("gptq", bits=4, group_size=-1, sym=False, checkpoint_format="gptq_v2"), "gptq_v2", 8, 256, 32, {}),
    (Scheme("gptq", bits=4, group_size=128, sym=False, checkpoint_format="gptq_v2"), "gptq_v2", 16, 256, 64,
     dict(block_kw=1, num_splits=4)),
    (Scheme("gptq", bits=8, group_size=128, sym=False), "gptq", 1, 256, 64, {}),
    (Scheme("gptq", bits=8, group_size=64, sym=True, checkpoint_format="gptq_v2"), "gptq_v2", 3, 256, 32,
     dict(num_splits=2, xload="bcast")),
    (Scheme("gptq", bits=8, group_size=-1, sym=False), "gptq", 16, 128, 32, dict(block_kw=2)),
    # unpack="window": fields at bits 15..22 read as 2**(23 - b) + q, offsets and zeros out once a block
    (Scheme("awq", group_size=128), "awq_kp", 1, 256, 128, dict(unpack="window")),
    (Scheme("awq", group_size=64), "awq_kp", 3, 256, 64, dict(block_n=16, num_splits=2, unpack="window")),
    (Scheme("gptq", bits=4, group_size=128, sym=True), "gptq", 1, 512, 64, dict(num_splits=3, unpack="window")),
    (Scheme("gptq", bits=4, group_size=64, sym=False), "gptq", 4, 256, 128, dict(block_n=32, unpack="window")),
    (Scheme("gptq", bits=4, group_size=-1, sym=False, checkpoint_format="gptq_v2"), "gptq_v2", 2, 256, 32,
     dict(unpack="window", block_kw=2)),
    (Scheme("gptq", bits=8, group_size=128, sym=False), "gptq", 1, 256, 64, dict(unpack="window")),
    (Scheme("gptq", bits=8, group_size=64, sym=True, checkpoint_format="gptq_v2"), "gptq_v2", 3, 256, 32,
     dict(num_splits=2, unpack="window")),
]


def _gemv_args(scheme, fmt, m, k, n, seed):
    rng = np.random.default_rng(seed)  # fresh weights, zeros, scales and x for every case
    grid = quantize(rng.normal(0, 0.05, (k, n)), scheme, rng)
    if fmt == "awq_kp":
        qw, qz = pack_awq_kp(grid.q), pack_cols(grid.z[:, :], 4)  # written independently of repack.py
        t = layer_tensors(grid, scheme)  # ... and the library's repack of the checkpoint arrays must give the same
        np.testing.assert_array_equal(repack.awq_to_kpacked(t["qweight"]), qw)
        np.testing.assert_array_equal(repack.awq_zeros_natural(t["qzeros"]), qz)
    else:
        t = layer_tensors(grid, scheme)
        qw, qz = t["qweight"], t["qzeros"]
    x = jnp.asarray(rng.normal(0, 1, (m, k)), jnp.bfloat16)
    s = jnp.asarray(grid.s, jnp.bfloat16)
    exact = np.asarray(x, np.float64) @ ((grid.q - grid.z[grid.g_idx]) * np.asarray(s, np.float64)[grid.g_idx])
    return (x, jnp.asarray(qw), jnp.asarray(qz), s), exact


@pytest.mark.parametrize("scheme, fmt, m, k, n, settings", GEMV_CASES,
                         ids=[f"{c[1]}-{c[0].bits}b-g{c[0].group_size}-m{c[2]}-{c[5].get('unpack', 'mask')}"
                              for c in GEMV_CASES])
def test_gemv_matches_exact_product(scheme, fmt, m, k, n, settings):
    args, exact = _gemv_args(scheme, fmt, m, k, n, seed=zlib.crc32(f"{scheme.name}-{fmt}-{m}-{k}-{n}".encode()))
    kw = dict(fmt=fmt, bits=scheme.bits, group_size=scheme.group_size)
    out = np.asarray(qg.quant_gemv(*args, **kw, **settings, interpret=True), np.float64)
    ref = np.asarray(qg.quant_gemv_reference(*args, **kw), np.float64)
    assert out.shape == (m, n)
    # float32 accumulation of exact (q - z) * x products, one rounding of the output to bfloat16
    tol = 2.0 ** -7 * np.abs(exact).max()
    np.testing.assert_allclose(out, exact, atol=tol, rtol=0)
    np.testing.assert_allclose(ref, exact, atol=tol, rtol=0)
    assert qg.supported(m, k, n, dtype=jnp.bfloat16, **kw)


def test_gemv_unpack_default_comes_from_the_environment(monkeypatch):
    """QWENJAX_QUANT_GEMV_UNPACK picks the unpack a caller leaves unnamed (the engine's path); a bad value is named."""
    scheme = Scheme("gptq", bits=4, group_size=64, sym=False)
    args, exact = _gemv_args(scheme, "gptq", 1, 256, 64, seed=11)
    kw = dict(fmt="gptq", bits=4, group_size=64, interpret=True)

    def kernel_names(**more):  # the pallas_call names in the traced product ("..._w": the window kernel)
        return re.findall(r"qwenjax_gptq4_gemv\w*", str(jax.make_jaxpr(lambda *a: qg.quant_gemv(*a, **kw, **more))(
            *args)))

    assert all(n.endswith("_w") for n in kernel_names(unpack="window")) and kernel_names(unpack="window")
    assert not any(n.endswith("_w") for n in kernel_names())  # unset: "mask"
    qg.quant_gemv.clear_cache()
    monkeypatch.setenv(qg.UNPACK_ENV, "window")
    assert kernel_names() == kernel_names(unpack="window")
    wide = (jnp.concatenate([args[0]] * 2),) + args[1:]  # 2 rows: past WINDOW_MAX_ROWS the default stays "mask"
    assert not any(n.endswith("_w") for n in re.findall(r"qwenjax_gptq4_gemv\w*", str(jax.make_jaxpr(
        lambda *a: qg.quant_gemv(*a, **kw))(*wide))))
    np.testing.assert_allclose(np.asarray(qg.quant_gemv(*args, **kw), np.float64), exact,
                               atol=2.0 ** -7 * np.abs(exact).max(), rtol=0)
    qg.quant_gemv.clear_cache()
    monkeypatch.setenv(qg.UNPACK_ENV, "bits")
    with pytest.raises(ValueError, match="unpack one of .*'window'.*got 'strided', 'bits'"):
        qg.quant_gemv(*args, **kw)
    qg.quant_gemv.clear_cache()


def test_gemv_settings_and_rejections():
    # A CONFIGS entry for r rows covers the M above the sweep's previous row count up to r; the heuristic covers
    # the rest (below too: the sweep writes no entry where the heuristic won, e.g. at M = 1).
    saved = dict(qg.CONFIGS)
    heur = lambda m: qg.heuristic(m, 256, 128, fmt="gptq", bits=4, group_size=128)  # noqa: E731
    try:
        qg.CONFIGS.clear()
        qg.CONFIGS[(4, 256, 128)] = (64, 2, 2, 4, 2, "bcast")
        for m in (2, 3, 4):
            assert qg.settings(m, 256, 128, fmt="gptq", bits=4, group_size=128) == (64, 2, 2, 4, 2, "bcast")
        for m in (1, 5):
            assert qg.settings(m, 256, 128, fmt="gptq", bits=4, group_size=128) == heur(m)
        assert heur(1) != (64, 2, 2, 4, 2, "bcast")
    finally:
        qg.CONFIGS.clear()
        qg.CONFIGS.update(saved)
    x = jnp.zeros((17, 256), jnp.bfloat16)
    qw, qz, s = jnp.zeros((32, 64), jnp.int32), jnp.zeros((2, 8), jnp.int32), jnp.zeros((2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="1 <= M <= 16"):
        qg.quant_gemv(x, qw, qz, s, fmt="gptq", bits=4, group_size=128, interpret=True)
    with pytest.raises(ValueError, match="awq_kp supports bits"):
        qg.quant_gemv(x[:2], qw, qz, s, fmt="awq_kp", bits=8, group_size=128, interpret=True)
    with pytest.raises(ValueError, match="xload must be one of"):
        qg.quant_gemv(x[:2], qw, qz, s, fmt="gptq", bits=4, group_size=128, xload="gather", interpret=True)
    with pytest.raises(ValueError, match="block_kw=3"):
        qg.quant_gemv(x[:2], qw, qz, s, fmt="gptq", bits=4, group_size=128, block_kw=3, interpret=True)
    assert not qg.supported(17, 256, 64, fmt="gptq", bits=4, group_size=128, dtype=jnp.bfloat16)
    assert not qg.supported(4, 256, 64, fmt="gptq", bits=4, group_size=128, dtype=jnp.float32)
    assert qg.supported(4, 256, 64, fmt="gptq", bits=4, group_size=32, dtype=jnp.bfloat16)


@pytest.mark.parametrize("scheme, fmt", [(Scheme("awq", group_size=64), "awq_kp"),
                                         (Scheme("gptq", bits=4, group_size=64, sym=False), "gptq")],
                         ids=["awq_kp", "gptq"])
def test_gemv_of_a_fused_layer_is_its_parts(scheme, fmt):
    """A fused projection (models/fusion.py): three parts of 64, 32 and 32 columns, each quantized and packed on its
    own and placed side by side as on one device, through the GEMV kernel with its default settings: each part of
    the output is that part's exact product. Qwen2-7B's fused shapes (qkv 3584 -> 4608, gate/up 3584 -> 37888)
    have no swept CONFIGS entry and must fit the heuristic's settings."""
    from qwenjax.models.fusion import interleave, split_columns

    rng = np.random.default_rng(17)
    k, widths = 256, (64, 32, 32)
    grids = [quantize(rng.normal(0, 0.05, (k, n)), scheme, rng) for n in widths]
    if fmt == "awq_kp":
        packed = [(pack_awq_kp(g.q), pack_cols(g.z, 4)) for g in grids]
    else:
        packed = [(t["qweight"], t["qzeros"]) for t in (layer_tensors(g, scheme) for g in grids)]
    qw, qz = (jnp.asarray(interleave([p[i] for p in packed], 1)) for i in (0, 1))
    s = jnp.asarray(interleave([g.s for g in grids], 1), jnp.bfloat16)
    x = jnp.asarray(rng.normal(0, 1, (1, k)), jnp.bfloat16)
    kw = dict(fmt=fmt, bits=scheme.bits, group_size=scheme.group_size)
    assert qg.supported(1, k, sum(widths), dtype=jnp.bfloat16, **kw)
    out = np.asarray(qg.quant_gemv(x, qw, qz, s, **kw, interpret=True), np.float64)
    for got, g, s_part in zip(split_columns(out, widths, 1), grids, split_columns(np.asarray(s, np.float64), widths, 1)):
        exact = np.asarray(x, np.float64) @ ((g.q - g.z[g.g_idx]) * s_part[g.g_idx])
        np.testing.assert_allclose(got, exact, atol=2.0 ** -7 * np.abs(exact).max(), rtol=0)
    for n in (4608, 37888):
        for m in (1, 4):
            assert (qg._sweep_rows(m), 3584, n) not in qg.CONFIGS
            assert qg.supported(m, 3584, n, fmt=fmt, bits=4, group_size=128, dtype=jnp.bfloat16)
