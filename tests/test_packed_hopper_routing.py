"""Packed prefill steps on sm90: long rows through the Hopper kernel on an aligned copy of q, the others through the
Triton kernel in place (qwenjax/layers/packed_routing.py). On CPU: the routing against a plain-Python walk of the
rows, the routed attention (each kernel replaced by a jnp stand-in that keeps its layout contract) against the packed
reference, the engine's greedy tokens with the routing forced against transformers, and the step lowering for CUDA
with both kernels. tests/gpu/test_prefill_hopper_gpu.py runs the real kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.paged_prefill import ragged_paged_prefill_reference
from pallas_kernels.paged_prefill_hopper import hopper_ragged_prefill_reference
from qwenjax.layers import attention, attention_kernels
from qwenjax.layers.packed_routing import (HOPPER_MIN_ROW, HOPPER_TILE, aligned_slots, route_rows,
                                           routed_ragged_attention, slot_maps)
from tests.test_paged_prefill_kernel import _covered, ragged_case

PIECE = 128  # tokens at a time in the references (their per-token context gather)


def _hopper_standin(q, k, v, s, t, sl, ql, rs):
    return hopper_ragged_prefill_reference(q, k, v, t, sl, ql, rs)


def _triton_standin(q, k, v, s, t, sl, ql, rs):
    return ragged_paged_prefill_reference(q, k, v, t, sl, ql, rs, piece=PIECE)


def test_aligned_slots():
    assert aligned_slots(HOPPER_MIN_ROW) == 0 and aligned_slots(128) == 0  # no long row fits: Triton alone
    assert aligned_slots(HOPPER_MIN_ROW + 16) == 768  # 528 slots: 5 tiles + 1 spare
    assert aligned_slots(4096) == 4096 + 2 * 128
    assert aligned_slots(16384) == 16384 + 8 * 128  # 8 rows of 2,048: no spare tile needed, 8 there


def _walk(lens, starts, aligned):
    """Plain Python: long rows laid out in order at tile multiples while they fit."""
    hopper, astarts, cursor, to_a = [], [], 0, {}
    for n, s in zip(lens, starts):
        foot = -(-n // HOPPER_TILE) * HOPPER_TILE if n > HOPPER_MIN_ROW else 0
        astarts.append(cursor)
        hopper.append(bool(foot) and cursor + foot <= aligned)
        if hopper[-1]:
            to_a.update({s + i: cursor + i for i in range(n)})
        cursor += foot
    return hopper, astarts, to_a


@pytest.mark.parametrize("aligned", [2304, 1408])  # all long rows fit / the third does not
def test_route_rows_and_slot_maps_match_a_walk(aligned):
    lens = [600, 40, 2, 530, 0, 700, 513, 0]  # two padding rows at the end (start T)
    starts, o = [], 0
    for n in lens[:-2]:
        starts.append(o)
        o += -(-n // 16) * 16
    T = o + 48
    starts += [T, T]
    ql, rs = jnp.asarray(lens, jnp.int32), jnp.asarray(starts, jnp.int32)
    hopper, astarts = route_rows(ql, aligned)
    want_h, want_s, want_map = _walk(lens, starts, aligned)
    assert np.asarray(hopper).tolist() == want_h and np.asarray(astarts).tolist() == want_s
    assert all(s % HOPPER_TILE == 0 for s, h in zip(want_s, want_h) if h)
    to_a, from_p = (np.asarray(x) for x in slot_maps(ql, rs, hopper, astarts, tokens=T, aligned=aligned))
    np.testing.assert_array_equal(to_a, [want_map.get(t, aligned) for t in range(T)])
    inverse = {a: t for t, a in want_map.items()}
    np.testing.assert_array_equal(from_p, [inverse.get(a, T) for a in range(aligned)])
    assert want_h == ([True, False, False, True, False, True, False, False] if aligned == 2304 else
                      [True, False, False, True, False, False, False, False])


ROWS = ((600, 0), (40, 0), (530, 0), (1, 0), (700, 0), (130, 0))  # fresh rows, as packed steps carry


def _case(rows=ROWS, group=2, head_dim=64, dtype=jnp.float32):
    return ragged_case(f"routed-{len(rows)}-{group}", rows, (0,) * len(rows), group=group, head_dim=head_dim,
                       page_size=16, q_dtype=dtype, kv_dtype=dtype, row_align=16)


def _by_rows(case):
    """The packed reference, one row at a time (each row's context gathered alone)."""
    q, k, v, tables, seq_lens, query_lens, row_starts = case
    out = np.zeros(q.shape, np.float32)
    for r, (s, n) in enumerate(zip(np.asarray(row_starts), np.asarray(query_lens))):
        if n:
            out[s:s + n] = np.asarray(ragged_paged_prefill_reference(
                q[s:s + n], k, v, tables[r:r + 1], seq_lens[r:r + 1], query_lens[r:r + 1],
                jnp.zeros((1,), jnp.int32), piece=PIECE), np.float32)
    return out


@pytest.mark.parametrize("spare", [1, -5])  # every long row fits / the last long row falls back to Triton
def test_routed_attention_equals_the_packed_reference(spare):
    case = _case()
    q, k, v, tables, seq_lens, query_lens, row_starts = case
    T = q.shape[0]
    aligned = aligned_slots(T) + spare * HOPPER_TILE if spare < 0 else aligned_slots(T)
    hopper, _ = route_rows(query_lens, aligned)
    assert np.asarray(hopper).sum() == (3 if spare > 0 else 2)
    calls = []

    def hopper_fn(qa, *rest):
        calls.append(qa.shape)
        return _hopper_standin(qa, *rest)

    out = np.asarray(routed_ragged_attention(q, k, v, jnp.ones(2), tables, seq_lens, query_lens, row_starts,
                                             hopper_fn=hopper_fn, triton_fn=_triton_standin, aligned=aligned))
    assert calls == [(aligned, q.shape[1], q.shape[2])]
    real = _covered(T, row_starts, query_lens)
    assert np.isfinite(out).all() and (out[~real] == 0).all()
    np.testing.assert_allclose(out[real], _by_rows(case)[real], atol=2e-5, rtol=2e-5)


def test_the_hopper_standin_breaks_on_rows_off_its_tile():
    """The stand-in keeps the kernel's contract (tiles mapped to rows by its own metadata): on the packed layout as
    is, where rows start at 16-token multiples, it does not give the reference's answer. So the routed test above
    can fail: it passes only because the long rows reach the kernel at tile multiples."""
    case = _case(rows=((40, 0), (600, 0)))
    q, k, v, tables, seq_lens, query_lens, row_starts = case
    assert int(row_starts[1]) % HOPPER_TILE
    out = np.asarray(hopper_ragged_prefill_reference(q, k, v, tables, seq_lens, query_lens, row_starts))
    real = _covered(q.shape[0], row_starts, query_lens)
    assert np.abs(np.nan_to_num(out[real]) - _by_rows(case)[real]).max() > 0.1


def test_the_standin_matches_the_reference_on_aligned_rows():
    case = ragged_case("hopper-standin", ((300, 45), (1, 0), (129, 7)), (0, 1, 0), group=4, head_dim=64,
                       page_size=32, q_dtype=jnp.float32, kv_dtype=jnp.float32, row_align=HOPPER_TILE)
    out = np.asarray(hopper_ragged_prefill_reference(*case))
    real = _covered(case[0].shape[0], case[6], case[5])
    assert (out[~real] == 0).all()
    np.testing.assert_allclose(out[real], _by_rows(case)[real], atol=2e-5, rtol=2e-5)


TRITON = "qwenjax_paged_prefill_p16"  # the Triton kernel's name at page size 16 (the Hopper one's ends in _hopper)


class _Hopper:
    compute_capability = "9.0"


def test_packed_step_lowers_for_cuda_with_both_kernels(monkeypatch):
    """What the engine traces for a packed bucket of 2,048 slots on an H100 with bf16 pages: by default the Triton
    kernel alone (the routing is opt-in); under QWENJAX_PREFILL_KERNEL=routed the Hopper (Mosaic GPU) call on the
    aligned buffer and the Triton one, while a bucket of 512 slots (no long row fits) and fp8 pages keep the Triton
    kernel alone."""
    monkeypatch.setattr(attention_kernels, "decode_backend", lambda head_dim: "pallas")
    monkeypatch.setattr(jax, "devices", lambda *a: [_Hopper()])
    bf16 = jnp.bfloat16

    def lowered(T, kv_dtype=bf16):
        args = (jax.ShapeDtypeStruct((T, 28, 128), bf16), jax.ShapeDtypeStruct((4, 64, 16, 128), kv_dtype),
                jax.ShapeDtypeStruct((4, 64, 16, 128), kv_dtype), jax.ShapeDtypeStruct((8, 32), jnp.int32),
                *(jax.ShapeDtypeStruct((8,), jnp.int32),) * 3)

        def step(q, kp, vp, tables, sl, ql, rs):
            kernels = attention.packed_kernels(q, kp, sm_scale=128 ** -0.5)
            return attention.sharded_ragged_prefill_kernel(q, kp, vp, tables, sl, ql, rs, mesh=None,
                                                           kernels=kernels)

        aligned = attention.packed_kernels(args[0], args[1], sm_scale=1.0)[2]
        return jax.jit(step).trace(*args).lower(lowering_platforms=("cuda",)).as_text(), aligned

    monkeypatch.delenv(attention.PREFILL_KERNEL_ENV, raising=False)
    text, aligned = lowered(2048)
    assert aligned == 0 and "mosaic_gpu" not in text and TRITON in text
    monkeypatch.setenv(attention.PREFILL_KERNEL_ENV, "routed")
    text, aligned = lowered(2048)
    assert aligned == 2048 + 128
    assert "mosaic_gpu" in text and TRITON in text
    assert f"tensor<{aligned}x28x128xbf16>" in text  # the aligned copy of q
    for T, kv in ((512, bf16), (2048, jnp.float8_e5m2)):
        text, aligned = lowered(T, kv)
        assert aligned == 0 and "mosaic_gpu" not in text and TRITON in text


# ---- the engine with the routing forced on CPU, against transformers ----------------------------------------------
ENGINE = dict(dtype="float32", max_model_len=2048, max_num_seqs=4, max_num_batched_tokens=2048, block_size=16,
              decode_buckets=(4,), prefill_token_buckets=(256, 1024), num_kv_pages=2048 // 16 * 2 + 8,
              enable_chunked_prefill=False)
LENGTHS = (700, 40, 600, 530)  # 1,904 packed slots: one packed step of T = 2,048, three rows of them long


def test_engine_tokens_equal_hf_with_the_routing_forced(ckpt_dir, monkeypatch):
    """The engine's packed step attends through `routed_ragged_attention` with jnp stand-ins for both kernels (each
    keeping its layout contract): the long rows on the aligned copy, the short one in place. Greedy tokens equal
    transformers'."""
    from qwenjax import LLM, SamplingParams
    from tests.checkpoints import hf_greedy, hf_model, write_checkpoint

    path = write_checkpoint(ckpt_dir / "packed_hopper", max_position_embeddings=2048, seed=29)
    prompts = [list(map(int, np.random.default_rng(n).integers(0, 512, n))) for n in LENGTHS]
    want = hf_greedy(hf_model(path), prompts, 8)
    traced = []

    def forced(q, k_pages, *, sm_scale, interpret=False):
        def hopper(*args):
            traced.append(("hopper", q.shape[0], args[0].shape[0]))
            return hopper_ragged_prefill_reference(*args[:3], *args[4:], sm_scale=sm_scale)

        def triton(*args):
            traced.append(("triton", q.shape[0], args[0].shape[0]))
            return ragged_paged_prefill_reference(*args[:3], *args[4:], sm_scale=sm_scale, piece=PIECE)

        return (hopper, triton, aligned_slots(q.shape[0])) if aligned_slots(q.shape[0]) else (None, triton, 0)

    monkeypatch.setattr(attention, "packed_kernels", forced)
    llm = LLM(str(path), **ENGINE)
    sched = llm.llm_engine.scheduler
    seen, schedule = [], sched.schedule

    def recording():
        out = schedule()
        if out is not None and out.kind == "prefill":
            seen.append((out.packed, out.bucket, [r.num_new_tokens for r in out.rows]))
        return out

    monkeypatch.setattr(sched, "schedule", recording)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(temperature=0.0, max_tokens=8,
                                                                                ignore_eos=True), use_tqdm=False)
    assert seen == [(True, (4, 2048), list(LENGTHS))]
    assert ("hopper", 2048, aligned_slots(2048)) in traced and ("triton", 2048, 2048) in traced
    assert [o.outputs[0].token_ids for o in outs] == want
