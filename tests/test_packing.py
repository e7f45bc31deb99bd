"""packing: the one-buffer host-to-device layout round-trips every leaf, and every leaf starts on a 256-byte boundary
(XLA may pass a leaf's slice to a kernel in place; Mosaic GPU refuses an operand that is not 256-byte aligned)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from qwenjax.scheduler_config import SchedulerConfig
from qwenjax.worker import packing, sampler
from qwenjax.worker.model_runner import dummy_input


def _leaves(tree):
    return jax.tree.leaves(tree)


def test_round_trip_of_every_dtype_with_aligned_offsets():
    rng = np.random.default_rng(0)
    tree = {"a": rng.integers(-5, 5, (3, 7)).astype(np.int32), "mask": rng.random((5,)) > 0.5,
            "seeds": rng.integers(0, 2**32, (4,), dtype=np.uint64).astype(np.uint32),
            "temp": rng.random((9,)).astype(np.float32), "empty": np.zeros((0, 4), np.int32),
            "narrow": rng.integers(-100, 100, (65,)).astype(np.int16), "p": rng.random((2, 64)).astype(np.float32)}
    i_buf, f_buf, layout = packing.pack(tree)
    assert i_buf.dtype == np.int32 and f_buf.dtype == np.float32
    assert layout.sizes == (i_buf.size, f_buf.size)
    for buf, off, shape, _ in layout.leaves:
        assert off % packing.ALIGN == 0, (buf, off, shape)
    assert packing.ALIGN * 4 == packing.ALIGN_BYTES == 256
    # The gaps between leaves are zeros (the bytes sent are deterministic).
    used = np.zeros(i_buf.size, bool)
    for buf, off, shape, _ in layout.leaves:
        if buf == "i":
            used[off:off + int(np.prod(shape))] = True
    assert not i_buf[~used].any()
    out = jax.jit(lambda i, f: packing.unpack(i, f, layout))(i_buf, f_buf)
    for name, want in tree.items():
        got = np.asarray(out[name])
        assert got.dtype == want.dtype and got.shape == want.shape, name
        np.testing.assert_array_equal(got, want, err_msg=name)


def test_unpack_refuses_a_layout_with_an_unaligned_leaf():
    i_buf, f_buf, layout = packing.pack({"x": np.arange(5, dtype=np.int32)})
    bad = packing.Layout(layout.treedef, (("i", 3, (5,), np.dtype(np.int32)),), layout.sizes)
    with pytest.raises(ValueError, match="not a multiple of 64 elements"):
        jax.jit(lambda i, f: packing.unpack(i, f, bad))(i_buf, f_buf)


def test_the_7b_engine_buckets_put_every_leaf_on_a_256_byte_boundary():
    # LLM()'s defaults on an 80 GB H100 with the startup benchmark's max_model_len: 1,024 sequences, a 16,384-token
    # budget, 36 buckets. Before the alignment, the mixed buckets' prefill block tables sat at offsets such as 645
    # int32s (2,580 bytes), which the Hopper prefill kernel refused on the GPU.
    sc = SchedulerConfig.build(max_model_len=4096, max_num_seqs=1024, max_num_batched_tokens=16384, block_size=16)
    buckets = [(b, 1, False, 0) for b in sc.decode_buckets] + [(r, t, False, 0) for r, t in sc.packed_buckets] + \
              [(1, q, True, 0) for _, q in sc.prefill_buckets] + [(b, q, True, d) for d, b, q in sc.mixed_buckets]
    assert len(buckets) == 36
    for b, q, ctx, d in buckets:
        inp = dummy_input(b, q, 62706, 16, sc.max_pages_per_seq, 1024, has_context=ctx, decode_rows=d)
        tensors = sampler.build_tensors([], num_rows=b + d, vocab_size=152064, with_history=False)
        for tree in (inp, (tensors, np.zeros((b + d,), np.int32)), (inp, tensors)):
            _, _, layout = packing.pack(tree)
            offsets = [off for _, off, _, _ in layout.leaves]
            assert all(off % packing.ALIGN == 0 for off in offsets), ((b, q, ctx, d), offsets)
