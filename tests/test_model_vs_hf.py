"""The oracle: logits and greedy tokens equal Hugging Face transformers' (PyTorch, CPU) on the same weights."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from qwenjax.layers.attention_metadata import AttentionMetadata
from qwenjax.models.loader import load_model_config, load_params
from qwenjax.worker.kv_cache import allocate
from tests.checkpoints import hf_model

ATOL = 2e-4  # float32 end to end; differences come from summation order only


def _our_logits(path, token_ids: list[int], *, chunk: int | None = None, decode_from: int | None = None,
                mesh=None):
    """Logits at every position, computed through the paged cache: prefill of the first `decode_from` tokens (in
    chunks of `chunk`, the later ones reading the cached prefix), then one token per decode step. With `mesh`, the
    parameters and pages are sharded over it (tests/tp_fused_worker.py)."""
    from qwenjax.models.sharding import kv_sharding

    cfg = load_model_config(path)
    graphdef, params = load_params(path, cfg, jnp.float32, mesh=mesh)
    model = nnx.merge(graphdef, params)
    page, pages = 16, 16
    kv = allocate(cfg, pages, page, jnp.float32, None if mesh is None else kv_sharding(mesh, cfg))
    table = np.random.default_rng(0).permutation(pages).astype(np.int32)[None]  # scattered pages
    n = len(token_ids)
    decode_from = n if decode_from is None else decode_from
    spans, start = [], 0
    while start < decode_from:
        end = min(decode_from, start + (chunk or decode_from))
        spans.append((start, end))
        start = end
    spans += [(i, i + 1) for i in range(decode_from, n)]
    out = []
    for start, end in spans:
        pos = np.arange(start, end, dtype=np.int32)[None]
        meta = AttentionMetadata(positions=pos, slot_mapping=table[0][pos // page] * page + pos % page,
                                 block_tables=table, seq_lens=np.array([end], np.int32),
                                 query_lens=np.array([end - start], np.int32))
        ids = np.asarray(token_ids[start:end], np.int32)[None]
        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            hidden, kv = model(ids, meta, kv, has_context=start > 0)
            out.append(np.asarray(model.logits(hidden[0])))
    return np.concatenate(out)


def _hf_logits(path, token_ids):
    with torch.no_grad():
        return hf_model(path)(torch.tensor([token_ids])).logits[0].numpy()


@pytest.mark.parametrize("name", ["untied_gqa2", "tied_mha", "gqa7_odd", "sharded"])
def test_prefill_and_decode_logits_match_hf(name, request):
    path = request.getfixturevalue(name)
    ids = list(np.random.default_rng(7).integers(0, 512, 40))
    ref = _hf_logits(path, ids)
    ours = _our_logits(path, ids, decode_from=25)  # 25 prompt tokens prefilled, 15 decoded one by one
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=1e-4)
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_chunked_prefill_logits_match_hf(untied_gqa2):
    ids = list(np.random.default_rng(8).integers(0, 512, 57))
    ref = _hf_logits(untied_gqa2, ids)
    ours = _our_logits(untied_gqa2, ids, chunk=20)  # chunks 0-20, 20-40, 40-57 read the cached prefix
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=1e-4)
