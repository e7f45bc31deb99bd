"""Random weights in the real shapes, made on the devices in their shards: what benchmarks and GPU runs use when no
checkpoint is given (`load_format="dummy"`), at the size and sharding a loaded checkpoint would have."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from qwenjax.config import ModelConfig
from qwenjax.layers.fp8_linear import RANDOM_SPREAD
from qwenjax.models.fusion import Fusion
from qwenjax.models.loader import abstract_model, model_class
from qwenjax.models.mesh_padding import pad_for_mesh, zero_padded_rows
from qwenjax.quantization.config import QuantConfig
from qwenjax.quantization.fp8_quant import FP8_DTYPE, FP8_MAX


def random_params(cfg: ModelConfig, dtype, seed: int = 0, *, mesh=None,
                  quant: QuantConfig | None = None) -> tuple[nnx.GraphDef, nnx.State]:
    """Random weights in the real shapes, initialised on the devices in their shards (no host copy): benchmarks.

    Float and FP8 models: one parameter at a time, each from its own key, by a jitted initializer shared by every
    parameter of the same shape, kind and sharding (`_leaf_init`): a 57B model compiles about twenty small programs
    instead of one that holds every weight, and the memory beyond the weights made so far is one parameter's
    transient (the largest, a layer's [64, 3584, 2560] bf16 expert stack, is 1.1 GiB). Kinds follow the modules' own
    initializers (`init_kind`). AWQ / GPTQ models: the modules' constructor in one jit (their packed arrays have their
    own init). FP8 went that way too: on an H100 the random FP8 7B took 46 s to load so (NOTES 50; the per-parameter
    path is not yet timed there).
    """
    from qwenjax.models.sharding import make_mesh, param_spec

    mesh = mesh or make_mesh(1)
    n = mesh.shape["tp"]
    real, cfg = cfg, pad_for_mesh(cfg, n, quant)  # padded heads / FFN columns: zero o_proj / down_proj rows
    fusion = Fusion.decide(cfg, n, quant)
    graphdef, abstract = nnx.split(abstract_model(cfg, dtype, quant, fusion))
    flat = list(nnx.to_flat_state(abstract))
    if quant is None or quant.method == "fp8":
        base = jax.random.key(seed)
        values = []
        for i, (path, var) in enumerate(flat):
            sharding = NamedSharding(mesh, param_spec(path, cfg, n, var.shape))
            value = _leaf_init(init_kind(path, var.dtype), tuple(var.shape), np.dtype(var.dtype), sharding)(
                jax.random.fold_in(base, i))
            value = zero_padded_rows(path, value, real, cfg)
            values.append(jax.block_until_ready(value))  # one parameter's transient memory at a time
        return graphdef, nnx.from_flat_state([(p, v.replace(x)) for (p, v), x in zip(flat, values)])
    shardings = nnx.from_flat_state([(p, NamedSharding(mesh, param_spec(p, cfg, n, v.shape))) for p, v in flat])

    @functools.partial(jax.jit, out_shardings=shardings)
    def init():
        return nnx.split(model_class(cfg)(cfg, dtype=dtype, rngs=nnx.Rngs(seed), quant=quant, fusion=fusion))[1]

    state = init()
    if real == cfg:
        return graphdef, state
    return graphdef, nnx.from_flat_state([(p, v.replace(zero_padded_rows(p, v[...], real, cfg)))
                                          for p, v in nnx.to_flat_state(state)])


def init_kind(path: tuple, dtype=None) -> str:
    """How the model's modules initialise the parameter at `path` (of `dtype`): "zeros" (biases), "ones" (RMSNorm
    weights, KV-cache scales, static input scales), "normal" (normal(0.02): projection kernels, embeddings, stacked
    experts, routers); for Fp8Linear (layers/fp8_linear.py) "fp8_normal" (its float8 `weight`) and "fp8_scale" (its
    `weight_scale`), which together make weights of std 0.02 as "normal" does."""
    leaf = path[-1]
    if leaf == "weight" and dtype is not None and np.dtype(dtype) == np.dtype(FP8_DTYPE):
        return "fp8_normal"
    if leaf == "weight_scale":
        return "fp8_scale"
    if leaf == "bias":
        return "zeros"
    if leaf in ("kernel", "embedding") or (len(path) > 1 and path[-2] == "experts"):
        return "normal"
    return "ones"


@functools.lru_cache(maxsize=None)
def _leaf_init(kind: str, shape: tuple, dtype: np.dtype, sharding):
    if kind == "normal":
        return jax.jit(lambda key: nnx.initializers.normal(0.02)(key, shape, dtype), out_shardings=sharding)
    if kind == "fp8_normal":  # as Fp8Linear.__init__: float8 values of std RANDOM_SPREAD
        return jax.jit(lambda key: jnp.clip(jax.random.normal(key, shape, jnp.float32) * RANDOM_SPREAD, -FP8_MAX,
                                            FP8_MAX).astype(dtype), out_shardings=sharding)
    if kind == "fp8_scale":
        return jax.jit(lambda key: jnp.full(shape, 0.02 / RANDOM_SPREAD, dtype), out_shardings=sharding)
    fill = jnp.zeros if kind == "zeros" else jnp.ones
    return jax.jit(lambda key: fill(shape, dtype), out_shardings=sharding)
