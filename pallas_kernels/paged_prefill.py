"""Paged prefill attention (chunks over cached pages): Pallas GPU (Triton lowering) kernel, jitted API and reference.

Each row brings a chunk of new tokens that attends causally to the row's cached pages and to itself (chunked prefill,
prefix-cache hits, recompute after preemption; a chunk starting at 0 is a plain causal prefill). The new tokens' K/V
are already in the pages (the caller writes them first), so the kernel reads K/V from pages only.

Axis letters: B rows, Q chunk length (padded), N q heads, K kv heads, G = N // K, Gp = G padded to a power of two,
H head dim, P pages, maxP block-table width, BQ chunk tokens per program.

Layout contract with the engine (one layer):
  q            [B, Q, N, H]       bfloat16 / float16 / float32
  k_pages      [K, P, page, H]    bfloat16 / float16 / float32 / float8_e5m2 / float8_e4m3fn
  v_pages      [K, P, page, H]
  block_tables [B, maxP] int32    page ids; entries past a row's length are any valid page id
  seq_lens     [B] int32          context after this step (cached + new); 0 marks a padding row
  query_lens   [B] int32          new tokens of the row (its first is at position seq_len - query_len)
Rows' tokens at index >= query_len are padding: their output is 0.

Kernel: grid (K, B, Q / BQ). A program takes BQ consecutive chunk tokens x the Gp q heads of one kv head as one
[BQ * Gp, H] tile (row r = token r // Gp, head r % Gp: the wrapper lays q out so), and walks the row's pages from
position 0 to the causal end of its last token, `pages_per_block` pages at a time, with an online softmax in float32
(base-2 exponentials). Pages past the causal end are never read; NaN in them cannot leak.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.paged_attention import (_CompilerParams, _F16_MAX, _LOG2E, _attend_block, _compute_dtype,
                                            _is_pow2, _KV_DTYPES, _Q_DTYPES)

_TILE_ROWS = 128  # BQ * Gp: q rows per program
_BLOCK_TOKENS = 64  # KV tokens per inner step (bf16, head_dim 128: 16 KiB of K)


def _prefill_kernel(lens_ref, scales_ref, tables_ref, q_ref, k_ref, v_ref, o_ref, *, page_size, pages_per_block,
                    group_pad, block_q, max_len, sm_scale, compute_dtype):
    # lens_ref [2] (seq_len, query_len), scales_ref [2] (k_scale, v_scale), tables_ref [maxP],
    # q_ref / o_ref [BQ * Gp, H], k_ref / v_ref [P, page, H].
    rows, head_dim = q_ref.shape
    block_k = pages_per_block * page_size
    seq_len = jnp.clip(lens_ref[0], 0, max_len)
    q_len = jnp.clip(lens_ref[1], 0, seq_len)
    start = seq_len - q_len  # position of the chunk's first token
    first_tok = pl.program_id(2) * block_q
    # Causal end of this block: its last real token sees positions < start + min(first_tok + BQ, q_len).
    kv_end = start + jnp.clip(jnp.minimum(first_tok + block_q, q_len), 0, None)
    num_blocks = jnp.where(first_tok < q_len, pl.cdiv(kv_end, block_k), 0)

    q = q_ref[...]
    if compute_dtype == jnp.float16 and q.dtype != jnp.float16:
        q = jnp.clip(q.astype(jnp.float32), -_F16_MAX, _F16_MAX)
    q = q.astype(compute_dtype)
    qk_scale = scales_ref[0] * (sm_scale * _LOG2E)
    q_pos = start + first_tok + lax.div(lax.broadcasted_iota(jnp.int32, (rows, 1), 0), group_pad)  # [rows, 1]
    tok_kv = lax.broadcasted_iota(jnp.int32, (block_k, head_dim), 0)
    page_of_tok = lax.div(lax.broadcasted_iota(jnp.int32, (block_k, 1), 0), page_size)
    tok_s = lax.broadcasted_iota(jnp.int32, (rows, block_k), 1)

    def body(i, carry):
        base = i * block_k
        pages = tables_ref[page_of_tok + i * pages_per_block]  # [block_k, 1]
        # Causal (and so < seq_len for real tokens).
        return _attend_block(carry, q, k_ref, v_ref, pages, tok_kv + base < kv_end, tok_s + base <= q_pos, qk_scale,
                             compute_dtype)

    init = (jnp.zeros((rows, head_dim), jnp.float32),
            jnp.full((rows,), -jnp.inf, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    acc, m, l = lax.fori_loop(0, num_blocks, body, init)
    real = (q_pos[:, 0] < seq_len) & (l > 0.0)  # padding tokens (past the chunk) output 0
    out = acc * (scales_ref[1] / jnp.where(real, l, 1.0))[:, None]
    o_ref[...] = jnp.where(real[:, None], out, 0.0).astype(o_ref.dtype)


def default_settings(num_q_heads: int, num_kv_heads: int, page_size: int, head_dim: int = 128,
                     kv_dtype=jnp.bfloat16) -> tuple[int, int]:
    """(block_q, pages_per_block): q tokens per program so that a tile has `_TILE_ROWS` rows, and pages per KV step
    (about `_BLOCK_TOKENS` tokens of bf16, twice as many of fp8)."""
    group_pad = pl.next_power_of_2(num_q_heads // num_kv_heads)
    block_q = max(1, _TILE_ROWS // group_pad)
    tokens = _BLOCK_TOKENS * max(1, 2 // jnp.dtype(kv_dtype).itemsize) * (128 // head_dim)
    return block_q, max(1, tokens // page_size)


def _kernel_call(q, k_pages, v_pages, block_tables, seq_lens, query_lens, scales, *, sm_scale, block_q,
                 pages_per_block, num_warps, num_stages, interpret):
    B, Q, N, H = q.shape
    K, num_pages, page_size, _ = k_pages.shape
    max_pages = block_tables.shape[1]
    G = N // K
    Gp = pl.next_power_of_2(G)
    Qp = pl.cdiv(Q, block_q) * block_q
    # q -> [B, K, Qp * Gp, H]: row t * Gp + g is chunk token t, head g of the kv head's group.
    q5 = q.reshape(B, Q, K, G, H)
    q5 = jnp.pad(q5, ((0, 0), (0, Qp - Q), (0, 0), (0, Gp - G), (0, 0)))
    qt = q5.transpose(0, 2, 1, 3, 4).reshape(B, K, Qp * Gp, H)
    # Whole pages-per-block steps never index past the table.
    width = pl.cdiv(max_pages, pages_per_block) * pages_per_block
    if width != max_pages:
        block_tables = jnp.pad(block_tables, ((0, 0), (0, width - max_pages)))
    lens = jnp.stack([seq_lens, query_lens], axis=1)  # [B, 2]
    kernel = functools.partial(
        _prefill_kernel, page_size=page_size, pages_per_block=pages_per_block, group_pad=Gp, block_q=block_q,
        max_len=max_pages * page_size, sm_scale=sm_scale, compute_dtype=_compute_dtype(q.dtype, k_pages.dtype))
    tile = block_q * Gp
    kv_spec = pl.BlockSpec((None, num_pages, page_size, H), lambda h, b, j: (h, 0, 0, 0))
    out = pl.pallas_call(
        kernel,
        grid=(K, B, Qp // block_q),
        in_specs=[
            pl.BlockSpec((None, 2), lambda h, b, j: (b, 0)),              # (seq_len, query_len)
            pl.BlockSpec((2,), lambda h, b, j: (0,)),                     # scales
            pl.BlockSpec((None, width), lambda h, b, j: (b, 0)),          # block table
            pl.BlockSpec((None, None, tile, H), lambda h, b, j: (b, h, j, 0)),  # q tile
            kv_spec, kv_spec,
        ],
        out_specs=pl.BlockSpec((None, None, tile, H), lambda h, b, j: (b, h, j, 0)),
        out_shape=jax.ShapeDtypeStruct((B, K, Qp * Gp, H), q.dtype),
        compiler_params=_CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"qwenjax_paged_prefill_p{page_size}_b{pages_per_block}_q{block_q}",
    )(lens, scales, block_tables, qt, k_pages, v_pages)
    out = out.reshape(B, K, Qp, Gp, H)[:, :, :Q, :G].transpose(0, 2, 1, 3, 4)
    return out.reshape(B, Q, N, H)


def _validate(q, k_pages, v_pages, block_tables, seq_lens, query_lens, block_q, pages_per_block):
    if q.ndim != 4 or k_pages.ndim != 4:
        raise ValueError(f"q must be [B, Q, N, H] and k_pages [K, P, page_size, H]; got q{q.shape}, "
                         f"k_pages{k_pages.shape}")
    if k_pages.shape != v_pages.shape or k_pages.dtype != v_pages.dtype:
        raise ValueError(f"k_pages and v_pages must match; got {k_pages.shape} {k_pages.dtype} and "
                         f"{v_pages.shape} {v_pages.dtype}")
    B, _, N, H = q.shape
    K, _, page_size, kv_h = k_pages.shape
    if N % K or not 1 <= N // K <= 8:
        raise ValueError(f"q heads ({N}) must be a multiple of kv heads ({K}) with a GQA ratio in 1..8")
    if kv_h != H or H not in (64, 128):
        raise ValueError(f"head_dim must be 64 or 128 and equal in q and pages; got q {H}, pages {kv_h}")
    if not _is_pow2(page_size) or not 16 <= page_size <= 128:
        raise ValueError(f"page_size must be a power of two in 16..128; got {page_size}")
    if q.dtype not in _Q_DTYPES:
        raise ValueError(f"q dtype must be bfloat16, float16 or float32; got {q.dtype}")
    if k_pages.dtype not in _KV_DTYPES:
        raise ValueError("KV page dtype must be bfloat16, float16, float32, float8_e5m2 or float8_e4m3fn; got "
                         f"{k_pages.dtype}")
    if block_tables.ndim != 2 or block_tables.shape[0] != B or block_tables.dtype != jnp.int32:
        raise ValueError(f"block_tables must be int32 [B={B}, maxP]; got {block_tables.dtype}{block_tables.shape}")
    for name, x in (("seq_lens", seq_lens), ("query_lens", query_lens)):
        if x.shape != (B,) or x.dtype != jnp.int32:
            raise ValueError(f"{name} must be int32 [B={B}]; got {x.dtype}{x.shape}")
    if block_q is not None and not _is_pow2(block_q):
        raise ValueError(f"block_q must be a power of two; got {block_q}")
    if pages_per_block is not None and not _is_pow2(pages_per_block):
        raise ValueError(f"pages_per_block must be a power of two; got {pages_per_block}")


@functools.partial(jax.jit, static_argnames=("sm_scale", "block_q", "pages_per_block", "num_warps", "num_stages",
                                             "interpret"))
def paged_prefill_attention(q, k_pages, v_pages, block_tables, seq_lens, query_lens, *, k_scale=None, v_scale=None,
                            sm_scale=None, block_q=None, pages_per_block=None, num_warps=None, num_stages=None,
                            interpret=False):
    """Causal attention of each row's new chunk over its pages (cached prefix + the chunk itself).

    Args:
        q: [B, Q, N, H] queries of the chunk tokens (row b's token i is at position seq_lens[b] - query_lens[b] + i).
        k_pages, v_pages: [K, P, page_size, H] pages, the chunk's K/V already written.
        block_tables: int32 [B, maxP]; seq_lens, query_lens: int32 [B] (0 / 0: a padding row, output 0).
        k_scale, v_scale: per-tensor dequantization scales (fp8 pages); default 1.0.
        sm_scale: softmax scale (static); default 1/sqrt(H).
        block_q, pages_per_block: tile sizes (static powers of two); default `default_settings`.
        num_warps, num_stages: Triton launch settings (static); default 4 and 2.
        interpret: Pallas interpret mode (CPU tests).

    Returns:
        [B, Q, N, H] in q's dtype; 0 at padding tokens.
    """
    _validate(q, k_pages, v_pages, block_tables, seq_lens, query_lens, block_q, pages_per_block)
    _, _, N, H = q.shape
    K, _, page_size, _ = k_pages.shape
    bq, ppb = default_settings(N, K, page_size, H, k_pages.dtype)
    scales = jnp.stack([jnp.asarray(1.0 if k_scale is None else k_scale, jnp.float32).reshape(()),
                        jnp.asarray(1.0 if v_scale is None else v_scale, jnp.float32).reshape(())])
    return _kernel_call(q, k_pages, v_pages, block_tables, seq_lens, query_lens, scales,
                        sm_scale=float(1.0 / math.sqrt(H) if sm_scale is None else sm_scale),
                        block_q=block_q or bq, pages_per_block=pages_per_block or ppb,
                        num_warps=num_warps or 4, num_stages=num_stages or 2, interpret=interpret)


def paged_prefill_reference(q, k_pages, v_pages, block_tables, seq_lens, query_lens, *, k_scale=1.0, v_scale=1.0,
                            sm_scale=None):
    """Plain-jnp paged prefill attention in float32 (gathers every page of the block table); 0 at padding tokens."""
    B, Q, N, H = q.shape
    K, _, page_size, _ = k_pages.shape
    G = N // K
    sm_scale = 1.0 / math.sqrt(H) if sm_scale is None else sm_scale
    C = block_tables.shape[1] * page_size

    def gather(pages, scale):  # -> [B, K, C, H] float32
        x = pages[:, block_tables].astype(jnp.float32) * jnp.asarray(scale, jnp.float32)
        return x.reshape(K, B, C, H).transpose(1, 0, 2, 3)

    pos = (seq_lens - query_lens)[:, None] + jnp.arange(Q)[None, :]              # [B, Q]
    real = jnp.arange(Q)[None, :] < query_lens[:, None]                           # [B, Q]
    visible = (jnp.arange(C)[None, None, :] <= pos[:, :, None]) & real[:, :, None]  # [B, Q, C]
    k = jnp.where((jnp.arange(C) < seq_lens[:, None])[:, None, :, None], gather(k_pages, k_scale), 0.0)
    v = jnp.where((jnp.arange(C) < seq_lens[:, None])[:, None, :, None], gather(v_pages, v_scale), 0.0)
    qf = q.astype(jnp.float32).reshape(B, Q, K, G, H)
    s = jnp.einsum("bqkgh,bkch->bkgqc", qf, k, precision="highest") * sm_scale
    s = jnp.where(visible[:, None, None], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
    den = p.sum(axis=-1, keepdims=True)
    o = jnp.einsum("bkgqc,bkch->bqkgh", p / jnp.where(den == 0.0, 1.0, den), v, precision="highest")
    return o.reshape(B, Q, N, H).astype(q.dtype)
