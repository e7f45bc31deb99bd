"""The Hopper (Mosaic GPU) paged prefill kernel against the packed-layout jnp reference on the GPU: GQA 1-8, head
dim 64 / 128, pages 16-128, bf16 / f16, both KV block sizes, 2-3 stages, rows of 1 to 2,048 new tokens over up to
7,680 cached ones, NaN in every slot past a row's length and in q at tokens of no row. Run with
`pytest tests/gpu --gpu` on an H100 / H200."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.paged_prefill import paged_prefill_reference, ragged_paged_prefill_reference
from pallas_kernels.paged_prefill_hopper import (HopperPrefillConfig, hopper_paged_prefill_attention,
                                                 hopper_ragged_prefill_attention)
from tests.test_paged_prefill_kernel import _covered, prefill_case, ragged_case

pytestmark = pytest.mark.gpu
BF16, F16 = jnp.bfloat16, jnp.float16
ALIGN = 128  # a program's tile: two warpgroups of 64 tokens

ROWS = ((1, 1), (1, 15), (130, 0), (37, 70), (64, 128), (300, 45))  # (new, cached): tails inside and past blocks
GAPS = (0, 1, 0, 0, 0, 0)
GRID = [  # group, head_dim, page_size, dtype, block_kv, num_stages
    (7, 128, 16, BF16, 128, 2),
    (7, 128, 16, BF16, 64, 3),
    (1, 64, 128, F16, 64, 2),
    (4, 64, 32, BF16, 128, 2),
    (8, 128, 64, F16, 128, 3),
    (2, 128, 128, BF16, 128, 2),
]
RECT = [((1, 1), (5, 300), (128, 0), (200, 1000)), ((512, 7680), (3, 0))]  # rectangular rows (new, cached)
LONG = [  # rows, gaps, group, page_size, block_kv
    (((512, 2048), (37, 0), (1, 4095), (512, 7680)), (0, 1, 0, 0), 7, 16, 128),
    (((2048, 0), (200, 900)), (0, 0), 7, 16, 64),
]


def _check(case, config, tol=1.5e-2):
    q, k, v, tables, seq_lens, query_lens, row_starts = case
    out = np.asarray(hopper_ragged_prefill_attention(q, k, v, tables, seq_lens, query_lens, row_starts,
                                                     row_align=ALIGN, config=config), np.float32)
    real = _covered(q.shape[0], row_starts, query_lens)
    ref = np.zeros_like(out)
    for r, (start, n) in enumerate(zip(np.asarray(row_starts), np.asarray(query_lens))):
        if n:  # row by row: the reference gathers each token's whole context (a [T, K, C, H] array)
            ref[start:start + n] = np.asarray(ragged_paged_prefill_reference(
                q[start:start + n], k, v, tables[r:r + 1], seq_lens[r:r + 1], query_lens[r:r + 1],
                jnp.zeros((1,), jnp.int32)), np.float32)
    assert np.isfinite(out).all() and (out[~real] == 0).all()
    np.testing.assert_allclose(out[real], ref[real], atol=tol, rtol=tol)


@pytest.mark.parametrize("group,head_dim,page_size,dtype,block_kv,num_stages", GRID)
def test_grid_on_gpu(group, head_dim, page_size, dtype, block_kv, num_stages):
    name = f"hopper-{group}-{head_dim}-{page_size}-{dtype.__name__}-{block_kv}-{num_stages}"
    case = ragged_case(name, ROWS, GAPS, group=group, head_dim=head_dim, page_size=page_size, q_dtype=dtype,
                       kv_dtype=dtype, row_align=ALIGN)
    _check(case, HopperPrefillConfig(block_kv=block_kv, num_stages=num_stages))


@pytest.mark.parametrize("rows,gaps,group,page_size,block_kv", LONG)
def test_long_contexts_on_gpu(rows, gaps, group, page_size, block_kv):
    name = f"hopper-long-{group}-{page_size}-{block_kv}-{len(rows)}"
    case = ragged_case(name, rows, gaps, group=group, head_dim=128, page_size=page_size, q_dtype=BF16,
                       kv_dtype=BF16, row_align=ALIGN)
    _check(case, HopperPrefillConfig(block_kv=block_kv))


@pytest.mark.parametrize("rows", RECT)
def test_rectangular_layout_on_gpu(rows):
    """The engine's context-prefill / mixed-step layout, q [B, Q, N, H] (`hopper_paged_prefill_attention`)."""
    q, k, v, tables, seq_lens, query_lens = prefill_case(f"hopper-rect-{len(rows)}", rows, group=7, head_dim=128,
                                                         page_size=16, q_dtype=BF16, kv_dtype=BF16)
    out = np.asarray(hopper_paged_prefill_attention(q, k, v, tables, seq_lens, query_lens), np.float32)
    ref = np.asarray(paged_prefill_reference(q, k, v, tables, seq_lens, query_lens), np.float32)
    real = np.arange(q.shape[1])[None, :] < np.asarray(query_lens)[:, None]
    assert np.isfinite(out).all() and (out[~real] == 0).all()
    np.testing.assert_allclose(out[real], ref[real], atol=1.5e-2, rtol=1.5e-2)


