"""QuantLinear: a weight-only quantized linear layer that keeps the checkpoint's packed arrays on the device.

Parameters carry Hugging Face's names and shapes, so the loader copies them without translation:
  AWQ   qweight int32 [I, O/8], qzeros int32 [G, O/8], scales [G, O], bias [O] (q/k/v only)
  GPTQ  qweight int32 [I/pf, O], qzeros int32 [G, O/pf], scales [G, O], g_idx int32 [I], bias [O] (q/k/v only)
        act-order (desc_act) also perm int32 [I]: the rows sorted into group order at load (quantization/act_order.py)
GPTQ's words keep the checkpoint's bits. AWQ's are repacked once at load, within each 8 x 8 block and in the same
shapes (qwenjax/quantization/repack.py: every word then holds 8 consecutive input rows of one column, the layout the
decode kernel streams; the zeros in natural column order). Invariant: the packed arrays are never dequantized
outside the jitted matmul; the float weight exists only as a temporary inside `quant_matmul`.

`quant_matmul` is the single entry point of the product; `kernel_path` picks, per shape: the skinny kernel
(pallas_kernels/quant_skinny.py) for decode batches of 1 to 64 rows, else the GEMV kernel
(pallas_kernels/quant_gemv.py) for a few decode rows, the tensor-core kernel (pallas_kernels/quant_matmul.py) where
it was measured faster, else the XLA path (unpack with shifts and masks, subtract the zeros, scale, dot in the
activation dtype), which is what prefill and large batches take.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels import awq_layout, gptq_layout as gptq
from qwenjax.layers import quant_sharded
from qwenjax.quantization import repack
from qwenjax.quantization.config import QuantConfig


class QuantLinear(nnx.Module):
    def __init__(self, in_features: int, out_features: int, *, use_bias: bool, quant: QuantConfig, dtype,
                 rngs: nnx.Rngs, split: str | None = None):
        """split: how tensor parallelism splits the layer, as models/sharding.py does: "out" (column-parallel),
        "in" (row-parallel) or None (replicated); the decode kernel runs per device accordingly (quant_sharded.py)."""
        _check_shape(in_features, out_features, quant)
        if split not in quant_sharded.SPLITS:
            raise ValueError(f"split must be one of {quant_sharded.SPLITS}, got {split!r}")
        self.in_features, self.out_features, self.split = in_features, out_features, split
        self.quant, self.dtype = quant, jnp.dtype(dtype)
        G = quant.num_groups(in_features)
        # Random packed values and mid-point zeros: a model of the right shape and scale for dummy-weight runs
        # (std of W about 0.02, as the float model's init); real weights replace all of them at load.
        bits = jax.random.bits(rngs.params(), _qweight_shape(in_features, out_features, quant), jnp.uint32)
        self.qweight = nnx.Param(jax.lax.bitcast_convert_type(bits, jnp.int32))
        zeros = np.full(_qzeros_shape(G, out_features, quant), _mid_zero_word(quant), np.int32)
        self.qzeros = nnx.Param(jnp.asarray(zeros))
        spread = (2 ** quant.bits) / np.sqrt(12.0)  # std of (q - z) for uniform q
        self.scales = nnx.Param(jnp.full((G, out_features), 0.02 / spread, self.dtype))
        if quant.method == "gptq":
            self.g_idx = nnx.Param(jnp.asarray(gptq.default_g_idx(in_features, quant.group_size)))
        if quant.desc_act:  # act-order: rows sorted into group order at load (quantization/act_order.py)
            self.perm = nnx.Param(jnp.arange(in_features, dtype=jnp.int32))
        self.bias = nnx.Param(jnp.zeros((out_features,), self.dtype)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., I] -> [..., O] in the layer dtype."""
        g_idx = self.g_idx[...] if self.quant.method == "gptq" else None
        perm = self.perm[...] if self.quant.desc_act else None
        y = quant_matmul(x.astype(self.dtype), self.qweight[...], self.qzeros[...], self.scales[...], g_idx,
                         quant=self.quant, perm=perm, split=self.split)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y


