"""RMSNorm as Qwen2 computes it: statistics in float32, the weight applied after casting back.

`RMSNorm.add(x, residual)` is the decoder's residual add fused with the norm of the sum: the Pallas kernel
(pallas_kernels/rms_norm.py, one kernel instead of XLA's three) on GPU, the same math in jnp elsewhere. x may also
be a K-split product's float32 partials [S, T, D] (Fp8Linear.to_norm): their sum, rounded to residual's dtype, is
the block's output; the kernel adds them itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from qwenjax.compat import platform


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype, rngs: nnx.Rngs | None = None):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * x32.astype(dtype)

    def add(self, x: jax.Array, residual: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [T, D] (or partials [S, T, D]: module docstring), residual [T, D] -> (self(x + residual), x +
        residual)."""
        if platform() == "gpu":
            return fused_add_rms_norm(x, residual, self.weight[...], eps=self.eps,
                                      mesh=jax.sharding.get_abstract_mesh())
        s = summed(x, residual.dtype) + residual
        return self(s), s

    def add_fp8(self, x: jax.Array, residual: jax.Array, form: str = "fp8"
                ) -> tuple[jax.Array, jax.Array, tuple[jax.Array, jax.Array]]:
        """add's (y, s), and y's rows for an FP8 product with their scales by quantization/fp8_quant.py's per-token
        rule: form "fp8" (q [T, D] float8_e4m3fn, scale [T, 1] float32), "scale" (y itself, scale); on GPU by the
        same kernel (Fp8Linear.takes_rows says when and which)."""
        if form not in ("fp8", "scale"):
            raise ValueError(f"RMSNorm.add_fp8: form must be 'fp8' or 'scale', got {form!r}")
        if platform() == "gpu":
            y, s, *rows = fused_add_rms_norm(x, residual, self.weight[...], eps=self.eps,
                                             mesh=jax.sharding.get_abstract_mesh(), fp8=True,
                                             scale_only=form == "scale")
            return y, s, ((y, *rows) if form == "scale" else tuple(rows))
        from qwenjax.quantization.fp8_quant import quantize_activations, scale_for

        y, s = self.add(x, residual)
        if form == "scale":
            return y, s, (y, scale_for(jnp.max(jnp.abs(y.astype(jnp.float32)), axis=-1, keepdims=True)))
        return y, s, quantize_activations(y)


def summed(x: jax.Array, dtype) -> jax.Array:
    """x [T, D] as it is, or partials [S, T, D] added in float32 and rounded to dtype."""
    return x if x.ndim == 2 else x.sum(axis=0).astype(dtype)


def fused_add_rms_norm(x, residual, weight, *, eps: float, mesh, fp8: bool = False, scale_only: bool = False,
                       interpret: bool = False):
    """The Pallas kernel on each device's copy of the (replicated) activations: under shard_map over the mesh's
    "tp" axis when it has more than one device, since the custom call has no partitioning rule of its own. fp8: the
    rows quantized too (pallas_kernels/rms_norm.add_rms_norm)."""
    from pallas_kernels.rms_norm import add_rms_norm

    def kernel(x, r, w):
        return add_rms_norm(x, r, w, eps=eps, fp8=fp8, scale_only=scale_only, interpret=interpret)

    n = 1 if mesh is None or mesh.empty or "tp" not in mesh.axis_names else mesh.shape["tp"]
    if n == 1:
        return kernel(x, residual, weight)
    outputs = 2 + (0 if not fp8 else 1 if scale_only else 2)
    return jax.shard_map(kernel, mesh=mesh, in_specs=(P(), P(), P()), out_specs=(P(),) * outputs,
                         check_vma=False)(x, residual, weight)
