"""The FP8 product: float8 activations x float8 weights, float32 accumulation, scales applied after.

Shapes: T tokens, I inputs, O outputs, G scale groups along I (1, or I / block_k for block-scaled checkpoints).
  xq [T, I] float8_e4m3fn, x_scale [T, G] float32, wq [O, I] float8_e4m3fn, w_scale [G, O] float32
  y[t, o] = sum_g x_scale[t, g] w_scale[g, o] sum_{i in g} xq[t, i] wq[o, i]
The weight is [O, I] (both operands contiguous along I, the "TN" order, the only one cuBLASLt's FP8 GEMM takes):
from [I, O] XLA transposed the weight before every product, measured on an H100 at 7B gate/up (3584 -> 37888) at
221-1,152 us against 85-110 us from [O, I] at 1 to 256 rows (bf16: 109-138 us), NOTES 48.
Every product of two float8 values is exact in float32, so the only rounding is the float32 sum's.

G == 1 (per-channel / per-tensor weight scales, per-token or static activation scales): one `dot_general` on the
float8 operands, contracting both on I, with `preferred_element_type=float32`, then the outer product of the
scales. This is the form that lets XLA on Hopper choose its FP8 GEMM (cuBLASLt `__cublas$lt$matmul$f8`); whether
it does at a given shape is what benchmarks/fp8_matmul.py measures and reads from the compiled HLO. Tensor
parallelism needs nothing here: XLA partitions the dot along the weights' shards (a row-parallel split of I gives
partial sums, all-reduced before the scales, which do not depend on I).

G > 1 (128 x 128 block-scaled checkpoints): the scales change along the contraction, so they cannot be applied after
one dot. Here both operands are dequantized to float32 (exactly the values above, up to float32 rounding of each
q x scale) and multiplied in float32: correct on every backend and partitioned like any dot, but not a tensor-core
FP8 path; a block-scaled FP8 kernel (DeepGEMM-style per-block promotion) is the GPU form still to write.

Few rows on a GPU (QWENJAX_FP8_GEMV=1, opt-in): pallas_kernels/fp8_gemv.py, the same values read once at 1 byte a
weight, for steps of at most fp8_gemv.MAX_ROWS tokens (decode). On an H100 it ran behind cuBLASLt's FP8 GEMM on the
[O, I] weight at gate/up, one row (99 against 85 us, NOTES 48), so it is off unless asked for.

Few to a few hundred rows on a GPU (the default; QWENJAX_FP8_SKINNY=0 turns it off): pallas_kernels/fp8_skinny.py,
a tensor-core GEMM split over K where the output is narrow. There cuBLASLt read the weight at 0.7-1.7 TB/s on an
H100 (NOTES 51); the skinny kernel read gate/up's at 2.55 TB/s at one row (ncu), and the 7B FP8 engine went from
12,641 to 14,025 output tok/s on throughput-fixed and to 3.76 ms a token at batch 1 (NOTES 53).

Where the skinny kernel takes a product of dynamic per-token activations, QWENJAX_FP8_ACT_KERNEL says who quantizes
them (ACT_KERNEL_ENV below, with the H100's figures):
  - "fused" (the default, "auto", for steps of at most AUTO_FUSED_ROWS tokens): pallas_kernels/fp8_skinny_rows.py
    quantizes the float activations itself (the same rule, one kernel a product): `fp8_linear`.
  - "0" (the default above that): XLA's form, two small kernels a product.
  - "scaled" (opt-in): "fused" with the rows' scales found where cheaper (XLA_SCALE_MIN_K below).
  - "1" (opt-in): pallas_kernels/fp8_act_quant.py (one kernel a product: `quantize_for`; its values are
    quantization/fp8_quant.py's rule exactly, IEEE division, while XLA's GPU form rounds 0.011% of them
    differently, NOTES 54), or the kernels that write the rows where they can (the add + RMSNorm kernel for qkv /
    gate_up, the SwiGLU kernel for down: Fp8Linear.takes_rows, kernel_rows); the product is fp8_skinny_rows.py on
    the float8 rows (x's rows under a mask, no XLA pad; the scaled output written where K is not split).
With QWENJAX_FP8_NORM_PARTIALS=1 (opt-in), under "1" / "fused", o_proj's and down_proj's K-split partials go to the
add + RMSNorm kernel unsummed (Fp8Linear.to_norm).
With QWENJAX_FP8_SWIGLU=1 (opt-in, not yet run on a GPU), where the activations are quantized inside the GEMM, the
fused gate/up GEMM writes the MLP's h itself (`swiglu_linear`).

`fp8_linear` (x in the model dtype) and `fp8_matmul` (x quantized) are the entry points: swap their bodies to change
the GPU form.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from pallas_kernels import fp8_act_quant, fp8_gemv, fp8_skinny, fp8_skinny_rows
from qwenjax.compat import enable_pallas_fp8_wgmma, platform
from qwenjax.quantization.fp8_quant import FP8_DTYPE, quantize_activations, scale_for

_DIMS = (((1,), (1,)), ((), ()))  # x [T, I] . w [O, I] -> [T, O]
FP8_WGMMA = enable_pallas_fp8_wgmma()  # the skinny kernel's float8 dots on Hopper's FP8 wgmma (compat's docstring)
# QWENJAX_FP8_GEMV=1: steps of few rows take the Pallas FP8 GEMV on a GPU (module docstring); read when traced.
GEMV_ENV = "QWENJAX_FP8_GEMV"
# QWENJAX_FP8_SKINNY: steps of at most fp8_skinny.MAX_ROWS tokens take the Pallas tensor-core skinny GEMM with split-K
# on a GPU unless it is "0" (after the GEMV where that is asked for); read when traced.
SKINNY_ENV = "QWENJAX_FP8_SKINNY"
# QWENJAX_FP8_ACCUM=f32: on a GPU the G == 1 dot asks XLA for float32 accumulation without cuBLASLt's fast
# (imprecise) FP8 accumulation (DotAlgorithmPreset.ANY_F8_ANY_F8_F32). At K = 18,944 (down_proj) and 2,048 rows the
# default form was off the float64 product by up to 1.5x 2^-7 of its scale at 151 of 7.3M outputs on an H100
# (tests/gpu/test_fp8_gpu.py, NOTES 50): fast accumulation. With the setting that case passes. It stays opt-in: on
# an H100 at f0fe535 (benchmarks/fp8_matmul.py's fp8_tn_f32acc form) it cost nothing at 2,048 rows of down_proj but
# ran at 0.81x the default at 256 rows of down, 0.92x at gate/up (NOTES 51); read when traced.
ACCUM_ENV = "QWENJAX_FP8_ACCUM"
# QWENJAX_FP8_GEMM_OUT=bf16: on a GPU the G == 1 dot returns bfloat16 (cuBLASLt still sums in its accumulator), the
# scales then multiply that. The float32 result is the largest tensor of a wide product: at 2,048 rows gate/up
# writes 310 MB of it and the scaling reads it back, and there the FP8 product ran 1.26x bf16 against down's 1.63x
# (down's output is a tenth as wide; NOTES 51). Costs one more rounding (bf16 before the scales). Opt-in, not yet
# run on a GPU (benchmarks/fp8_matmul.py's fp8_tn_bf16out form); read when traced.
GEMM_OUT_ENV = "QWENJAX_FP8_GEMM_OUT"
# QWENJAX_FP8_ACT_KERNEL: where the skinny kernel takes a product of dynamic per-token activations, "auto"
# (default): "fused" for steps of at most AUTO_FUSED_ROWS tokens, else "0"; "0": XLA quantizes them; "1": the kernels
# that write the rows (or one Pallas kernel) do; "fused": the skinny kernel does (module docstring); read when traced.
# On an H100 at 40f6dff (7B, batch 1, NOTES 56): "0" 3.788 ms a token, "1" 4.131 (its one-program-a-row
# quantizing kernels ran at ~10 us each), "fused" 3.680; but "fused" at the 128-token prefill took a 28.0 ms TTFT
# against "0"'s 9.1 (every program divides all of its rows' values): hence "auto".
ACT_KERNEL_ENV = "QWENJAX_FP8_ACT_KERNEL"
ACT_KERNEL_CHOICES = ("auto", "0", "1", "fused", "scaled")
AUTO_FUSED_ROWS = 8
# "scaled" (opt-in): as "fused", but the rows' scales come from elsewhere where that is cheaper than the kernel's
# maxima pass (each program of a product reads all of x first): the add + RMSNorm kernel writes qkv's and gate/up's
# (it has the row in registers; Fp8Linear.row_form "scale"), XLA finds them for inputs of at least XLA_SCALE_MIN_K
# columns (down_proj's h: the maximum fused into the SwiGLU multiply), the kernel for the rest (o_proj). Opt-in: on an
# H100 at 9b23510 (batch 1, NOTES 56) 3.667 ms a token against "auto"'s 3.619: down_proj gained 2.8 us a layer, but
# XLA took three kernels for its scales (~4.4 us with the multiply's maximum) and the norm 0.5 us more a call.
XLA_SCALE_MIN_K = 8192
# QWENJAX_FP8_SWIGLU=1: where the activations are quantized inside the GEMM ("fused", or "auto" at decode), the fused
# gate/up GEMM writes the MLP's h = silu(gate) * up itself (swiglu_linear): the fused output's slices and XLA's
# multiply go (~3.2 us a layer of the 7B at batch 1, NOTES 56). Opt-in: built after the session's last GPU call, not
# yet run on a GPU; read when traced.
SWIGLU_ENV = "QWENJAX_FP8_SWIGLU"
# QWENJAX_FP8_NORM_PARTIALS=1: o_proj's and down_proj's K-split float32 partials go unsummed to the add + RMSNorm
# kernel after them, which adds them (one XLA kernel a product fewer). Opt-in: on an H100 at 40f6dff (batch 1) that
# norm took 4.5 us against 2.1 without partials, more than XLA's separate sum (1.25 us) saved; read when traced.
NORM_PARTIALS_ENV = "QWENJAX_FP8_NORM_PARTIALS"


# f32 accumulation from this many rows: at 1 row jax 0.11.2's GPU compiler refused the algorithm ("Unsupported dot
# precision algorithm") on an H100 at f0fe535; at 64 and 2,048 rows it compiled and passed tests/gpu (NOTES 51).
ACCUM_MIN_ROWS = 64


def dot_precision(accum: str | None = None, rows: int = ACCUM_MIN_ROWS):
    """The G == 1 dot's precision: float32 accumulation without fast accumulation where `accum` (default: ACCUM_ENV)
    is "f32" on a GPU for at least ACCUM_MIN_ROWS rows (the CPU backend takes no algorithm for float8 operands),
    else XLA's default."""
    if (accum or os.environ.get(ACCUM_ENV)) == "f32" and platform() == "gpu" and rows >= ACCUM_MIN_ROWS:
        return jax.lax.DotAlgorithmPreset.ANY_F8_ANY_F8_F32
    return None


