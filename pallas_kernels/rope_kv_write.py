"""RoPE on q and k fused with the K/V page writes: Pallas GPU (Triton lowering) kernel, jitted API and jnp reference.

After the fused qkv GEMM a layer rotates q and k and scatters k and v into their page slots. XLA runs that as four
launch-bound kernels at batch 1 (RoPE on q, RoPE on k, the K scatter, the V scatter: ~6.6 us a layer on an H100,
benchmarks/NOTES.md); this kernel does all of it in one launch and never writes the rotated k anywhere but its slot.

Axis letters: T tokens, N q heads, K kv heads, H head dim (a power of two), P pages, S page size, Gq = cdiv(N, K) q
heads rotated by each program (padded to a power of two in the tile; no GQA ratio is assumed, so a tensor-parallel
shard with replicated kv heads runs it too), BT tokens per program.

Layout contract (one layer):
  q        [T, N, H]       bfloat16 / float16 / float32, not yet rotated
  k, v     [T, K, H]       bfloat16 / float16 / float32, k not yet rotated
  cos, sin [T, H] float32  rotate-half layout (qwenjax/layers/rotary.py: rope_cos_sin)
  k_pages  [K, P, S, H]    bfloat16 / float16 / float32 / float8_e5m2 / float8_e4m3fn; v_pages the same
  slots    [T] int32       page * S + offset of each token; a slot < 0 or >= P * S is padding (nothing written).
                           Valid slots must be distinct (as write_kv's unique_indices assumes).
Returns q rotated [T, N, H] (q's dtype) and the pages with rotated k and plain v stored at the slots. The pages are
aliased to the outputs (input_output_aliases): under a jit that donates the cache no copy of it is made.

Numerics are bit-identical to `apply_rope` then `write_kv` (the reference below) as XLA compiles them under jit:
  x' = x * cos + rotate_half(x) * sin in float32, rounded to x's dtype (q's, k's);
  a page stores `page_format.to_pages(k' or v, dtype, scale)`: a plain cast, or for fp8 the cast of clip(x / scale, +-max)
  (the division only when a scale is given: the engine passes one for float8_e4m3fn pages alone, `page_scale`).
Three of XLA's rewrites are reproduced, each checked on an H100 (tests/gpu/test_rope_kv_write_gpu.py):
  - FMA contraction: inside a fusion x * cos + r * sin becomes fma(x, cos, r * sin); Triton contracts the same
    expression written in the same order alike (`_rotate`). Evaluated op by op (eager, no FMA) the last bit differs
    now and then: "bit-identical" is against the jitted path, which is what the engine runs.
  - x / scale (a broadcast scalar) becomes x * (1 / scale): the kernel multiplies by XLA's reciprocal, computed
    outside it (Triton's own float32 division, div.full.f32, is up to 2 ulp off in any case).
  - On GPU (SimplifyFPConversions, under xla_allow_excess_precision, XLA's default) the round trip
    f32 -> k's dtype -> f32 in front of an fp8 page's cast is folded: rotated k goes to fp8 pages unrounded
    (`_k_for_page`). Before a float page's cast a bitcast (write_kv's transpose) separates the two converts and the
    rounding stays. XLA on CPU keeps the round trip; interpreted, the kernel body is compiled by XLA like the
    reference, with the same rewrites.

Kernel: grid (cdiv(T, BT), K). Program (i, h) takes tokens i * BT .. i * BT + BT - 1 and, for each, rotates q heads
h * Gq .. h * Gq + Gq - 1 (masked past N), rotates kv head h of k and stores it and v's head h at the token's slot.
Halves of the head dim are loaded and stored separately (the rotate-half pairs lane j with lane j + H/2), so no
in-register shuffle is needed.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.page_format import FP8_MAX, write_kv
from pallas_kernels.paged_attention import _CompilerParams, _is_pow2

_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
_PAGE_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32, jnp.float8_e5m2, jnp.float8_e4m3fn)
_INT32_LIMIT = 2 ** 31  # page offsets are int32 inside the kernel
# Tokens per program by step size: one program per (token, kv head) at decode; larger steps amortize each program's
# setup over more tokens (benchmarks/rope_kv_write.py --sweep on an H100 showed no setting clearly better).
_BLOCK_TOKENS_BY_T = ((64, 1), (1024, 4))  # (T at most, BT); larger T: _BLOCK_TOKENS_LARGE
_BLOCK_TOKENS_LARGE = 8


def default_block_tokens(tokens: int) -> int:
    """BT used when the caller leaves it None."""
    for limit, bt in _BLOCK_TOKENS_BY_T:
        if tokens <= limit:
            return bt
    return _BLOCK_TOKENS_LARGE


def _rotate(x_lo, x_hi, cos_lo, sin_lo, cos_hi, sin_hi):
    """Rotate-half RoPE of one head-dim's two halves, in float32: apply_rope's x * cos + rotated * sin per lane
    (rotated is -x_hi in the low half, x_lo in the high half), in its operand order, so FMA contraction matches."""
    xl, xh = x_lo.astype(jnp.float32), x_hi.astype(jnp.float32)
    return xl * cos_lo + (-xh) * sin_lo, xh * cos_hi + xl * sin_hi


def _to_page(x, dtype, inv_scale, fp8_max):
    """What a page of `dtype` stores for x (v, or rotated k from `_k_for_page`): `page_format.to_pages`, whose x / scale
    XLA compiles to x * (1 / scale) (a division by a broadcast scalar becomes a multiplication by its reciprocal):
    inv_scale is that reciprocal, computed by XLA outside the kernel."""
    if fp8_max is None:
        return x if x.dtype == dtype else x.astype(jnp.float32).astype(dtype)  # bf16 <-> f16 through float32 (exact)
    x = x.astype(jnp.float32)
    if inv_scale is not None:
        x = x * inv_scale
    return jnp.clip(x, -fp8_max, fp8_max).astype(dtype)


def _k_for_page(k_rot, k_dtype, fp8_max, fold_round_trip):
    """The rotated k [float32] that a page's conversion starts from: apply_rope's result, rounded to k's dtype. Before
    an fp8 page's cast XLA on GPU folds that round trip (f32 -> k dtype -> f32, by SimplifyFPConversions under
    xla_allow_excess_precision, its default) and casts the float32 value itself: `fold_round_trip` (the Triton path
    with fp8 pages) does the same. Interpreted, the kernel body is compiled by XLA like the reference and keeps the
    round trip for XLA to fold or not, as it does the reference's."""
    if fold_round_trip and fp8_max is not None:
        return k_rot
    return k_rot.astype(k_dtype)


