"""Loading FP8 projections (layers/fp8_linear.py): the checkpoint's tensors in Fp8Linear's layout, and float weights
quantized at load (quantization="fp8" on a float checkpoint).

The loader (models/loader.py) hands each projection tensor here (`Fp8Loading`). It reads, fuses, pads and places FP8
weights as [I, O] kernels, as it does every projection (`loading_view` shows it Fp8Linear's `weight` [O, I] as such a
`kernel`), and `to_model_layout` turns them to Fp8Linear's [O, I] at the end, on the devices. The layouts are:
  weight            float8_e4m3fn [O, I] -> kernel [I, O] (the loader transposes); an FP8 checkpoint's must be
                    float8_e4m3fn, a float checkpoint's must not be (it is then placed in the model dtype and
                    quantized per output channel on the devices, in its own sharding, by `finish`)
  weight_scale      per-tensor [] / [1] -> [1, O], the value repeated over the layer's (or fused part's) columns
  weight_scale_inv  block [ceil(O / bn), ceil(I / bk)] -> weight_scale [I / bk, O], each block row repeated over its
                    bn output columns
  input_scale       [] / [1] per projection -> one [] per Fp8Linear: the largest of a fused layer's parts (q/k/v, or
                    gate/up, read one input, so calibrated checkpoints give them the same value anyway)
Columns beyond a layer's real outputs (padding for the mesh, models/mesh_padding.py) get a scale too; their kernel
columns are zero, so the scale multiplies nothing.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

from qwenjax.quantization.config import QuantConfig
from qwenjax.quantization.fp8_quant import FP8_DTYPE, quantize_weight_per_channel

logger = logging.getLogger("qwenjax")
_F8 = np.dtype(FP8_DTYPE)


def is_fp8(arr) -> bool:
    return np.dtype(arr.dtype) in (np.dtype(jax.numpy.float8_e4m3fn), np.dtype(jax.numpy.float8_e5m2))


class Fp8Loading:
    """One load's FP8 bookkeeping: tensor layouts, static input scales gathered over fused parts, quantization at
    load."""

    def __init__(self, quant: QuantConfig):
        self.quant = quant
        self.input_scales: dict[tuple, dict[str, float]] = {}   # param path -> checkpoint name -> value
        self.input_parts: dict[tuple, int] = {}                 # param path -> how many parts give it a value
        self._ignored_input_scale = False

    def param_key(self, name: str, key: tuple) -> tuple:
        """The checkpoint's block scales `weight_scale_inv` are Fp8Linear's `weight_scale`; the other format's name in
        a checkpoint is an error that says which format the config declares."""
        block = self.quant.weight_block_size
        if key[-1] == "weight_scale_inv":
            if block is None:
                raise ValueError(f"checkpoint tensor {name!r} is a block scale, but quantization_config has no "
                                 f"weight_block_size (per-tensor fp8 checkpoints hold `weight_scale`)")
            return key[:-1] + ("weight_scale",)
        if key[-1] == "weight_scale" and block is not None:
            raise ValueError(f"checkpoint tensor {name!r} is a per-tensor scale, but quantization_config has "
                             f"weight_block_size {list(block)} (block-scaled checkpoints hold `weight_scale_inv`)")
        return key

    def place_dtype(self, key: tuple, wanted_dtype, model_dtype):
        """A float checkpoint's kernels are placed in the model dtype and quantized on the devices by `finish`."""
        if key[-1] == "kernel" and np.dtype(wanted_dtype) == _F8 and not self.quant.is_checkpoint_fp8_serialized:
            return model_dtype
        return wanted_dtype

    def host_array(self, name: str, leaf: str, arr: np.ndarray, shape: tuple, wanted_dtype) -> np.ndarray:
        """A projection tensor in Fp8Linear's layout (module docstring); `shape` is the parameter (or fused part)
        shape in the padded model, whose last axis is the output columns; `wanted_dtype` the parameter's."""
        if leaf == "kernel" and np.dtype(wanted_dtype) != _F8:  # lm_head: float in every FP8 checkpoint
            if is_fp8(arr):
                raise ValueError(f"checkpoint tensor {name!r} is {arr.dtype}; only the q/k/v/o/gate/up/down "
                                 f"projections are FP8 here")
            return arr
        if leaf == "kernel":
            if self.quant.is_checkpoint_fp8_serialized and np.dtype(arr.dtype) != _F8:
                raise ValueError(f"checkpoint tensor {name!r} is {arr.dtype}; an fp8 checkpoint's projection weights "
                                 f"must be float8_e4m3fn (F8_E4M3)")
            if not self.quant.is_checkpoint_fp8_serialized and is_fp8(arr):
                raise ValueError(f"checkpoint tensor {name!r} is {arr.dtype} but config.json has no fp8 "
                                 f"quantization_config to give its scales")
            return arr
        if leaf != "weight_scale":
            return arr
        if self.quant.weight_block_size is None:
            if arr.size != 1:
                raise NotImplementedError(
                    f"checkpoint tensor {name!r} has shape {tuple(arr.shape)}; fp8 checkpoints without "
                    f"weight_block_size are supported with one per-tensor weight_scale (shape [] or [1]); per-channel "
                    f"scales are compressed-tensors' format, not vLLM's fp8")
            return np.full((1, shape[-1]), np.float32(np.asarray(arr, np.float32).reshape(())), np.float32)
        bn = self.quant.weight_block_size[0]
        if arr.ndim != 2:
            raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(arr.shape)}; block scales are "
                             f"[ceil(out / {bn}), ceil(in / {self.quant.weight_block_size[1]})]")
        cols = np.repeat(np.asarray(arr, np.float32).T, bn, axis=1)
        O = shape[-1]
        if cols.shape[1] < O:  # padded output columns (zero kernel columns): any scale
            cols = np.pad(cols, ((0, 0), (0, O - cols.shape[1])), mode="edge")
        return np.ascontiguousarray(cols[:, :O])

    def add_input_scale(self, key: tuple | None, name: str, arr: np.ndarray, parts: int) -> None:
        """A static input scale for the Fp8Linear at `key` (a fused layer's path for its parts); None: the model has
        no place for it (dynamic activations), and it is not used."""
        if key is None:
            if not self._ignored_input_scale:
                logger.warning("fp8 checkpoint has input_scale tensors (e.g. %s) but activation_scheme is %r: they "
                               "are not used", name, self.quant.activation_scheme)
                self._ignored_input_scale = True
            return
        value = np.float32(np.asarray(arr, np.float32).reshape(-1)[0]) if arr.size == 1 else None
        if value is None or not (np.isfinite(value) and value > 0):
            raise ValueError(f"checkpoint tensor {name!r} (shape {tuple(arr.shape)}) must be one positive, finite "
                             f"per-tensor input scale")
        self.input_scales.setdefault(key, {})[name] = float(value)
        self.input_parts[key] = parts

    @staticmethod
    def loading_view(wanted: dict) -> dict:
        """The model's flat abstract state with each Fp8Linear `weight` [O, I] shown as a `kernel` [I, O] (module
        docstring): the parameters the loader fills."""
        out = {}
        for key, var in wanted.items():
            if key[-1] == "weight" and np.dtype(var.dtype) == _F8:
                key, var = key[:-1] + ("kernel",), jax.ShapeDtypeStruct(tuple(var.shape)[::-1], var.dtype)
            out[key] = var
        return out

    @staticmethod
    def to_model_layout(loaded: dict, view: dict, sharding_of) -> dict:
        """`loaded` (keys of `loading_view`) with every FP8 kernel [I, O] transposed on the devices into Fp8Linear's
        `weight` [O, I], placed in `sharding_of(weight key)`; one layer at a time (its kernel freed once transposed,
        so the memory beyond the weights is one layer's)."""
        out = {}
        for key in list(loaded):
            arr = loaded.pop(key)
            if key[-1] == "kernel" and np.dtype(view[key].dtype) == _F8:
                key = key[:-1] + ("weight",)
                arr = jax.jit(jnp.transpose, out_shardings=sharding_of(key))(arr)  # the kernel is dropped here
            out[key] = arr
        return out

    def finish(self, loaded: dict, wanted: dict, sharding_of) -> dict:
        """`loaded` with the static input scales (max over a fused layer's parts) and, for a float checkpoint, every
        FP8 kernel quantized per output channel on the devices with its weight_scale. `sharding_of(key)` is a
        parameter's NamedSharding."""
        out = dict(loaded)
        for key, values in self.input_scales.items():
            if len(values) < self.input_parts[key]:
                raise ValueError(f"checkpoint has {len(values)} of the {self.input_parts[key]} input_scale tensors of "
                                 f"{'.'.join(map(str, key[:-1]))} ({sorted(values)}); a fused layer needs each part's")
            out[key] = jax.device_put(np.float32(max(values.values())), sharding_of(key))
        for key, arr in loaded.items():
            if key[-1] != "kernel" or np.dtype(wanted[key].dtype) != _F8 or np.dtype(arr.dtype) == _F8:
                continue
            scale_key = key[:-1] + ("weight_scale",)
            fn = jax.jit(quantize_weight_per_channel, out_shardings=(sharding_of(key), sharding_of(scale_key)))
            out[key], out[scale_key] = fn(arr)
        return out
