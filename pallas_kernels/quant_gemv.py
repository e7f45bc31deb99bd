"""Weight-only low-bit GEMV for decode (M = 1..16 rows): Pallas GPU (Triton lowering) kernel, jitted API, jnp reference.

Axis letters: M rows of x (tokens), K inputs, N outputs, G groups (K / group_size, or 1), S K-splits, A column classes.

Layouts (K-packed words: every int32 holds pf = 32 / bits consecutive input rows of ONE output column):
  gptq     qweight int32 [K/pf, N]: value j of word (w, n) is W-row w*pf + j, column n (the checkpoint's own layout)
  awq_kp   qweight int32 [K, N/8]: AWQ repacked at load (qwenjax/quantization/repack.py) in 8 x 8 blocks: nibble j of
           word (8w + a, b) is row 8w + j, column 8b + a. Same shape as the checkpoint's qweight, and every 8-row,
           8-column block of the output maps to the same block of words, so row and column shards stay shards.
  qzeros   int32 [G, N/pf], packed along N in natural order (column c: field c % pf of word c // pf); "gptq" (v1)
           stores zero - 1, "gptq_v2" and "awq_kp" the zero
  scales   [G, N], any float dtype;  x [M, K] bfloat16 / float16;  out [M, N] in x.dtype
  out = x @ W,  W[k, n] = (q[k, n] - z[g(k), n]) * s[g(k), n],  g(k) = k // group_size

Kernel: no tensor-core dot (M is tiny, so bandwidth, not FMA rate, is the limit). Grid (N / bn, S). A program owns bn
output columns and one K-split; it walks blocks of bkw words (bk = bkw * pf input rows, inside one group). A block's
words are one [bkw, A, bn / A] tile, loaded coalesced and unexpanded (A = 1 for gptq; A = 8 for awq_kp, whose 8 rows
of a block are the 8 column classes a of the columns 8b + a). Each of the pf bit fields becomes float32 exactly
without an integer-to-float conversion (a quarter of an FMA's throughput): fields wholly below bit 23 are masked in
place and or-ed with the exponent of 2**23, and 2**23 + zero * 2**(bits f) is subtracted, giving (q - z) * 2**(bits f)
(the power of two moves onto x, exactly); the fields above are shifted down first, all with one shift a word. The
result multiplies into an element-wise float32 accumulator per row of x by x's value of that input row. The scale
multiplies a block's partial once; the accumulators are reduced over their bkw rows once, at the end. Per weight
and row of x: about 1.1 integer ops + 1 FADD + M FMAs. S > 1 writes float32 partials [S, M, N] that XLA sums.

unpack="window" (opt-in, QWENJAX_QUANT_GEMV_UNPACK=window, until measured against "mask" on a GPU): one shift a
PAIR of 4-bit fields places them at bits 19 and 15 (quant_gemv_window.py; int8: one field a shift, at 15); one and-or
with the exponent of 2**(23 - b) reads each as 2**(23 - b) + q exactly, and the FMA takes that as it is: no
per-field subtraction, no per-field zero constant, no scaling of x. The offsets and the zero come out once a block
per column: acc += s * (P - sum_j x_j (2**(23 - b_j) + z)), the sums over x's values of the block's rows. The masks
come from a small input array, not immediates (ptxas otherwise re-materializes one before every and-or). Offline
SASS (Triton 3.9, sm_90, gate/up at one row, default tiles): 562 loop instructions for 128 weights a thread, 4.4 a
weight, against "mask"'s 757 (5.9): and-or 1, FMA 1, shifts 0.5, and the block's x sums and correction the rest.

How x reaches the tile (`xload`): "strided" loads x's bkw values of input rows k0 + j, k0 + j + pf, ... as a vector
and broadcasts it over the tile (through a free [M, K/pf, pf] view of x); "bcast" gathers them straight into the
tile's [bkw, A, bn/A] shape (every column of a row reads the same address: no register-layout conversion, but more
load instructions); "bcast1" gathers a [bkw, 1, 1] column and broadcasts it.

Status (H100, Qwen2-7B shapes, GPTQ 4-bit group 128, M = 1, device time per product from a profile, "strided"):
gate/up 3584 -> 18944 25.2 us = 1.40 TB/s of packed bytes (bf16 matmul about 45 us: 1.8x), down 25.1 us, q/o
7.8 us (1.4 of it the XLA sum of the split partials), k/v 4.4 us; AWQ (awq_kp) within 10% of GPTQ. Each block of a
program cost about 2 us whatever its size, and the cost grew with M (4 rows: gate/up 61 us; 16 rows: 160 us): the
suspect is the broadcast of each x vector over the tile (a register-layout conversion through shared memory per
(row of x, bit field)), which "bcast" avoids; it and "bcast1" are in benchmarks/quant_matmul.py's search but were not
measured yet. Per-shape settings: `CONFIGS` (paste the sweep's output), else `heuristic`.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.gemv_tiles import store_rows, tile_columns, zero_and_scale
from pallas_kernels.quant_gemv_window import window_bits, window_kernel

_CompilerParams = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")

FORMATS = ("gptq", "gptq_v2", "awq_kp")
MAX_ROWS = 16            # the kernel unrolls over the rows of x: decode batches only
_X_DTYPES = (jnp.bfloat16, jnp.float16)
_MAGIC = 0x4B000000      # float32 bits of 2**23: (v | _MAGIC) viewed as float32 is 2**23 + v for 0 <= v < 2**23
_TWO23 = float(1 << 23)


# (max rows, K, N) -> (block_n, block_kw, num_splits, num_warps, num_stages, xload). Paste benchmarks/quant_matmul.py's
# output here. The model fuses q/k/v and gate/up (qwenjax/models/fusion.py): at 7B its shapes are qkv 3584 -> 4608
# and gate/up 3584 -> 37888 (`--layers qkv,q_o,gate_up2,down`), which take the heuristic until swept. The sweep
# measures the row counts SWEEP_ROWS and writes an entry only where its best beat the heuristic, so an entry for r
# rows covers only the M above the sweep's previous row count (M = 1 never takes the M = 4 entry: at M = 1 the
# heuristic won, e.g. gate/up 28.3 us against 31.5 us with the M = 4 settings).
CONFIGS: dict[tuple[int, int, int], tuple[int, int, int, int, int, str]] = {
    # H100, benchmarks/quant_matmul.py --rows 1,4,16 --budget-s 150 (dad883a; greedy search cut by its budget)
    (1, 3584, 512): (128, 8, 56, 2, 3, 'strided'),     # gptq
    (4, 3584, 3584): (512, 4, 42, 4, 3, 'strided'),    # gptq
    (1, 18944, 3584): (128, 8, 74, 2, 3, 'strided'),   # awq
    (4, 3584, 512): (512, 4, 112, 4, 3, 'strided'),    # awq
    (4, 3584, 18944): (512, 4, 8, 4, 3, 'strided'),    # awq
}
SWEEP_ROWS = (1, 4, 16)
assert all(rows in SWEEP_ROWS for rows, _, _ in CONFIGS), "CONFIGS rows must be sweep row counts (SWEEP_ROWS)"
XLOADS = ("strided", "bcast", "bcast1")
UNPACKS = ("mask", "shift", "window")
# The unpack used when the caller names none: "mask" (measured on the H100) unless this variable names another;
# read when a product is traced. "window" is the candidate (fewer instructions a weight, module docstring), and
# only for up to WINDOW_MAX_ROWS rows: its correction is per row of x (offline SASS at gate/up, 4 rows: 1,585 loop
# instructions against "mask"'s 1,448), where "mask"'s subtraction is shared by all rows.
UNPACK_ENV = "QWENJAX_QUANT_GEMV_UNPACK"
WINDOW_MAX_ROWS = 1
_TARGET_PROGRAMS_M1 = 2048  # M <= 2: short programs, many of them (measured best on an H100 at every 7B shape)
_TARGET_PROGRAMS = 288      # M > 2: about two waves of an H100's 132 SMs


def settings(m: int, k: int, n: int, *, fmt: str, bits: int, group_size: int):
    """(block_n, block_kw, num_splits, num_warps, num_stages, xload) for a product: CONFIGS, else the heuristic."""
    cfg = CONFIGS.get((_sweep_rows(m), k, n))
    if cfg is not None and _valid(k, n, fmt, bits, group_size, cfg[0], cfg[1]) is None:
        return tuple(cfg)
    return heuristic(m, k, n, fmt=fmt, bits=bits, group_size=group_size)


def _sweep_rows(m: int) -> int | None:
    """The sweep's row count whose CONFIGS entry covers M rows: the smallest of SWEEP_ROWS >= M (None above them)."""
    return next((r for r in SWEEP_ROWS if r >= m), None)