def _kernel(slots_ref, scales_ref, cos_ref, sin_ref, q_ref, k_ref, v_ref, _k_pages_in, _v_pages_in,
            q_out, k_pages_ref, v_pages_ref, *, tokens, block_tokens, q_heads, q_rows, num_slots, page_size,
            k_scaled, v_scaled, fp8_max, fold_round_trip):
    # slots_ref [T], scales_ref [2] (1 / k_scale, 1 / v_scale), cos_ref / sin_ref [T, H], q_ref / q_out [T, N, H],
    # k_ref / v_ref [T, K, H] (all of them); k_pages_ref / v_pages_ref [P, S, H]: kv head h's pages (outputs aliased
    # to the inputs, which are never read).
    half = q_ref.shape[-1] // 2
    num_q_heads = q_ref.shape[1]
    h = pl.program_id(1)
    lo, hi = pl.ds(0, half), pl.ds(half, half)
    heads = pl.ds(h * q_heads, q_rows)
    row = lax.broadcasted_iota(jnp.int32, (q_rows, half), 0)
    head_ok = (row < q_heads) & (h * q_heads + row < num_q_heads)  # rows past Gq or past N: never read or written
    k_inv = scales_ref[0] if k_scaled else None
    v_inv = scales_ref[1] if v_scaled else None
    for j in range(block_tokens):
        t_raw = pl.program_id(0) * block_tokens + j
        live = t_raw < tokens
        t = jnp.minimum(t_raw, tokens - 1)  # the last block's spare tokens re-read token T - 1 and store nothing
        c_lo, c_hi = plgpu.load(cos_ref.at[t, lo]), plgpu.load(cos_ref.at[t, hi])
        s_lo, s_hi = plgpu.load(sin_ref.at[t, lo]), plgpu.load(sin_ref.at[t, hi])

        zero = jnp.zeros((), q_ref.dtype)
        x_lo = plgpu.load(q_ref.at[t, heads, lo], mask=head_ok, other=zero)
        x_hi = plgpu.load(q_ref.at[t, heads, hi], mask=head_ok, other=zero)
        r_lo, r_hi = _rotate(x_lo, x_hi, c_lo[None, :], s_lo[None, :], c_hi[None, :], s_hi[None, :])
        store_q = head_ok & live
        plgpu.store(q_out.at[t, heads, lo], r_lo.astype(q_out.dtype), mask=store_q)
        plgpu.store(q_out.at[t, heads, hi], r_hi.astype(q_out.dtype), mask=store_q)

        slot = slots_ref[t]
        valid = live & (slot >= 0) & (slot < num_slots)
        slot = jnp.where(valid, slot, 0)  # keeps the (masked) address inside the pages
        page, offset = lax.div(slot, page_size), lax.rem(slot, page_size)
        k_lo, k_hi = _rotate(plgpu.load(k_ref.at[t, h, lo]), plgpu.load(k_ref.at[t, h, hi]), c_lo, s_lo, c_hi, s_hi)
        k_lo, k_hi = (_k_for_page(x, k_ref.dtype, fp8_max, fold_round_trip) for x in (k_lo, k_hi))
        v_lo, v_hi = plgpu.load(v_ref.at[t, h, lo]), plgpu.load(v_ref.at[t, h, hi])
        mask = lax.broadcast(valid, (half,))
        for ref, x, part, inv in ((k_pages_ref, k_lo, lo, k_inv), (k_pages_ref, k_hi, hi, k_inv),
                                  (v_pages_ref, v_lo, lo, v_inv), (v_pages_ref, v_hi, hi, v_inv)):
            plgpu.store(ref.at[page, offset, part], _to_page(x, ref.dtype, inv, fp8_max), mask=mask)


