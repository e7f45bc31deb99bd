"""Fp8Linear: a projection whose weight is float8_e4m3fn, with float32 scales, multiplied as FP8 x FP8.

Parameters (T tokens, I inputs, O outputs, G = quant.num_groups(I): 1, or I / block_k for block-scaled weights):
  weight        float8_e4m3fn [O, I]   the checkpoint's `weight` as it is, or a float weight quantized at load per
                                       output channel (qwenjax/quantization/fp8_load.py). [O, I], not a float
                                       kernel's [I, O]: cuBLASLt's FP8 GEMM takes only K-contiguous operands, and
                                       from [I, O] XLA transposed the weight at every call (NOTES 48)
  weight_scale  float32 [G, O]         W[o, i] = weight[o, i] x weight_scale[i // block_k, o]: a per-tensor scale
                                       repeated over O, per-channel scales, or a block's scale repeated over its
                                       block_n output columns, so every format is one layout and q/k/v or gate/up
                                       fuse by concatenating columns, as float kernels do (models/fusion.py)
  input_scale   float32 []             activation_scheme "static" only: x is quantized as x / input_scale (a fused
                                       layer takes the largest of its parts', as vLLM does)
  bias          [O]                    in the model dtype (q/k/v)
Activations are quantized in the step (quantization/fp8_quant.py's rule; layers/fp8_matmul.fp8_linear): static,
dynamic per token, or dynamic per token per block_k group; the product is layers/fp8_matmul.py's. Tensor parallelism
splits weight_scale with its kernel's output axis (column-parallel) or its groups (row-parallel),
sharding.param_spec; the output is in the model dtype. The loader
fuses, pads and shards FP8 layers as [I, O] kernels like every other projection and turns them to [O, I] at the end
(fp8_load.Fp8Loading.loading_view / to_model_layout).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels import fp8_act_quant
from qwenjax.layers.fp8_matmul import fp8_linear, fp8_matmul, kernel_rows, swiglu_linear
from qwenjax.quantization.config import QuantConfig
from qwenjax.quantization.fp8_quant import FP8_DTYPE, FP8_MAX

RANDOM_SPREAD = 64.0  # random weights: float8 values of std 64, scale 0.02 / 64 (std 0.02, the float init's)


class Fp8Linear(nnx.Module):
    def __init__(self, in_features: int, out_features: int, *, use_bias: bool, quant: QuantConfig, dtype,
                 rngs: nnx.Rngs):
        block = quant.weight_block_size
        if block is not None and in_features % block[1]:
            raise ValueError(f"fp8 weight_block_size {list(block)}: block_k {block[1]} must divide the layer's "
                             f"{in_features} inputs (activations are scaled per group of block_k inputs)")
        self.in_features, self.out_features = in_features, out_features
        self.quant, self.dtype = quant, jnp.dtype(dtype)
        G = quant.num_groups(in_features)
        w = jax.random.normal(rngs.params(), (out_features, in_features), jnp.float32) * RANDOM_SPREAD
        self.weight = nnx.Param(jnp.clip(w, -FP8_MAX, FP8_MAX).astype(FP8_DTYPE))
        self.weight_scale = nnx.Param(jnp.full((G, out_features), 0.02 / RANDOM_SPREAD, jnp.float32))
        if quant.activation_scheme == "static":
            self.input_scale = nnx.Param(jnp.ones((), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((out_features,), self.dtype)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., I] -> [..., O] in the layer dtype."""
        lead = x.shape[:-1]
        y = self._linear(x.reshape(-1, self.in_features), partials=False)
        return self._biased(y).reshape(*lead, self.out_features)

    def takes_rows(self, tokens: int) -> str | None:
        """Whether a step of `tokens` tokens gives this layer its input rows with their scales from the kernel that
        writes them (fp8_matmul.kernel_rows): "fp8" (float8 rows), "scale" (the rows in the model dtype and their
        scales), or None; dynamic per-token activations (no static scale, no block groups) on the skinny kernel's
        path."""
        if self.quant.activation_scheme == "dynamic" and self.quant.weight_block_size is None:
            return kernel_rows(tokens, self.weight[...])
        return None

    def to_norm(self, x: jax.Array) -> jax.Array:
        """__call__ for a layer without bias whose output goes straight into RMSNorm.add: x [T, I] -> [T, O], or
        where the skinny kernel splits K (fp8_matmul's `partials`) the splits' float32 partials [S, T, O], which
        the norm's kernel adds (one XLA kernel a product fewer)."""
        if self.bias is not None:
            raise ValueError("Fp8Linear.to_norm: the layer has a bias; only a bias-free output goes to the norm as "
                             "partial sums")
        return self._linear(x, partials=True)

    def from_rows(self, xq: jax.Array, x_scale: jax.Array, *, partials: bool = False) -> jax.Array:
        """The product of input rows quantized elsewhere by the same rule: xq [T, I] float8_e4m3fn (or the rows in
        the model dtype, to quantize by the scales given), x_scale [T, 1] float32 -> [T, O] in the layer dtype (the
        kernels that write them: takes_rows). partials (a layer without bias): as to_norm's."""
        y = fp8_matmul(xq, x_scale, self.weight[...], self.weight_scale[...], out_dtype=self.dtype,
                       partials=partials and self.bias is None)
        return self._biased(y)

    def from_gate_up(self, y: jax.Array, *, partials: bool = False) -> jax.Array:
        """down_proj's product of h = silu(gate) * up, from the fused gate/up output y [T, 2F] on one device (gate's
        columns, then up's): h's rows quantized by one kernel (pallas_kernels/fp8_act_quant.swiglu_quantize_rows,
        GPU only; where takes_rows), then from_rows (partials: as to_norm's)."""
        return self.from_rows(*fp8_act_quant.swiglu_quantize_rows(y), partials=partials)

    def swiglu(self, x: jax.Array) -> jax.Array | None:
        """For a fused gate/up layer (gate's F outputs, then up's) without bias, dynamic per-token activations and
        per-channel or per-tensor scales: h = silu(gate) * up [T, F] by one kernel where the step's activations are
        quantized inside the GEMM (fp8_matmul.swiglu_linear), else None."""
        if (self.bias is not None or self.quant.activation_scheme != "dynamic"
                or self.quant.weight_block_size is not None):
            return None
        return swiglu_linear(x, self.weight[...], self.weight_scale[...], out_dtype=self.dtype)

    def _linear(self, x2: jax.Array, *, partials: bool) -> jax.Array:
        """x2 [T, I] -> [T, O] (or partials: fp8_matmul's), before the bias."""
        block = self.quant.weight_block_size
        static = self.input_scale[...] if self.quant.activation_scheme == "static" else None
        return fp8_linear(x2, self.weight[...], self.weight_scale[...], group=block[1] if block else None,
                          static_scale=static, out_dtype=self.dtype, partials=partials)

    def _biased(self, y: jax.Array) -> jax.Array:
        return y if self.bias is None else y + self.bias[...].astype(y.dtype)