@pytest.mark.parametrize("row", [(8192, 0), (4096, 12288)])
def test_lone_long_chunk_on_gpu(row):
    """What a long prompt alone now gives the kernel (core/scheduler.py, LONG_PREFILL_ROW): its first chunk as one
    fresh rectangular row of 8,192 tokens, and a later chunk over a long cached prefix."""
    q, k, v, tables, seq_lens, query_lens = prefill_case(f"hopper-lone-{row[0]}-{row[1]}", (row,), group=7,
                                                         head_dim=128, page_size=16, q_dtype=BF16, kv_dtype=BF16)
    out = np.asarray(hopper_paged_prefill_attention(q, k, v, tables, seq_lens, query_lens), np.float32)
    ref = np.asarray(paged_prefill_reference(q, k, v, tables, seq_lens, query_lens), np.float32)
    real = np.arange(q.shape[1])[None, :] < np.asarray(query_lens)[:, None]
    assert np.isfinite(out).all() and (out[~real] == 0).all()
    np.testing.assert_allclose(out[real], ref[real], atol=1.5e-2, rtol=1.5e-2)


# ---- packed steps: long rows through the Hopper kernel on an aligned copy, the others through the Triton kernel ----
PACKED = ((601, 0), (37, 0), (1000, 0), (513, 0), (1, 0), (2047, 0), (129, 0), (700, 0))  # odd lengths, fresh rows


@pytest.mark.parametrize("spare_tiles", [None, -6])  # the engine's buffer / one too small for the last long rows
def test_packed_routing_on_gpu(spare_tiles, monkeypatch):
    """`routed_ragged_attention` with the engine's kernels (`attention.packed_kernels` on this sm90 device, bf16
    pages, QWENJAX_PREFILL_KERNEL=routed) on a packed step of rows at 16-token starts, against the jnp reference row
    by row."""
    from qwenjax.layers import attention

    monkeypatch.setenv(attention.PREFILL_KERNEL_ENV, "routed")
    from qwenjax.layers.packed_routing import HOPPER_TILE, route_rows, routed_ragged_attention

    case = ragged_case("hopper-packed", PACKED, (0,) * len(PACKED), group=7, head_dim=128, page_size=16,
                       q_dtype=BF16, kv_dtype=BF16, row_align=16)
    q, k, v, tables, seq_lens, query_lens, row_starts = case
    hopper, triton, aligned = attention.packed_kernels(q, k, sm_scale=128 ** -0.5)
    assert hopper is not None and aligned, "no Hopper kernel for a packed step on this device"
    if spare_tiles is not None:
        aligned += spare_tiles * HOPPER_TILE
    routed = np.asarray(route_rows(query_lens, aligned)[0])
    assert routed.sum() == (5 if spare_tiles is None else 4) and not routed[[1, 4, 6]].any()
    out = np.asarray(routed_ragged_attention(q, k, v, jnp.ones(2), tables, seq_lens, query_lens, row_starts,
                                             hopper_fn=hopper, triton_fn=triton, aligned=aligned), np.float32)
    real = _covered(q.shape[0], row_starts, query_lens)
    ref = np.zeros_like(out)
    for r, (start, n) in enumerate(zip(np.asarray(row_starts), np.asarray(query_lens))):
        if n:
            ref[start:start + n] = np.asarray(ragged_paged_prefill_reference(
                q[start:start + n], k, v, tables[r:r + 1], seq_lens[r:r + 1], query_lens[r:r + 1],
                jnp.zeros((1,), jnp.int32), piece=512), np.float32)
    assert np.isfinite(out).all() and (out[~real] == 0).all()
    np.testing.assert_allclose(out[real], ref[real], atol=1.5e-2, rtol=1.5e-2)


