"""Attention over the paged KV cache: the single dispatch point between the jnp references and the GPU kernels.

Shapes (axis letters): B rows (sequences) in the step, Q new tokens per row, N query heads, K kv heads, G = N // K,
H head dim, P pages in the cache, S page size, M pages per row in the block table; a packed prefill step has R rows
on T token slots (PackedMetadata).

Invariant: new K/V are written into their slots *before* attention reads the pages, so a token attends to the
cached prefix and to the new tokens up to itself through the same pages. The model calls `rope_and_write` (RoPE on
q and k plus both page writes: one fused Pallas kernel on GPU) and then `attend`.

FP8 pages (kv_cache_dtype fp8_e5m2 / fp8_e4m3, see `fp8_kv`): written by a saturating cast (K / k_scale for e4m3),
read back as stored * scale in float32 by every reader here, and handed to the Pallas kernel as they are, with the
scales, on GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pallas_kernels.page_format import from_pages, to_pages, write_kv
from pallas_kernels.rope_kv_write import apply_rope
from qwenjax.compat import platform
from qwenjax.layers.attention_kernels import (BACKEND_ENV, PREFILL_KERNEL_ENV, VERIFY_KERNEL_ENV,  # noqa: F401
                                             decode_backend, packed_kernels, prefill_kernel, sharded_decode_kernel,
                                             sharded_prefill_kernel, sharded_ragged_prefill_kernel, _over_heads)
from qwenjax.layers.attention_metadata import AttentionMetadata, MixedMetadata, PackedMetadata, segments, step_slots
from qwenjax.layers.fp8_kv import page_scale


def paged_attention_reference(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, meta: AttentionMetadata,
                              *, sm_scale: float, k_scale: jax.Array | None = None,
                              v_scale: jax.Array | None = None) -> jax.Array:
    """q [B, Q, N, H] attends to its row's pages up to its own position. float32 math, returns q's dtype.

    Pages are dequantized as they are gathered: K = stored * k_scale, V = stored * v_scale (None: stored as is).
    """
    B, Q, N, H = q.shape
    K, P, S, _ = k_pages.shape
    M = meta.block_tables.shape[1]
    G = N // K
    # Gather each row's pages: [K, B, M, S, H] -> [K, B, C, H] with C = M * S.
    # Slots at or past a row's length may hold anything (stale or NaN): zero them, so 0-probability terms stay 0.
    in_row = (jnp.arange(M * S, dtype=jnp.int32)[None, :] < meta.seq_lens[:, None])[None, :, :, None]
    k = jnp.where(in_row, from_pages(k_pages[:, meta.block_tables], k_scale).reshape(K, B, M * S, H), 0.0)
    v = jnp.where(in_row, from_pages(v_pages[:, meta.block_tables], v_scale).reshape(K, B, M * S, H), 0.0)
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
    It reads the fresh K/V, never the pages: with an fp8 cache these rows attend to unquantized K/V (as vLLM's
    prefill does), and only later steps see the fp8-rounded values.
    """
    lens = jnp.maximum(query_lens, 1)  # padding rows: attend to their first (garbage) token, stay finite
    impl = "cudnn" if platform() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) else "xla"
    return jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), scale=sm_scale, is_causal=True,
                                        query_seq_lengths=lens, key_value_seq_lengths=lens, implementation=impl)


PACKED_REFERENCE_TILE = 256  # query slots per piece of the packed reference (its scores are [tile, N, T])