def quant_matmul(x, qweight, qzeros, scales, g_idx, *, quant: QuantConfig, perm=None, split=None) -> jax.Array:
    """x [..., I] @ dequantized W [I, O] -> [..., O] in x.dtype. The one place a low-bit product is computed.

    perm [I] int32: an act-order layer sorted into group order at load (quantization/act_order.py: the weight's
    row k is the checkpoint's row perm[k], in group k // group_size): x's columns are gathered through it, and the
    product is then a group-ordered one on every path.
    split: the layer's tensor-parallel split ("out", "in", None; quant_sharded.py): on a "tp" mesh of several
    devices, decode products run the skinny kernel on each device's shard where it fits, else the XLA path."""
    if perm is not None:
        x = jnp.take(x, perm, axis=-1)  # x @ W == x[:, perm] @ W[perm]
        quant = dataclasses.replace(quant, desc_act=False)
    elif quant.desc_act:
        raise ValueError("an act-order (desc_act) GPTQ product needs `perm`: the layer's rows sorted into group "
                         "order at load (quantization/act_order.py)")
    I, O = x.shape[-1], scales.shape[-1]
    if quant_sharded.tp_size() > 1:
        y = quant_sharded.sharded_skinny(
            x.reshape(-1, I), qweight, qzeros, scales, split=split, fmt=kernel_format(quant), bits=quant.bits,
            group_size=quant.group_size, fits=lambda m, k, n, gs: skinny_fits(m, k, n, x.dtype, quant, group_size=gs),
            interpret=jax.default_backend() != "gpu", mode=skinny_mode())
        if y is not None:
            return y.reshape(*x.shape[:-1], O)
    path = kernel_path(x, O, quant)
    if path == "skinny":
        from pallas_kernels import quant_skinny

        y = quant_skinny.quant_skinny(x.reshape(-1, I), qweight, qzeros, scales, fmt=kernel_format(quant),
                                      bits=quant.bits, group_size=quant.group_size, mode=skinny_mode(),
                                      interpret=jax.default_backend() != "gpu")
        return y.reshape(*x.shape[:-1], O)
    if path == "gemv":  # pragma: no cover - GPU only
        from pallas_kernels import quant_gemv

        y = quant_gemv.quant_gemv(x.reshape(-1, I), qweight, qzeros, scales, fmt=kernel_format(quant),
                                  bits=quant.bits, group_size=quant.group_size)
        return y.reshape(*x.shape[:-1], O)
    if path == "mma":  # pragma: no cover - GPU only
        from pallas_kernels import quant_matmul as qmm

        y = qmm.quant_matmul(x.reshape(-1, I), qweight, qzeros, scales.astype(x.dtype), fmt=quant.checkpoint_format,
                             bits=quant.bits, group_size=quant.group_size)
        return y.reshape(*x.shape[:-1], O)
    w = dequantize_weight(qweight, qzeros, scales, g_idx, quant=quant, dtype=x.dtype)
    return jnp.dot(x, w)


def kernel_format(quant: QuantConfig) -> str:
    """The GEMV kernel's name for the layer's layout (AWQ is repacked at load: "awq_kp")."""
    return "awq_kp" if quant.method == "awq" else quant.checkpoint_format