def _rope_kv_write_call(q, k, v, cos, sin, k_pages, v_pages, slots, scales, *, k_scaled, v_scaled, block_tokens,
                        num_warps, interpret):
    tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, num_pages, page_size, _ = k_pages.shape
    q_heads = pl.cdiv(num_q_heads, num_kv_heads)
    kernel = functools.partial(
        _kernel, tokens=tokens, block_tokens=block_tokens, q_heads=q_heads, q_rows=pl.next_power_of_2(q_heads),
        num_slots=num_pages * page_size, page_size=page_size, k_scaled=k_scaled, v_scaled=v_scaled,
        fp8_max=FP8_MAX.get(jnp.dtype(k_pages.dtype)), fold_round_trip=not interpret)

    def whole(x):
        return pl.BlockSpec(x.shape, lambda i, h: (0,) * x.ndim)

    head_pages = pl.BlockSpec((None, num_pages, page_size, head_dim), lambda i, h: (h, 0, 0, 0))
    q_out, k_pages, v_pages = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(tokens, block_tokens), num_kv_heads),
        in_specs=[whole(slots), whole(scales), whole(cos), whole(sin), whole(q), whole(k), whole(v),
                  head_pages, head_pages],
        out_specs=[whole(q), head_pages, head_pages],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype),
                   jax.ShapeDtypeStruct(v_pages.shape, v_pages.dtype)],
        input_output_aliases={7: 1, 8: 2},
        compiler_params=_CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name=f"qwenjax_rope_kv_write_bt{block_tokens}",
    )(slots, scales, cos, sin, q, k, v, k_pages, v_pages)
    return q_out, k_pages, v_pages


