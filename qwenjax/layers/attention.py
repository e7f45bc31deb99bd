"""Attention over the paged KV cache: the single dispatch point between the jnp references and the GPU kernels.

Shapes (axis letters): B rows (sequences) in the step, Q new tokens per row, N query heads, K kv heads, G = N // K,
H head dim, P pages in the cache, S page size, M pages per row in the block table.

Invariant: new K/V are written into their slots *before* attention reads the pages, so a token attends to the
cached prefix and to the new tokens up to itself through the same pages.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qwenjax.compat import platform, register_dataclass


@register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    positions: jax.Array     # [B, Q] int32 absolute position of each new token (padding: 0)
    slot_mapping: jax.Array  # [B, Q] int32 page * S + offset of each new token; padding: P * S (out of range, dropped)
    block_tables: jax.Array  # [B, M] int32 pages of each row, in order; unused entries 0
    seq_lens: jax.Array      # [B] int32 context length after this step (cached + new); padding rows 0
    query_lens: jax.Array    # [B] int32 new tokens in the row; padding rows 0


def write_kv(pages: jax.Array, new: jax.Array, slots: jax.Array) -> jax.Array:
    """Scatters new [B, Q, K, H] into pages [K, P, S, H] at flat slot indices [B, Q]; out-of-range slots drop."""
    K, P, S, H = pages.shape
    flat = pages.reshape(K, P * S, H)
    vals = new.reshape(-1, K, H).astype(pages.dtype).transpose(1, 0, 2)
    flat = flat.at[:, slots.reshape(-1), :].set(vals, mode="drop", unique_indices=True)
    return flat.reshape(K, P, S, H)


def paged_attention_reference(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, meta: AttentionMetadata,
                              *, sm_scale: float) -> jax.Array:
    """q [B, Q, N, H] attends to its row's pages up to its own position. float32 math, returns q's dtype."""
    B, Q, N, H = q.shape
    K, P, S, _ = k_pages.shape
    M = meta.block_tables.shape[1]
    G = N // K
    # Gather each row's pages: [K, B, M, S, H] -> [K, B, C, H] with C = M * S.
    k = k_pages[:, meta.block_tables].reshape(K, B, M * S, H).astype(jnp.float32)
    v = v_pages[:, meta.block_tables].reshape(K, B, M * S, H).astype(jnp.float32)
    qg = q.reshape(B, Q, K, G, H).astype(jnp.float32)
    scores = jnp.einsum("bqkgh,kbch->bkgqc", qg, k) * sm_scale
    ctx = jnp.arange(M * S, dtype=jnp.int32)
    visible = (ctx[None, None, :] <= meta.positions[:, :, None]) & (ctx[None, None, :] < meta.seq_lens[:, None, None])
    scores = jnp.where(visible[:, None, None, :, :], scores, -jnp.inf)
    # Padding rows see nothing: keep them finite.
    scores = jnp.where(jnp.any(visible, axis=-1)[:, None, None, :, None], scores, 0.0)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgqc,kbch->bqkgh", probs, v)
    return out.reshape(B, Q, N, H).astype(q.dtype)


def prefill_attention_dense(q: jax.Array, k: jax.Array, v: jax.Array, query_lens: jax.Array,
                            *, sm_scale: float) -> jax.Array:
    """Rows with no cached prefix: causal attention among the row's new tokens, no page reads.

    q [B, Q, N, H], k/v [B, Q, K, H]. On GPU in bf16/fp16 this is cuDNN's fused attention.
    """
    lens = jnp.maximum(query_lens, 1)  # padding rows: attend to their first (garbage) token, stay finite
    impl = "cudnn" if platform() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) else "xla"
    return jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), scale=sm_scale, is_causal=True,
                                        query_seq_lengths=lens, key_value_seq_lengths=lens, implementation=impl)


KERNEL_HEAD_DIMS = (64, 128)


def decode_backend(head_dim: int) -> str:
    """Which decode attention runs: "pallas" (GPU, head_dim 64 or 128) or "reference" (jnp). Logged at start-up, so
    a GPU engine never falls back without saying so."""
    return "pallas" if platform() == "gpu" and head_dim in KERNEL_HEAD_DIMS else "reference"


def decode_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, meta: AttentionMetadata,
                     *, sm_scale: float) -> jax.Array:
    """One new token per row (Q == 1): the Pallas kernel on GPU, the jnp reference elsewhere."""
    if decode_backend(q.shape[-1]) == "pallas":
        from pallas_kernels.paged_attention import paged_attention

        out = paged_attention(q[:, 0], k_pages, v_pages, meta.block_tables, meta.seq_lens, sm_scale=sm_scale)
        return out[:, None]
    return paged_attention_reference(q, k_pages, v_pages, meta, sm_scale=sm_scale)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
              meta: AttentionMetadata, *, has_context: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Writes k/v [B, Q, K, H] into the pages and attends. Returns (out [B, Q, N, H], k_pages, v_pages).

    `has_context` (static) is False when every row starts at position 0, so prefill needs no page reads.
    """
    sm_scale = q.shape[-1] ** -0.5
    k_pages = write_kv(k_pages, k, meta.slot_mapping)
    v_pages = write_kv(v_pages, v, meta.slot_mapping)
    if q.shape[1] == 1:
        out = decode_attention(q, k_pages, v_pages, meta, sm_scale=sm_scale)
    elif not has_context:
        out = prefill_attention_dense(q, k, v, meta.query_lens, sm_scale=sm_scale)
    else:
        out = paged_attention_reference(q, k_pages, v_pages, meta, sm_scale=sm_scale)
    return out, k_pages, v_pages