def heuristic(m: int, k: int, n: int, *, fmt: str, bits: int, group_size: int):
    """From an H100 probe at Qwen2-7B shapes (strided x loads; device time per product, GPTQ 4-bit, M = 1):
    block_n 128 over 2 warps with 8 word rows a block and K split until about 2048 programs run was best or within
    1 us of best at gate/up (25.2 us, 1.40 TB/s of packed bytes), down (25.1 us), k/v (4.4 us) and q/o (8.8 us
    against 7.8). For more rows: block_n 512 over 4 warps, fewer word rows a block (registers: one [bkw, bn]
    float32 accumulator per row of x), about two waves of programs."""
    pf = 32 // bits
    group = k if group_size == -1 else group_size
    if m <= 2:
        bn, bkw, warps, target = 128, 8, 2, _TARGET_PROGRAMS_M1
    else:
        bn, bkw, warps, target = 512, 4 if m <= 4 else 2 if m <= 8 else 1, 4, _TARGET_PROGRAMS
    while bn > 8 and n % bn:
        bn //= 2
    while bkw > 1 and (group % (bkw * pf) or k % (bkw * pf)):
        bkw //= 2
    blocks = k // (bkw * pf)
    splits = max(1, min(-(-target // (n // bn)), blocks))
    return bn, bkw, splits, warps, 3, "strided"


def _valid(k, n, fmt, bits, group_size, bn, bkw) -> str | None:
    """None when (block_n, block_kw) fits the product, else why not."""
    pf = 32 // bits
    classes = 8 if fmt == "awq_kp" else 1
    group = k if group_size == -1 else group_size
    bk = bkw * pf
    if bkw < 1 or bkw & (bkw - 1) or k % bk or group % bk:
        return (f"block_kw={bkw} must be a power of two whose {bk} input rows (x {pf} per word) divide K={k} and "
                f"the group ({group})")
    if bn < classes or bn & (bn - 1) or n % bn:
        return f"block_n={bn} must be a power of two >= {classes} dividing N={n}"
    return None


def layout_fits(m: int, k: int, n: int, *, fmt: str, bits: int, group_size: int, dtype, max_rows: int) -> bool:
    """Whether x's dtype, the format, the bits, the rows and the shape fit the K-packed layouts at all (this kernel
    and quant_skinny.py; each then checks its own tiles)."""
    if jnp.dtype(dtype) not in _X_DTYPES or fmt not in FORMATS or not 1 <= m <= max_rows:
        return False
    if bits not in ((4,) if fmt == "awq_kp" else (4, 8)) or k % (32 // bits) or n % 8:
        return False
    return group_size == -1 or (group_size > 0 and k % group_size == 0)


def check_arrays(x, qweight, qzeros, scales, *, fmt: str, bits: int, group_size: int, max_rows: int):
    """Raises ValueError naming what does not fit the K-packed layouts; returns (M, K, N, pf, G)."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if bits not in ((4,) if fmt == "awq_kp" else (4, 8)):
        raise ValueError(f"{fmt} supports bits {(4,) if fmt == 'awq_kp' else (4, 8)}, got {bits}")
    if x.ndim != 2 or x.dtype not in _X_DTYPES or not 1 <= x.shape[0] <= max_rows:
        raise ValueError(f"x must be bfloat16 or float16 [M, K] with 1 <= M <= {max_rows}, got {x.dtype}{x.shape}")
    m, k = x.shape
    pf = 32 // bits
    n = scales.shape[-1]
    want_qw = (k, n // 8) if fmt == "awq_kp" else (k // pf, n)
    if qweight.shape != want_qw or qweight.dtype != jnp.int32:
        raise ValueError(f"{fmt} qweight must be int32 {want_qw} for x [{m}, {k}] and scales {scales.shape}, got "
                         f"{qweight.dtype}{qweight.shape}")
    if group_size != -1 and (group_size <= 0 or k % group_size):
        raise ValueError(f"group_size must be -1 or divide K={k}, got {group_size}")
    groups = 1 if group_size == -1 else k // group_size
    if scales.shape != (groups, n) or qzeros.shape != (groups, n // pf) or qzeros.dtype != jnp.int32:
        raise ValueError(f"scales must be [{groups}, {n}] and qzeros int32 [{groups}, {n // pf}]; got "
                         f"{scales.shape} and {qzeros.dtype}{qzeros.shape}")
    return m, k, n, pf, groups


def supported(m: int, k: int, n: int, *, fmt: str, bits: int, group_size: int, dtype) -> bool:
    """Whether the kernel takes this product with its default settings (else the caller uses another path)."""
    if not layout_fits(m, k, n, fmt=fmt, bits=bits, group_size=group_size, dtype=dtype, max_rows=MAX_ROWS):
        return False
    bn, bkw, *_ = settings(m, k, n, fmt=fmt, bits=bits, group_size=group_size)
    return _valid(k, n, fmt, bits, group_size, bn, bkw) is None


def _kernel(x_ref, qw_ref, qz_ref, s_ref, o_ref, *, rows, bits, zero_offset, classes, bkw, group_blocks,
            blocks_per_split, num_k_blocks, unpack, xload):
    # x_ref [M, K/pf, pf]; qw_ref [K/pf, A, bn/A] (gptq: A = 1) or [K/8, 8, bn/8] (awq_kp); qz_ref [G, bn/pf];
    # s_ref [G, bn]; o_ref [M, bn] (float32 partials of this split when K is split)
    pf, mask = 32 // bits, (1 << bits) - 1
    low = (23 - bits) // bits + 1  # fields whose bits all lie below bit 23 (4 bits: 5; 8 bits: 2)
    A, cw = qw_ref.shape[1], qw_ref.shape[2]
    first = pl.program_id(1) * blocks_per_split
    count = jnp.clip(num_k_blocks - first, 0, blocks_per_split)
    cols = tile_columns(A, cw, pf, bits)

    def body(i, accs):
        kb = first + i
        g = kb // group_blocks if group_blocks else 0
        words = qw_ref[pl.ds(kb * bkw, bkw), :, :]                              # [bkw, A, cw], one coalesced load
        high = words >> (bits * low)
        if xload != "strided":  # the word row of each tile element, for gathering x in the tile's own shape
            shape = (bkw, A, cw) if xload == "bcast" else (bkw, 1, 1)
            x_rows = kb * bkw + lax.broadcasted_iota(jnp.int32, shape, 0)
        z, s = zero_and_scale(qz_ref, s_ref, g, cols, bits=bits, zero_offset=zero_offset)  # [A, cw], [1|A, cw]
        parts = [None] * rows
        for j in range(pf):
            # Field j as float32, exactly: in place (times 2**(bits*f), f = its place in `src`) when it lies below
            # bit 23, so that one and + or and one subtraction give (q - z) * 2**(bits*f); fields above are first
            # shifted down as a group (one shift per word for all of them).
            src, f = (words, j) if j < low else (high, j - low)
            if unpack == "shift":
                src, f = words >> (bits * j), 0
            q = lax.bitcast_convert_type((src & (mask << (bits * f))) | _MAGIC, jnp.float32)
            w = q - (z * float(1 << (bits * f)) + _TWO23)[None]                 # exact: |q - z| * 2**(bits f) < 2**23
            for m in range(rows):
                if xload == "strided":
                    xj = x_ref[m, pl.ds(kb * bkw, bkw), j][:, None, None]           # rows k0 + pf * r + j
                else:
                    xj = plgpu.load(x_ref.at[m, x_rows, j])
                xj = xj.astype(jnp.float32)
                t = (xj * (1.0 / (1 << (bits * f))) if f else xj) * w             # times 2**-(bits f): exact
                parts[m] = t if parts[m] is None else parts[m] + t
        return tuple(acc + p * s[None] for acc, p in zip(accs, parts))

    zeros = tuple(jnp.zeros((bkw, A, cw), jnp.float32) for _ in range(rows))
    store_rows(o_ref, lax.fori_loop(0, count, body, zeros), cols[0])


@functools.partial(jax.jit, static_argnames=("fmt", "bits", "group_size", "block_n", "block_kw", "num_splits",
                                             "num_warps", "num_stages", "unpack", "xload", "interpret"))
def quant_gemv(x, qweight, qzeros, scales, *, fmt: str, bits: int, group_size: int, block_n=None, block_kw=None,
               num_splits=None, num_warps=None, num_stages=None, xload=None, unpack=None,
               interpret=False):
    """x [M, K] @ the low-bit weight -> [M, N] in x.dtype, for M <= MAX_ROWS.

    Args:
        x: [M, K] bfloat16 / float16 activations.
        qweight, qzeros, scales: one layer's arrays in `fmt`'s layout (module docstring).
        fmt: "gptq" (v1 zeros: stored + 1), "gptq_v2" or "awq_kp" (AWQ after repack.awq_to_kpacked) (static).
        bits: 4 or 8 (gptq); 4 (awq_kp) (static).
        group_size: input rows per scale group, or -1 for one group (static).
        block_n, block_kw, num_splits, num_warps, num_stages, xload: tiling, launch and how x is loaded (module
            docstring) (static); default `settings`.
        unpack: "mask" (fields below bit 23 in place, one shift a word), "shift" (one shift a field) or "window"
            (module docstring) (static); default: $QWENJAX_QUANT_GEMV_UNPACK ("window" only up to WINDOW_MAX_ROWS
            rows), else "mask".
        interpret: run in Pallas interpret mode (CPU tests).
    """
    m, k, n, pf, groups = check_arrays(x, qweight, qzeros, scales, fmt=fmt, bits=bits, group_size=group_size,
                                       max_rows=MAX_ROWS)
    d = settings(m, k, n, fmt=fmt, bits=bits, group_size=group_size)
    bn, bkw, splits, warps, stages, xload = (v if v is not None else dv for v, dv in
                                             zip((block_n, block_kw, num_splits, num_warps, num_stages, xload), d))
    if unpack is None:
        unpack = os.environ.get(UNPACK_ENV) or "mask"
        unpack = "mask" if unpack == "window" and m > WINDOW_MAX_ROWS else unpack
    if xload not in XLOADS or unpack not in UNPACKS:
        raise ValueError(f"xload must be one of {XLOADS} and unpack one of {UNPACKS}, got {xload!r}, {unpack!r}")
    why = _valid(k, n, fmt, bits, group_size, bn, bkw)
    if why:
        raise ValueError(why)
    if not (isinstance(splits, int) and splits >= 1):
        raise ValueError(f"num_splits must be a positive int, got {splits}")
    classes = 8 if fmt == "awq_kp" else 1
    bk = bkw * pf
    num_k_blocks = k // bk
    per_split = pl.cdiv(num_k_blocks, splits)
    splits = pl.cdiv(num_k_blocks, per_split)  # no split starts past K
    group_blocks = 0 if group_size == -1 else group_size // bk
    qw3 = qweight.reshape(k // pf, classes, n // classes)  # free: [K/pf, 1, N] or [K/8, 8, N/8]
    common = dict(rows=m, bits=bits, zero_offset=1 if fmt == "gptq" else 0, bkw=bkw, group_blocks=group_blocks,
                  blocks_per_split=per_split, num_k_blocks=num_k_blocks)
    if unpack == "window":
        kernel, extra = functools.partial(window_kernel, **common), (
            jnp.asarray([((1 << bits) - 1) << b for b in window_bits(bits)], jnp.int32),)
    else:
        kernel, extra = functools.partial(_kernel, classes=classes, unpack=unpack, xload=xload, **common), ()
    return launch(kernel, x.reshape(m, k // pf, pf), qw3, qzeros, scales, *extra, block_n=bn, num_splits=splits,
                  out_dtype=x.dtype, num_warps=warps, num_stages=stages, interpret=interpret,
                  name=f"qwenjax_{fmt}{bits}_gemv_m{m}_n{bn}_kw{bkw}_s{splits}{'_w' if extra else ''}")


def launch(kernel, x3, qw3, qzeros, scales, *extra, block_n, num_splits, out_dtype, num_warps, num_stages,
           interpret, name, rows=None):
    """The pallas_call of a K-packed kernel (this one, quant_skinny.py's): grid (N / block_n, num_splits), x3 [rows,
    ...] whole to every program (x3[m, w, j] = x[m, w * pf + j]), the words qw3 [K/pf, A, N/A], zeros and scales
    by column block, `extra` small arrays whole; out [rows, N] in out_dtype, or float32 partials [S, rows, N]
    summed here when K is split (over the first `rows` rows alone where given: a kernel that writes no others)."""
    rows, bn, (groups, n) = x3.shape[0], block_n, scales.shape
    pf, classes = n // qzeros.shape[1], qw3.shape[1]
    in_specs = [
        pl.BlockSpec(x3.shape, lambda j, s: (0,) * x3.ndim),
        pl.BlockSpec((qw3.shape[0], classes, bn // classes), lambda j, s: (0, 0, j)),
        pl.BlockSpec((groups, bn // pf), lambda j, s: (0, j)),
        pl.BlockSpec((groups, bn), lambda j, s: (0, j)),
    ] + [pl.BlockSpec(e.shape, lambda j, s, nd=e.ndim: (0,) * nd) for e in extra]  # small arrays, whole
    if num_splits == 1:
        out_shape = jax.ShapeDtypeStruct((rows, n), out_dtype)
        out_spec = pl.BlockSpec((rows, bn), lambda j, s: (0, j))
    else:
        out_shape = jax.ShapeDtypeStruct((num_splits, rows, n), jnp.float32)
        out_spec = pl.BlockSpec((None, rows, bn), lambda j, s: (s, 0, j))
    out = pl.pallas_call(
        kernel,
        grid=(n // bn, num_splits),
        in_specs=in_specs,
        out_specs=out_spec,
        out_shape=out_shape,
        compiler_params=_CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=name,
    )(x3, qw3, qzeros, scales, *extra)
    if rows is not None:
        out = out[..., :rows, :]
    return out.sum(axis=0).astype(out_dtype) if num_splits > 1 else out


def quant_gemv_reference(x, qweight, qzeros, scales, *, fmt: str, bits: int, group_size: int):
    """Plain jnp: dequantize the whole weight in float32, then one float32 matmul; -> [M, N] in x.dtype."""
    from pallas_kernels.quant_matmul import quant_matmul_reference

    return quant_matmul_reference(x, qweight, qzeros, scales, fmt=fmt, bits=bits, group_size=group_size)
