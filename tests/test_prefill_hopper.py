"""The Hopper (Mosaic GPU) paged prefill kernel on CPU: its per-tile metadata against a plain-Python walk of the
rows, its argument checks, and that it lowers for CUDA at the engine's shapes (Mosaic GPU runs on the GPU only;
tests/gpu/test_prefill_hopper_gpu.py checks its numbers there)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.paged_prefill_hopper import (HopperPrefillConfig, _tile_metadata,
                                                 hopper_ragged_prefill_attention)

BF16 = jnp.bfloat16


def _expected_metadata(seq_lens, query_lens, row_starts, num_tiles, tile):
    meta = np.zeros((num_tiles, 4), np.int32)
    for r, (s, n, start) in enumerate(zip(seq_lens, query_lens, row_starts)):
        for t in range(start // tile, -(-(start + n) // tile) if n else 0):
            if t < num_tiles:
                meta[t] = (s, n, t * tile - start, r)
    return meta


def test_tile_metadata_matches_a_walk_of_the_rows():
    tile = 128
    query_lens = [1, 300, 0, 128, 129, 0]
    seq_lens = [5, 345, 0, 128, 1000, 0]
    row_starts = [0, 128, 512, 512, 640, 1024]  # a padding row at T, another in between
    got = np.asarray(_tile_metadata(jnp.asarray(seq_lens, jnp.int32), jnp.asarray(query_lens, jnp.int32),
                                    jnp.asarray(row_starts, jnp.int32), num_tiles=8, tile=tile))
    np.testing.assert_array_equal(got, _expected_metadata(seq_lens, query_lens, row_starts, 8, tile))
    assert (got[7] == 0).all() and got[6, 2] == 128  # tile 7 lies past row 4's 129 tokens; tile 6 holds its last


def _args(T=256, N=28, K=4, H=128, page=16, pages=64, rows=3, dtype=BF16, kv_dtype=None):
    kv_dtype = kv_dtype or dtype
    return (jax.ShapeDtypeStruct((T, N, H), dtype), jax.ShapeDtypeStruct((K, pages, page, H), kv_dtype),
            jax.ShapeDtypeStruct((K, pages, page, H), kv_dtype), jax.ShapeDtypeStruct((rows, 17), jnp.int32),
            *(jax.ShapeDtypeStruct((rows,), jnp.int32),) * 3)


@pytest.mark.parametrize("N,K,H,page,block_kv,stages,dtype,ping_pong", [
    (28, 4, 128, 16, 128, 2, BF16, True),   # Qwen2-7B
    (14, 2, 64, 128, 64, 3, jnp.float16, True),
    (28, 4, 128, 16, 128, 3, BF16, False),  # the sweep's setting without the schedule barrier
])
def test_lowers_for_cuda(N, K, H, page, block_kv, stages, dtype, ping_pong):
    cfg = HopperPrefillConfig(block_kv=block_kv, num_stages=stages, schedule_barrier=ping_pong)
    fn = jax.jit(lambda *a: hopper_ragged_prefill_attention(*a, config=cfg))
    text = fn.trace(*_args(N=N, K=K, H=H, page=page, dtype=dtype)).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


@pytest.mark.parametrize("kw,args,match", [
    (dict(row_align=64), {}, r"row_align \(64\) must be a multiple of the program tile, 2 \* block_q = 128"),
    ({}, dict(kv_dtype=jnp.float8_e5m2), "q and the pages must share one dtype"),
    ({}, dict(dtype=jnp.float32), "bfloat16 or float16"),
    ({}, dict(N=30), r"q heads \(30\) must be a multiple of kv heads \(4\)"),
    ({}, dict(page=8), "page_size must be a power of two in 16..128; got 8"),
])
def test_rejects_what_it_cannot_run(kw, args, match):
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(lambda *a: hopper_ragged_prefill_attention(*a, **kw), *_args(**args))


@pytest.mark.parametrize("bad,match", [
    (dict(block_q=128), "block_q must be 64"),
    (dict(block_kv=256), "block_kv must be 64 or 128"),
    (dict(num_stages=1), "num_stages must be in 2..4"),
])
def test_config_checks(bad, match):
    with pytest.raises(ValueError, match=match):
        HopperPrefillConfig(**bad)


def test_engine_picks_the_hopper_kernel_only_where_it_applies(monkeypatch):
    from qwenjax.layers import attention

    bf16_shape = (BF16, BF16, 128, 16, 7)
    assert attention.prefill_kernel(*bf16_shape) == "triton"  # a CPU device has no compute capability

    class Hopper:
        compute_capability = "9.0"

    monkeypatch.setattr(jax, "devices", lambda *a: [Hopper()])
    assert attention.prefill_kernel(*bf16_shape) == "hopper"
    assert attention.prefill_kernel(BF16, jnp.float8_e5m2, 128, 16, 7) == "triton"  # fp8 pages
    assert attention.prefill_kernel(jnp.float32, jnp.float32, 128, 16, 7) == "triton"
    assert attention.prefill_kernel(BF16, BF16, 96, 16, 7) == "triton"
    monkeypatch.setenv(attention.PREFILL_KERNEL_ENV, "routed")  # rectangular chunks as under auto
    assert attention.prefill_kernel(*bf16_shape) == "hopper"
    assert attention.prefill_kernel(BF16, jnp.float8_e5m2, 128, 16, 7) == "triton"
    monkeypatch.setenv(attention.PREFILL_KERNEL_ENV, "triton")
    assert attention.prefill_kernel(*bf16_shape) == "triton"
    monkeypatch.setenv(attention.PREFILL_KERNEL_ENV, "cudnn")
    with pytest.raises(ValueError, match="QWENJAX_PREFILL_KERNEL='cudnn': expected one of auto, triton, routed"):
        attention.prefill_kernel(*bf16_shape)


def test_rectangular_layout_lowers_for_cuda():
    from pallas_kernels.paged_prefill_hopper import hopper_paged_prefill_attention

    args = (jax.ShapeDtypeStruct((2, 200, 28, 128), BF16), jax.ShapeDtypeStruct((4, 64, 16, 128), BF16),
            jax.ShapeDtypeStruct((4, 64, 16, 128), BF16), jax.ShapeDtypeStruct((2, 32), jnp.int32),
            jax.ShapeDtypeStruct((2,), jnp.int32), jax.ShapeDtypeStruct((2,), jnp.int32))
    lowered = jax.jit(hopper_paged_prefill_attention).trace(*args).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()
    assert jax.eval_shape(hopper_paged_prefill_attention, *args).shape == (2, 200, 28, 128)
