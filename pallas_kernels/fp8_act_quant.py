"""Dynamic per-token FP8 quantization of activations in one pass: Pallas GPU (Triton lowering) kernel and jitted API.

qwenjax/quantization/fp8_quant.py's rule for one token's row v (float8_e4m3fn, FP8_MAX = 448):
  scale = max|v| x float32(1 / 448) (1 where max|v| is 0),  q = float8(clip(v / scale, -448, 448))   (round to
  nearest even)
XLA runs it as two kernels a product, the row's max reduction and the divide-and-convert; at a decode step of a few
rows each is a ~1.2-1.6 us launch-bound kernel, up to 8 of them a layer of the FP8 7B (H100 profile, NOTES 54). Here one
program a row reads the row once, reduces it in registers and writes q and the scale.

Values: the rule's exactly: the maximum is exact, the scale one float32 multiplication, the division IEEE-rounded
(`div.rn.f32` by inline PTX, so the rounding does not hang on how Triton lowers a float32 `/`), and the conversion
rounds to nearest even (`cvt.rn.satfinite` after the clip, as XLA's convert). On an H100 (jax 0.11.2) at 512 x
18,944 its float8 values equal numpy's IEEE form at every element and its scales equal XLA's, while XLA's GPU form
(`jax.jit(quantize_activations)`) differed from the IEEE form at 1,049 of 9.7M values (its float32 division is not
IEEE-rounded; NOTES 54). On CPU, XLA's form is IEEE and the interpret mode's values equal it bit for bit.

Status: opt-in (layers/fp8_matmul.py's QWENJAX_FP8_ACT_KERNEL=1): correct on the GPU, speed not yet measured.

Shapes: x [T, K] bfloat16 / float16 / float32 (K any size: the row is padded to a power of two inside the kernel
and masked) -> (q [T, K] float8_e4m3fn, scale [T, 1] float32).

`swiglu_quantize_rows` does the same for the MLP's h = silu(gate) * up, read from the fused gate/up output [T, 2F]:
the SwiGLU kernel and the two kernels of h's quantization become one (h itself is not written).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.paged_attention import _CompilerParams

FP8 = jnp.dtype(jnp.float8_e4m3fn)
FP8_MAX = 448.0
INV_FP8_MAX = float(np.float32(1.0 / FP8_MAX))  # quantization/fp8_quant.py's (kernels import no qwenjax module)
MAX_WIDTH = 1 << 16   # a row of at most 64k values in one program (Qwen2's widest activation: 29,568, the 72B's FFN)
_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


def div_rn(a, b, interpret: bool):
    """a / b in float32, IEEE round-to-nearest (PTX `div.rn.f32`; interpret mode: jnp's division, IEEE on CPU)."""
    if interpret:
        return a / b
    (out,) = plgpu.elementwise_inline_asm("div.rn.f32 $0, $1, $2;", args=[a, b], constraints="=f,f,f", pack=1,
                                          result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.float32)])
    return out


def rounded(v, dtype, interpret: bool):
    """float32 v rounded to `dtype`'s precision, kept in float32: the model-dtype values a kernel writes, for its own
    quantization. In interpret mode XLA's CPU compiler folds a float32 -> bfloat16 -> float32 round trip (it allows
    excess precision), so there the rounding is `reduce_precision`, which it keeps. On the GPU the casts are expected
    to stay (MLIR folds an exact round trip, not a lossy one); tests/gpu/test_fp8_gpu.py's rows tests check it."""
    if interpret:
        info = jnp.finfo(dtype)
        return lax.reduce_precision(v, exponent_bits=info.nexp, mantissa_bits=info.nmant)
    return v.astype(dtype).astype(jnp.float32)


def quantize_row(v, q_ref, s_ref, t, cols, valid, interpret: bool):
    """The rule for one row v (float32, masked lanes 0) in registers: its float8 values stored at q_ref[t, cols], its
    scale at s_ref[t, 0] (q_ref None: the scale alone). Shared with the kernels that produce the row themselves
    (rms_norm.py's, swiglu below)."""
    # the row's maximum (masked lanes are 0: they never raise it) and its scale, in every lane (no scalar asm)
    amax = jnp.broadcast_to(jnp.max(jnp.abs(v)), v.shape)
    scale = jnp.where(amax > 0, amax * jnp.float32(INV_FP8_MAX), 1.0)
    if q_ref is not None:
        q = jnp.clip(div_rn(v, scale, interpret), -FP8_MAX, FP8_MAX).astype(q_ref.dtype)
        plgpu.store(q_ref.at[t, cols], q, mask=valid)
    s_ref[t, 0] = jnp.max(scale)


