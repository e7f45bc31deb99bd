"""Paged attention of a few new tokens a row (a speculative verify step's k + 1): the decode kernel's grid and GQA
tile, widened to the row's Q tokens. Pallas GPU (Triton lowering) kernel and jitted API.

Axis letters: S rows, Q new tokens a row, N q heads, K kv heads, G = N // K, H head dim, P pages, maxP block-table
width, C KV splits, R tile rows = max(16, next power of two of Q * G).

Contract (the layout of `paged_prefill.paged_prefill_attention`, for small Q):
  q            [S, Q, N, H]       bfloat16 / float16 / float32
  k_pages      [K, P, page, H]    bfloat16 / float16 / float32 / float8_e5m2 / float8_e4m3fn (fp8: stored * scale)
  v_pages      [K, P, page, H]
  block_tables [S, maxP] int32    page ids; entries past a row's length are any valid page id
  seq_lens     [S] int32          context after this step (cached + new); 0 marks a padding row
  query_lens   [S] int32          new tokens of the row (<= Q), whose K/V are already in the pages: token i of the
                                  row sits at position seq_lens - query_lens + i and sees the context up to itself
  out          [S, Q, N, H]       q's dtype; 0 at tokens i >= query_lens and in padding rows

Why not the prefill kernels: they give each q head (Hopper) or each 64-token tile of a row its own program, so a row
of Q = 2..9 tokens reads its context once per q head, or computes a 64-row tile for a few real rows. Here, as in
decode (`paged_attention.py`), a program takes one kv head of one row and one split of its context, and its tile
holds every (token, q head) pair of that kv head, row r = i * G + g: the context is read once per kv head, and the
Q tokens ride that read. Causality is a per-row bound on the key position (token i sees keys < seq_len - query_len
+ i + 1), a prefix of the context, so a block past a row's bound adds exp2(_MASK - m) == 0 to it; a split the row
sees nothing of has a log-sum-exp near _MASK, weight 0 in the merge (token 0 of the context, in split 0, is visible
to every real token).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.paged_attention import (_F16_MAX, _GROUP_ROWS, _LOG2E, _CompilerParams, _attend_block,
                                            _combine_splits, _compute_dtype, _validate, default_num_stages,
                                            default_settings, split_pages)

MAX_TILE_ROWS = 64  # Q * G per kv head at most: beyond it a prefill kernel's query tiles are the better fit


def tile_rows(num_q: int, group: int) -> int:
    """Rows of a program's q tile: every (token, q head) pair of one kv head, padded to a power of two >= 16."""
    return max(_GROUP_ROWS, pl.next_power_of_2(num_q * group))


def supported(num_q: int, group: int) -> bool:
    """Whether this kernel takes Q tokens a row with a GQA group of G (else a prefill kernel does)."""
    return tile_rows(num_q, group) <= MAX_TILE_ROWS