# Rows each kernel takes. The skinny kernel (pallas_kernels/quant_skinny.py) takes every decode batch of 1 to 64 rows
# it supports (4-bit, group-ordered or act-order sorted at load, groups dividing 128 rows or multiples of it; on a
# "tp" mesh per device, quant_sharded.py) where SKINNY_ENV switches it on: it is built to replace the GEMV below
# (whose K loop Triton never pipelined) on the strength of its design and its PTX (see its docstring); the sweep's
# `skinny` column against its `gemv`, `mma` and `auto` (this choice) columns is the check that would make it default.
# 8 bits: as the GEMV, once checked on a GPU (tests/gpu/test_quant_gemv_gpu.py covers both kernels' 8-bit cases).
SKINNY_MAX_ROWS = 64
# The skinny kernel is taken only with QWENJAX_QUANT_SKINNY=1 until an H100 run has compiled and measured it (it has
# run in Pallas' interpreter and as offline-compiled PTX only): unset, decode keeps the GEMV / tensor-core / XLA
# paths measured on the H100 (AWQ 3.67 ms, GPTQ-Int4 3.21 ms a token at 7476a1c). Read when a step is traced.
SKINNY_ENV = "QWENJAX_QUANT_SKINNY"
# off, on (modes by rows), on in the lop3_t mode (correct on an H100 but slower than bf16 at 29dc2fe: NOTES 52)
SKINNY_ENV_VALUES = ("0", "1", "lop3")
_SKINNY_BITS = (4,)
# The paths before the skinny kernel, still taken where it does not fit (e.g. 4-bit groups of 96 at 9..16 rows).
# (benchmarks/quant_matmul.py on an H100, Qwen2-7B shapes, group 128, bf16). GEMV: at 1 row
# 25 us for gate/up (bf16 about 45 us, XLA's dequantize-then-dot about 100 us), and still ahead of XLA at 4 rows
# (61 us) though behind bf16; at 16 rows 160 us, behind both, with its x loads as measured (see quant_gemv.py). The
# tensor-core kernel (GPTQ checkpoint layout, 4 bits) measured 1.4-1.9x faster than XLA for 1-16 rows before the
# GEMV, so GPTQ keeps it above GEMV_MAX_ROWS; at 256+ rows XLA was 2-4x faster than it. Everything else: XLA.
# Re-derive both from the sweep's `auto` column after a change to either kernel.
# 8-bit GPTQ passes the GEMV's interpret-mode tests but has not been checked on a GPU yet (quant_matmul.py
# --formats gptq8 compares every variant's output with a float32 reference): add 8 to _GEMV_BITS once it has.
GEMV_MAX_ROWS = 4
_GEMV_BITS = (4,)
MMA_ROWS = (GEMV_MAX_ROWS + 1, 16)
_MMA_BITS = (4,)


def kernel_path(x, out_features: int, quant: QuantConfig) -> str | None:
    """"skinny", "gemv", "mma" or None (the XLA path) for this product.

    The kernels take bf16/f16 activations on a GPU, group-ordered weights (act-order layers arrive here sorted
    into group order, quant_matmul; an unsorted one never takes a kernel), in the shapes their tiles fit. This is
    the whole product's path: under tensor parallelism (a "tp" mesh axis over more than one device) it is None, and
    quant_matmul runs the skinny kernel on each device's shard instead where `skinny_fits` the local shape
    (quant_sharded.py), else the XLA path, which XLA partitions along the weights' shards."""
    if quant.desc_act or quant_sharded.tp_size() > 1:
        return None
    m, k = int(np.prod(x.shape[:-1])), x.shape[-1]
    if skinny_fits(m, k, out_features, x.dtype, quant):
        return "skinny"
    if jax.default_backend() != "gpu":
        return None
    if 1 <= m <= GEMV_MAX_ROWS and quant.bits in _GEMV_BITS:
        from pallas_kernels import quant_gemv

        if quant_gemv.supported(m, k, out_features, fmt=kernel_format(quant), bits=quant.bits,
                                group_size=quant.group_size, dtype=x.dtype):
            return "gemv"
    if MMA_ROWS[0] <= m <= MMA_ROWS[1] and quant.method == "gptq" and quant.bits in _MMA_BITS:
        from pallas_kernels import quant_matmul as qmm

        if qmm.supported(m, k, out_features, fmt=quant.checkpoint_format, bits=quant.bits,
                         group_size=quant.group_size, dtype=x.dtype):
            return "mma"
    return None


def skinny_fits(m: int, k: int, n: int, dtype, quant: QuantConfig, *, group_size: int | None = None) -> bool:
    """Whether the skinny kernel runs an [m, k] @ [k, n] product of this layout on this backend (a GPU);
    `group_size` overrides the layer's (a device's rows all in one group, quant_sharded.py)."""
    if jax.default_backend() != "gpu" or not (1 <= m <= SKINNY_MAX_ROWS and quant.bits in _SKINNY_BITS):
        return False
    if os.environ.get(SKINNY_ENV, "0") == "0":
        return False
    from pallas_kernels import quant_skinny

    gs = quant.group_size if group_size is None else group_size
    return quant_skinny.supported(m, k, n, fmt=kernel_format(quant), bits=quant.bits, group_size=gs, dtype=dtype,
                                  mode=skinny_mode())


