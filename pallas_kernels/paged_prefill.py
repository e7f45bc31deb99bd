"""Paged prefill attention (chunks over cached pages): Pallas GPU (Triton lowering) kernel, jitted APIs and references.

Each row brings a chunk of new tokens that attends causally to the row's cached pages and to itself (chunked prefill,
prefix-cache hits, recompute after preemption; a chunk starting at 0 is a plain causal prefill). The new tokens' K/V
are already in the pages (the caller writes them first), so the kernel reads K/V from pages only.

Axis letters: B rows (rectangular layout), R rows (packed layout), Q chunk length (padded), T flat tokens (packed),
N q heads, K kv heads, G = N // K, Gp = G padded to a power of two, H head dim, P pages, maxP block-table width,
BQ tokens per query tile, W query tiles.

Layout contract with the engine (one layer). Two layouts of q share one kernel:

  Rectangular (`paged_prefill_attention`):
    q            [B, Q, N, H]       bfloat16 / float16 / float32
    k_pages      [K, P, page, H]    bfloat16 / float16 / float32 / float8_e5m2 / float8_e4m3fn
    v_pages      [K, P, page, H]
    block_tables [B, maxP] int32    page ids; entries past a row's length are any valid page id
    seq_lens     [B] int32          context after this step (cached + new); 0 marks a padding row
    query_lens   [B] int32          new tokens of the row, at most Q (its first is at position seq_len - query_len)
  Row b's tokens at index >= query_len are padding: their output is 0.

  Packed / ragged (`ragged_paged_prefill_attention`): the rows' new tokens lie back to back on one token axis.
    q            [T, N, H]          as above
    k_pages, v_pages                as above
    block_tables [R, maxP] int32    as above
    seq_lens     [R] int32          as above; 0 marks a padding row
    query_lens   [R] int32          new tokens of the row; 0 for a padding row
    row_starts   [R] int32          row r's tokens are q[row_starts[r] : row_starts[r] + query_lens[r]]; token i of
                                    the row is at position seq_lens[r] - query_lens[r] + i
  Every row_starts[r] of a row with tokens is a multiple of `row_align` (a static power of two); row_starts is
  nondecreasing; rows do not overlap and lie inside [0, T). Padding rows (query_lens 0, seq_lens 0) may start
  anywhere, T included; rows of no tokens are ignored. Tokens of q covered by no row are padding: their output is 0
  (whatever q holds there).

Kernel: grid (K, W). A program takes BQ consecutive tokens x the Gp q heads of one kv head as one [BQ * Gp, H] tile
(row r = token r // Gp, head r % Gp: the wrappers lay q out so). Rows start at multiples of BQ, so a tile holds
tokens of at most one row; the wrapper computes, per tile, (seq_len, query_len, the tile's first token within its
row) and the row's block table (zeros / no pages read for a tile of no row). The program walks the row's pages from
position 0 to the causal end of the tile's last token, `pages_per_block` pages at a time, with an online softmax in
float32 (base-2 exponentials). Pages past the causal end are never read; NaN in them cannot leak. The rectangular
layout runs as a packed one: B * Qp tokens, row b starting at b * Qp (Qp = Q rounded up to BQ).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.paged_attention import (_CompilerParams, _F16_MAX, _LOG2E, _attend_block, _compute_dtype,
                                            _is_pow2, _KV_DTYPES, _Q_DTYPES, masked_softmax)

_TILE_ROWS = 128  # BQ * Gp: q rows per program
_MIN_TILE_ROWS = 16  # Triton's dot needs M >= 16
_BLOCK_TOKENS = 64  # KV tokens per inner step (bf16, head_dim 128: 16 KiB of K)
_META = 4  # per-tile metadata: (seq_len, query_len, first token within the row, unused); 4 keeps it a power of two


def _prefill_kernel(meta_ref, scales_ref, tables_ref, q_ref, k_ref, v_ref, o_ref, *, page_size, pages_per_block,
                    group_pad, block_q, max_len, sm_scale, compute_dtype):
    # meta_ref [4] (seq_len, query_len, first token of the tile within its row, 0), scales_ref [2] (k_scale, v_scale),
    # tables_ref [width] (the tile's row), q_ref / o_ref [BQ * Gp, H], k_ref / v_ref [P, page, H].
    rows, head_dim = q_ref.shape
    block_k = pages_per_block * page_size
    seq_len = jnp.clip(meta_ref[0], 0, max_len)
    q_len = jnp.clip(meta_ref[1], 0, seq_len)
    first_tok = meta_ref[2]
    start = seq_len - q_len  # position of the chunk's first token
    # Causal end of this tile: its last real token sees positions < start + min(first_tok + BQ, q_len).
    kv_end = start + jnp.clip(jnp.minimum(first_tok + block_q, q_len), 0, None)
    num_blocks = jnp.where((first_tok >= 0) & (first_tok < q_len), pl.cdiv(kv_end, block_k), 0)

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
    real = (q_pos[:, 0] < seq_len) & (l > 0.0)  # tokens past the chunk, tiles of no row: output 0
    out = acc * (scales_ref[1] / jnp.where(real, l, 1.0))[:, None]
    o_ref[...] = jnp.where(real[:, None], out, 0.0).astype(o_ref.dtype)


def default_settings(num_q_heads: int, num_kv_heads: int, page_size: int, head_dim: int = 128,
                     kv_dtype=jnp.bfloat16) -> tuple[int, int]:
    """(block_q, pages_per_block): q tokens per program so that a tile has `_TILE_ROWS` rows, and pages per KV step
    (about `_BLOCK_TOKENS` tokens of bf16, twice as many of fp8). The packed layout takes at most `row_align` tokens
    a tile."""
    group_pad = pl.next_power_of_2(num_q_heads // num_kv_heads)
    block_q = max(1, _TILE_ROWS // group_pad)
    tokens = _BLOCK_TOKENS * max(1, 2 // jnp.dtype(kv_dtype).itemsize) * (128 // head_dim)
    return block_q, max(1, tokens // page_size)


def _tile_metadata(block_tables, seq_lens, query_lens, row_starts, *, num_tiles, block_q):
    """Per query tile of `block_q` flat tokens: [W, 4] (seq_len, query_len, first token of the tile within its row, 0)
    and [W, width] its row's block table; all-zero metadata (no page read, output 0) for a tile in no row.

    Rows with tokens start at multiples of block_q, so each marks the tile it starts in; a tile belongs to the latest
    row that started at or before it, if the tile starts inside that row's tokens. Rows of no tokens mark nothing.
    """
    num_rows = row_starts.shape[0]
    tiles = jnp.arange(num_tiles, dtype=jnp.int32)
    live = (query_lens > 0) & (row_starts >= 0)
    first_tile = jnp.where(live, row_starts // block_q, num_tiles)  # num_tiles: out of range, dropped
    starter = jnp.full((num_tiles,), -1, jnp.int32).at[first_tile].max(jnp.arange(num_rows, dtype=jnp.int32),
                                                                         mode="drop")  # row starting at tile w, or -1
    last = lax.cummax(jnp.where(starter >= 0, tiles, -1), axis=0)  # latest tile <= w where a row starts, or -1
    row = jnp.where(last >= 0, starter[jnp.maximum(last, 0)], 0)
    first_tok = tiles * block_q - row_starts[row]
    inside = (last >= 0) & (first_tok >= 0) & (first_tok < query_lens[row])
    meta = jnp.stack([seq_lens[row], query_lens[row], first_tok, jnp.zeros_like(first_tok)], axis=1)
    return jnp.where(inside[:, None], meta, 0), block_tables[row]


def _kernel_call(q, k_pages, v_pages, block_tables, seq_lens, query_lens, row_starts, scales, *, sm_scale, block_q,
                 pages_per_block, num_warps, num_stages, interpret):
    """The kernel over packed q [T, N, H] (rows at multiples of block_q) -> [T, N, H]."""
    T, N, H = q.shape
    K, num_pages, page_size, _ = k_pages.shape
    max_pages = block_tables.shape[1]
    G = N // K
    Gp = pl.next_power_of_2(G)
    W = pl.cdiv(T, block_q)
    Tp = W * block_q
    # q -> [K, Tp * Gp, H]: row t * Gp + g is flat token t, head g of the kv head's group.
    q4 = jnp.pad(q.reshape(T, K, G, H), ((0, Tp - T), (0, 0), (0, Gp - G), (0, 0)))
    qt = q4.transpose(1, 0, 2, 3).reshape(K, Tp * Gp, H)
    # Whole pages-per-block steps never index past the table.
    width = pl.cdiv(max_pages, pages_per_block) * pages_per_block
    if width != max_pages:
        block_tables = jnp.pad(block_tables, ((0, 0), (0, width - max_pages)))
    meta, tables = _tile_metadata(block_tables, seq_lens, query_lens, row_starts, num_tiles=W, block_q=block_q)
    kernel = functools.partial(
        _prefill_kernel, page_size=page_size, pages_per_block=pages_per_block, group_pad=Gp, block_q=block_q,
        max_len=max_pages * page_size, sm_scale=sm_scale, compute_dtype=_compute_dtype(q.dtype, k_pages.dtype))
    tile = block_q * Gp
    kv_spec = pl.BlockSpec((None, num_pages, page_size, H), lambda h, w: (h, 0, 0, 0))
    out = pl.pallas_call(
        kernel,
        grid=(K, W),
        in_specs=[
            pl.BlockSpec((None, _META), lambda h, w: (w, 0)),    # (seq_len, query_len, first token, 0)
            pl.BlockSpec((2,), lambda h, w: (0,)),               # scales
            pl.BlockSpec((None, width), lambda h, w: (w, 0)),    # the tile's row of the block table
            pl.BlockSpec((None, tile, H), lambda h, w: (h, w, 0)),  # q tile
            kv_spec, kv_spec,
        ],
        out_specs=pl.BlockSpec((None, tile, H), lambda h, w: (h, w, 0)),
        out_shape=jax.ShapeDtypeStruct((K, Tp * Gp, H), q.dtype),
        compiler_params=_CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"qwenjax_paged_prefill_p{page_size}_b{pages_per_block}_q{block_q}",
    )(meta, scales, tables, qt, k_pages, v_pages)
    out = out.reshape(K, Tp, Gp, H)[:, :T, :G].transpose(1, 0, 2, 3)
    return out.reshape(T, N, H)


def _validate_pages(q, k_pages, v_pages, pages_per_block):
    """Checks shared by both layouts: q [..., N, H] against the pages, dtypes, pages_per_block."""
    if k_pages.shape != v_pages.shape or k_pages.dtype != v_pages.dtype:
        raise ValueError(f"k_pages and v_pages must match; got {k_pages.shape} {k_pages.dtype} and "
                         f"{v_pages.shape} {v_pages.dtype}")
    N, H = q.shape[-2:]
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
    if pages_per_block is not None and not _is_pow2(pages_per_block):
        raise ValueError(f"pages_per_block must be a power of two; got {pages_per_block}")


def _validate_rows(letter, rows, block_tables, **per_row):
    if block_tables.ndim != 2 or block_tables.shape[0] != rows or block_tables.dtype != jnp.int32:
        raise ValueError(f"block_tables must be int32 [{letter}={rows}, maxP]; got {block_tables.dtype}"
                         f"{block_tables.shape}")
    for name, x in per_row.items():
        if x.shape != (rows,) or x.dtype != jnp.int32:
            raise ValueError(f"{name} must be int32 [{letter}={rows}]; got {x.dtype}{x.shape}")


def _validate(q, k_pages, v_pages, block_tables, seq_lens, query_lens, block_q, pages_per_block):
    if q.ndim != 4 or k_pages.ndim != 4:
        raise ValueError(f"q must be [B, Q, N, H] and k_pages [K, P, page_size, H]; got q{q.shape}, "
                         f"k_pages{k_pages.shape}")
    _validate_pages(q, k_pages, v_pages, pages_per_block)
    _validate_rows("B", q.shape[0], block_tables, seq_lens=seq_lens, query_lens=query_lens)
    if block_q is not None and not _is_pow2(block_q):
        raise ValueError(f"block_q must be a power of two; got {block_q}")


def _validate_ragged(q, k_pages, v_pages, block_tables, seq_lens, query_lens, row_starts, row_align, block_q,
                     pages_per_block):
    if q.ndim != 3 or k_pages.ndim != 4:
        raise ValueError(f"q must be [T, N, H] (packed tokens) and k_pages [K, P, page_size, H]; got q{q.shape}, "
                         f"k_pages{k_pages.shape}")
    _validate_pages(q, k_pages, v_pages, pages_per_block)
    if block_tables.ndim != 2 or block_tables.shape[0] < 1:
        raise ValueError(f"block_tables must be int32 [R, maxP] with at least one row; got {block_tables.dtype}"
                         f"{block_tables.shape}")
    _validate_rows("R", block_tables.shape[0], block_tables, seq_lens=seq_lens, query_lens=query_lens,
                   row_starts=row_starts)
    if not _is_pow2(row_align):
        raise ValueError(f"row_align must be a power of two (int); got {row_align!r}")
    if block_q is not None and not (_is_pow2(block_q) and block_q <= row_align):
        raise ValueError(f"block_q must be a power of two dividing row_align ({row_align}), so that no query tile "
                         f"spans two rows; got {block_q}")


@functools.partial(jax.jit, static_argnames=("sm_scale", "block_q", "pages_per_block", "num_warps", "num_stages",
                                             "interpret"))
def paged_prefill_attention(q, k_pages, v_pages, block_tables, seq_lens, query_lens, *, k_scale=None, v_scale=None,
                            sm_scale=None, block_q=None, pages_per_block=None, num_warps=None, num_stages=None,
                            interpret=False):
    """Causal attention of each row's new chunk over its pages (cached prefix + the chunk itself), rectangular q.

    Args:
        q: [B, Q, N, H] queries of the chunk tokens (row b's token i is at position seq_lens[b] - query_lens[b] + i).
        k_pages, v_pages: [K, P, page_size, H] pages, the chunk's K/V already written.
        block_tables: int32 [B, maxP]; seq_lens, query_lens: int32 [B] (0 / 0: a padding row, output 0;
            query_lens[b] <= Q).
        k_scale, v_scale: per-tensor dequantization scales (fp8 pages); default 1.0.
        sm_scale: softmax scale (static); default 1/sqrt(H).
        block_q, pages_per_block: tile sizes (static powers of two); default `default_settings`.
        num_warps, num_stages: Triton launch settings (static); default 4 and 2.
        interpret: Pallas interpret mode (CPU tests).

    Returns:
        [B, Q, N, H] in q's dtype; 0 at padding tokens.
    """
    _validate(q, k_pages, v_pages, block_tables, seq_lens, query_lens, block_q, pages_per_block)
    B, Q, N, H = q.shape
    K, _, page_size, _ = k_pages.shape
    bq, ppb = default_settings(N, K, page_size, H, k_pages.dtype)
    bq = block_q or bq
    Qp = pl.cdiv(Q, bq) * bq
    # Packed: row b's tokens at b * Qp .. b * Qp + Q - 1 (a multiple of the tile), the rest padding.
    qf = jnp.pad(q, ((0, 0), (0, Qp - Q), (0, 0), (0, 0))).reshape(B * Qp, N, H)
    row_starts = jnp.arange(B, dtype=jnp.int32) * Qp
    out = _kernel_call(qf, k_pages, v_pages, block_tables, seq_lens, query_lens, row_starts, _scales(k_scale, v_scale),
                       sm_scale=float(1.0 / math.sqrt(H) if sm_scale is None else sm_scale), block_q=bq,
                       pages_per_block=pages_per_block or ppb, num_warps=num_warps or 4,
                       num_stages=num_stages or 2, interpret=interpret)
    return out.reshape(B, Qp, N, H)[:, :Q]


@functools.partial(jax.jit, static_argnames=("sm_scale", "row_align", "block_q", "pages_per_block", "num_warps",
                                             "num_stages", "interpret"))
def ragged_paged_prefill_attention(q, k_pages, v_pages, block_tables, seq_lens, query_lens, row_starts, *,
                                   k_scale=None, v_scale=None, sm_scale=None, row_align=16, block_q=None,
                                   pages_per_block=None, num_warps=None, num_stages=None, interpret=False):
    """Causal attention of each row's new tokens over its pages, q packed: the rows' tokens back to back on one axis.

    Args:
        q: [T, N, H] queries; row r's tokens are q[row_starts[r] : row_starts[r] + query_lens[r]], its token i at
            position seq_lens[r] - query_lens[r] + i. Tokens in no row are padding (output 0).
        k_pages, v_pages: [K, P, page_size, H] pages, the rows' new K/V already written.
        block_tables: int32 [R, maxP]; seq_lens, query_lens, row_starts: int32 [R]. row_starts nondecreasing,
            each a multiple of row_align; rows do not overlap. Padding rows: query_lens 0, seq_lens 0, any start
            (T included).
        k_scale, v_scale: per-tensor dequantization scales (fp8 pages); default 1.0.
        sm_scale: softmax scale (static); default 1/sqrt(H).
        row_align: alignment of row_starts (static power of two).
        block_q: tokens per query tile (static power of two dividing row_align); default the smaller of
            row_align and `default_settings`' block_q. block_q * Gp must be at least 16 (Triton's dot).
        pages_per_block: pages per KV step (static power of two); default `default_settings`.
        num_warps, num_stages: Triton launch settings (static); default 4 and 2.
        interpret: Pallas interpret mode (CPU tests).

    Returns:
        [T, N, H] in q's dtype; 0 at padding tokens.
    """
    _validate_ragged(q, k_pages, v_pages, block_tables, seq_lens, query_lens, row_starts, row_align, block_q,
                     pages_per_block)
    T, N, H = q.shape
    K, _, page_size, _ = k_pages.shape
    bq, ppb = default_settings(N, K, page_size, H, k_pages.dtype)
    bq = block_q or min(bq, row_align)
    group_pad = pl.next_power_of_2(N // K)
    if bq * group_pad < _MIN_TILE_ROWS:
        raise ValueError(f"a query tile must have at least {_MIN_TILE_ROWS} rows (Triton's dot): block_q ({bq}, "
                         f"from block_q={block_q}, row_align={row_align}) x padded GQA group ({group_pad}) = "
                         f"{bq * group_pad}; raise row_align / block_q")
    if T == 0:
        return jnp.zeros((0, N, H), q.dtype)
    return _kernel_call(q, k_pages, v_pages, block_tables, seq_lens, query_lens, row_starts,
                        _scales(k_scale, v_scale),
                        sm_scale=float(1.0 / math.sqrt(H) if sm_scale is None else sm_scale), block_q=bq,
                        pages_per_block=pages_per_block or ppb, num_warps=num_warps or 4,
                        num_stages=num_stages or 2, interpret=interpret)


def _scales(k_scale, v_scale):
    return jnp.stack([jnp.asarray(1.0 if k_scale is None else k_scale, jnp.float32).reshape(()),
                      jnp.asarray(1.0 if v_scale is None else v_scale, jnp.float32).reshape(())])


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
    o = jnp.einsum("bkgqc,bkch->bqkgh", masked_softmax(s, visible[:, None, None]), v, precision="highest")
    return o.reshape(B, Q, N, H).astype(q.dtype)


def ragged_paged_prefill_reference(q, k_pages, v_pages, block_tables, seq_lens, query_lens, row_starts, *,
                                   k_scale=1.0, v_scale=1.0, sm_scale=None, piece=None):
    """Plain-jnp packed-layout paged prefill attention in float32: each flat token finds its row (the row whose
    tokens q[row_starts[r] : row_starts[r] + query_lens[r]] hold it), gathers that row's pages and attends causally
    by position; 0 at tokens in no row. piece: tokens at a time (lax.map), so the per-token context gather stays
    [piece, K, C, H] (None: all T at once)."""
    T, N, H = q.shape
    if piece is not None and T > piece:
        W = -(-T // piece)

        def one(args):  # row starts shifted by the piece's first token: membership and positions are unchanged
            qt, first = args
            return ragged_paged_prefill_reference(qt, k_pages, v_pages, block_tables, seq_lens, query_lens,
                                                  row_starts - first, k_scale=k_scale, v_scale=v_scale,
                                                  sm_scale=sm_scale)

        qs = jnp.pad(q, ((0, W * piece - T), (0, 0), (0, 0))).reshape(W, piece, N, H)
        return jax.lax.map(one, (qs, jnp.arange(W, dtype=jnp.int32) * piece)).reshape(W * piece, N, H)[:T]
    K, _, page_size, _ = k_pages.shape
    G = N // K
    sm_scale = 1.0 / math.sqrt(H) if sm_scale is None else sm_scale
    C = block_tables.shape[1] * page_size

    t = jnp.arange(T)[:, None]                                                       # [T, 1]
    member = (t >= row_starts[None, :]) & (t < (row_starts + query_lens)[None, :])    # [T, R]
    has_row = member.any(axis=1)                                                     # [T]
    row = jnp.argmax(member, axis=1)                                                 # [T] (0 if none)
    pos = seq_lens[row] - query_lens[row] + (jnp.arange(T) - row_starts[row])       # [T]
    ctx = jnp.arange(C)[None, :]                                                     # [1, C]
    valid = (ctx < seq_lens[row][:, None]) & has_row[:, None]                        # [T, C] real context
    visible = valid & (ctx <= pos[:, None])                                          # [T, C] causal

    def gather(pages, scale):  # -> [T, K, C, H] float32: each token's row's context
        x = pages[:, block_tables[row]].astype(jnp.float32) * jnp.asarray(scale, jnp.float32)  # [K, T, maxP, page, H]
        x = x.reshape(K, T, C, H).transpose(1, 0, 2, 3)
        return jnp.where(valid[:, None, :, None], x, 0.0)

    k, v = gather(k_pages, k_scale), gather(v_pages, v_scale)
    qf = jnp.where(has_row[:, None, None], q.astype(jnp.float32), 0.0).reshape(T, K, G, H)
    s = jnp.einsum("tkgh,tkch->tkgc", qf, k, precision="highest") * sm_scale
    o = jnp.einsum("tkgc,tkch->tkgh", masked_softmax(s, visible[:, None, None, :]), v, precision="highest")
    o = jnp.where(has_row[:, None, None, None], o, 0.0)
    return o.reshape(T, N, H).astype(q.dtype)