def _kernel(lengths_ref, qlens_ref, scales_ref, tables_ref, q_ref, k_ref, v_ref, *out_refs, page_size,
            pages_per_block, num_splits, max_len, sm_scale, compute_dtype, group, num_q, rows):
    # lengths_ref / qlens_ref [1]; scales_ref [2]; tables_ref [W] (the row's table); q_ref [Q, N, H] (the row's);
    # k_ref / v_ref [P, page, H]; out_refs: o [R, H] (this program's tile, in q's dtype), or, split, o [R, H] and
    # lse [R] in float32. Whole tiles, not masked stores into [S, Q, N, H]: the tile's rows past Q * G would alias
    # real (token, head) pairs, and the caller's reshape to [S, Q, N, H] is one small XLA transpose.
    head_dim = q_ref.shape[-1]
    block_k = pages_per_block * page_size
    length = jnp.clip(lengths_ref[0], 0, max_len)
    qlen = jnp.clip(qlens_ref[0], 0, jnp.minimum(num_q, length))
    row_pages = pl.cdiv(length, page_size)
    per_split = split_pages(row_pages, num_splits, pages_per_block)
    first_page = pl.program_id(2) * per_split
    num_pages = jnp.minimum(row_pages - first_page, per_split)
    num_blocks = pl.cdiv(jnp.maximum(num_pages, 0), pages_per_block)

    r = lax.broadcasted_iota(jnp.int32, (rows, 1), 0)
    token = lax.div(r, group)                                     # [R, 1] the row's token i
    real = token < qlen                                           # rows past Q * G have token >= Q >= qlen
    token = jnp.minimum(token, num_q - 1)
    head = pl.program_id(0) * group + lax.rem(r, group)           # [R, 1] q head
    dim = lax.broadcasted_iota(jnp.int32, (1, head_dim), 1)
    in_tile = jnp.broadcast_to(real, (rows, head_dim))
    q = plgpu.load(q_ref.at[token, head, dim], mask=in_tile, other=jnp.zeros((), q_ref.dtype))
    if compute_dtype == jnp.float16 and q.dtype != jnp.float16:
        q = jnp.clip(q.astype(jnp.float32), -_F16_MAX, _F16_MAX)
    q = q.astype(compute_dtype)
    qk_scale = scales_ref[0] * (sm_scale * _LOG2E)
    bound = jnp.where(real, length - qlen + 1 + token, 0)         # [R, 1] keys below it are visible
    tok_kv = lax.broadcasted_iota(jnp.int32, (block_k, head_dim), 0)
    page_of_tok = lax.div(lax.broadcasted_iota(jnp.int32, (block_k, 1), 0), page_size)
    tok_s = lax.broadcasted_iota(jnp.int32, (rows, block_k), 1)

    def body(i, carry):
        start = (first_page + i * pages_per_block) * page_size
        pages = tables_ref[page_of_tok + first_page + i * pages_per_block]
        return _attend_block(carry, q, k_ref, v_ref, pages, tok_kv + start < length, tok_s + start < bound,
                             qk_scale, compute_dtype)

    init = (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), -jnp.inf, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    acc, m, l = lax.fori_loop(0, num_blocks, body, init)
    keep = real[:, 0] & (l > 0.0)
    l_safe = jnp.where(keep, l, 1.0)
    out = jnp.where(keep[:, None], acc * (scales_ref[1] / l_safe)[:, None], 0.0)
    if len(out_refs) == 1:
        o_ref = out_refs[0]
        o_ref[...] = out.astype(o_ref.dtype)
    else:
        o_ref, lse_ref = out_refs
        o_ref[...] = out
        lse_ref[...] = jnp.where(keep, m + jnp.log2(l_safe), -jnp.inf)


