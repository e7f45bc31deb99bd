"""Paged decode attention: Pallas GPU (Triton lowering) kernel, jitted API and jnp reference.

Axis letters: S sequences, N q heads, K kv heads, G = N // K q heads per kv head (GQA group), H head dim,
P pages in the cache, maxP block-table width, C KV splits (flash-decoding).

Layout contract with the engine (one layer):
  q            [S, N, H]          bfloat16 / float16 (float32 allowed, slow path)
  k_pages      [K, P, page, H]    bfloat16 / float16 / float32 / float8_e5m2 / float8_e4m3fn
  v_pages      [K, P, page, H]    same shape and dtype as k_pages
  block_tables [S, maxP] int32    page ids; entries past a row's length are any valid page id
  lengths      [S] int32          context tokens incl. the current one; 0 marks a padding row (output 0)
fp8 pages hold values directly; true value = stored * scale (per-tensor float32 k_scale / v_scale).

Kernel: grid (K, S, C). A program takes the G q heads of one kv head as a tile of 16 rows (the smallest
Triton dot): rows G..15 are masked off when q is loaded (read as 0) and when the output is stored, so q and the
output stay [S, N, H] in memory with no pad or slice around the call (each of those was a kernel of its own in a
batch-1 decode step). It walks its share of the sequence's pages (split c of C takes the c-th slice of the row's own
length, so a short row in a wide table still spreads over the splits) `pages_per_compute_block` pages at a time with an
online softmax in float32 (base-2 exponentials), and either writes the normalized output (C == 1) or a
float32 partial plus its log-sum-exp, merged by `_combine_splits` in plain jnp.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# --- jax version differences live here only. ------------------------------------------------------
# Older jax releases named the Triton params `TritonCompilerParams` and had the dot only as `pl.dot`;
# jax 0.10 / 0.11 (CPU tests, GPU image) have `plgpu.CompilerParams` and `plgpu.dot`.
_CompilerParams = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
_dot = getattr(plgpu, "dot", None) or pl.dot
# ---------------------------------------------------------------------------------------------------

_LOG2E = math.log2(math.e)
_MASK = -1e30  # finite: keeps exp2(m_prev - m_next) a number when a block is fully masked
_GROUP_ROWS = 16  # rows of the q tile; Triton's dot needs M >= 16
# Defaults, from sweeps on an H100 (batch 64, 28/4 heads, dim 128, page 16; benchmarks/attention_decode.py):
_BLOCK_BYTES = 16384  # K bytes per compute block: bf16 best at 64 tokens, fp8 at 128 (both beat half and double)
_MAX_BLOCK_TOKENS = 128
_TARGET_PROGRAMS = 512  # K * S * C: at 256 (s, kv head) pairs, 2 splits beat 1, 4, 8, 16 at contexts 4k, 8k, 512..8k
# fp8 pages: half that. At 256 pairs and context 8k, 1 split beat 2 and 4 (226 / 229 / 236 us, 2 stages), and 4
# pipeline stages beat 2 and 3 (221.5 / 226.2 / 222.5 us, 1 split); bf16 pages: 2 stages (3 and 4 within 0.7%).
_TARGET_PROGRAMS_FP8 = 256
_NUM_STAGES, _NUM_STAGES_FP8 = 2, 4
_MIN_BLOCKS_PER_SPLIT = 2  # a split shorter than this costs more in the combine than it saves
# Block tables of at most this many blocks run in one pass: at batch 1 the split's combine (three XLA kernels, ~4.8 us
# a layer on an H100 at b004b55) cost more than the 2-split kernel itself (2.15 us) at a 256-token context.
_SINGLE_PASS_BLOCKS = 8
_F16_MAX = 65504.0

_Q_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
_KV_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32, jnp.float8_e5m2, jnp.float8_e4m3fn)
_FP8_DTYPES = (jnp.float8_e5m2, jnp.float8_e4m3fn)


def _compute_dtype(q_dtype, kv_dtype):
    """dtype of the dot inputs.

    f32 if either side is f32; f16 for fp8 pages (both fp8 formats convert to f16 exactly and cheaply, and f16 keeps
    more of q and of the probabilities than bf16; q is clamped to the f16 range); else the pages' dtype when they
    match q, and bf16 when f16 q meets bf16 pages (bf16 keeps the range of the cache).
    """
    if jnp.float32 in (q_dtype, kv_dtype):
        return jnp.dtype(jnp.float32)
    if kv_dtype in _FP8_DTYPES:
        return jnp.dtype(jnp.float16)
    return jnp.dtype(q_dtype if kv_dtype == q_dtype else jnp.bfloat16)


def _load_pages(ref, pages, mask):
    """Gathers a [B, H] block of tokens from ref [P, page, H]; pages [B, 1] holds each token's page id.

    Token b of the block sits in slot b % page of its page. Integer-array indices throughout: Pallas
    interpret mode cannot mix an array index with slices in a masked load, and Triton sees the same
    pointer arithmetic either way. Masked lanes read as 0 and cost no bandwidth.
    """
    _, page_size, head_dim = ref.shape
    block_k = pages.shape[0]
    slot = lax.rem(lax.broadcasted_iota(jnp.int32, (block_k, 1), 0), page_size)
    dim = lax.broadcasted_iota(jnp.int32, (1, head_dim), 1)
    return plgpu.load(ref.at[pages, slot, dim], mask=mask, other=jnp.zeros((), ref.dtype))


def _decode_kernel(lengths_ref, scales_ref, tables_ref, q_ref, k_ref, v_ref, *out_refs,
                   page_size, pages_per_block, num_splits, max_len, sm_scale, compute_dtype, group):
    # lengths_ref [1], scales_ref [2] (k_scale, v_scale), tables_ref [W] (the row's whole table, padded to a multiple
    # of pages_per_block), q_ref [S, N, H] (all of it), k_ref / v_ref [P, page, H]; out_refs: o [S, N, H] (all of
    # it), or, split, o [16, H] and lse [16] (this program's tile, rows past `group` unused).
    rows, head_dim = _GROUP_ROWS, q_ref.shape[-1]
    block_k = pages_per_block * page_size
    length = jnp.clip(lengths_ref[0], 0, max_len)  # clamp: never index past the block table
    # Split-K over the row's own context, not over the table's width: a row of 8k tokens in a table sized for 128k
    # spreads over all C splits instead of the first 1/16 of them. Each split takes a whole number of compute blocks
    # (a block never reaches into the next split's pages), at least _MIN_BLOCKS_PER_SPLIT of them (the combine's
    # cost), so short rows use fewer splits; the rest get no pages (output 0, lse -inf: dropped by the merge).
    row_pages = pl.cdiv(length, page_size)
    per_split = split_pages(row_pages, num_splits, pages_per_block)
    first_page = pl.program_id(2) * per_split
    num_pages = jnp.minimum(row_pages - first_page, per_split)
    num_blocks = pl.cdiv(jnp.maximum(num_pages, 0), pages_per_block)

    # This kv head's q rows: group h * G .. h * G + G - 1 of sequence s; the tile's other rows are masked (the
    # last kv head's tile reaches past N: masked lanes are never read or written).
    heads = pl.ds(pl.program_id(0) * group, rows)
    in_group = lax.broadcasted_iota(jnp.int32, (rows, head_dim), 0) < group
    q = plgpu.load(q_ref.at[pl.program_id(1), heads, :], mask=in_group, other=jnp.zeros((), q_ref.dtype))
    if compute_dtype == jnp.float16 and q.dtype != jnp.float16:
        q = jnp.clip(q.astype(jnp.float32), -_F16_MAX, _F16_MAX)
    q = q.astype(compute_dtype)
    qk_scale = scales_ref[0] * (sm_scale * _LOG2E)
    tok_kv = lax.broadcasted_iota(jnp.int32, (block_k, head_dim), 0)  # token of the block, per element
    page_of_tok = lax.div(lax.broadcasted_iota(jnp.int32, (block_k, 1), 0), page_size)
    tok_s = lax.broadcasted_iota(jnp.int32, (rows, block_k), 1)

    def body(i, carry):
        start = (first_page + i * pages_per_block) * page_size
        pages = tables_ref[page_of_tok + first_page + i * pages_per_block]  # [block_k, 1]
        return _attend_block(carry, q, k_ref, v_ref, pages, tok_kv + start < length, tok_s + start < length,
                             qk_scale, compute_dtype)

    init = (jnp.zeros((rows, head_dim), jnp.float32),
            jnp.full((rows,), -jnp.inf, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    acc, m, l = lax.fori_loop(0, num_blocks, body, init)
    l_safe = jnp.where(l == 0.0, 1.0, l)  # empty split or padding row: output 0, lse -inf
    out = acc * (scales_ref[1] / l_safe)[:, None]
    if len(out_refs) == 1:
        o_ref = out_refs[0]
        plgpu.store(o_ref.at[pl.program_id(1), heads, :], out.astype(o_ref.dtype), mask=in_group)
    else:
        o_ref, lse_ref = out_refs
        o_ref[...] = out
        lse_ref[...] = jnp.where(l == 0.0, -jnp.inf, m + jnp.log2(l_safe))


def split_pages(row_pages, num_splits: int, pages_per_block: int):
    """Pages each of the `num_splits` splits of a row of `row_pages` pages takes (the last may take fewer, later ones
    none): an even share rounded up to whole compute blocks, at least _MIN_BLOCKS_PER_SPLIT blocks. Traced in the
    kernel; plain ints work too (tests)."""
    share = pl.cdiv(pl.cdiv(row_pages, num_splits), pages_per_block) * pages_per_block
    return jnp.maximum(share, _MIN_BLOCKS_PER_SPLIT * pages_per_block)


def _attend_block(carry, q, k_ref, v_ref, pages, kv_mask, visible, qk_scale, compute_dtype):
    """One block of the online softmax (base-2): carry (acc [rows, H], m [rows], l [rows]) updated with the block's
    tokens. pages [block_k, 1]: each token's page; kv_mask [block_k, H]: tokens to read (slots past it may hold
    garbage, NaN included: they are never loaded, and the zeros loaded instead keep p * v finite where p == 0);
    visible [rows, block_k]: which tokens each q row may attend to."""
    acc, m_prev, l_prev = carry
    k = _load_pages(k_ref, pages, kv_mask).astype(compute_dtype)
    s = _dot(q, k, trans_b=True) * qk_scale  # [rows, block_k] f32, log2 units
    s = jnp.where(visible, s, _MASK)
    m_next = jnp.maximum(m_prev, s.max(axis=1))
    alpha = jnp.exp2(m_prev - m_next)
    p = jnp.exp2(s - m_next[:, None])
    l_next = l_prev * alpha + p.sum(axis=1)
    v = _load_pages(v_ref, pages, kv_mask).astype(compute_dtype)
    acc = acc * alpha[:, None] + _dot(p.astype(compute_dtype), v)
    return acc, m_next, l_next


def _combine_splits(o_part, lse):
    """Merges C partial outputs [C, ...rows, H] (each normalized) by their base-2 log-sum-exp [C, ...rows]."""
    top = lse.max(axis=0)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    w = jnp.exp2(lse - top)  # exp2(-inf) == 0 for empty splits
    den = w.sum(axis=0)
    num = (o_part * w[..., None]).sum(axis=0)
    return num / jnp.where(den == 0.0, 1.0, den)[..., None]


def default_settings(batch, num_kv_heads, max_pages, page_size, head_dim=128, kv_dtype=jnp.bfloat16):
    """(pages_per_compute_block, num_splits) used when the caller leaves them None.

    Block: `_BLOCK_BYTES` of K per step (at most `_MAX_BLOCK_TOKENS` tokens), cut down for short block tables.
    Splits: none for tables of at most `_SINGLE_PASS_BLOCKS` blocks; else enough programs in flight
    (K * S * C ~ `_TARGET_PROGRAMS`) while each split keeps `_MIN_BLOCKS_PER_SPLIT` blocks of the longest possible
    context (max_pages * page_size: lengths are dynamic, the table width is not).
    """
    tokens = min(_MAX_BLOCK_TOKENS, _BLOCK_BYTES // (head_dim * jnp.dtype(kv_dtype).itemsize))
    ppcb = max(1, min(tokens // page_size, pl.next_power_of_2(max_pages)))
    blocks = pl.cdiv(max_pages, ppcb)
    if blocks <= _SINGLE_PASS_BLOCKS:
        return ppcb, 1
    target = _TARGET_PROGRAMS_FP8 if jnp.dtype(kv_dtype).itemsize == 1 else _TARGET_PROGRAMS
    want = pl.cdiv(target, batch * num_kv_heads)
    num_splits = max(1, min(want, blocks // _MIN_BLOCKS_PER_SPLIT))
    return ppcb, num_splits


def default_num_stages(kv_dtype) -> int:
    """Triton pipeline stages used when the caller leaves num_stages None (see `_NUM_STAGES_FP8`)."""
    return _NUM_STAGES_FP8 if jnp.dtype(kv_dtype).itemsize == 1 else _NUM_STAGES


def _paged_attention_kernel_call(q, k_pages, v_pages, block_tables, lengths, scales, *, sm_scale,
                                 pages_per_block, num_splits, num_warps, num_stages, interpret,
                                 compute_dtype=None):
    seqs, num_q_heads, head_dim = q.shape
    num_kv_heads, num_pages, page_size, _ = k_pages.shape
    max_pages = block_tables.shape[1]
    group = num_q_heads // num_kv_heads
    pages_per_split = pl.cdiv(pl.cdiv(max_pages, num_splits), pages_per_block) * pages_per_block
    num_splits = pl.cdiv(max_pages, pages_per_split)  # drop splits that would start past the table
    width = pl.cdiv(max_pages, pages_per_block) * pages_per_block  # every block a program reads lies in the table
    if width != max_pages:
        # Padding entries are never dereferenced (their tokens are >= length); 0 keeps them valid.
        block_tables = jnp.pad(block_tables, ((0, 0), (0, width - max_pages)))
    kernel = functools.partial(
        _decode_kernel, page_size=page_size, pages_per_block=pages_per_block,
        num_splits=num_splits, max_len=max_pages * page_size, sm_scale=sm_scale,
        compute_dtype=jnp.dtype(compute_dtype or _compute_dtype(q.dtype, k_pages.dtype)), group=group)
    kv_spec = pl.BlockSpec((None, num_pages, page_size, head_dim), lambda h, s, c: (h, 0, 0, 0))
    whole_q = pl.BlockSpec(q.shape, lambda h, s, c: (0, 0, 0))  # the kernel picks its rows (masked loads / stores)
    in_specs = [
        pl.BlockSpec((1,), lambda h, s, c: (s,)),  # lengths
        pl.BlockSpec((2,), lambda h, s, c: (0,)),  # scales
        pl.BlockSpec((None, width), lambda h, s, c: (s, 0)),  # block tables: the row's whole table
        whole_q,
        kv_spec, kv_spec,
    ]
    rows = (seqs, num_kv_heads, _GROUP_ROWS)
    if num_splits == 1:
        out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
        out_specs = [whole_q]
    else:
        out_shape = [jax.ShapeDtypeStruct((num_splits, *rows, head_dim), jnp.float32),
                     jax.ShapeDtypeStruct((num_splits, *rows), jnp.float32)]
        out_specs = [
            pl.BlockSpec((None, None, None, _GROUP_ROWS, head_dim), lambda h, s, c: (c, s, h, 0, 0)),
            pl.BlockSpec((None, None, None, _GROUP_ROWS), lambda h, s, c: (c, s, h, 0)),
        ]
    outs = pl.pallas_call(
        kernel,
        grid=(num_kv_heads, seqs, num_splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"qwenjax_paged_decode_p{page_size}_b{pages_per_block}_c{num_splits}",
    )(lengths, scales, block_tables, q, k_pages, v_pages)
    if num_splits == 1:
        return outs[0]
    o_part, lse = outs  # the tiles' rows past `group` dropped before the merge (fused into it by XLA)
    out = _combine_splits(o_part[..., :group, :], lse[..., :group])
    return out.reshape(seqs, num_q_heads, head_dim).astype(q.dtype)


def _is_pow2(x):
    return isinstance(x, int) and x > 0 and x & (x - 1) == 0


def _validate(q, k_pages, v_pages, block_tables, lengths, pages_per_block, num_splits):
    if q.ndim != 3 or k_pages.ndim != 4:
        raise ValueError(f"q must be [S, N, H] and k_pages [K, P, page_size, H]; got q{q.shape}, "
                         f"k_pages{k_pages.shape}")
    if k_pages.shape != v_pages.shape or k_pages.dtype != v_pages.dtype:
        raise ValueError(f"k_pages and v_pages must match; got {k_pages.shape} {k_pages.dtype} and "
                         f"{v_pages.shape} {v_pages.dtype}")
    seqs, num_q_heads, head_dim = q.shape
    num_kv_heads, _, page_size, kv_head_dim = k_pages.shape
    if num_q_heads % num_kv_heads or not 1 <= num_q_heads // num_kv_heads <= 8:
        raise ValueError(f"q heads ({num_q_heads}) must be a multiple of kv heads ({num_kv_heads}) "
                         "with a GQA ratio in 1..8")
    if kv_head_dim != head_dim or head_dim not in (64, 128):
        raise ValueError(f"head_dim must be 64 or 128 and equal in q and pages; got q {head_dim}, "
                         f"pages {kv_head_dim}")
    if not _is_pow2(page_size) or not 16 <= page_size <= 128:
        raise ValueError(f"page_size must be a power of two in 16..128; got {page_size}")
    if q.dtype not in _Q_DTYPES:
        raise ValueError(f"q dtype must be bfloat16, float16 or float32; got {q.dtype}")
    if k_pages.dtype not in _KV_DTYPES:
        raise ValueError("KV page dtype must be bfloat16, float16, float32, float8_e5m2 or "
                         f"float8_e4m3fn; got {k_pages.dtype}")
    if block_tables.ndim != 2 or block_tables.shape[0] != seqs or block_tables.dtype != jnp.int32:
        raise ValueError(f"block_tables must be int32 [S={seqs}, maxP]; got {block_tables.dtype}"
                         f"{block_tables.shape}")
    if lengths.shape != (seqs,) or lengths.dtype != jnp.int32:
        raise ValueError(f"lengths must be int32 [S={seqs}]; got {lengths.dtype}{lengths.shape}")
    if pages_per_block is not None and not _is_pow2(pages_per_block):
        raise ValueError(f"pages_per_compute_block must be a power of two; got {pages_per_block}")
    if num_splits is not None and not (isinstance(num_splits, int) and num_splits >= 1):
        raise ValueError(f"num_splits must be a positive int; got {num_splits}")


@functools.partial(jax.jit, static_argnames=("sm_scale", "pages_per_compute_block", "num_splits",
                                             "num_warps", "num_stages", "interpret"))
def paged_attention(q, k_pages, v_pages, block_tables, lengths, *, k_scale=None, v_scale=None,
                    sm_scale=None, pages_per_compute_block=None, num_splits=None, num_warps=None,
                    num_stages=None, interpret=False):
    """Decode attention of one new token per sequence over a paged KV cache.

    Args:
        q: [S, N, H] bfloat16 / float16 / float32 queries.
        k_pages, v_pages: [K, P, page_size, H] pages (bf16, f16, f32, float8_e5m2, float8_e4m3fn).
        block_tables: int32 [S, maxP] page ids per sequence.
        lengths: int32 [S] context length incl. the current token; 0 gives a zero output row.
        k_scale, v_scale: per-tensor dequantization scales (scalar or float32 array); default 1.0.
        sm_scale: softmax scale (static); default 1/sqrt(H).
        pages_per_compute_block: pages per inner-loop step, a power of two (static).
        num_splits: KV splits (flash-decoding); 1 disables the combine step (static).
        num_warps, num_stages: Triton launch settings (static); default 4 and `default_num_stages`.
        interpret: run the kernel in Pallas interpret mode (CPU tests).

    Returns:
        [S, N, H] attention output in q's dtype.
    """
    _validate(q, k_pages, v_pages, block_tables, lengths, pages_per_compute_block, num_splits)
    seqs, _, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    ppcb, splits = default_settings(seqs, num_kv_heads, block_tables.shape[1], page_size, head_dim, k_pages.dtype)
    scales = jnp.stack([jnp.asarray(1.0 if k_scale is None else k_scale, jnp.float32).reshape(()),
                        jnp.asarray(1.0 if v_scale is None else v_scale, jnp.float32).reshape(())])
    return _paged_attention_kernel_call(
        q, k_pages, v_pages, block_tables, lengths, scales,
        sm_scale=float(1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale),
        pages_per_block=pages_per_compute_block or ppcb, num_splits=num_splits or splits,
        num_warps=num_warps or 4, num_stages=num_stages or default_num_stages(k_pages.dtype), interpret=interpret)


def masked_softmax(s, visible):
    """Softmax over the last axis of the entries where `visible`; 0 elsewhere, and all 0 where a row sees none."""
    s = jnp.where(visible, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
    den = p.sum(axis=-1, keepdims=True)
    return p / jnp.where(den == 0.0, 1.0, den)


def paged_attention_reference(q, k_pages, v_pages, block_tables, lengths, *, k_scale=1.0,
                              v_scale=1.0, sm_scale=None):
    """Plain-jnp paged decode attention in float32 (gathers every page of the block table)."""
    seqs, num_q_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    group = num_q_heads // num_kv_heads
    sm_scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    max_len = block_tables.shape[1] * page_size

    def gather(pages, scale):  # -> [S, K, T, H] float32, T = maxP * page_size
        x = pages[:, block_tables].astype(jnp.float32) * jnp.asarray(scale, jnp.float32)
        return x.reshape(num_kv_heads, seqs, max_len, head_dim).transpose(1, 0, 2, 3)

    valid = jnp.arange(max_len)[None, :] < jnp.clip(lengths, 0, max_len)[:, None]  # [S, T]
    k = jnp.where(valid[:, None, :, None], gather(k_pages, k_scale), 0.0)
    v = jnp.where(valid[:, None, :, None], gather(v_pages, v_scale), 0.0)
    qf = q.astype(jnp.float32).reshape(seqs, num_kv_heads, group, head_dim)
    s = jnp.einsum("skgh,skth->skgt", qf, k, precision="highest") * sm_scale
    o = jnp.einsum("skgt,skth->skgh", masked_softmax(s, valid[:, None, None, :]), v, precision="highest")
    return o.reshape(seqs, num_q_heads, head_dim).astype(q.dtype)