def packed_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, meta: PackedMetadata,
                               *, sm_scale: float) -> jax.Array:
    """A packed step's causal attention among each row's own tokens, from the fresh k/v [T, K, H] (as stored in the
    pages: the caller rounds them through the page dtype). q [T, N, H]; 0 at padding slots. float32 math.

    Every query slot scores all T key slots, masked to its row and to positions up to its own; the query axis runs
    in pieces of PACKED_REFERENCE_TILE so the scores stay [tile, N, T].
    """
    from pallas_kernels.paged_attention import masked_softmax

    T, N, H = q.shape
    K = k.shape[1]
    G = N // K
    row, real = meta.token_rows()
    row = jnp.where(real, row, -1)
    kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)
    tile = min(T, PACKED_REFERENCE_TILE)
    pad = -T % tile

    def piece(args):
        qt, rt, pt = args  # [tile, N, H], [tile], [tile]
        s = jnp.einsum("tkgh,skh->tkgs", qt.reshape(tile, K, G, H).astype(jnp.float32), kf) * sm_scale
        visible = (rt[:, None] == row[None, :]) & (rt[:, None] >= 0) & (meta.positions[None, :] <= pt[:, None])
        return jnp.einsum("tkgs,skh->tkgh", masked_softmax(s, visible[:, None, None, :]), vf).reshape(tile, N, H)

    qs = jnp.pad(q, ((0, pad), (0, 0), (0, 0))).reshape(-1, tile, N, H)
    rs = jnp.pad(row, (0, pad), constant_values=-1).reshape(-1, tile)
    ps = jnp.pad(meta.positions, (0, pad)).reshape(-1, tile)
    out = jax.lax.map(piece, (qs, rs, ps)).reshape(-1, N, H)[:T]
    return out.astype(q.dtype)


def packed_attention(q: jax.Array, k: jax.Array, v: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                     meta: PackedMetadata, *, sm_scale: float, k_scale: jax.Array | None = None,
                     v_scale: jax.Array | None = None) -> jax.Array:
    """A packed prefill step's attention, its K/V already in the pages: the Pallas prefill kernels over the pages on
    GPU (`packed_kernels`: long rows through the Hopper kernel where it applies); elsewhere the jnp reference on
    the fresh k/v rounded through the page dtype, which is what the kernel reads back (so fp8 pages give both paths
    the same inputs)."""
    kernels = packed_kernels(q, k_pages, sm_scale=sm_scale)
    if kernels is not None:
        return sharded_ragged_prefill_kernel(q, k_pages, v_pages, meta.block_tables, meta.seq_lens, meta.query_lens,
                                             meta.row_starts, mesh=jax.sharding.get_abstract_mesh(),
                                             k_scale=k_scale, v_scale=v_scale, kernels=kernels)
    if k_pages.dtype != k.dtype:
        k = from_pages(to_pages(k, k_pages.dtype, k_scale), k_scale)
        v = from_pages(to_pages(v, v_pages.dtype, v_scale), v_scale)
    return packed_attention_reference(q, k, v, meta, sm_scale=sm_scale)


def decode_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, meta: AttentionMetadata,
                     *, sm_scale: float, k_scale: jax.Array | None = None,
                     v_scale: jax.Array | None = None) -> jax.Array:
    """One new token per row (Q == 1): the Pallas kernel on GPU, the jnp reference elsewhere."""
    if decode_backend(q.shape[-1]) == "pallas":
        out = sharded_decode_kernel(q[:, 0], k_pages, v_pages, meta.block_tables, meta.seq_lens,
                                    mesh=jax.sharding.get_abstract_mesh(), sm_scale=sm_scale, k_scale=k_scale,
                                    v_scale=v_scale)
        return out[:, None]
    return paged_attention_reference(q, k_pages, v_pages, meta, sm_scale=sm_scale, k_scale=k_scale, v_scale=v_scale)


def context_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, meta: AttentionMetadata,
                      *, sm_scale: float, k_scale: jax.Array | None = None,
                      v_scale: jax.Array | None = None) -> jax.Array:
    """Chunks of Q > 1 new tokens over cached pages (their own K/V already written): the Pallas prefill kernel on
    GPU, the jnp reference elsewhere. Padding tokens of a row may differ between the two (never read)."""
    if decode_backend(q.shape[-1]) == "pallas":
        return sharded_prefill_kernel(q, k_pages, v_pages, meta.block_tables, meta.seq_lens, meta.query_lens,
                                      mesh=jax.sharding.get_abstract_mesh(), sm_scale=sm_scale, k_scale=k_scale,
                                      v_scale=v_scale)
    return paged_attention_reference(q, k_pages, v_pages, meta, sm_scale=sm_scale, k_scale=k_scale, v_scale=v_scale)