def gemm_out_dtype(gemm_out: str | None = None):
    """The G == 1 dot's result type: bfloat16 where `gemm_out` (default: GEMM_OUT_ENV) is "bf16" on a GPU, else
    float32 (on CPU the setting changes nothing, so CPU results stay those of the float32 form)."""
    if (gemm_out or os.environ.get(GEMM_OUT_ENV)) == "bf16" and platform() == "gpu":
        return jnp.bfloat16
    return jnp.float32


def kernel_for(xq: jax.Array, wq: jax.Array) -> str | None:
    """The Pallas kernel a G == 1 product takes: "gemv" (GEMV_ENV=1), "skinny" (unless SKINNY_ENV=0), or None
    (XLA's dot). Read when traced."""
    switches = {env: os.environ.get(env, default) for env, default in ((GEMV_ENV, "0"), (SKINNY_ENV, "1"))}
    for env, value in switches.items():
        if value not in ("0", "1"):
            raise ValueError(f"{env} must be 0 or 1, got {value!r}")
    if _takes(fp8_gemv, switches[GEMV_ENV], xq, wq):
        return "gemv"
    if _takes(fp8_skinny, switches[SKINNY_ENV], xq, wq):
        return "skinny"
    return None


def act_kernel(tokens: int | None = None) -> str:
    """ACT_KERNEL_ENV's value, checked; "auto" resolved for a step of `tokens` tokens ("0" where None)."""
    value = os.environ.get(ACT_KERNEL_ENV, "auto")
    if value not in ACT_KERNEL_CHOICES:
        raise ValueError(f"{ACT_KERNEL_ENV} must be one of {', '.join(ACT_KERNEL_CHOICES)}; got {value!r}")
    if value == "auto":
        return "fused" if tokens is not None and tokens <= AUTO_FUSED_ROWS else "0"
    return value


