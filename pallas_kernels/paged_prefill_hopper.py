"""Paged prefill attention for Hopper: a Mosaic GPU kernel (TMA page loads, warp-specialized wgmma), jitted API.

The same computation as `paged_prefill.ragged_paged_prefill_attention` (each row's new tokens attend causally to
the row's pages, which already hold those tokens' K/V), built the way FlashAttention-3 is built on an H100 instead of
through Pallas' Triton lowering:

  * a producer warpgroup copies K and V pages into shared memory with TMA, one copy per page, `num_stages` KV blocks
    ahead of the consumers;
  * two consumer warpgroups each take `block_q` tokens of one q head; q . k^T and p . v are wgmma, and a schedule
    barrier lets one warpgroup's softmax run while the other's matmuls hold the tensor cores.

Axis letters: T flat tokens (packed), N q heads, K kv heads, H head dim, P pages, W program tiles of 2 * block_q
tokens, maxP block-table width.

Layout contract (the packed layout of `paged_prefill.py`, narrower in what it accepts):
    q            [T, N, H]          bfloat16 or float16
    k_pages      [K, P, page, H]    the same dtype as q (fp8 pages: use the Triton kernel)
    v_pages      [K, P, page, H]
    block_tables [R, maxP] int32    page ids; entries past a row's length are any valid page id
    seq_lens     [R] int32          context after this step (cached + new); 0 marks a padding row
    query_lens   [R] int32          new tokens of the row; 0 for a padding row
    row_starts   [R] int32          row r's tokens are q[row_starts[r] : row_starts[r] + query_lens[r]]
  Every row with tokens starts at a multiple of `row_align`, which must be a multiple of 2 * block_q (a program's two
  warpgroups share one row's K/V stream); rows do not overlap; tokens covered by no row get output 0.

Invariants the kernel keeps:
  * A program reads only blocks that start before the causal end of its last real token, so no page past a row's
    context is copied except inside the row's last, partial block. There, the slots at or past seq_len may hold
    anything (NaN included): scores are masked by select (never by arithmetic), and the V rows of those slots are set
    to zero in shared memory before p . v reads them, so 0 * NaN never happens.
  * The producer refills a stage only after both consumers arrived on its `consumed` barrier; a consumer that needs
    fewer blocks than its partner still arrives for the partner's remaining blocks (and keeps the schedule barrier's
    count), so the two never deadlock.
  * Every barrier's arrivals per phase are fixed at trace time: a K or V stage expects `copies_per_block` TMA copies.

Mosaic GPU kernels have no CPU path that runs this kernel (jax 0.10's GPU interpreter stalled on its barriers), so
CPU tests lower it for CUDA and check its metadata and argument checks; the GPU tests compare it with the jnp
reference of `paged_prefill.py`.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

_LOG2E = math.log2(math.e)
_DTYPES = (jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True)
class HopperPrefillConfig:
    """Tile sizes. block_q: tokens per consumer warpgroup (a program takes 2 * block_q tokens of one q head);
    block_kv: KV tokens per stage; num_stages: KV blocks in flight (shared memory: 2 * num_stages * block_kv * H * 2
    bytes for K and V, plus the q / output tiles)."""
    block_q: int = 64
    # 128 / 3 stages: best at 4k, 8k and a 512 chunk after 7,680 cached on an H100 (2k: 2 stages, 3%)
    block_kv: int = 128
    num_stages: int = 3
    # The ping-pong schedule barrier (FA3): one consumer's softmax runs while the other's matmuls hold the tensor
    # cores. False drops every wait and arrival on it (the warpgroups run unsynchronized): a sweep setting.
    schedule_barrier: bool = True

    def __post_init__(self):
        if self.block_q != 64:
            raise ValueError(f"block_q must be 64 (one wgmma M tile a warpgroup); got {self.block_q}")
        if self.block_kv not in (64, 128):
            raise ValueError(f"block_kv must be 64 or 128 (256 overflows shared memory at head_dim 128); got "
                             f"{self.block_kv}")
        if not 2 <= self.num_stages <= 4:
            raise ValueError(f"num_stages must be in 2..4; got {self.num_stages}")

    @property
    def tile_tokens(self) -> int:
        return 2 * self.block_q


def _iota(shape, dim):
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def _tile_metadata(seq_lens, query_lens, row_starts, *, num_tiles, tile):
    """Per program tile of `tile` flat tokens: int32 [W, 4] (seq_len, query_len, first token of the tile within its
    row, row index); zeros (no block read, output 0) for a tile in no row. Rows with tokens start at multiples of
    `tile`, so a tile belongs to the latest row starting at or before it, if it starts inside that row's tokens."""
    num_rows = row_starts.shape[0]
    tiles = jnp.arange(num_tiles, dtype=jnp.int32)
    live = query_lens > 0
    first_tile = jnp.where(live, row_starts // tile, num_tiles)  # num_tiles: dropped
    starter = jnp.full((num_tiles,), -1, jnp.int32).at[first_tile].max(jnp.arange(num_rows, dtype=jnp.int32),
                                                                         mode="drop")
    last = lax.cummax(jnp.where(starter >= 0, tiles, -1), axis=0)
    row = jnp.where(last >= 0, starter[jnp.maximum(last, 0)], 0)
    first_tok = tiles * tile - row_starts[row]
    inside = (last >= 0) & (first_tok >= 0) & (first_tok < query_lens[row])
    meta = jnp.stack([seq_lens[row], query_lens[row], first_tok, row], axis=1)
    return jnp.where(inside[:, None], meta, 0)


def _kernel_call(q, k_pages, v_pages, block_tables, meta, *, sm_scale, config: HopperPrefillConfig):
    """q [T, N, H] with T a multiple of the program tile; meta [W, 4] from `_tile_metadata`; -> [T, N, H]."""
    T, N, H = q.shape
    K, _, page, _ = k_pages.shape
    G = N // K
    bq, bkv, stages = config.block_q, config.block_kv, config.num_stages
    W = T // config.tile_tokens
    rows_per_copy = min(page, bkv)
    copies = bkv // rows_per_copy  # TMA copies that fill one K (or V) stage
    dtype = q.dtype
    qk_scale = sm_scale * _LOG2E

    def kernel(meta_ref, tables_ref, q_ref, k_ref, v_ref, o_ref, smem, ready, consumed, q_ready, schedule):
        q_smem, k_smem, v_smem = smem
        k_ready, v_ready = ready
        k_consumed, v_consumed = consumed
        head = lax.axis_index("heads")
        # Tiles run last to first: under the causal mask the late tiles carry the most blocks, and starting them first
        # leaves the short ones to fill the last wave.
        w = W - 1 - lax.axis_index("tiles")
        wg = lax.axis_index("wg")
        seq_len = meta_ref[w, 0]
        q_len = meta_ref[w, 1]
        first_tok = meta_ref[w, 2]
        row = meta_ref[w, 3]
        start = seq_len - q_len  # position of the row's first new token

        def wg_steps(i):
            """(blocks warpgroup i reads, blocks before the first it must mask): 0, 0 for a warpgroup of no token."""
            live = first_tok + i * bq < q_len
            pos0 = start + first_tok + i * bq
            end = start + jnp.minimum(first_tok + (i + 1) * bq, q_len)  # past the causal end of its last token
            steps = jnp.where(live, lax.div(end + bkv - 1, bkv), 0)
            return steps, jnp.minimum(lax.div(pos0 + 1, bkv), steps)

        all_steps = jnp.maximum(wg_steps(0)[0], wg_steps(1)[0])

        ping_pong = config.schedule_barrier

        def sync_schedule():
            if ping_pong:
                plgpu.barrier_arrive(schedule)
                plgpu.barrier_wait(schedule)

        @pl.when(wg < 2)
        def _consumer():
            plgpu.set_max_registers(232, action="increase")
            my_q = q_smem.at[wg]
            tok0 = w * config.tile_tokens + wg * bq
            steps, full = wg_steps(wg)
            pos0 = start + first_tok + wg * bq
            plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(tok0, bq), head], my_q, q_ready.at[wg])
            plgpu.barrier_wait(q_ready.at[wg])
            # A row's query position, capped at the row's last context slot: padding tokens past the row attend to
            # real slots only (their output is zeroed at the end), so no garbage slot is ever unmasked.
            q_pos = pos0 + _iota((bq, bkv), 0)
            limit = jnp.minimum(q_pos, seq_len - 1)
            kv_iota = _iota((bq, bkv), 1)
            acc = plgpu.layout_cast(jnp.zeros((bq, H), jnp.float32), plgpu.Layout.WGMMA)
            m = plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            l = plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))

            @pl.when(steps > 0)
            def _():
                plgpu.barrier_wait(k_ready.at[0])

            if ping_pong:
                pl.when(wg == 1)(sync_schedule)  # warpgroup 1 starts one phase behind: the two alternate

            def block(step, carry, masked: bool):
                acc, m, l = carry
                slot = lax.rem(step, stages)

                def qk(acc_ref):
                    plgpu.wgmma(acc_ref, my_q, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                    sync_schedule()
                    return acc_ref[...]

                s = pl.run_scoped(qk, plgpu.ACC((bq, bkv), jnp.float32))
                plgpu.barrier_arrive(k_consumed.at[slot])
                if masked:
                    s = jnp.where(kv_iota + step * bkv <= limit, s, -jnp.inf)
                m_next = jnp.maximum(m, s.max(axis=1) * qk_scale)
                alpha = jnp.exp2(m - m_next)
                p = jnp.exp2(s * qk_scale - lax.broadcast_in_dim(m_next, s.shape, [0]))
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                l = l * alpha + p.sum(axis=1)
                p16 = p.astype(dtype)
                acc, l, m_next, p16 = lax.optimization_barrier((acc, l, m_next, p16))
                if ping_pong:
                    plgpu.barrier_arrive(schedule)  # softmax done
                plgpu.barrier_wait(v_ready.at[slot])
                if masked:
                    # The row's last block may reach past seq_len: zero those V rows (see the module invariants).
                    tail = seq_len - step * bkv

                    @pl.when(tail < bkv)
                    def _():
                        v_blk = v_smem.at[slot]
                        v_blk[...] = jnp.where(_iota((bkv, H), 0) < tail, v_blk[...], 0).astype(dtype)
                        plgpu.commit_smem()

                if ping_pong:
                    plgpu.barrier_wait(schedule)  # the other warpgroup's matmuls are done

                def pv(acc_ref):
                    plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
                    nxt = step + 1

                    @pl.when(nxt < steps)
                    def _():
                        plgpu.barrier_wait(k_ready.at[lax.rem(nxt, stages)])

                acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(v_consumed.at[slot])
                return acc, m_next, l

            carry = lax.fori_loop(0, full, functools.partial(block, masked=False), (acc, m, l))
            acc, m, l = lax.fori_loop(full, steps, functools.partial(block, masked=True), carry)

            @pl.loop(steps, all_steps)
            def _drain(step):  # the partner's remaining blocks: release them and keep the schedule's count
                slot = lax.rem(step, stages)
                plgpu.barrier_arrive(k_consumed.at[slot])
                plgpu.barrier_arrive(v_consumed.at[slot])
                sync_schedule()
                sync_schedule()

            if ping_pong:
                pl.when(wg == 0)(sync_schedule)
            real = (pos0 + _iota((bq, H), 0) < seq_len) & lax.broadcast_in_dim(l > 0, (bq, H), [0])
            out = acc / lax.broadcast_in_dim(jnp.where(l > 0, l, 1.0), (bq, H), [0])
            my_q[...] = jnp.where(real, out, 0.0).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(my_q, o_ref.at[pl.ds(tok0, bq), head])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")
            kv_head = lax.div(head, G)

            def fill(step, slot):
                for pages_ref, stage, barrier in ((k_ref, k_smem, k_ready), (v_ref, v_smem, v_ready)):
                    for c in range(copies):
                        tok = step * bkv + c * rows_per_copy  # first context slot of this copy
                        page_id = tables_ref[row, lax.div(tok, page)]
                        src = pages_ref.at[kv_head, page_id, pl.ds(lax.rem(tok, page), rows_per_copy)]
                        plgpu.copy_gmem_to_smem(src, stage.at[slot, pl.ds(c * rows_per_copy, rows_per_copy)],
                                                barrier.at[slot])

            for i in range(stages):  # prologue: the first stages fill without waiting
                pl.when(i < all_steps)(functools.partial(fill, i, i))

            @pl.loop(stages, all_steps)
            def _(step):
                slot = lax.rem(step, stages)
                plgpu.barrier_wait(k_consumed.at[slot])
                plgpu.barrier_wait(v_consumed.at[slot])
                fill(step, slot)


    def qwenjax_paged_prefill_hopper(meta_ref, tables_ref, q_ref, k_ref, v_ref, o_ref):
        tiles = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        smem = (plgpu.SMEM((2, bq, H), dtype, transforms=tiles),
                plgpu.SMEM((stages, bkv, H), dtype, transforms=tiles),
                plgpu.SMEM((stages, bkv, H), dtype, transforms=tiles))
        ready = (plgpu.Barrier(num_arrivals=copies, num_barriers=stages),) * 2
        consumed = (plgpu.Barrier(num_arrivals=2, num_barriers=stages),) * 2
        pl.run_scoped(
            lambda *scoped: kernel(meta_ref, tables_ref, q_ref, k_ref, v_ref, o_ref, *scoped),
            smem, ready, consumed, plgpu.Barrier(num_barriers=2), plgpu.Barrier(num_arrivals=2),
            collective_axes="wg")

    return plgpu.kernel(
        qwenjax_paged_prefill_hopper,
        out_type=jax.ShapeDtypeStruct((T, N, H), dtype),
        grid=(N, W),
        grid_names=("heads", "tiles"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(meta, block_tables, q, k_pages, v_pages)


def validate(q, k_pages, v_pages, block_tables, seq_lens, query_lens, row_starts, row_align,
             config: HopperPrefillConfig):
    """Raises ValueError naming what this kernel does not take (the caller may use the Triton kernel instead)."""
    if q.ndim != 3 or k_pages.ndim != 4:
        raise ValueError(f"q must be [T, N, H] and k_pages [K, P, page, H]; got q{q.shape}, k_pages{k_pages.shape}")
    if q.dtype not in _DTYPES or k_pages.dtype != q.dtype or v_pages.dtype != q.dtype:
        raise ValueError(f"q and the pages must share one dtype, bfloat16 or float16; got q {q.dtype}, pages "
                         f"{k_pages.dtype} / {v_pages.dtype}")
    if k_pages.shape != v_pages.shape:
        raise ValueError(f"k_pages and v_pages must match; got {k_pages.shape} and {v_pages.shape}")
    N, H = q.shape[1:]
    K, _, page, kv_h = k_pages.shape
    if N % K or not 1 <= N // K <= 8:
        raise ValueError(f"q heads ({N}) must be a multiple of kv heads ({K}) with a GQA ratio in 1..8")
    if kv_h != H or H not in (64, 128):
        raise ValueError(f"head_dim must be 64 or 128 and equal in q and pages; got q {H}, pages {kv_h}")
    if page & (page - 1) or not 16 <= page <= 128:
        raise ValueError(f"page_size must be a power of two in 16..128; got {page}")
    R = block_tables.shape[0]
    if block_tables.ndim != 2 or block_tables.dtype != jnp.int32:
        raise ValueError(f"block_tables must be int32 [R, maxP]; got {block_tables.dtype}{block_tables.shape}")
    for name, x in (("seq_lens", seq_lens), ("query_lens", query_lens), ("row_starts", row_starts)):
        if x.shape != (R,) or x.dtype != jnp.int32:
            raise ValueError(f"{name} must be int32 [R={R}]; got {x.dtype}{x.shape}")
    if row_align % config.tile_tokens:
        raise ValueError(f"row_align ({row_align}) must be a multiple of the program tile, 2 * block_q = "
                         f"{config.tile_tokens} tokens, so that a program's two warpgroups share one row")


@functools.partial(jax.jit, static_argnames=("sm_scale", "row_align", "config"))
def hopper_ragged_prefill_attention(q, k_pages, v_pages, block_tables, seq_lens, query_lens, row_starts, *,
                                    sm_scale=None, row_align=128, config: HopperPrefillConfig = HopperPrefillConfig()):
    """Causal attention of each row's new tokens over its pages, q packed [T, N, H] (see the module docstring).

    Args:
        q: [T, N, H]; row r's tokens are q[row_starts[r] : row_starts[r] + query_lens[r]], token i at position
            seq_lens[r] - query_lens[r] + i.
        k_pages, v_pages: [K, P, page, H], q's dtype, the rows' new K/V already written.
        block_tables: int32 [R, maxP]; seq_lens, query_lens, row_starts: int32 [R] (padding rows: 0 / 0, any start).
        sm_scale: softmax scale (static); default 1/sqrt(H).
        row_align: alignment of row_starts (static), a multiple of 2 * config.block_q.
        config: tile sizes (static).

    Returns:
        [T, N, H] in q's dtype; 0 at tokens in no row.
    """
    validate(q, k_pages, v_pages, block_tables, seq_lens, query_lens, row_starts, row_align, config)
    T, _, H = q.shape
    if T == 0:
        return q
    tile = config.tile_tokens
    Tp = pl.cdiv(T, tile) * tile
    # A block never indexes past the table: whole blocks of the widest row fit.
    page = k_pages.shape[2]
    width = pl.cdiv(block_tables.shape[1] * page, config.block_kv) * config.block_kv // page
    tables = block_tables
    if width > block_tables.shape[1]:
        tables = jnp.pad(block_tables, ((0, 0), (0, width - block_tables.shape[1])))
    # Lengths are data, not checked at trace time: clamp them so no block is read past the table (as the Triton
    # kernel clamps them in its program).
    seq_lens = jnp.clip(seq_lens, 0, block_tables.shape[1] * page)
    query_lens = jnp.clip(query_lens, 0, seq_lens)
    meta = _tile_metadata(seq_lens, query_lens, row_starts, num_tiles=Tp // tile, tile=tile)
    out = _kernel_call(jnp.pad(q, ((0, Tp - T), (0, 0), (0, 0))), k_pages, v_pages, tables, meta,
                       sm_scale=float(1.0 / math.sqrt(H) if sm_scale is None else sm_scale), config=config)
    return out[:T]


def hopper_ragged_prefill_reference(q, k_pages, v_pages, block_tables, seq_lens, query_lens, row_starts, *,
                                    sm_scale=None, config: HopperPrefillConfig = HopperPrefillConfig()):
    """What the kernel computes, in jnp (float32 math, any dtype): program tiles of 2 * block_q tokens are mapped to
    rows by the kernel's own `_tile_metadata` and each tile attends as a row of its own (its tokens' positions, its
    row's pages). So a layout that breaks the kernel's contract (a row starting off a tile boundary) gives what the
    kernel would give, not the packed reference's answer: the CPU stand-in for the kernel in layout tests. Tiles run
    one at a time (lax.map): the reference's per-token context gather stays [tile, K, C, H]."""
    from pallas_kernels.paged_prefill import ragged_paged_prefill_reference

    T, N, H = q.shape
    tile = config.tile_tokens
    W = pl.cdiv(T, tile)
    seq_lens = jnp.clip(seq_lens, 0, block_tables.shape[1] * k_pages.shape[2])
    query_lens = jnp.clip(query_lens, 0, seq_lens)
    meta = _tile_metadata(seq_lens, query_lens, row_starts, num_tiles=W, tile=tile)
    seq, qlen, first, row = (meta[:, i] for i in range(4))
    n = jnp.clip(qlen - first, 0, tile)  # the tile's tokens of its row; 0: a tile of no row
    tile_seq = jnp.where(n > 0, seq - qlen + first + n, 0)  # context after the tile's last token

    def one(args):
        qt, table, s, m = args
        return ragged_paged_prefill_reference(qt, k_pages, v_pages, table[None], s[None], m[None],
                                              jnp.zeros((1,), jnp.int32), sm_scale=sm_scale)

    qs = jnp.pad(q, ((0, W * tile - T), (0, 0), (0, 0))).reshape(W, tile, N, H)
    out = jax.lax.map(one, (qs, block_tables[row], tile_seq, n))
    return out.reshape(W * tile, N, H)[:T]


def supports(q_dtype, kv_dtype, head_dim: int, page_size: int, group: int) -> bool:
    """Whether this kernel takes these shapes and dtypes (else the Triton kernel of `paged_prefill.py` does)."""
    return (jnp.dtype(q_dtype) in map(jnp.dtype, _DTYPES) and jnp.dtype(kv_dtype) == jnp.dtype(q_dtype)
            and head_dim in (64, 128) and 16 <= page_size <= 128 and not page_size & (page_size - 1)
            and 1 <= group <= 8)


@functools.partial(jax.jit, static_argnames=("sm_scale", "config"))
def hopper_paged_prefill_attention(q, k_pages, v_pages, block_tables, seq_lens, query_lens, *, sm_scale=None,
                                   config: HopperPrefillConfig = HopperPrefillConfig()):
    """The rectangular layout of `paged_prefill.paged_prefill_attention` (q [B, Q, N, H], row b's token i at
    position seq_lens[b] - query_lens[b] + i) through this kernel: each row's chunk padded to the program tile and
    laid back to back. Returns [B, Q, N, H]; 0 at padding tokens."""
    B, Q, N, H = q.shape
    tile = config.tile_tokens
    Qp = pl.cdiv(Q, tile) * tile
    packed = jnp.pad(q, ((0, 0), (0, Qp - Q), (0, 0), (0, 0))).reshape(B * Qp, N, H)
    out = hopper_ragged_prefill_attention(packed, k_pages, v_pages, block_tables, seq_lens, query_lens,
                                          jnp.arange(B, dtype=jnp.int32) * Qp, sm_scale=sm_scale, row_align=tile,
                                          config=config)
    return out.reshape(B, Qp, N, H)[:, :Q]