def _validate(q, k, v, cos, sin, k_pages, v_pages, slots, k_scale, v_scale, block_tokens, num_warps):
    if q.ndim != 3 or k.ndim != 3 or k.shape != v.shape:
        raise ValueError(f"q must be [T, N, H] and k, v both [T, K, H]; got q{q.shape}, k{k.shape}, v{v.shape}")
    tokens, _, head_dim = q.shape
    if tokens < 1 or k.shape[0] != tokens or k.shape[2] != head_dim:
        raise ValueError(f"q, k and v must share T >= 1 tokens and the head dim; got q{q.shape}, k{k.shape}")
    if not _is_pow2(head_dim) or not 16 <= head_dim <= 256:
        raise ValueError(f"head_dim must be a power of two in 16..256; got {head_dim}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in _DTYPES:
            raise ValueError(f"{name} dtype must be bfloat16, float16 or float32; got {x.dtype}")
    for name, x in (("cos", cos), ("sin", sin)):
        if x.shape != (tokens, head_dim) or x.dtype != jnp.float32:
            raise ValueError(f"{name} must be float32 [T={tokens}, H={head_dim}]; got {x.dtype}{x.shape}")
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape or k_pages.dtype != v_pages.dtype:
        raise ValueError(f"k_pages and v_pages must both be [K, P, S, H] of one dtype; got {k_pages.dtype}"
                         f"{k_pages.shape} and {v_pages.dtype}{v_pages.shape}")
    num_kv_heads, num_pages, page_size, page_dim = k_pages.shape
    if num_kv_heads != k.shape[1] or page_dim != head_dim:
        raise ValueError(f"pages must hold K={k.shape[1]} kv heads of H={head_dim}; got {k_pages.shape}")
    if k_pages.dtype not in _PAGE_DTYPES:
        raise ValueError("page dtype must be bfloat16, float16, float32, float8_e5m2 or float8_e4m3fn; got "
                         f"{k_pages.dtype}")
    if num_pages * page_size * head_dim >= _INT32_LIMIT:
        raise ValueError(f"one kv head's pages must hold fewer than 2^31 values (int32 offsets); got P={num_pages} "
                         f"x S={page_size} x H={head_dim}")
    if slots.shape != (tokens,) or slots.dtype != jnp.int32:
        raise ValueError(f"slots must be int32 [T={tokens}]; got {slots.dtype}{slots.shape}")
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if s is not None and jnp.size(s) != 1:
            raise ValueError(f"{name} must be a scalar (or None); got shape {jnp.shape(s)}")
    if block_tokens is not None and not (_is_pow2(block_tokens) and block_tokens <= 64):
        raise ValueError(f"block_tokens must be a power of two in 1..64; got {block_tokens}")
    if num_warps is not None and not (_is_pow2(num_warps) and num_warps <= 8):
        raise ValueError(f"num_warps must be a power of two in 1..8; got {num_warps}")


@functools.partial(jax.jit, static_argnames=("block_tokens", "num_warps", "interpret"))
def rope_kv_write(q, k, v, cos, sin, k_pages, v_pages, slots, *, k_scale=None, v_scale=None, block_tokens=None,
                  num_warps=None, interpret=False):
    """RoPE on q and k, and k (rotated) and v stored into their page slots, in one kernel.

    Args:
        q: [T, N, H] queries, k, v: [T, K, H] keys and values (bfloat16 / float16 / float32), q and k unrotated.
        cos, sin: float32 [T, H] (`rope_cos_sin`, rotate-half layout).
        k_pages, v_pages: [K, P, S, H] pages (bf16, f16, f32, float8_e5m2, float8_e4m3fn), updated in place when the
            caller's jit donates them.
        slots: int32 [T] flat slot (page * S + offset) of each token; < 0 or >= P * S: padding, nothing written.
        k_scale, v_scale: scalars, or None: fp8 pages store the saturating cast of x / scale when one is given
            (`page_format.to_pages`); other page dtypes ignore them.
        block_tokens: tokens per program, a power of two (static); default `default_block_tokens(T)`.
        num_warps: Triton warps per program (static); default 2.
        interpret: run the kernel in Pallas interpret mode (CPU tests).

    Returns:
        (q rotated [T, N, H] in q's dtype, k_pages, v_pages), bit-identical to `rope_kv_write_reference`.
    """
    _validate(q, k, v, cos, sin, k_pages, v_pages, slots, k_scale, v_scale, block_tokens, num_warps)
    # XLA's reciprocal of each scale, the factor the reference's x / scale becomes (see _to_page).
    scales = jnp.stack([1.0 / jnp.asarray(1.0 if s is None else s, jnp.float32).reshape(())
                        for s in (k_scale, v_scale)])
    return _rope_kv_write_call(q, k, v, cos, sin, k_pages, v_pages, slots, scales, k_scaled=k_scale is not None,
                               v_scaled=v_scale is not None,
                               block_tokens=block_tokens or default_block_tokens(q.shape[0]),
                               num_warps=num_warps or 2, interpret=interpret)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [..., heads, H]; cos/sin [..., H] broadcast over heads. Math in float32, result in x's dtype."""
    half = x.shape[-1] // 2
    xf = x.astype(jnp.float32)
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    out = xf * cos[..., None, :] + rotated * sin[..., None, :]
    return out.astype(x.dtype)


def rope_kv_write_reference(q, k, v, cos, sin, k_pages, v_pages, slots, *, k_scale=None, v_scale=None):
    """The same from the engine's jnp path: `apply_rope` on q and k, then `write_kv` of k and v."""
    _, num_pages, page_size, _ = k_pages.shape
    # write_kv drops slots >= P * S but would wrap a negative one: every padding slot goes past the end (distinct).
    spare = num_pages * page_size + jnp.arange(slots.shape[0], dtype=jnp.int32)
    slots = jnp.where((slots >= 0) & (slots < num_pages * page_size), slots, spare)
    k = apply_rope(k, cos, sin)
    k_scale, v_scale = (None if s is None else jnp.asarray(s, jnp.float32).reshape(()) for s in (k_scale, v_scale))
    return apply_rope(q, cos, sin), write_kv(k_pages, k, slots, k_scale), write_kv(v_pages, v, slots, v_scale)