def norm_partials() -> bool:
    """NORM_PARTIALS_ENV's value ("0" or "1", default "0"), checked."""
    value = os.environ.get(NORM_PARTIALS_ENV, "0")
    if value not in ("0", "1"):
        raise ValueError(f"{NORM_PARTIALS_ENV} must be 0 or 1, got {value!r}")
    return value == "1"


def quantize_for(x: jax.Array, wq: jax.Array, *, group: int | None = None,
                 static_scale: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """quantize_activations(x, group, static_scale) for a product with the weight wq [O, I]: by
    pallas_kernels/fp8_act_quant.py where ACT_KERNEL_ENV is "1", the activations are dynamic per token and the
    skinny kernel takes the product, else XLA's form (the same rule; on a GPU XLA's division is not IEEE-rounded)."""
    if (act_kernel(x.shape[0]) == "1" and _skinny_per_token(x, wq, group, static_scale)
            and fp8_act_quant.why_not(x) is None):
        return fp8_act_quant.quantize_rows(x)
    return quantize_activations(x, group=group, static_scale=static_scale)


def fp8_linear(x: jax.Array, wq: jax.Array, w_scale: jax.Array, *, group: int | None = None,
               static_scale: jax.Array | None = None, out_dtype, partials: bool = False) -> jax.Array:
    """x [T, I] (the model dtype) times the float8 weight wq [O, I] with scales w_scale [G, O] -> [T, O] in out_dtype:
    the activations quantized as quantize_activations(x, group, static_scale) says, then fp8_matmul; in one kernel
    (pallas_kernels/fp8_skinny_rows.py with float x) where ACT_KERNEL_ENV is "fused", the activations are dynamic
    per token and the skinny kernel takes the product. partials: as fp8_matmul's."""
    mode = act_kernel(x.shape[0])
    if (mode in ("fused", "scaled") and _skinny_per_token(x, wq, group, static_scale)
            and fp8_skinny_rows.supported(*x.shape, wq.shape[0], x_dtype=x.dtype, w_dtype=wq.dtype)):
        x_scale = None
        if mode == "scaled" and x.shape[1] >= XLA_SCALE_MIN_K:  # the rule's scales by XLA (fused into x's producer)
            x_scale = scale_for(jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1, keepdims=True))
        return fp8_skinny_rows.fp8_skinny_rows(x, wq, w_scale, x_scale, out_dtype=out_dtype,
                                               partials=partials and norm_partials())
    xq, x_scale = quantize_for(x, wq, group=group, static_scale=static_scale)
    return fp8_matmul(xq, x_scale, wq, w_scale, out_dtype=out_dtype, partials=partials)