PACKED_ENGINE = dict(max_model_len=1024, max_num_seqs=4, max_num_batched_tokens=2048, decode_buckets=(4,),
                     prefill_token_buckets=(256, 1024), num_kv_pages=256, skip_warmup=True,
                     enable_chunked_prefill=False)
# Two long prompts and a short one: 1,360 packed slots, one packed step of T = 2,048 (rows of 704, 48, 608 slots).
PACKED_PROMPTS = [list(map(int, np.random.default_rng(n).integers(0, 512, n))) for n in (700, 40, 600)]
_PACKED_RUN = """
import json, jax
from qwenjax import LLM, SamplingParams
llm = LLM({model!r}, dtype='bfloat16', **{engine!r})
p = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, prompt_logprobs=0)
outs = llm.generate(prompt_token_ids={prompts!r}, sampling_params=p, use_tqdm=False)
print(json.dumps({{"tokens": [o.outputs[0].token_ids for o in outs],
                  "prefill_steps": llm.llm_engine.stats.prefill_steps,
                  "prompt_logprobs": [[next(iter(d.values())).logprob for d in o.prompt_logprobs[1:]] for o in outs]}}))
"""


def test_engine_packed_step_takes_the_hopper_kernel(tmp_path, monkeypatch):
    """Under QWENJAX_PREFILL_KERNEL=routed, a bf16 engine's packed bucket of 2,048 slots holds the Hopper (Mosaic
    GPU) call and the Triton one in every layer; a packed step of two long prompts and a short one gives the CPU
    engine's greedy tokens (bf16 on both sides, a checkpoint written by transformers with logits far from uniform),
    and its prompt logprobs (every position of the long rows' attention) agree to bf16 rounding."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import jax

    from qwenjax import LLM
    from qwenjax.worker import packing
    from qwenjax.worker.model_runner import dummy_input
    from tests.checkpoints import write_checkpoint
    from tests.gpu.test_engine_gpu import _kernel_in

    from qwenjax.layers import attention

    monkeypatch.setenv(attention.PREFILL_KERNEL_ENV, "routed")  # the subprocesses below inherit it
    layers = 2
    model = str(write_checkpoint(tmp_path / "packed", hidden_size=256, intermediate_size=512, num_layers=layers,
                                 num_heads=4, num_kv_heads=2, vocab_size=512, max_position_embeddings=1024, seed=29))
    llm = LLM(model, dtype="bfloat16", **PACKED_ENGINE)
    runner, sc = llm.llm_engine.runner, llm.llm_engine.scheduler_config
    R, T = sc.packed_buckets[-1]
    assert T == 2048
    inp = dummy_input(R, T, runner.num_pages, runner.page_size, runner.block_table_width, runner.scratch_slot)
    i_buf, f_buf, layout = packing.pack(inp)
    with jax.set_mesh(runner.mesh):
        hlo = runner._step.lower(runner._param_leaves, runner.kv_cache, runner.penalties, runner.last_tokens, i_buf,
                                 f_buf, has_context=False, layout=layout).compile().as_text()
    hopper = sum('custom_call_target="mosaic_gpu' in line for line in hlo.splitlines())
    triton = sum(_kernel_in(line) and "qwenjax_paged_prefill_p" in line for line in hlo.splitlines())
    assert (hopper, triton) == (layers, layers), f"packed bucket {(R, T)}: {hopper} Mosaic GPU, {triton} Triton calls"

    code = _PACKED_RUN.format(model=model, engine=PACKED_ENGINE, prompts=PACKED_PROMPTS)
    root = Path(__file__).resolve().parents[2]
    runs = {}
    for platform in ("gpu", "cpu"):
        env = {**os.environ, **({"JAX_PLATFORMS": "cpu"} if platform == "cpu" else {})}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                             cwd=root)
        assert out.returncode == 0, out.stderr[-2000:]
        runs[platform] = json.loads(out.stdout.strip().splitlines()[-1])
    assert runs["gpu"]["prefill_steps"] == runs["cpu"]["prefill_steps"] == 1, runs  # one packed step
    assert runs["gpu"]["tokens"] == runs["cpu"]["tokens"], runs
    diff = np.abs(np.concatenate(runs["gpu"]["prompt_logprobs"]) - np.concatenate(runs["cpu"]["prompt_logprobs"]))
    assert diff.mean() < 0.05 and diff.max() < 0.5, (diff.mean(), diff.max())