def reads_fresh_kv(meta: "AttentionMetadata | MixedMetadata | PackedMetadata", *, has_context: bool,
                   head_dim: int) -> bool:
    """Whether `attend` reads this step's k/v arrays rather than the pages alone: dense prefill rows (a segment of
    Q > 1 with no context) and, off the Pallas path, the packed reference."""
    if isinstance(meta, PackedMetadata):
        return decode_backend(head_dim) != "pallas"
    return any(seg.positions.shape[1] > 1 and not has_context for seg in segments(meta))


# The fused kernel runs for steps of at most this many tokens. Device time a call on an H100, kernel against the
# four XLA kernels it replaces (benchmarks/rope_kv_write.py: 7B shape, bf16, profiler kernel time): 1.41 / 5.37 us at
# 1 token, 1.74 / 4.15 at 64, 5.67 / 8.08 at 1024; from 2048 tokens on both run near copy bandwidth and the kernel is
# no faster (16.1 / 15.5 at 2048, 32.3 / 33.8 at 4096, 64.0 / 62.9 at 8192), so longer steps keep the XLA path.
FUSED_ROPE_WRITE_MAX_TOKENS = 1024


def fused_rope_write(meta: "AttentionMetadata | MixedMetadata | PackedMetadata", *, has_context: bool,
                     head_dim: int) -> bool:
    """Whether `rope_and_write` runs the fused Pallas kernel: with the Pallas attention (GPU), for steps whose
    attention reads K/V from the pages alone (the kernel keeps no rotated k array) and of at most
    FUSED_ROPE_WRITE_MAX_TOKENS tokens."""
    tokens = sum(seg.positions.size for seg in segments(meta))
    return (decode_backend(head_dim) == "pallas" and tokens <= FUSED_ROPE_WRITE_MAX_TOKENS
            and not reads_fresh_kv(meta, has_context=has_context, head_dim=head_dim))


def rope_and_write(q: jax.Array, k: jax.Array, v: jax.Array, cos: jax.Array, sin: jax.Array, k_pages: jax.Array,
                   v_pages: jax.Array, meta: "AttentionMetadata | MixedMetadata | PackedMetadata", *,
                   has_context: bool, k_scale: jax.Array | None = None, v_scale: jax.Array | None = None) -> tuple:
    """RoPE on q [T, N, H] and k [T, K, H] (cos / sin [T, H]), then k and v [T, K, H] written into their slots.

    Returns (q, k, v, k_pages, v_pages): q rotated; k rotated and v as given where `attend` reads them
    (`reads_fresh_kv`), else None. On GPU (`fused_rope_write`) one Pallas kernel does it all
    (pallas_kernels/rope_kv_write.py, bit-identical to the jnp path); elsewhere `apply_rope` and `write_kv`.
    k_scale / v_scale: the layer's scales (`fp8_kv.page_scale` picks what the pages use).
    """
    k_scale, v_scale = page_scale(k_pages.dtype, k_scale), page_scale(v_pages.dtype, v_scale)
    slots = step_slots(meta)
    if fused_rope_write(meta, has_context=has_context, head_dim=q.shape[-1]):
        q, k_pages, v_pages = sharded_rope_kv_write(q, k, v, cos, sin, k_pages, v_pages, slots,
                                                    mesh=jax.sharding.get_abstract_mesh(), k_scale=k_scale,
                                                    v_scale=v_scale)
        return q, None, None, k_pages, v_pages
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return q, k, v, write_kv(k_pages, k, slots, k_scale), write_kv(v_pages, v, slots, v_scale)


