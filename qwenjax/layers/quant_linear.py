"""QuantLinear: a weight-only quantized linear layer that keeps the checkpoint's packed arrays on the device.

Parameters carry Hugging Face's names and layouts, so the loader copies them without translation:
  AWQ   qweight int32 [I, O/8], qzeros int32 [G, O/8], scales [G, O], bias [O] (q/k/v only)
  GPTQ  qweight int32 [I/pf, O], qzeros int32 [G, O/pf], scales [G, O], g_idx int32 [I], bias [O] (q/k/v only)
(the bit layouts are documented in qwenjax/quantization/awq.py and gptq.py). Invariant: the packed arrays are never
dequantized outside the jitted matmul; the float weight exists only as a temporary inside `quant_matmul`.

`quant_matmul` is the single entry point of the product: the Pallas kernel (pallas_kernels/quant_matmul.py) where
`_kernel_applies` (GPU, bf16/f16 activations, group-ordered weights, shapes its tiles fit), else the XLA path (unpack
with shifts and masks, subtract the zeros, scale, dot in the activation dtype).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenjax.quantization import awq, gptq
from qwenjax.quantization.config import QuantConfig


class QuantLinear(nnx.Module):
    def __init__(self, in_features: int, out_features: int, *, use_bias: bool, quant: QuantConfig, dtype,
                 rngs: nnx.Rngs):
        _check_shape(in_features, out_features, quant)
        self.in_features, self.out_features = in_features, out_features
        self.quant, self.dtype = quant, jnp.dtype(dtype)
        G, pf = quant.num_groups(in_features), quant.pack_factor
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
        self.bias = nnx.Param(jnp.zeros((out_features,), self.dtype)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., I] -> [..., O] in the layer dtype."""
        g_idx = self.g_idx[...] if self.quant.method == "gptq" else None
        y = quant_matmul(x.astype(self.dtype), self.qweight[...], self.qzeros[...], self.scales[...], g_idx,
                         quant=self.quant)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y


def quant_matmul(x, qweight, qzeros, scales, g_idx, *, quant: QuantConfig) -> jax.Array:
    """x [..., I] @ dequantized W [I, O] -> [..., O] in x.dtype. The one place a low-bit product is computed."""
    I, O = x.shape[-1], scales.shape[-1]
    if _kernel_applies(x, O, quant):  # pragma: no cover - GPU only
        from pallas_kernels import quant_matmul as qmm

        y = qmm.quant_matmul(x.reshape(-1, I), qweight, qzeros, scales.astype(x.dtype), fmt=_kernel_format(quant),
                             bits=quant.bits, group_size=quant.group_size)
        return y.reshape(*x.shape[:-1], O)
    w = dequantize_weight(qweight, qzeros, scales, g_idx, quant=quant, dtype=x.dtype)
    return jnp.dot(x, w)


def _kernel_format(quant: QuantConfig) -> str:
    return "awq" if quant.method == "awq" else quant.checkpoint_format


# Rows up to which the kernel beats the XLA path. Measured on an H100 at Qwen2-7B shapes (group 128, bf16): GPTQ
# 4-bit decode 1.4-1.9x faster than XLA's dequantize-then-dot; at 256+ rows XLA was 2-4x faster; AWQ's kernel was
# no faster than XLA at any size, so AWQ stays on XLA until the kernel improves. 8-bit GPTQ compiles and measured
# 1.6-1.8x faster than XLA at batch 1, but its GPU output has not been compared with the reference yet (only interpret
# mode), so it stays on XLA too.
_KERNEL_MAX_ROWS = 16
_KERNEL_METHODS = ("gptq",)
_KERNEL_BITS = (4,)


def _kernel_applies(x, out_features: int, quant: QuantConfig) -> bool:
    """The Pallas kernel takes the product on a GPU for bf16/f16 activations and group-ordered weights (not GPTQ
    act-order, whose g_idx is arbitrary) in the shapes its tiles fit, where it was measured faster than XLA;
    everything else takes the XLA path. Under tensor parallelism (a "tp" mesh axis over more than one device) the
    XLA path runs too: XLA partitions it along the weights' shards, while the kernel's custom call has no
    partitioning rule and would gather the whole packed weight onto every device."""
    if jax.default_backend() != "gpu" or quant.desc_act or quant.method not in _KERNEL_METHODS or \
            quant.bits not in _KERNEL_BITS:
        return False
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.shape.get("tp", 1) > 1:
        return False
    from pallas_kernels import quant_matmul as qmm

    m = int(np.prod(x.shape[:-1]))
    if m > _KERNEL_MAX_ROWS:
        return False
    return qmm.supported(m, x.shape[-1], out_features, fmt=_kernel_format(quant), bits=quant.bits,
                         group_size=quant.group_size, dtype=x.dtype)


def dequantize_weight(qweight, qzeros, scales, g_idx, *, quant: QuantConfig, dtype) -> jax.Array:
    """The float weight [I, O] of one layer, for the XLA path (inside jit: fused into the matmul's producer)."""
    if quant.method == "awq":
        return awq.dequantize(qweight, qzeros, scales, group_size=quant.group_size, dtype=dtype)
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
    if quant.method == "gptq" and I % pf:
        raise ValueError(f"GPTQ {quant.bits}-bit packs {pf} input rows per int32; a layer with {I} inputs is not a "
                         f"multiple of {pf}")
