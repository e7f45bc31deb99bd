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


def _div_rn(a, b, interpret: bool):
    """a / b in float32, IEEE round-to-nearest (PTX `div.rn.f32`; interpret mode: jnp's division, IEEE on CPU)."""
    if interpret:
        return a / b
    (out,) = plgpu.elementwise_inline_asm("div.rn.f32 $0, $1, $2;", args=[a, b], constraints="=f,f,f", pack=1,
                                          result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.float32)])
    return out


def _kernel(x_ref, q_ref, s_ref, *, width: int, interpret: bool):
    # x_ref / q_ref [T, K] (all of them; this program's row is program_id(0)); s_ref [T, 1]
    t = pl.program_id(0)
    lanes = pl.next_power_of_2(width)
    cols = pl.ds(0, lanes)
    valid = lax.broadcasted_iota(jnp.int32, (lanes,), 0) < width
    v = plgpu.load(x_ref.at[t, cols], mask=valid, other=jnp.zeros((), x_ref.dtype)).astype(jnp.float32)
    # the row's maximum (masked lanes are 0: they never raise it) and its scale, in every lane (no scalar asm)
    amax = jnp.broadcast_to(jnp.max(jnp.abs(v)), v.shape)
    scale = jnp.where(amax > 0, amax * jnp.float32(INV_FP8_MAX), 1.0)
    q = jnp.clip(_div_rn(v, scale, interpret), -FP8_MAX, FP8_MAX).astype(q_ref.dtype)
    plgpu.store(q_ref.at[t, cols], q, mask=valid)
    s_ref[t, 0] = jnp.max(scale)


def why_not(x) -> str | None:
    """None when the kernel takes x, else why not (with the numbers)."""
    if x.ndim != 2 or jnp.dtype(x.dtype) not in _DTYPES:
        return f"fp8 activation quantization takes x [T, K] in bfloat16, float16 or float32; got {x.dtype} " \
               f"{list(x.shape)}"
    if not 1 <= x.shape[1] <= MAX_WIDTH:
        return f"fp8 activation quantization takes rows of 1 to {MAX_WIDTH} values, got {x.shape[1]}"
    return None


@functools.partial(jax.jit, static_argnames=("interpret",))
def quantize_rows(x: jax.Array, *, interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """(q [T, K] float8_e4m3fn, scale [T, 1] float32): fp8_quant.quantize_activations(x) by one kernel."""
    why = why_not(x)
    if why:
        raise ValueError(why)
    T, K = x.shape
    whole = pl.BlockSpec((T, K), lambda t: (0, 0))
    lanes = pl.next_power_of_2(K)
    q, s = pl.pallas_call(
        functools.partial(_kernel, width=K, interpret=interpret),
        grid=(T,),
        in_specs=[whole],
        out_specs=[whole, pl.BlockSpec((T, 1), lambda t: (0, 0))],
        out_shape=[jax.ShapeDtypeStruct((T, K), FP8), jax.ShapeDtypeStruct((T, 1), jnp.float32)],
        # about 32 values a thread: a row of 4,096 on 4 warps, of 18,944 (32,768 lanes) on 32
        compiler_params=_CompilerParams(num_warps=max(4, min(32, lanes // 1024)), num_stages=1),
        interpret=interpret,
        name="qwenjax_fp8_act_quant",
    )(x)
    return q, s
