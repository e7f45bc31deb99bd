"""The skinny low-bit product (pallas_kernels/quant_skinny.py) in Pallas interpret mode (CPU): every mode and format
against the exact product of the writer's integer grid and the float32 dequantize-then-dot reference of the same
packed arrays (packed by tests/quant_writer.py, independently of qwenjax)."""

from __future__ import annotations

import zlib

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import quant_skinny as qs
from tests.quant_writer import Scheme
from tests.test_quant_matmul_kernel import _gemv_args

AWQ128, AWQ64 = Scheme("awq", group_size=128), Scheme("awq", group_size=64)
GPTQ128 = Scheme("gptq", bits=4, group_size=128, sym=True)
GPTQ64 = Scheme("gptq", bits=4, group_size=64, sym=False)
GPTQ_V2 = Scheme("gptq", bits=4, group_size=128, sym=False, checkpoint_format="gptq_v2")
GPTQ_V2_ONE = Scheme("gptq", bits=4, group_size=-1, sym=False, checkpoint_format="gptq_v2")
GPTQ8 = Scheme("gptq", bits=8, group_size=128, sym=False)
GPTQ8_64 = Scheme("gptq", bits=8, group_size=64, sym=True, checkpoint_format="gptq_v2")

CASES = [  # scheme, kernel format, M, K, N, settings ({}: the defaults)
    (GPTQ128, "gptq", 1, 512, 128, {}),                                          # fma, split K
    (GPTQ64, "gptq", 1, 256, 64, dict(num_splits=1)),                            # fma, a loop of 4 blocks
    (GPTQ64, "gptq", 2, 256, 64, dict(num_splits=2)),                            # fma, 2 blocks straight-line
    (GPTQ128, "gptq", 2, 1024, 64, dict(mode="fma", block_kw=4, num_splits=3)),  # loops of 11, 11 and 10 blocks
    (AWQ128, "awq_kp", 1, 256, 256, {}),
    (AWQ64, "awq_kp", 3, 256, 128, dict(block_n=64, num_splits=2)),
    (GPTQ_V2, "gptq_v2", 3, 256, 128, dict(block_kw=4)),
    (GPTQ8, "gptq", 3, 256, 64, dict(mode="fma", num_warps=2)),
    (GPTQ_V2_ONE, "gptq_v2", 8, 256, 32, dict(mode="fma")),                      # one group, fma's most rows
    (GPTQ128, "gptq", 16, 256, 128, {}),                                         # dot, bm 16
    (GPTQ128, "gptq", 16, 512, 64, dict(mode="dot_t", num_splits=2)),
    (GPTQ_V2_ONE, "gptq_v2", 16, 256, 64, dict(mode="dot_t", num_splits=1)),     # one group, K loop of 2 blocks
    (AWQ128, "awq_kp", 16, 256, 256, dict(mode="dot_t")),
    (GPTQ_V2, "gptq_v2", 33, 256, 128, dict(mode="dot")),                        # bm 64, 31 padded rows
    (AWQ128, "awq_kp", 33, 256, 128, dict(mode="dot")),
    (GPTQ8_64, "gptq_v2", 33, 256, 64, dict(mode="dot_t")),
    (GPTQ8, "gptq", 64, 256, 64, {}),
    (AWQ128, "awq_kp", 64, 256, 256, dict(num_splits=1, num_stages=2)),
    (GPTQ128, "gptq", 64, 256, 128, dict(mode="dot_t", block_n=64)),
    # groups smaller than a dot block (16 words): per-row zeros and scales
    (GPTQ64, "gptq", 16, 256, 128, {}),
    (Scheme("gptq", bits=4, group_size=32, sym=False), "gptq", 33, 256, 64, dict(mode="dot_t")),
    (AWQ64, "awq_kp", 20, 256, 128, dict(mode="dot", num_splits=2)),
    # lop3 (quant_lop3.py): the asm's arithmetic emulated in jnp, the K order and the masked rows are the kernel's
    (GPTQ128, "gptq", 1, 512, 128, dict(mode="lop3_t")),                         # split K: only row 0 summed
    (GPTQ64, "gptq", 3, 256, 64, dict(mode="lop3", num_splits=1)),               # a block spans 2 groups
    (GPTQ_V2, "gptq_v2", 5, 256, 128, dict(mode="lop3_t", block_kw=8)),          # blocks of 64 inputs
    (GPTQ_V2_ONE, "gptq_v2", 16, 256, 64, dict(mode="lop3_t", num_splits=1)),
    (AWQ128, "awq_kp", 2, 256, 256, dict(mode="lop3_t")),
    (AWQ64, "awq_kp", 33, 256, 128, dict(mode="lop3")),
    (Scheme("gptq", bits=4, group_size=32, sym=False), "gptq", 64, 256, 64, dict(mode="lop3_t")),
]


def _id(c):
    return f"{c[1]}-{c[0].bits}b-g{c[0].group_size}-m{c[2]}-{c[5].get('mode', 'default')}"


