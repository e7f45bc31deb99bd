"""The batched LoRA matmul for decode-sized steps: a split-K shrink and an expand over rows grouped by slot.

Axis letters: T tokens, I input features, O output features, R rank (padded; a projection group's G * R side by
side), S slots (slot 0: no adapter), NT row tiles, KS K-slices of the shrink.

Contract: `lora_matmul.py`'s (x [T, I], a [S, I, R], b [S, R, O], ids [T] int32 -> [T, O] in x.dtype, the shrink
and the expand each accumulated in float32, the shrink's [T, R] rounded to x.dtype in between), plus the step's
`LoRAPlan` (`plan(ids, S)`), built once a step and shared by every projection of every layer.

Why a second kernel pair: in a decode step the shrink's output is only R (16..48) columns wide, so a grouped matmul
(grid: row tiles x R / bn) runs 1-3 programs per row tile, each walking all of I (3584, or 18944 for down_proj)
serially: a few of the GPU's 132 SMs busy, the rest idle (NOTES 38). Here the shrink is split on K as Punica's and
vLLM's decode shrink is: grid (NT, I / split_k, R / block_r); a program takes a K-slice of `split_k` inputs for one
row tile of one adapter, and writes float32 partials [T, KS, R]; XLA sums the KS axis (a [T, KS, R] reduction, a
few hundred KB) and rounds. The expand (grid (NT, O / block_n)) reads the [T, R] rows of a tile and its adapter's B
block and stores straight into the rows' original positions. `fuse_reduction=True` has the expand sum the partials
itself (one kernel fewer): each program loads its rows' partials as [block_m, 16, block_r] tiles of 16 K-slices and
reduces them (10 tiles at I = 18944 and batch 1, 2 at 3584). The first form, one small load a K-slice, compiled to a
loop of 148 dependent loads at 18944 (NOTES 47). Off by default (QWENJAX_LORA_FUSE_REDUCTION=1 in the model) until
benchmarks/lora.py has timed it.

Invariants:
- The plan's rows are sorted by slot (`lora_matmul.group_by_slot`'s order: slot 1 first, slot-0 rows last); tile i
  covers sorted rows [row0[i], row1[i]) of adapter group[i] + 1. Tiles of the slot-0 rows and tiles past the real
  count are empty: no loads, no stores (a loop of 0 steps and all-false masks). A row without an adapter costs
  nothing.
- The kernels gather x rows and scatter output rows through `order` (inside the kernel), so there is no [T, I]
  permuted copy and no inverse gather of [T, O]; rows without an adapter are never written, and the result is
  `where(ids > 0, out, 0)`, an elementwise select that XLA can fuse into the add that follows.
- A is read at slot group[i] + 1 of the whole stack (no a[1:] copy), B likewise.
- Shapes depend only on T and S: the mix of adapters never recompiles anything.

Settings: `plan(..., block_m)` (one tiling a step: the tile table is shared) and the kernels' block_k, split_k,
block_r, block_n, num_warps, num_stages (static, keyword-only); `default_settings` says how they are chosen, and
`benchmarks/lora_kernel.py --sweep` times others at the 7B's shapes on a GPU.

The jnp reference is `lora_matmul.lora_matmul_reference` (the same contract).

With `base` (the base projection's [T, O]), the expand adds its delta into base's rows in place (an aliased
output): rows without an adapter keep base's values, and no [T, O] select-and-add follows. The model passes it
with QWENJAX_LORA_EXPAND_ADD=1 (layers/lora.py; opt-in until checked on a GPU): three kernels a projection group
(shrink, XLA's sum, expand) instead of four, two with the fused reduction.

Status: tested on CPU (Pallas interpret mode, both reductions, several tilings, with and without base) against that
reference; on an H100 (tests/gpu/test_lora_gpu.py, NOTES 38) without `base`, whose GPU cases (decode_add) have not
run yet; measured end to end by benchmarks/lora.py (NOTES 44 and 47).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.grouped_matmul import tile_table
from pallas_kernels.lora_matmul import group_by_slot, validate_operands

# --- jax version differences live here only (as in grouped_matmul.py). ---------------------------
_CompilerParams = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
_dot = getattr(plgpu, "dot", None) or pl.dot
# ---------------------------------------------------------------------------------------------------

_MIN_DOT = 16            # Triton's smallest dot dimension
_SUM_CHUNK = 16         # the fused reduction's K-slices a load: a [bm, 16, br] float32 tile, 32 registers a thread
TARGET_PROGRAMS = 264    # the shrink's split aims at this many programs: 2 per SM of an H100 (132 SMs)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoRAPlan:
    """The step's row grouping and tile table, shared by every LoRA projection of the step."""
    ids: jax.Array     # [T] int32 each row's slot (0: no adapter)
    order: jax.Array   # [T] int32 sorted position -> row (slot 1's rows first, slot-0 rows last)
    group: jax.Array   # [NT] int32 tile -> adapter group (slot - 1); >= S - 1: an empty tile
    row0: jax.Array    # [NT] int32 first sorted row of the tile
    row1: jax.Array    # [NT] int32 end (exclusive) sorted row of the tile
    block_m: int = dataclasses.field(metadata=dict(static=True), default=16)  # rows a tile