def swiglu_linear(x: jax.Array, wq: jax.Array, w_scale: jax.Array, *, out_dtype) -> jax.Array | None:
    """The MLP's h = silu(gate) * up [T, F] from x [T, I] and a fused gate/up weight wq [2F, I] (gate's rows, then
    up's) with per-channel scales w_scale [1, 2F], in one kernel (pallas_kernels/fp8_skinny_rows.py, swiglu): where
    SWIGLU_ENV is "1", ACT_KERNEL_ENV resolves to "fused" for the step and the skinny kernel takes the product, else
    None (the caller
    runs the projection, the slices and the multiply). h is torch's (silu in float32 of the bf16 gate, rounded, then
    the product rounded), not XLA's jnp form of it."""
    f = wq.shape[0] // 2
    switch = os.environ.get(SWIGLU_ENV, "0")
    if switch not in ("0", "1"):
        raise ValueError(f"{SWIGLU_ENV} must be 0 or 1, got {switch!r}")
    if (switch == "1" and act_kernel(x.shape[0]) == "fused" and wq.shape[0] % 2 == 0 and w_scale.shape[0] == 1
            and _skinny_per_token(x, wq, None, None)
            and fp8_skinny_rows.supported(x.shape[0], x.shape[1], f, x_dtype=x.dtype, w_dtype=wq.dtype)):
        return fp8_skinny_rows.fp8_skinny_rows(x, wq, w_scale, out_dtype=out_dtype, swiglu=True)
    return None


def kernel_rows(tokens: int, wq: jax.Array) -> str | None:
    """Whether kernels that write a product's input rows also quantize them for it, for a step of `tokens` tokens
    with dynamic per-token activations times the weight wq [O, I], where the skinny kernel takes the product:
    "fp8" (ACT_KERNEL_ENV "1": the add + RMSNorm kernel for qkv / gate_up, the SwiGLU kernel for down_proj write
    float8 rows and scales), "scale" ("scaled": the add + RMSNorm kernel writes the scales alone), else None. Read
    when traced."""
    form = {"1": "fp8", "scaled": "scale"}.get(act_kernel(tokens))
    if form and kernel_for(jax.ShapeDtypeStruct((tokens, wq.shape[1]), FP8_DTYPE), wq) == "skinny":
        return form
    return None