@pytest.mark.parametrize("scheme, fmt, m, k, n, settings", CASES, ids=[_id(c) for c in CASES])
def test_skinny_matches_exact_product(scheme, fmt, m, k, n, settings):
    args, exact = _gemv_args(scheme, fmt, m, k, n, seed=zlib.crc32(f"skinny-{_id((scheme, fmt, m, k, n, settings))}"
                                                                  .encode()))
    kw = dict(fmt=fmt, bits=scheme.bits, group_size=scheme.group_size)
    out = qs.quant_skinny(*args, **kw, **settings, interpret=True)
    assert out.shape == (m, n) and out.dtype == jnp.bfloat16
    ref = np.asarray(qs.quant_skinny_reference(*args, **kw), np.float64)
    # fma: float32 sums of exact (q - z) * x products, scaled per block; dot: (q - z) * s rounded to bfloat16 once,
    # through float32-accumulating dots; then one rounding of the output to bfloat16
    tol = 2.0 ** -7 * np.abs(exact).max()
    np.testing.assert_allclose(np.asarray(out, np.float64), exact, atol=tol, rtol=0)
    np.testing.assert_allclose(ref, exact, atol=tol, rtol=0)
    assert qs.supported(m, k, n, dtype=jnp.bfloat16, **kw)


def test_default_modes_by_rows():
    """fma up to 4 rows, dot above (groups of 32 and 64 too: a dot block then spans several)."""
    mode = lambda m, g=128, bits=4, fmt="gptq": qs.settings(m, 3584, 4608, fmt=fmt, bits=bits,  # noqa: E731
                                                            group_size=g)[0]
    assert [mode(m) for m in (1, 3, 4, 5, 16, 33, 64)] == ["fma"] * 3 + ["dot"] * 4
    assert mode(5, fmt="awq_kp") == mode(5, g=64) == mode(5, g=64, bits=8) == mode(64, g=32) == "dot"
    assert mode(16, g=96) == "fma" and not qs.supported(16, 3456, 4608, fmt="gptq", bits=4, group_size=96,
                                                        dtype=jnp.bfloat16)  # 96 neither divides nor is 128 / n
    for n in (4608, 37888, 512, 3584):  # Qwen2-7B: fused qkv, fused gate_up, k/v, q/o
        for m in (1, 4, 16, 64):
            for fmt in ("gptq", "awq_kp"):
                assert qs.supported(m, 3584, n, fmt=fmt, bits=4, group_size=128, dtype=jnp.bfloat16)
    assert qs.supported(1, 18944, 3584, fmt="gptq", bits=4, group_size=128, dtype=jnp.bfloat16)  # down


def test_skinny_rejections_name_the_numbers():
    x = jnp.zeros((65, 256), jnp.bfloat16)
    qw, qz, s = jnp.zeros((32, 64), jnp.int32), jnp.zeros((2, 8), jnp.int32), jnp.zeros((2, 64), jnp.bfloat16)
    kw = dict(fmt="gptq", bits=4, group_size=128, interpret=True)
    with pytest.raises(ValueError, match=r"1 <= M <= 64, got bfloat16\(65, 256\)"):
        qs.quant_skinny(x, qw, qz, s, **kw)
    with pytest.raises(ValueError, match="mode 'fma' takes at most 8 rows, got M=9"):
        qs.quant_skinny(x[:9], qw, qz, s, mode="fma", **kw)
    with pytest.raises(ValueError, match=r"mode 'dot' needs block_kw >= 16 \(got 8\)"):
        qs.quant_skinny(x[:9], qw, qz, s, mode="dot", block_kw=8, **kw)
    with pytest.raises(ValueError, match="mode must be one of"):
        qs.quant_skinny(x[:2], qw, qz, s, mode="wgmma", **kw)
    with pytest.raises(ValueError, match="mode 'lop3_t' needs block_kw >= 8 \\(got 4"):
        qs.quant_skinny(x[:2], qw, qz, s, mode="lop3_t", block_kw=4, **kw)
    with pytest.raises(ValueError, match="mode 'lop3' takes 4-bit weights only, got bits=8"):
        qs.quant_skinny(x[:2], jnp.zeros((64, 64), jnp.int32), jnp.zeros((2, 16), jnp.int32), s, mode="lop3",
                        **dict(kw, bits=8))
    with pytest.raises(ValueError, match="block_n=48 must be a power of two"):
        qs.quant_skinny(x[:2], qw, qz, s, block_n=48, **kw)
    with pytest.raises(ValueError, match=r"qweight must be int32 \(32, 64\)"):
        qs.quant_skinny(x[:2], qw[:16], qz, s, **kw)
    assert not qs.supported(4, 256, 64, fmt="gptq", bits=4, group_size=128, dtype=jnp.float32)
    assert not qs.supported(65, 256, 64, fmt="gptq", bits=4, group_size=128, dtype=jnp.bfloat16)