def skinny_mode() -> str | None:
    """The skinny kernel's mode that SKINNY_ENV asks for: "lop3" -> "lop3_t" (Marlin's dequantization,
    pallas_kernels/quant_lop3.py), "1" -> None (the kernel's own choice by rows). Anything else is refused by name."""
    v = os.environ.get(SKINNY_ENV, "0")
    if v not in SKINNY_ENV_VALUES:
        raise ValueError(f"{SKINNY_ENV}={v!r}: allowed {', '.join(SKINNY_ENV_VALUES)}")
    return "lop3_t" if v == "lop3" else None


def dequantize_weight(qweight, qzeros, scales, g_idx, *, quant: QuantConfig, dtype) -> jax.Array:
    """The float weight [I, O] of one layer, for the XLA path (inside jit: fused into the matmul's producer)."""
    if quant.method == "awq":  # the repacked layout (repack.py)
        return awq_layout.dequantize_kpacked(qweight, qzeros, scales, group_size=quant.group_size, dtype=dtype)
    if quant.desc_act:
        return gptq.dequantize(qweight, qzeros, scales, g_idx, bits=quant.bits,
                               checkpoint_format=quant.checkpoint_format, dtype=dtype)
    # Without act-order, row k is in group k // group_size: a static layout, so groups become a reshape
    # (no gather, and the checkpoint's g_idx is not read).
    q = gptq.unpack_qweight(qweight, quant.bits)
    z = gptq.unpack_qzeros(qzeros, quant.bits, quant.checkpoint_format)
    I, O = q.shape
    G = z.shape[0]
    if I % G == 0 and (quant.group_size == -1 or quant.group_size == I // G):
        w = (q.reshape(G, I // G, O) - z[:, None, :]).astype(dtype) * scales.astype(dtype)[:, None, :]
        return w.reshape(I, O)
    rows = gptq.default_g_idx(I, quant.group_size)  # a ragged last group: a constant gather
    return (q - z[rows]).astype(dtype) * scales.astype(dtype)[rows]


def _qweight_shape(I: int, O: int, quant: QuantConfig) -> tuple[int, int]:
    return (I, O // quant.pack_factor) if quant.method == "awq" else (I // quant.pack_factor, O)


def _qzeros_shape(G: int, O: int, quant: QuantConfig) -> tuple[int, int]:
    return (G, O // quant.pack_factor)


def _mid_zero_word(quant: QuantConfig) -> int:
    """An int32 word whose every field is the mid-point zero 2**(bits-1), stored as the format stores zeros."""
    mid = 1 << (quant.bits - 1)
    field = mid - 1 if quant.checkpoint_format == "gptq" else mid
    word = sum(field << (quant.bits * j) for j in range(quant.pack_factor))
    return int(np.array(word, np.uint32).view(np.int32))


def _check_shape(I: int, O: int, quant: QuantConfig) -> None:
    pf, name = quant.pack_factor, quant.method.upper()
    if O % pf:
        raise ValueError(f"{name} {quant.bits}-bit packs {pf} output columns per int32; a layer with {O} outputs "
                         f"is not a multiple of {pf}")
    if quant.method == "awq" and I % quant.group_size:
        raise ValueError(f"AWQ group_size {quant.group_size} must divide the layer's {I} inputs")
    if quant.method == "awq" and I % repack.PACK:
        raise ValueError(f"AWQ layers are repacked 8 input rows per word; a layer with {I} inputs is not a "
                         f"multiple of 8")
    if quant.method == "gptq" and I % pf:
        raise ValueError(f"GPTQ {quant.bits}-bit packs {pf} input rows per int32; a layer with {I} inputs is not a "
                         f"multiple of {pf}")