def default_block_m(t: int, num_slots: int) -> int:
    """Rows a tile: the mean rows an adapter gets when every row has one, as a power of two in [16, 64] (16 at
    batch 1..128 over 8 adapters; a tile's A slice is read once for its rows, so larger groups want larger tiles)."""
    mean = max(1, t // max(num_slots - 1, 1))
    return min(64, max(_MIN_DOT, 1 << (mean - 1).bit_length()))


def plan(ids: jax.Array, num_slots: int, *, block_m: int | None = None) -> LoRAPlan:
    """The step's LoRAPlan for row slots `ids` [T] over `num_slots` slots (jnp: a few small kernels, once a step)."""
    bm = block_m or default_block_m(ids.shape[0], num_slots)
    if bm < _MIN_DOT or bm & (bm - 1):
        raise ValueError(f"block_m must be a power of two >= {_MIN_DOT}, got {bm}")
    order, _, sizes = group_by_slot(ids, num_slots)
    group, row0, row1 = tile_table(sizes, ids.shape[0], bm)  # group S - 1 is the slot-0 tail: empty here
    return LoRAPlan(ids.astype(jnp.int32), order, group, row0, row1, bm)


def _pow2_divisor(n: int, cap: int) -> int:
    b = cap
    while b > _MIN_DOT and n % b:
        b //= 2
    return b


def default_settings(t: int, k: int, r: int, o: int, block_m: int) -> dict:
    """block_k (64), block_r (the largest power of two <= 64 dividing R), block_n (128, halved until it divides O),
    and split_k: the largest multiple 2^j * block_k (j >= 1) of I's divisors whose programs, cdiv(t, block_m) row
    tiles x I / split_k x R / block_r, still reach TARGET_PROGRAMS; the smallest (2 * block_k) where none does."""
    bk = _pow2_divisor(k, 64)
    br = _pow2_divisor(r, 64)
    bn = _pow2_divisor(o, 128)
    tiles, cols = pl.cdiv(t, block_m), r // br
    splits = [s for s in (bk * 2 ** j for j in range(1, 12)) if s <= k and k % s == 0] or [bk]
    good = [s for s in splits if tiles * (k // s) * cols >= TARGET_PROGRAMS]
    return dict(block_k=bk, split_k=max(good) if good else min(splits), block_r=br, block_n=bn)


def _shrink_kernel(group_ref, row0_ref, row1_ref, order_ref, x_ref, a_ref, p_ref, *, num_groups, block_m, block_k,
                   block_r, pad_row, precision):
    # tables [NT]; order_ref [Tp]; x_ref [Tx, split_k] (this K-slice); a_ref [S, split_k, block_r]; p_ref [Tp, block_r]
    i = pl.program_id(0)
    g, r0, r1 = group_ref[i], row0_ref[i], row1_ref[i]
    srows = r0 + lax.broadcasted_iota(jnp.int32, (block_m,), 0)                         # sorted positions
    ok = srows < r1                                                                     # all False: empty tile
    rows = plgpu.load(order_ref.at[srows], mask=ok, other=pad_row)[:, None]             # [bm, 1] original rows
    kk = lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
    # Empty tiles (the slot-0 tail, past the real count) run 0 steps (int32 arithmetic: see grouped_matmul.py).
    steps = (g < num_groups).astype(jnp.int32) * (x_ref.shape[1] // block_k)
    slot = jnp.minimum(g, num_groups - 1) + 1

    def body(s, acc):
        k0 = s * block_k
        x = plgpu.load(x_ref.at[rows, k0 + kk], mask=jnp.broadcast_to(ok[:, None], (block_m, block_k)),
                       other=jnp.zeros((), x_ref.dtype))
        return acc + _dot(x, a_ref[slot, pl.ds(k0, block_k), :], precision=precision).astype(jnp.float32)

    acc = lax.fori_loop(0, steps, body, jnp.zeros((block_m, block_r), jnp.float32))
    cols = lax.broadcasted_iota(jnp.int32, (1, block_r), 1)
    plgpu.store(p_ref.at[srows[:, None], cols], acc, mask=jnp.broadcast_to(ok[:, None], (block_m, block_r)))


def _expand_kernel(group_ref, row0_ref, row1_ref, order_ref, h_ref, b_ref, *refs, num_groups, block_m, block_r,
                   block_n, pad_row, precision, num_splits, chunk, folded=False, part_starts=(), part_rank=0,
                   h_col0=0):
    # tables [NT]; order_ref [Tp] and h_ref in sorted rows: h [Tp, R] (x.dtype), or with num_splits > 0 the shrink's
    # float32 partials [Tp, num_splits * R], summed here, or with `folded` every slot's shrink in row order
    # [Tx, h_col0 + (S - 1) * R] (the base projection's extra columns, from column h_col0: lora_decode_expand);
    # b_ref [S, R, block_n]; refs:
    # (o_ref,) or (y_ref, o_ref), y the base projection [Tx, block_n] aliased to o_ref, both in row order.
    # part_starts (static): B is block-diagonal over a group's parts (part p: rows [p * part_rank, (p + 1) *
    # part_rank), output columns from part_starts[p - 1]) and block_n divides every part's width, so this program's
    # columns lie in one part and only that part's part_rank rows of B (and of h) are read: the rest are zeros.
    y_ref, o_ref = refs if len(refs) == 2 else (None, refs[0])
    i = pl.program_id(0)
    g, r0, r1 = group_ref[i], row0_ref[i], row1_ref[i]
    srows = r0 + lax.broadcasted_iota(jnp.int32, (block_m,), 0)
    ok = srows < r1
    rows = plgpu.load(order_ref.at[srows], mask=ok, other=pad_row)[:, None]
    cc = lax.broadcasted_iota(jnp.int32, (1, block_r), 1)
    r = b_ref.shape[1]
    if part_starts:
        col0 = pl.program_id(1) * block_n
        first = sum((col0 >= c).astype(jnp.int32) for c in part_starts) * part_rank  # this part's first rank row
        steps = (g < num_groups).astype(jnp.int32) * (part_rank // block_r)
    else:
        first, steps = 0, (g < num_groups).astype(jnp.int32) * (r // block_r)
    slot = jnp.minimum(g, num_groups - 1) + 1
    mask = jnp.broadcast_to(ok[:, None], (block_m, block_r))

    def body(s, acc):
        c0 = first + s * block_r
        if folded:  # the row's own slot's R columns of the folded shrink
            h = plgpu.load(h_ref.at[rows, h_col0 + (slot - 1) * r + c0 + cc], mask=mask,
                           other=jnp.zeros((), h_ref.dtype))
        elif num_splits:  # the shrink's K-slices summed in float32, then rounded as the separate reduction does
            h = lax.fori_loop(0, pl.cdiv(num_splits, chunk), functools.partial(
                _sum_partials, h_ref, srows, ok, c0 + cc, r, num_splits, chunk),
                jnp.zeros((block_m, block_r), jnp.float32)).astype(b_ref.dtype)
        else:
            h = plgpu.load(h_ref.at[srows[:, None], c0 + cc], mask=mask, other=jnp.zeros((), h_ref.dtype))
        return acc + _dot(h, b_ref[slot, pl.ds(c0, block_r), :], precision=precision).astype(jnp.float32)

    acc = lax.fori_loop(0, steps, body, jnp.zeros((block_m, block_n), jnp.float32))
    cols = lax.broadcasted_iota(jnp.int32, (1, block_n), 1)
    out_mask = jnp.broadcast_to(ok[:, None], (block_m, block_n))
    out = acc.astype(o_ref.dtype)  # the delta rounded as the unaliased path rounds it, then added as y + delta adds
    if y_ref is not None:
        y = plgpu.load(y_ref.at[rows, cols], mask=out_mask, other=jnp.zeros((), y_ref.dtype))
        out = (y.astype(jnp.float32) + out.astype(jnp.float32)).astype(o_ref.dtype)
    plgpu.store(o_ref.at[rows, cols], out, mask=out_mask)


def _sum_partials(h_ref, srows, ok, cols, r, num_splits, chunk, q, h):
    """h + the sum of K-slices [q * chunk, (q + 1) * chunk) of the rows' partials at columns `cols` [1, br]: one
    [bm, chunk, br] tile a step (one vectorized masked load and a reduction; a load a K-slice left the loop one
    dependent load an iteration, NOTES 47). Slices past num_splits are masked to 0."""
    j = q * chunk + lax.broadcasted_iota(jnp.int32, (1, chunk, 1), 1)                    # [1, chunk, 1]
    m = ok[:, None, None] & (j < num_splits)                                            # [bm, chunk, 1]
    idx = j * r + cols[:, None, :]                                                      # [1, chunk, br]
    m = jnp.broadcast_to(m, (srows.shape[0], chunk, idx.shape[2]))
    tile = plgpu.load(h_ref.at[srows[:, None, None], idx], mask=m, other=jnp.zeros((), jnp.float32))
    return h + tile.sum(axis=1)


def _validate(x, a, b, p: LoRAPlan, bk, ks, br, bn):
    validate_operands(x, a, b, p.ids)
    k, r, o = a.shape[1], a.shape[2], b.shape[2]
    for name, v, dim in (("block_k", bk, ks), ("split_k", ks, k), ("block_r", br, r), ("block_n", bn, o)):
        if v < _MIN_DOT or v & (v - 1) and name != "split_k" or dim % v:
            raise ValueError(f"{name}={v} must be {'a power of two ' if name != 'split_k' else ''}>= {_MIN_DOT} "
                             f"dividing {dim}")


@functools.partial(jax.jit, static_argnames=("block_k", "split_k", "block_r", "block_n", "num_warps", "num_stages",
                                             "fuse_reduction", "interpret"))
def lora_decode_matmul(x: jax.Array, a: jax.Array, b: jax.Array, p: LoRAPlan, *, block_k=None, split_k=None,
                       block_r=None, block_n=None, num_warps=None, num_stages=None,
                       fuse_reduction: bool = False, base: jax.Array | None = None,
                       interpret: bool = False) -> jax.Array:
    """x [T, I] with the plan's per-row slots -> [T, O] in x.dtype (the module contract), as two Pallas kernels;
    with `base`, base + that in one pass (the expand adds into base's buffer).

    Args:
        x, a, b: see `lora_matmul.py`'s contract.
        p: `plan(ids, S)` of this step.
        block_k, split_k, block_r, block_n: tiling (static); default from `default_settings`.
        num_warps, num_stages: Triton launch settings (static); default 4 and 3.
        fuse_reduction: the expand sums the shrink's float32 partials itself (one kernel fewer a call; each of its
            programs re-reads its rows' partials) instead of XLA summing them first; for the sweep to decide.
        base: [T, O] in x.dtype, the base projection: the result is base + delta, rows without an adapter are base
            untouched (the expand's output aliases base's buffer: no separate select and add over [T, O]).
        interpret: run the kernels in Pallas interpret mode (CPU tests).
    """
    t, k = x.shape
    s_, _, r = a.shape
    o = b.shape[2]
    d = default_settings(t, k, r, o, p.block_m)
    ks, br, bn = split_k or d["split_k"], block_r or d["block_r"], block_n or d["block_n"]
    bk = block_k or (d["block_k"] if ks % d["block_k"] == 0 else _pow2_divisor(ks, 64))
    _validate(x, a, b, p, bk, ks, br, bn)
    if base is not None and (base.shape != (t, o) or base.dtype != x.dtype):
        raise ValueError(f"base must be {x.dtype}[{t}, {o}] (x's rows and dtype, B's columns), got "
                         f"{base.dtype}{list(base.shape)}")
    bm, ng, nt = p.block_m, s_ - 1, p.group.shape[0]
    # Interpret mode evaluates masked loads and stores on clamped windows: arrays indexed by sorted position get bm
    # rows of padding and those indexed by row one (pad_row = T, the masked lanes' row). A GPU never dereferences a
    # masked lane: there the arrays are used as they are.
    tp, tx = (t + bm, t + 1) if interpret else (t, t)
    order = jnp.pad(p.order, (0, tp - t), constant_values=t) if interpret else p.order
    xp = jnp.pad(x, ((0, tx - t), (0, 0))) if interpret else x
    precision = lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    params = _CompilerParams(num_warps=num_warps or 4, num_stages=num_stages or 3)
    table = pl.BlockSpec((nt,), lambda *_: (0,))
    tables = (p.group, p.row0, p.row1, order)
    kw = dict(num_groups=ng, block_m=bm, block_r=br, pad_row=t, precision=precision)
    nks, nr = k // ks, r // br
    partials = pl.pallas_call(
        functools.partial(_shrink_kernel, block_k=bk, **kw),
        grid=(nt, nks, nr),
        in_specs=[table, table, table, pl.BlockSpec((tp,), lambda *_: (0,)),
                  pl.BlockSpec((tx, ks), lambda i, j, c: (0, j)),
                  pl.BlockSpec((s_, ks, br), lambda i, j, c: (0, j, c))],
        out_specs=pl.BlockSpec((tp, br), lambda i, j, c: (0, j * nr + c)),
        out_shape=jax.ShapeDtypeStruct((tp, nks * r), jnp.float32),
        compiler_params=params, interpret=interpret,
        name=f"qwenjax_lora_shrink_m{bm}_k{bk}_s{ks}_r{br}",
    )(*tables, xp, a)
    # Rows of no adapter (and the padding) hold whatever was there: they are never read back into a result.
    h = partials if fuse_reduction else partials.reshape(tp, nks, r).sum(axis=1).astype(x.dtype)  # [Tp, R] sorted
    out = _expand(h, b, p, order, t, tx, bn, params, kw, base=base, num_splits=nks if fuse_reduction else 0,
                  interpret=interpret)
    if base is not None:
        return out[:t]  # rows of no adapter were never written: base's values
    return jnp.where((p.ids > 0)[:, None], out[:t], jnp.zeros((), x.dtype))


def _expand(h, b, p: LoRAPlan, order, t, tx, bn, params, kw, *, base=None, num_splits=0, folded=False,
            parts=(), h_col0=0, interpret=False):
    """The expand's pallas_call: [Tx, O] in b.dtype, rows of an adapter written (plus base's with `base`); `parts`
    (see `block_diagonal`): the tiles read only their own part's rows of B."""
    s_, r, o = b.shape
    starts = tuple(int(c) for c in np.cumsum(parts)[:-1]) if parts else ()
    nt = p.group.shape[0]
    table = pl.BlockSpec((nt,), lambda *_: (0,))
    out_spec = pl.BlockSpec((tx, bn), lambda i, j: (0, j))
    extra = () if base is None else (jnp.pad(base, ((0, tx - t), (0, 0))) if tx > t else base,)
    return pl.pallas_call(
        functools.partial(_expand_kernel, block_n=bn, num_splits=num_splits, folded=folded, part_starts=starts,
                          part_rank=r // len(parts) if parts else 0, h_col0=h_col0,
                          chunk=min(_SUM_CHUNK, 1 << max(num_splits - 1, 0).bit_length()), **kw),
        grid=(nt, o // bn),
        in_specs=[table, table, table, pl.BlockSpec((order.shape[0],), lambda *_: (0,)),
                  pl.BlockSpec(h.shape, lambda i, j: (0, 0)),
                  pl.BlockSpec((s_, r, bn), lambda i, j: (0, 0, j))] + [out_spec] * len(extra),
        out_specs=out_spec,
        out_shape=jax.ShapeDtypeStruct((tx, o), b.dtype),
        input_output_aliases={6: 0} if extra else {},
        compiler_params=params, interpret=interpret,
        name=f"qwenjax_lora_expand_m{p.block_m}_r{kw['block_r']}_n{bn}{'_fused' if num_splits else ''}"
             f"{'_add' if extra else ''}{'_folded' if folded else ''}{f'_parts{len(parts)}' if parts else ''}",
    )(p.group, p.row0, p.row1, order, h, b, *extra)


def block_diagonal(parts: tuple, r: int, block_r: int | None = None) -> tuple[tuple, int | None]:
    """(parts, block_n) for an expand whose B [S, R, O] is block-diagonal over a group's parts of output widths
    `parts` (q/k/v, gate/up: part p's R / G rank rows feed only its columns): the widest power-of-two block_n <= 128
    dividing every part, so that a tile's columns lie in one part. ((), None) where no such tiling is there (a
    width not a multiple of 16, or a part's rank not a multiple of block_r): then every tile reads all R rows."""
    g = len(parts)
    if g < 2 or r % g:
        return (), None
    width = int(np.gcd.reduce(np.asarray(parts)))
    bn = _pow2_divisor(width, 128)
    pr = r // g
    br = block_r or _pow2_divisor(pr, 64)
    if width % bn or pr % br or br < _MIN_DOT:
        return (), None
    return tuple(int(w) for w in parts), bn


@functools.partial(jax.jit, static_argnames=("block_r", "block_n", "num_warps", "num_stages", "parts", "col0",
                                             "interpret"))
def lora_decode_expand(h_all: jax.Array, b: jax.Array, p: LoRAPlan, *, block_r=None, block_n=None, num_warps=None,
                       num_stages=None, parts: tuple = (), col0: int = 0, interpret: bool = False) -> jax.Array:
    """The expand alone, of a shrink already done for every slot: h_all [T, (S - 1) * R] in row order (slot s's
    R columns at [(s - 1) R, s R), as the base projection's extra columns give it: layers/lora.py's fold) and
    b [S, R, O] -> [T, O] in b.dtype, row t = h_all[t, its slot's columns] @ b[its slot] accumulated in float32,
    zeros for rows of slot 0. One kernel: the expand reads each row's own columns straight from h_all.

    parts: the output widths of a group's parts when b is block-diagonal over them (layers/lora.py's groups); where
    `block_diagonal` finds a tiling, each tile reads only its part's rank rows (the zero blocks are not read) and
    block_n defaults to that tiling's.

    col0: the slots' columns start at column col0 of h_all ([T, col0 + (S - 1) * R]; the columns before are not
    read): the base projection's whole output can be passed as it is, with no copy of its tail for the kernel."""
    t = h_all.shape[0]
    s_, r, o = b.shape
    if h_all.ndim != 2 or h_all.shape[1] != col0 + (s_ - 1) * r or h_all.dtype != b.dtype or p.ids.shape[0] != t:
        raise ValueError(f"h_all must be {b.dtype}[T, col0 + (S - 1) * R] = [{p.ids.shape[0]}, {col0 + (s_ - 1) * r}]"
                         f" for b [S={s_}, R={r}, O={o}], col0={col0} and the plan's rows; got "
                         f"{h_all.dtype}{list(h_all.shape)}")
    if parts and sum(parts) != o:
        raise ValueError(f"parts {list(parts)} must add up to B's {o} output columns")
    d = default_settings(t, r, r, o, p.block_m)
    parts, part_bn = block_diagonal(parts, r, block_r) if parts else ((), None)
    if parts and block_n and any(w % block_n for w in parts):
        raise ValueError(f"block_n={block_n} must divide every part's width {list(parts)} (a tile in one part)")
    br = block_r or (_pow2_divisor(r // len(parts), 64) if parts else d["block_r"])
    bn = block_n or part_bn or d["block_n"]
    for name, v, dim in (("block_r", br, r), ("block_n", bn, o)):
        if v < _MIN_DOT or v & (v - 1) or dim % v:
            raise ValueError(f"{name}={v} must be a power of two >= {_MIN_DOT} dividing {dim}")
    bm = p.block_m
    tp, tx = (t + bm, t + 1) if interpret else (t, t)  # interpret mode's padding, as lora_decode_matmul's
    order = jnp.pad(p.order, (0, tp - t), constant_values=t) if interpret else p.order
    hp = jnp.pad(h_all, ((0, tx - t), (0, 0))) if interpret else h_all
    precision = lax.Precision.HIGHEST if b.dtype == jnp.float32 else None
    params = _CompilerParams(num_warps=num_warps or 4, num_stages=num_stages or 3)
    kw = dict(num_groups=s_ - 1, block_m=bm, block_r=br, pad_row=t, precision=precision)
    out = _expand(hp, b, p, order, t, tx, bn, params, kw, folded=True, parts=parts, h_col0=col0, interpret=interpret)
    return jnp.where((p.ids > 0)[:, None], out[:t], jnp.zeros((), b.dtype))