def _skinny_per_token(x, wq, group, static_scale) -> bool:
    """Dynamic per-token activations (no group, no static scale) for a product the skinny kernel takes."""
    return (group is None and static_scale is None
            and kernel_for(jax.ShapeDtypeStruct(x.shape, FP8_DTYPE), wq) == "skinny")


def _takes(kernel, switch: str, xq: jax.Array, wq: jax.Array) -> bool:
    """The switch "1", a GPU, a mesh of one device (over several, XLA partitions the dot), and a shape `kernel` (a
    pallas_kernels module) takes."""
    if switch != "1" or platform() != "gpu":
        return False
    mesh = jax.sharding.get_abstract_mesh()
    if not (mesh is None or mesh.empty or mesh.size == 1):
        return False
    return kernel.supported(xq.shape[0], xq.shape[1], wq.shape[0], x_dtype=xq.dtype, w_dtype=wq.dtype)


def fp8_matmul(xq: jax.Array, x_scale: jax.Array, wq: jax.Array, w_scale: jax.Array, *, out_dtype,
               accum: str | None = None, gemm_out: str | None = None, partials: bool = False) -> jax.Array:
    """[T, O] in out_dtype (module docstring for the shapes); `accum`: "f32" or None (ACCUM_ENV), see dot_precision;
    `gemm_out`: "bf16" or None (GEMM_OUT_ENV), see gemm_out_dtype. partials: where fp8_skinny_rows splits K, its
    scaled float32 partials [S, T, O] unsummed, for the add + RMSNorm kernel to add (layers/norm.py); elsewhere the
    [T, O] output as without it."""
    G = x_scale.shape[-1]
    if G != w_scale.shape[0]:
        raise ValueError(f"activation scales have {G} groups along the inputs, weight scales {w_scale.shape[0]}")
    if jnp.dtype(xq.dtype) != FP8_DTYPE:  # float rows with their scales given (kernel_rows "scale"): quantized inside
        return fp8_skinny_rows.fp8_skinny_rows(xq, wq, w_scale, x_scale, out_dtype=out_dtype,
                                               partials=partials and norm_partials())
    kernel = kernel_for(xq, wq) if G == 1 else None
    if kernel == "gemv":
        return fp8_gemv.fp8_gemv(xq, x_scale, wq, w_scale, out_dtype=out_dtype)
    if kernel == "skinny" and act_kernel(xq.shape[0]) == "1":  # x's real rows, no pad; the scaled output where K is
        # not split
        return fp8_skinny_rows.fp8_skinny_rows(xq, wq, w_scale, x_scale, out_dtype=out_dtype,
                                               partials=partials and norm_partials())
    if kernel == "skinny":
        return fp8_skinny.fp8_skinny(xq, x_scale, wq, w_scale, out_dtype=out_dtype)
    if G == 1:
        acc = jax.lax.dot_general(xq, wq, _DIMS, precision=dot_precision(accum, xq.shape[0]),
                                  preferred_element_type=gemm_out_dtype(gemm_out))
        return (acc.astype(jnp.float32) * x_scale * w_scale).astype(out_dtype)
    return block_scaled_reference(xq, x_scale, wq, w_scale).astype(out_dtype)


def block_scaled_reference(xq, x_scale, wq, w_scale) -> jax.Array:
    """G > 1: dequantize both operands to float32, one float32 dot (module docstring). Returns float32 [T, O].

    The optimization barrier keeps the float8 rounding: XLA's GPU pipeline (SimplifyFPConversions, on while
    xla_allow_excess_precision is) folds a chain of float conversions A -> B -> A into A, so an activation quantized
    in the same program (float32 -> float8 -> float32) would reach the dot unrounded. That is the likely cause of
    the block-scaled projections 28% off the reference's rounded values on an H100 at b39bff8 (tests/gpu/
    test_fp8_gpu.py, NOTES 50; the barrier is not yet run on a GPU). The CPU pipeline keeps the rounding either way."""
    xq, wq = jax.lax.optimization_barrier((xq, wq))
    T, I = xq.shape
    G, O = w_scale.shape
    x = (xq.astype(jnp.float32).reshape(T, G, I // G) * x_scale[..., None]).reshape(T, I)
    w = (wq.astype(jnp.float32).reshape(O, G, I // G) * w_scale.T[:, :, None]).reshape(O, I)
    return jax.lax.dot_general(x, w, _DIMS, precision=jax.lax.Precision.HIGHEST,
                               preferred_element_type=jnp.float32)
