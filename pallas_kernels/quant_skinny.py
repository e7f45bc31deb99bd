"""Weight-only low-bit skinny product for decode batches (M = 1..64 rows): Pallas GPU (Triton lowering) kernel,
jitted API, jnp reference. The successor of quant_gemv.py (kept for comparison in benchmarks/quant_matmul.py).

Axis letters: M rows of x, K inputs, N outputs, G groups, S K-splits, A column classes, U blocks a program.
Layouts: exactly quant_gemv.py's ("gptq", "gptq_v2": the checkpoint's K-packed words [K/pf, N]; "awq_kp": AWQ
repacked at load in 8 x 8 blocks, words [K, N/8]); out = x @ W, W[k, n] = (q[k, n] - z[g(k), n]) * s[g(k), n],
g(k) = k // group_size. Group-ordered weights only: act-order layers are sorted into group order at load
(qwenjax/quantization/act_order.py) and x's columns gathered to match.

Why a redesign (found by reading Triton and the Pallas lowering, not yet measured): Pallas lowers `fori_loop` to an
`scf.for` without a `tt.num_stages` attribute, and Triton's pipeliner (AssignLatencies / loadOpsToIndirectionLevel)
only software-pipelines loads of such a loop when they feed a `tt.dot`. The old GEMV's loop has no dot, so every
block of it waited for its own DRAM round trip, whatever its size and whatever num_stages said: the "about 2 us per
block" measured on the H100. Hence two designs, each with a reason for its loads to be in flight early:

  "fma"   (M <= FMA_MAX_ROWS, default for M <= 4): no loop at all. A program owns bn columns and U consecutive
          K blocks of bkw words (bk = bkw * pf input rows, inside one group), unrolled in straight-line code with
          all of its loads written first, so that they are in flight together and latency hides behind the many
          resident programs (K is split into K / (bk * U) programs; float32 partials [S, M, N] that XLA sums,
          usually fused into the consumer). The tile [bkw, A, bn/A] is loaded once, contiguous along N (Pallas
          marks every pointer argument divisible by 32 bytes and the column offsets are an arange: Triton's
          coalescing pass gives each thread 4 consecutive int32, one 128-bit ld.global.v4). Each bit field
          becomes float32 with no integer-to-float conversion: masked in place, or-ed with the exponent of
          2**23, minus 2**23 + zero, which is (q - z) * 2**(bits f) exactly (the power of two moves onto x); M FMAs
          per weight into element-wise partials, reduced over the block's rows and scaled once per block. x's
          values for a block arrive as small [bkw] vectors broadcast along N (the slice layout of the tile: no
          shared memory).
  "dot"   (M <= 64): x padded to bm = 16, 32 or 64 rows, a K loop over the split's blocks whose weight loads feed
          a tensor-core `tl.dot` (so Triton pipelines them num_stages deep, cp.async). Per block and bit field:
          dot(x[:, rows j, j+pf, ...] [bm, bkw], (q_j - z) * s [bkw, bn/A] rounded once to x's dtype, as XLA's
          dequantize-then-dot does; where a block spans several smaller groups, z and s are gathered per word
          row), accumulated in float32 by the dots themselves (scaling the block's float32
          product instead cost a layout change of the accumulator and more barriers, and 50 more registers at
          64 rows). The dequantized tile reaches the tensor cores through
          Triton's operand layout conversion (registers -> shared memory -> ldmatrix, as any Triton mixed-input
          GEMM); bm = 16 is an mma.sync m16n8k16 shape, so this is a "skinny GEMM" with few wasted rows.
  "dot_t" the same product transposed (out^T = W^T x^T, "swap AB"): the weight tile is the dot's left operand, whose
          M = bn/A >= 64 is a Hopper wgmma shape (A may come from registers), x^T the small right operand.
The sweep (benchmarks/quant_matmul.py, variant `skinny`) searches mode, block_n, block_kw, unroll / num_splits,
num_warps and num_stages; `CONFIGS` takes its output, `heuristic` covers the rest.

What the GPU will run, inspected on CPU (the pallas_call lowered for CUDA, its Triton IR compiled for sm_90a by
Triton 3.9 and ptxas 12.9: benchmarks/kernel_isa.py --kernels skinny-fma-m1,... --triton-python PY; per thread,
GPTQ 4-bit g128 at the fused gate/up 3584 -> 37888, the heuristic's settings):
  fma, M = 1 (bn 512 on 4 warps, 8 word rows a block, 7 blocks a program in the prefetching loop): 16 ld.global.v4
      of weights (the next block's issued before this block's arithmetic); no shared memory, no bar.sync; 168
      registers, no spills. x: 64 scalar 2-byte loads per block (every thread needs every x of its rows: L1 hits,
      one per 4 weight words per row of x). M = 4 (4 word rows): 8 v4, no barrier, 166 registers. The fused qkv
      (bn 256 on 2 warps, 2 blocks straight-line): 16 v4, no barrier, 254 registers.
  fma with bn = 256 on 4 warps instead (the first version's default): 7 bar.sync and shared-memory round trips per
      block (the [1, bn] zeros and scales in another layout than the tile's slice), a DRAM round trip per block.
  fma, awq_kp: the same loads, plus 4 (M = 1) to 10 (M = 4) barriers from the 8 column classes' gathered zeros and
      scales; about 252 registers, no spills.
  dot / dot_t, M = 16: weights and x arrive by cp.async (pipelined, 3 stages); each field's dequantized
      [bkw, bn] bf16 tile goes to shared memory with 2-byte st.shared (Triton's operand conversion, also for
      dot_t's wgmma; one barrier each, 8 a block), then mma.sync m16n8k16 (dot, 128 registers, 8 bytes of spills)
      or wgmma m64n16k16 (dot_t, 112 registers). M = 64: wgmma m64n128k16, 8 warps, 147 registers (on 4 warps it
      spilled). awq_kp's 8 column classes make 8 times the dots and many more barriers (144 at M = 16).
  The old GEMV (quant_gemv.py, M = 1): a loop without a dot (no cp.async), 4 v4 loads and 16 bar.sync per block.
Measured on the H100 (benchmarks/NOTES.md entry 46): no faster than the GEMV, both bound by instruction issue at
~5.5 loop instructions a weight. The lop3 modes (quant_lop3.py) dequantize two fields per PTX instruction instead.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import gemv_tiles, quant_gemv, quant_lop3

FORMATS = quant_gemv.FORMATS
MODES = ("fma", "dot", "dot_t", "lop3", "lop3_t")  # lop3: quant_lop3.py (4 bits, Marlin's dequantization)
MAX_ROWS = 64
FMA_MAX_ROWS = 8          # the fma mode unrolls over the rows of x (M partial tiles in registers)
_MIN_DOT = 16             # Triton's smallest dot dimension
_MAGIC = 0x4B000000       # float32 bits of 2**23: (v | _MAGIC) viewed as float32 is 2**23 + v for 0 <= v < 2**23
_TWO23 = float(1 << 23)
_FMA_DEFAULT_ROWS = 4     # the heuristic's fma / dot boundary
_TARGET_PROGRAMS = 528    # fma: four programs per SM of an H100 (132)
_MIN_COLUMN_BLOCKS = 16   # fma: fewer warps (narrower programs) below this many column blocks
_STRAIGHT_BLOCKS = 2      # fma: up to this many blocks a program in straight-line code, more in a prefetching loop
_TARGET_DOT_PROGRAMS = 264  # dot: two waves of an H100's 132 SMs

# (max rows, K, N) -> (mode, block_n, block_kw, num_splits, num_warps, num_stages). Paste the sweep's output here
# (benchmarks/quant_matmul.py prints `skinny` entries); an entry for r rows covers the M above the previous row count
# of SWEEP_ROWS up to r. Empty until measured on the H100.
CONFIGS: dict[tuple[int, int, int], tuple[str, int, int, int, int, int]] = {}
SWEEP_ROWS = (1, 4, 16, 64)


def settings(m: int, k: int, n: int, *, fmt: str, bits: int, group_size: int, mode: str | None = None):
    """(mode, block_n, block_kw, num_splits, num_warps, num_stages) for a product: CONFIGS, else `heuristic`
    (for a lop3 mode asked by name: `lop3_heuristic`)."""
    if mode in ("lop3", "lop3_t"):
        return lop3_heuristic(m, k, n, fmt=fmt, group_size=group_size, transpose=mode == "lop3_t")
    rows = next((r for r in SWEEP_ROWS if r >= m), None)
    cfg = CONFIGS.get((rows, k, n))
    if cfg is not None and _valid(m, k, n, fmt, bits, group_size, *cfg[:4]) is None:
        return tuple(cfg)
    return heuristic(m, k, n, fmt=fmt, bits=bits, group_size=group_size)


def heuristic(m: int, k: int, n: int, *, fmt: str, bits: int, group_size: int):
    """fma for M <= 4: block_n = 128 * num_warps, the width at which Triton gives each thread 4 adjacent columns
    (one 128-bit load) of every word row of the block, so that the zeros and scales need no layout change, each
    thread reduces its own rows and the PTX has no barrier and no shared memory; 4 warps (fewer where N has under
    16 such column blocks); 8 word rows a block (4 above 2 rows: registers; at M = 1, 168 registers and no spills
    with two blocks in registers, 16 KB in flight a program); K split until about 528 programs (four per SM) run,
    no further (the float32 partials cost S * M * N * 8 bytes of traffic: at gate/up, M = 1, S = 8, 4% of the
    weights'). dot above: bm = M padded, bn 128 (256 for awq_kp, whose dots are bn / 8 wide), 16 word rows a block
    (one mma K step per bit field; where that spans several smaller groups, per-row zeros and scales), 4 warps (8
    for bm = 64), about two waves of programs, 3 stages. Falls back to fma (M <= FMA_MAX_ROWS) where neither the
    block divides the group nor the group the block (e.g. groups of 96)."""
    pf = 32 // bits
    group = k if group_size == -1 else group_size
    classes = 8 if fmt == "awq_kp" else 1
    mode = "fma" if m <= _FMA_DEFAULT_ROWS else "dot"
    bn = 128 * (2 if classes == 8 else 1)  # the dot modes' block_n
    while bn > classes and n % bn:
        bn //= 2
    if mode == "dot" and _valid(m, k, n, fmt, bits, group_size, "dot", bn, _MIN_DOT, 1) is not None:
        mode = "fma"
    bkw = (8 if m <= 2 else 4) if mode == "fma" else _MIN_DOT  # the dot block was validated above
    while mode == "fma" and bkw > 1 and (group % (bkw * pf) or k % (bkw * pf)):
        bkw //= 2
    blocks = k // (bkw * pf)
    if mode == "fma":
        warps = 4
        while warps > 1 and (n % (128 * warps) or n // (128 * warps) < _MIN_COLUMN_BLOCKS):
            warps //= 2
        bn = 128 * warps
        while bn > classes and n % bn:  # an N no multiple of 128: rows then spread over threads
            bn //= 2
        splits = max(1, min(-(-_TARGET_PROGRAMS // (n // bn)), blocks))
        return mode, bn, bkw, -(-blocks // -(-blocks // splits)), warps, 1  # the count quant_skinny ends with
    warps, stages = 8 if m > 32 else 4, 3  # 64 rows on 4 warps: spills
    return mode, bn, bkw, _dot_splits(blocks, n // bn), warps, stages


def _dot_splits(blocks: int, column_blocks: int, target: int = _TARGET_DOT_PROGRAMS) -> int:
    """K splits for about `target` programs (default two waves of dot programs): the count that `num_splits` ends
    with (none empty)."""
    splits = max(1, min(-(-target // max(1, column_blocks)), blocks))
    return -(-blocks // -(-blocks // splits))


def lop3_heuristic(m: int, k: int, n: int, *, fmt: str, group_size: int, transpose: bool = False):
    """The lop3 modes: 16 word rows a block (128 input rows: one dot of K = 128), block_n 128 (256 for awq_kp),
    K split until about four programs an SM up to 32 rows (on an H100 the split-dot form used 95 registers, room for
    5 programs an SM, and with gate/up's 296 programs, 0.45 waves, its warps waited on memory: ncu, NOTES 53), two
    waves above, 4 warps (8 above 32 rows), 3 stages. A group smaller than the block gives per-row zeros and scales
    (as the dot modes); one that neither divides nor is a multiple of 128 rows falls to 8 word rows."""
    classes = 8 if fmt == "awq_kp" else 1
    bn = 128 * (2 if classes == 8 else 1)
    while bn > 16 * classes and n % bn:
        bn //= 2
    group = k if group_size == -1 else group_size
    bkw = 16 if k % 128 == 0 and (group % 128 == 0 or 128 % group == 0) else 8
    splits = _dot_splits(k // (bkw * 8), n // bn, _TARGET_PROGRAMS if m <= 32 else _TARGET_DOT_PROGRAMS)
    return "lop3_t" if transpose else "lop3", bn, bkw, splits, 8 if m > 32 else 4, 3


def _valid(m, k, n, fmt, bits, group_size, mode, bn, bkw, splits) -> str | None:
    """None when the settings fit the product, else why not."""
    if mode not in MODES:
        return f"mode must be one of {MODES}, got {mode!r}"
    classes = 8 if fmt == "awq_kp" else 1
    if mode in ("lop3", "lop3_t"):
        if bits != 4:
            return f"mode {mode!r} takes 4-bit weights only, got bits={bits}"
        if bkw < 8 or bn // classes < _MIN_DOT:
            return (f"mode {mode!r} needs block_kw >= 8 (got {bkw}: its dots' K is 2 * block_kw) and "
                    f"block_n{' / 8' if classes > 1 else ''} >= {_MIN_DOT} (got block_n={bn})")
    elif mode != "fma" and (bkw < _MIN_DOT or bn // classes < _MIN_DOT):
        return (f"mode {mode!r} needs block_kw >= {_MIN_DOT} (got {bkw}) and block_n{' / 8' if classes > 1 else ''}"
                f" >= {_MIN_DOT} (got block_n={bn}): Triton's smallest dot")
    pf, group = 32 // bits, k if group_size == -1 else group_size
    if mode != "fma" and group < bkw * pf and (bkw * pf) % group == 0 and group % pf == 0:
        group = bkw * pf  # the dot modes gather per-row zeros and scales where a block spans whole groups
    why = quant_gemv._valid(k, n, fmt, bits, group, bn, bkw)
    if why:
        return why
    if not (isinstance(splits, int) and splits >= 1):
        return f"num_splits must be a positive int, got {splits}"
    if mode == "fma" and m > FMA_MAX_ROWS:
        return f"mode 'fma' takes at most {FMA_MAX_ROWS} rows, got M={m}"
    return None


def supported(m: int, k: int, n: int, *, fmt: str, bits: int, group_size: int, dtype, mode=None) -> bool:
    """Whether the kernel takes this product with its default settings (in `mode`, where named), else the caller
    uses another path."""
    if not quant_gemv.layout_fits(m, k, n, fmt=fmt, bits=bits, group_size=group_size, dtype=dtype,
                                  max_rows=MAX_ROWS):
        return False
    return _valid(m, k, n, fmt, bits, group_size, *settings(m, k, n, fmt=fmt, bits=bits, group_size=group_size,
                                                                 mode=mode)[:4]) is None


def _field(words, j, bits, *, in_place: bool):
    """Bit field j of every word as float32 plus 2**23, exactly: in place (times 2**(bits j)) or shifted down."""
    if in_place:
        return lax.bitcast_convert_type((words & (((1 << bits) - 1) << (bits * j))) | _MAGIC, jnp.float32)
    return lax.bitcast_convert_type(((words >> (bits * j)) & ((1 << bits) - 1)) | _MAGIC, jnp.float32)


def _fma_kernel(x_ref, qw_ref, qz_ref, s_ref, o_ref, *, rows, bits, zero_offset, bkw, group_blocks, unroll,
                num_k_blocks):
    # x_ref [M, K/pf, pf]; qw_ref [K/pf, A, cw]; qz_ref [G, bn/pf]; s_ref [G, bn]; o_ref [M, bn] (f32 when split)
    pf = 32 // bits
    low = (23 - bits) // bits + 1  # fields whose bits all lie below bit 23 (4 bits: 5; 8 bits: 2)
    A, cw = qw_ref.shape[1], qw_ref.shape[2]
    col, zero_word, zero_shift = gemv_tiles.skinny_columns(A, cw, pf, bits)
    first = pl.program_id(1) * unroll

    def load(kb):  # a block's words [bkw, A, cw] (128-bit loads along N), zeros and scales [A, cw]
        g = kb // group_blocks if group_blocks else 0
        return (qw_ref[pl.ds(kb * bkw, bkw), :, :],
                *gemv_tiles.skinny_zeros_scales(qz_ref, s_ref, g, col, zero_word, zero_shift, bits=bits,
                                                zero_offset=zero_offset, natural=A == 1))

    def block(kb, words, z, s, accs):
        high = words >> (bits * low)
        z = z[None]  # [1, A, cw] before any arithmetic: one layout change for all fields, if any
        parts = [None] * rows
        for j in range(pf):
            src, f = (words, j) if j < low else (high, j - low)
            w = _field(src, f, bits, in_place=True) - (z * float(1 << (bits * f)) + _TWO23)  # (q - z) * 2**(bits f)
            for m in range(rows):
                xj = x_ref[m, pl.ds(kb * bkw, bkw), j].astype(jnp.float32)  # input rows k0 + j, k0 + j + pf, ...
                t = (xj * (1.0 / (1 << (bits * f))) if f else xj)[:, None, None] * w
                parts[m] = t if parts[m] is None else parts[m] + t
        # Reduced over the block's rows at once (inside each thread where one thread holds all bkw rows of its
        # columns: the heuristic's block_n = 128 * num_warps), so only [A, cw] accumulators live across blocks.
        return tuple(acc + jnp.sum(p, axis=0) * s for acc, p in zip(accs, parts))

    accs = tuple(jnp.zeros((A, cw), jnp.float32) for _ in range(rows))
    if unroll <= _STRAIGHT_BLOCKS and num_k_blocks % unroll == 0:
        # Every block's loads first, in program order: ptxas does not move a load across a barrier, so a load
        # written after the previous block's arithmetic would wait for it wherever that arithmetic has one.
        for u, blk in enumerate([load(first + u) for u in range(unroll)]):
            accs = block(first + u, *blk, accs)
    else:
        # More blocks: a loop that loads block i + 1 before the arithmetic of block i (double buffering in
        # registers; the last iteration reloads its own block, a cache hit), so that one block is always in flight
        # and the registers hold two, whatever the count (the last split's may be shorter).
        count = jnp.minimum(num_k_blocks - first, unroll)

        def body(i, carry):
            cur, accs = carry[:3], carry[3:]
            nxt = load(first + jnp.minimum(i + 1, count - 1))
            return (*nxt, *block(first + i, *cur, accs))

        accs = lax.fori_loop(0, count, body, (*load(first), *accs))[3:]
    for m in range(rows):
        if A == 1:
            o_ref[pl.ds(m, 1), :] = accs[m].astype(o_ref.dtype)
        else:
            plgpu.store(o_ref.at[jnp.full((A, cw), m, jnp.int32), col], accs[m].astype(o_ref.dtype))


def _dot_kernel(x_ref, qw_ref, qz_ref, s_ref, o_ref, *, bits, zero_offset, bkw, blocks_per_group, blocks_per_split,
                num_k_blocks, transpose):
    # x_ref [bm, pf, K/pf] (x_ref[:, j, w] = x[:, w * pf + j]); qw_ref [K/pf, A, cw]; qz_ref [G, bn/pf];
    # s_ref [G, bn]; o_ref [bm, bn]
    pf = 32 // bits
    A, cw = qw_ref.shape[1], qw_ref.shape[2]
    bm = x_ref.shape[0]
    cdt = x_ref.dtype
    cols = [gemv_tiles.skinny_columns(A, cw, pf, bits, a) for a in range(A)]             # [1, cw] each
    first = pl.program_id(1) * blocks_per_split
    count = jnp.clip(num_k_blocks - first, 0, blocks_per_split)
    acc_shape = (cw, bm) if transpose else (bm, cw)

    def body(i, accs):
        kb = first + i
        if blocks_per_group < 0:  # a block spans -blocks_per_group groups: each word row w its own (rows w*pf + j)
            w = lax.broadcasted_iota(jnp.int32, (bkw, 1), 0)
            g = kb * -blocks_per_group + w * pf // (bkw * pf // -blocks_per_group)
        else:
            g = kb // blocks_per_group if blocks_per_group else 0
        xs = [x_ref[:, j, pl.ds(kb * bkw, bkw)] for j in range(pf)]     # [bm, bkw]: input rows j, j + pf, ...
        out = []
        for a in range(A):  # awq_kp: class a holds output columns 8b + a in its row 8w + a of every 8
            words = qw_ref[pl.ds(kb * bkw, bkw), a, :]                   # [bkw, cw]
            za, sa = gemv_tiles.skinny_zeros_scales(qz_ref, s_ref, g, *cols[a], bits=bits, zero_offset=zero_offset,
                                                    natural=A == 1)
            acc = accs[a]
            for j in range(pf):
                # (q - z) * s rounded once to x's dtype (as XLA's dequantize-then-dot does): the scale joins the
                # tile in its own layout, and the dots accumulate straight into acc (no per-block multiply in the
                # accumulator's layout, which cost a layout change and barriers per block)
                w = ((_field(words, j, bits, in_place=False) - (za + _TWO23)) * sa).astype(cdt)
                acc += jnp.dot(w.T, xs[j].T, preferred_element_type=jnp.float32) if transpose else \
                    jnp.dot(xs[j], w, preferred_element_type=jnp.float32)
            out.append(acc)
        return tuple(out)

    accs = lax.fori_loop(0, count, body, tuple(jnp.zeros(acc_shape, jnp.float32) for _ in range(A)))
    rows = lax.broadcasted_iota(jnp.int32, (bm, cw), 0)
    for a, acc in enumerate(accs):
        acc = acc.T if transpose else acc
        if A == 1:
            o_ref[...] = acc.astype(o_ref.dtype)
        else:
            plgpu.store(o_ref.at[rows, jnp.broadcast_to(cols[a][0], (bm, cw))], acc.astype(o_ref.dtype))


@functools.partial(jax.jit, static_argnames=("fmt", "bits", "group_size", "mode", "block_n", "block_kw",
                                             "num_splits", "num_warps", "num_stages", "interpret", "out_dtype"))
def quant_skinny(x, qweight, qzeros, scales, *, fmt: str, bits: int, group_size: int, mode=None, block_n=None,
                 block_kw=None, num_splits=None, num_warps=None, num_stages=None, interpret=False, out_dtype=None):
    """x [M, K] @ the low-bit weight -> [M, N] in out_dtype (default x.dtype), for 1 <= M <= MAX_ROWS.

    Args:
        x: [M, K] bfloat16 / float16 activations.
        qweight, qzeros, scales: one layer's arrays in `fmt`'s layout (quant_gemv.py's docstring).
        fmt: "gptq" (v1 zeros: stored + 1), "gptq_v2" or "awq_kp" (static).
        bits: 4 or 8 (gptq); 4 (awq_kp) (static).
        group_size: input rows per scale group, or -1 for one group (static).
        mode: "fma", "dot" or "dot_t" (module docstring) (static); default `settings`.
        block_n, block_kw: output columns and packed word rows of a block (static).
        num_splits: K splits (static): programs along K, each over ceil(blocks / num_splits) blocks (the count
            rounded so that no split is empty; the last may be shorter). fma: up to 2 blocks in straight-line code,
            more in a loop that prefetches the next block; dot: a pipelined loop.
        num_warps, num_stages: Triton launch settings (static); num_stages matters to the dot modes' loop only.
        interpret: run in Pallas interpret mode (CPU tests).
        out_dtype: the result's dtype (static); float32 for partial products that are summed before rounding
            (a row-parallel layer's K slices over a mesh, qwenjax/layers/quant_sharded.py).
    """
    m, k, n, pf, groups = quant_gemv.check_arrays(x, qweight, qzeros, scales, fmt=fmt, bits=bits,
                                                  group_size=group_size, max_rows=MAX_ROWS)
    d = settings(m, k, n, fmt=fmt, bits=bits, group_size=group_size, mode=mode)
    mode, bn, bkw, splits, warps, stages = (v if v is not None else dv for v, dv in
                                            zip((mode, block_n, block_kw, num_splits, num_warps, num_stages), d))
    why = _valid(m, k, n, fmt, bits, group_size, mode, bn, bkw, splits)
    if why:
        raise ValueError(why)
    classes = 8 if fmt == "awq_kp" else 1
    num_k_blocks = k // (bkw * pf)
    per_split = pl.cdiv(num_k_blocks, splits)
    splits = pl.cdiv(num_k_blocks, per_split)  # no split starts past K (the last may be shorter)
    group_blocks = 0 if group_size == -1 else group_size // (bkw * pf)
    zero_offset = 1 if fmt == "gptq" else 0
    bm = m if mode == "fma" else max(_MIN_DOT, 1 << (m - 1).bit_length())
    xp = jnp.pad(x, ((0, bm - m), (0, 0))) if bm != m else x
    if mode == "fma":
        kernel = functools.partial(_fma_kernel, rows=m, bits=bits, zero_offset=zero_offset, bkw=bkw,
                                   group_blocks=group_blocks, unroll=per_split, num_k_blocks=num_k_blocks)
    else:
        bk = bkw * pf  # blocks a group (> 0), or minus the groups a block spans (groups smaller than a block)
        blocks_per_group = 0 if group_size == -1 else group_size // bk if group_size >= bk else -(bk // group_size)
        common = dict(zero_offset=zero_offset, bkw=bkw, blocks_per_group=blocks_per_group,
                      blocks_per_split=per_split, num_k_blocks=num_k_blocks, transpose=mode.endswith("_t"))
        if mode.startswith("lop3"):
            kernel = functools.partial(quant_lop3.kernel, rows=m, interpret=interpret,
                                       split=quant_lop3.split_dots(warps), **common)
        else:
            kernel = functools.partial(_dot_kernel, bits=bits, **common)
    # fma: x3 [M, K/pf, pf], a free view. dot: x3 transposed to [bm, pf, K/pf] (a tiny XLA transpose), so that the
    # [bm, bkw] x operand of a bit field is contiguous rows: pipelined 16-byte cp.async instead of 2-byte loads.
    # lop3: in the K order of its dequantized pairs (quant_lop3.arrange_x: [bm, K], or [bm, 4, K/4] for split dots).
    x3 = xp.reshape(bm, k // pf, pf)
    if mode.startswith("lop3"):
        x3 = quant_lop3.arrange_x(xp, split=quant_lop3.split_dots(warps))
    elif mode != "fma":
        x3 = x3.transpose(0, 2, 1)
    name = f"qwenjax_{fmt}{bits}_skinny_{mode}_m{bm}_n{bn}_kw{bkw}_s{splits}"
    # lop3 writes the first m rows alone (its padded rows hold no values): the partials are summed over those
    out = quant_gemv.launch(kernel, x3, qweight.reshape(k // pf, classes, n // classes), qzeros, scales, block_n=bn,
                            num_splits=splits, out_dtype=out_dtype or x.dtype, num_warps=warps, num_stages=stages,
                            interpret=interpret, name=name, rows=m if mode.startswith("lop3") else None)
    return out[:m]


def quant_skinny_reference(x, qweight, qzeros, scales, *, fmt: str, bits: int, group_size: int):
    """Plain jnp: dequantize the whole weight in float32, then one float32 matmul; -> [M, N] in x.dtype."""
    return quant_gemv.quant_gemv_reference(x, qweight, qzeros, scales, fmt=fmt, bits=bits, group_size=group_size)