def _kernel_call(q, k_pages, v_pages, block_tables, seq_lens, query_lens, scales, *, sm_scale, pages_per_block,
                 num_splits, num_warps, num_stages, interpret):
    S, Q, N, H = q.shape
    K, P, page_size, _ = k_pages.shape
    G = N // K
    R = tile_rows(Q, G)
    max_pages = block_tables.shape[1]
    per_split = pl.cdiv(pl.cdiv(max_pages, num_splits), pages_per_block) * pages_per_block
    num_splits = pl.cdiv(max_pages, per_split)
    width = pl.cdiv(max_pages, pages_per_block) * pages_per_block
    if width != max_pages:  # padding entries are never dereferenced (their tokens are >= length)
        block_tables = jnp.pad(block_tables, ((0, 0), (0, width - max_pages)))
    kernel = functools.partial(
        _kernel, page_size=page_size, pages_per_block=pages_per_block, num_splits=num_splits,
        max_len=max_pages * page_size, sm_scale=sm_scale, compute_dtype=_compute_dtype(q.dtype, k_pages.dtype),
        group=G, num_q=Q, rows=R)
    kv_spec = pl.BlockSpec((None, P, page_size, H), lambda h, s, c: (h, 0, 0, 0))
    row_q = pl.BlockSpec((None, Q, N, H), lambda h, s, c: (s, 0, 0, 0))  # the row's q; the kernel picks its heads
    in_specs = [pl.BlockSpec((1,), lambda h, s, c: (s,)), pl.BlockSpec((1,), lambda h, s, c: (s,)),
                pl.BlockSpec((2,), lambda h, s, c: (0,)), pl.BlockSpec((None, width), lambda h, s, c: (s, 0)),
                row_q, kv_spec, kv_spec]
    out_dtype = q.dtype if num_splits == 1 else jnp.float32
    out_shape = [jax.ShapeDtypeStruct((num_splits, S, K, R, H), out_dtype)]
    out_specs = [pl.BlockSpec((None, None, None, R, H), lambda h, s, c: (c, s, h, 0, 0))]
    if num_splits > 1:
        out_shape.append(jax.ShapeDtypeStruct((num_splits, S, K, R), jnp.float32))
        out_specs.append(pl.BlockSpec((None, None, None, R), lambda h, s, c: (c, s, h, 0)))
    outs = pl.pallas_call(
        kernel, grid=(K, S, num_splits), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        compiler_params=_CompilerParams(num_warps=num_warps, num_stages=num_stages), interpret=interpret,
        name=f"qwenjax_paged_verify_q{Q}_p{page_size}_b{pages_per_block}_c{num_splits}",
    )(seq_lens, query_lens, scales, block_tables, q, k_pages, v_pages)
    if num_splits == 1:
        out = outs[0][0, :, :, :Q * G]                                          # [S, K, Q * G, H]
    else:
        o_part, lse = outs  # [C, S, K, R, H]: rows past Q * G dropped before the merge
        out = _combine_splits(o_part[..., :Q * G, :], lse[..., :Q * G])        # [S, K, Q * G, H]
    return out.reshape(S, K, Q, G, H).transpose(0, 2, 1, 3, 4).reshape(S, Q, N, H).astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("sm_scale", "pages_per_compute_block", "num_splits", "num_warps",
                                             "num_stages", "interpret"))
def paged_verify_attention(q, k_pages, v_pages, block_tables, seq_lens, query_lens, *, k_scale=None, v_scale=None,
                           sm_scale=None, pages_per_compute_block=None, num_splits=None, num_warps=None,
                           num_stages=None, interpret=False):
    """Attention of Q new tokens a row over a paged KV cache (the module contract), for Q * G <= MAX_TILE_ROWS.

    Args: as `paged_attention.paged_attention`, with q [S, Q, N, H] and `query_lens` [S] int32 the row's real
    tokens. Settings default as decode's for S * Q rows (the same bytes a program streams, Q times the rows).
    """
    S, Q, N, H = q.shape
    _validate(q[:, 0], k_pages, v_pages, block_tables, seq_lens, pages_per_compute_block, num_splits)
    if query_lens.shape != (S,) or query_lens.dtype != jnp.int32:
        raise ValueError(f"query_lens must be int32 [S={S}]; got {query_lens.dtype}{query_lens.shape}")
    G = N // k_pages.shape[0]
    if not supported(Q, G):
        raise ValueError(f"Q={Q} tokens x GQA group {G} = {Q * G} rows a kv head; this kernel takes at most "
                         f"{MAX_TILE_ROWS} (use paged_prefill_attention)")
    ppcb, splits = default_settings(S, k_pages.shape[0], block_tables.shape[1], k_pages.shape[2], H, k_pages.dtype)
    scales = jnp.stack([jnp.asarray(1.0 if s is None else s, jnp.float32).reshape(()) for s in (k_scale, v_scale)])
    return _kernel_call(
        q, k_pages, v_pages, block_tables, seq_lens, query_lens, scales,
        sm_scale=float(1.0 / math.sqrt(H) if sm_scale is None else sm_scale),
        pages_per_block=pages_per_compute_block or ppcb, num_splits=num_splits or splits,
        num_warps=num_warps or 4, num_stages=num_stages or default_num_stages(k_pages.dtype), interpret=interpret)