def sharded_rope_kv_write(q, k, v, cos, sin, k_pages, v_pages, slots, *, mesh, k_scale=None, v_scale=None,
                          interpret: bool = False):
    """The fused RoPE + page-write kernel on each device's heads, under shard_map over the "tp" axis of `mesh`: q
    split on its heads; k, v and the pages split on kv heads when K divides over the mesh, else replicated (each
    device then writes every kv head, the same values, into its copy of the pages). cos, sin, slots replicated."""
    from pallas_kernels.rope_kv_write import rope_kv_write

    def kernel(q, k, v, cos, sin, k_pages, v_pages, slots, scales):
        return rope_kv_write(q, k, v, cos, sin, k_pages, v_pages, slots,
                             k_scale=None if k_scale is None else scales[0],
                             v_scale=None if v_scale is None else scales[1], interpret=interpret)

    scales = jnp.stack([jnp.asarray(1.0 if s is None else s, jnp.float32).reshape(()) for s in (k_scale, v_scale)])
    args = (q, k, v, cos, sin, k_pages, v_pages, slots, scales)
    n = 1 if mesh is None or mesh.empty or "tp" not in mesh.axis_names else mesh.shape["tp"]
    if n == 1:
        return kernel(*args)
    heads = P(None, "tp", None)
    kv, pages = (heads, P("tp", None, None, None)) if k.shape[1] % n == 0 else (P(), P())
    return jax.shard_map(kernel, mesh=mesh, in_specs=(heads, kv, kv, P(), P(), pages, pages, P(), P()),
                         out_specs=(heads, pages, pages), check_vma=False)(*args)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
              meta: AttentionMetadata | MixedMetadata | PackedMetadata, *, has_context: bool,
              k_scale: jax.Array | None = None, v_scale: jax.Array | None = None) -> tuple[jax.Array, ...]:
    """Writes k/v [T, K, H] (k already rotated) into the pages and attends (`attend`). Returns (out [T, N, H],
    k_pages, v_pages). The model goes through `rope_and_write` then `attend` instead, which fuses RoPE and the
    writes on GPU."""
    k_scale, v_scale = page_scale(k_pages.dtype, k_scale), page_scale(v_pages.dtype, v_scale)
    slots = step_slots(meta)
    k_pages = write_kv(k_pages, k, slots, k_scale)
    v_pages = write_kv(v_pages, v, slots, v_scale)
    out = attend(q, k, v, k_pages, v_pages, meta, has_context=has_context, k_scale=k_scale, v_scale=v_scale)
    return out, k_pages, v_pages


def attend(q: jax.Array, k: jax.Array | None, v: jax.Array | None, k_pages: jax.Array, v_pages: jax.Array,
           meta: AttentionMetadata | MixedMetadata | PackedMetadata, *, has_context: bool,
           k_scale: jax.Array | None = None, v_scale: jax.Array | None = None) -> jax.Array:
    """Attention of q [T, N, H] (rotated) over the pages, which already hold this step's K/V. Returns [T, N, H].

    The T tokens are the segments' tokens in order (`segments`): one segment of [B, Q] rows, a mixed step's
    decode segment then its prefill segment, or a packed prefill step's slots (PackedMetadata). `has_context`
    (static) is False when every prefill row starts at position 0, so prefill needs no page reads. k / v [T, K, H]:
    this step's rotated K and V, read only where `reads_fresh_kv` (else they may be None). k_scale / v_scale: the
    layer's float32 scalars; used only with float8_e4m3fn pages (`fp8_kv.page_scale`).
    """
    sm_scale = q.shape[-1] ** -0.5
    k_scale, v_scale = page_scale(k_pages.dtype, k_scale), page_scale(v_pages.dtype, v_scale)
    scales = dict(k_scale=k_scale, v_scale=v_scale)
    if isinstance(meta, PackedMetadata):
        return packed_attention(q, k, v, k_pages, v_pages, meta, sm_scale=sm_scale, **scales)
    outs, start = [], 0
    for seg in segments(meta):
        B, Q = seg.positions.shape
        end = start + B * Q
        qs = q[start:end].reshape(B, Q, *q.shape[1:])
        if Q == 1:
            out = decode_attention(qs, k_pages, v_pages, seg, sm_scale=sm_scale, **scales)
        elif not has_context:
            ks, vs = (x[start:end].reshape(B, Q, *x.shape[1:]) for x in (k, v))
            out = prefill_attention_dense(qs, ks, vs, seg.query_lens, sm_scale=sm_scale)
        else:
            out = context_attention(qs, k_pages, v_pages, seg, sm_scale=sm_scale, **scales)
        outs.append(out.reshape(B * Q, *q.shape[1:]))
        start = end
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs)