def _row(width: int):
    lanes = pl.next_power_of_2(width)
    return pl.ds(0, lanes), lax.broadcasted_iota(jnp.int32, (lanes,), 0) < width


def _kernel(x_ref, q_ref, s_ref, *, width: int, interpret: bool):
    # x_ref / q_ref [T, K] (all of them; this program's row is program_id(0)); s_ref [T, 1]
    t = pl.program_id(0)
    cols, valid = _row(width)
    v = plgpu.load(x_ref.at[t, cols], mask=valid, other=jnp.zeros((), x_ref.dtype)).astype(jnp.float32)
    quantize_row(v, q_ref, s_ref, t, cols, valid, interpret)


def _swiglu_kernel(gate_ref, up_ref, q_ref, s_ref, *, width: int, interpret: bool):
    # gate_ref / up_ref [T, F] (the two halves of the fused gate/up output), q_ref [T, F], s_ref [T, 1]; this
    # program's row is program_id(0)
    t = pl.program_id(0)
    cols, valid = _row(width)
    zero = jnp.zeros((), gate_ref.dtype)
    gate = plgpu.load(gate_ref.at[t, cols], mask=valid, other=zero).astype(jnp.float32)
    up = plgpu.load(up_ref.at[t, cols], mask=valid, other=zero).astype(jnp.float32)
    # h = silu(gate) * up in the model dtype as torch computes it (transformers' Qwen2MLP, the tests' oracle): silu in
    # float32 rounded to the dtype, then the product rounded (masked lanes: 0). XLA's jnp form of the same bf16
    # expression differs from it (on CPU: at 35% of a row's values, by 1 bf16 ulp at 86% of those, up to 3).
    act = rounded(gate / (1.0 + jnp.exp(-gate)), gate_ref.dtype, interpret)
    quantize_row(rounded(act * up, gate_ref.dtype, interpret), q_ref, s_ref, t, cols, valid, interpret)


def why_not(x) -> str | None:
    """None when the kernel takes x, else why not (with the numbers)."""
    if x.ndim != 2 or jnp.dtype(x.dtype) not in _DTYPES:
        return f"fp8 activation quantization takes x [T, K] in bfloat16, float16 or float32; got {x.dtype} " \
               f"{list(x.shape)}"
    if not 1 <= x.shape[1] <= MAX_WIDTH:
        return f"fp8 activation quantization takes rows of 1 to {MAX_WIDTH} values, got {x.shape[1]}"
    return None


def _call(kernel, x, width: int, name: str, interpret: bool):
    """One program a row: (q [T, width] float8_e4m3fn, scale [T, 1] float32) from x [T, parts x width], the kernel
    taking each part's [T, width] columns as one ref."""
    T = x.shape[0]
    lanes = pl.next_power_of_2(width)
    return pl.pallas_call(
        functools.partial(kernel, width=width, interpret=interpret),
        grid=(T,),
        in_specs=[pl.BlockSpec((T, width), lambda t, p=p: (0, p)) for p in range(x.shape[1] // width)],
        out_specs=[pl.BlockSpec((T, width), lambda t: (0, 0)), pl.BlockSpec((T, 1), lambda t: (0, 0))],
        out_shape=[jax.ShapeDtypeStruct((T, width), FP8), jax.ShapeDtypeStruct((T, 1), jnp.float32)],
        # about 32 values a thread: a row of 4,096 on 4 warps, of 18,944 (32,768 lanes) on 32
        compiler_params=_CompilerParams(num_warps=max(4, min(32, lanes // 1024)), num_stages=1),
        interpret=interpret,
        name=name,
    )(*[x] * (x.shape[1] // width))


@functools.partial(jax.jit, static_argnames=("interpret",))
def quantize_rows(x: jax.Array, *, interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """(q [T, K] float8_e4m3fn, scale [T, 1] float32): fp8_quant.quantize_activations(x) by one kernel."""
    why = why_not(x)
    if why:
        raise ValueError(why)
    return _call(_kernel, x, x.shape[1], "qwenjax_fp8_act_quant", interpret)


@functools.partial(jax.jit, static_argnames=("interpret",))
def swiglu_quantize_rows(y: jax.Array, *, interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """y [T, 2F] (a fused gate/up projection's output on one device: gate's F columns, then up's) ->
    quantize_activations(h) of the MLP's h = silu(gate) * up in y's dtype, by one kernel (no h is written)."""
    why = why_not(y)
    if why is None and y.shape[1] % 2:
        why = f"swiglu quantization takes gate and up side by side, an even width; got {y.shape[1]}"
    if why:
        raise ValueError(why)
    return _call(_swiglu_kernel, y, y.shape[1] // 2, "qwenjax_fp8_swiglu_quant", interpret)
