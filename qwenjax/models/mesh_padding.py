"""Any mesh size: heads and FFN widths that the "tp" mesh does not divide are zero-padded until it does.

`pad_for_mesh(cfg, n)` gives the config of the model that actually runs on a mesh of n devices; the loaders
(models/loader.py, convert.py) build that model from a checkpoint of the real config, appending zeros
(`ZeroPadded`), and the KV cache is allocated for its kv heads. Everything downstream (sharding.py, the attention
shard_map, fusion) then sees sizes that divide the mesh and needs no other case.

Heads (only where n does not divide the q heads N; where it does, nothing changes: kv heads that n does not divide
stay replicated, sharding.py). kv heads K are padded to Kp, a multiple of n, and q heads to Np = Kp x g, where
g = N / K is the GQA group, so g is unchanged. Invariant: padded heads are APPENDED after the real ones, so q head i
still reads kv head i // g; real q heads (i < N) read real kv heads (i // g < K), and padded q heads read padded kv
heads. A split of Np and Kp into n equal contiguous ranges puts q head i and kv head i // g on the same device, so
every device holds whole heads and whole GQA groups. Padded heads change no result: their q/k/v projections (and
biases) are zero, so their keys and values are zero and their attention output is zero whatever the softmax gives;
their o_proj rows are zero too.

FFN widths (intermediate_size, Qwen2-MoE's moe_intermediate_size where experts split on F, and
shared_expert_intermediate_size) not divided by n are padded to a multiple of 16n: zero gate/up columns give
silu(0) x 0 = 0, and the down_proj rows are zero.

Quantized checkpoints pad in whole groups: padded widths of row-parallel inputs (o_proj's Np x H, down_proj's F)
are multiples of the group size, so the padded rows are whole zero groups (scales 0: every dequantized weight 0).

Not padded: the vocabulary (embed_tokens / lm_head stay replicated where n does not divide it, sharding.param_spec's
fallback, so no padded logit exists to mask; `describe` says what that costs) and the experts under expert
parallelism (where n does not divide them, worker/model_setup.py splits them on their width instead).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from qwenjax.config import ModelConfig
from qwenjax.quantization.config import QuantConfig


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def _ffn_unit(n: int, quant: QuantConfig | None) -> int:
    """Padded FFN widths are multiples of this: n devices with 16 columns each (a device's width stays a multiple
    of 16, as real FFN widths are), and whole groups / packed words when quantized."""
    if quant is None or quant.method == "fp8":  # fp8: whole blocks of block_k rows where block-scaled
        return math.lcm(16 * n, quant.group_size if quant is not None and quant.group_size > 0 else 1)
    group = quant.group_size if quant.group_size > 0 else 1
    return math.lcm(n, group, quant.pack_factor)


def pad_for_mesh(cfg: ModelConfig, n: int, quant: QuantConfig | None = None) -> ModelConfig:
    """The config of the model that runs on `n` devices: `cfg` itself when n divides everything it splits."""
    if n <= 1:
        return cfg
    changes = {}
    N, K, H = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    if N % n:
        g, kp = N // K, _round_up(K, n)
        group = quant.group_size if quant is not None and quant.group_size > 0 else 1
        unit = math.lcm(group, quant.pack_factor) if quant is not None else 1
        while (kp * g * H) % unit:  # o_proj's padded input rows in whole groups (module docstring)
            kp += n
        changes.update(num_attention_heads=kp * g, num_key_value_heads=kp)
    unit = _ffn_unit(n, quant)
    names = ["intermediate_size"]
    if cfg.num_experts:
        names += ["shared_expert_intermediate_size"] + ([] if cfg.expert_parallel else ["moe_intermediate_size"])
    for name in names:
        f = getattr(cfg, name)
        if f % n:
            changes[name] = _round_up(f, unit)
    return dataclasses.replace(cfg, **changes) if changes else cfg


def features(path: tuple, cfg: ModelConfig) -> int | None:
    """The width the parameter at NNX path `path` is padded along (heads x head_dim, or an FFN width), in `cfg`'s
    sizes; None for parameters that are never padded (norms, embeddings, routers)."""
    names = [p for p in path if isinstance(p, str)]
    owner = names[-2] if len(names) > 1 else ""
    if owner in ("q_proj", "o_proj"):
        return cfg.num_attention_heads * cfg.head_dim
    if owner in ("k_proj", "v_proj"):
        return cfg.num_key_value_heads * cfg.head_dim
    if owner == "experts":
        return cfg.moe_intermediate_size
    if owner in ("gate_proj", "up_proj", "down_proj"):
        return cfg.shared_expert_intermediate_size if "shared_expert" in names else cfg.intermediate_size
    return None


def padded_array(name: str, arr, shape: tuple, path: tuple, real: ModelConfig, padded: ModelConfig):
    """`arr` (the checkpoint's tensor for the parameter part at `path`) seen in the padded model's `shape`, zeros
    appended; `arr` itself when the shapes agree. Raises unless exactly one axis differs, by the padding's ratio."""
    if tuple(arr.shape) == tuple(shape):
        return arr
    f_real, f_pad = features(path, real), features(path, padded)
    diff = [a for a, (x, y) in enumerate(zip(arr.shape, shape)) if x != y]
    if (f_real is None or f_real == f_pad or len(arr.shape) != len(shape) or len(diff) != 1
            or arr.shape[diff[0]] * f_pad != shape[diff[0]] * f_real):
        raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(arr.shape)}, the model expects "
                         f"{tuple(shape)}" + ("" if f_real == f_pad else
                                              f" (padded for the mesh from {f_real} to {f_pad} features)"))
    return ZeroPadded(arr, tuple(shape))


class ZeroPadded:
    """An array (a memory map) seen in a larger shape, zeros after its end on every axis. Indexing reads only the
    real elements asked for, so the loader's `place` gives each device its shard without a padded host copy."""

    def __init__(self, arr, shape: tuple):
        self.arr, self.shape, self.dtype = arr, tuple(shape), arr.dtype

    def __getitem__(self, index):
        index = tuple(index) + (slice(None),) * (len(self.shape) - len(tuple(index)))
        ranges = [ix.indices(s) for ix, s in zip(index, self.shape)]
        if any(step != 1 for _, _, step in ranges):
            raise NotImplementedError("ZeroPadded reads contiguous slices only")
        out = np.zeros(tuple(stop - start for start, stop, _ in ranges), self.dtype)
        inner = tuple(slice(start, max(start, min(stop, real)))
                      for (start, stop, _), real in zip(ranges, self.arr.shape))
        if all(s.stop > s.start for s in inner):
            out[tuple(slice(0, s.stop - s.start) for s in inner)] = self.arr[inner]
        return out

    def __array__(self, dtype=None, copy=None):
        out = self[(slice(None),) * len(self.shape)]
        return out if dtype is None else out.astype(dtype)


def describe(real: ModelConfig, padded: ModelConfig, n: int, itemsize: int = 2) -> str | None:
    """What padding for a mesh of n devices costs, and what a vocabulary it does not divide costs (replicated
    embeddings), for the start-up log; None when nothing is padded or replicated for want of a split."""
    parts = []
    if padded.num_attention_heads != real.num_attention_heads:
        parts.append(f"q heads {real.num_attention_heads} -> {padded.num_attention_heads}, kv heads "
                     f"{real.num_key_value_heads} -> {padded.num_key_value_heads} (KV cache "
                     f"{padded.num_key_value_heads / real.num_key_value_heads:.2f}x the bytes a token, "
                     f"{padded.num_key_value_heads // n} kv head(s) a device)")
    for name in ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size"):
        if getattr(padded, name) != getattr(real, name):
            parts.append(f"{name} {getattr(real, name)} -> {getattr(padded, name)}")
    text = f"padded for tensor_parallel_size={n} with zero weights (results unchanged): " + "; ".join(parts)
    if n > 1 and real.vocab_size % n:
        tables = 1 if real.tie_word_embeddings else 2
        gib = tables * real.vocab_size * real.hidden_size * itemsize / 2**30
        note = (f"vocabulary {real.vocab_size} does not split {n} ways: embed_tokens{'' if tables == 1 else '/lm_head'}"
                f" replicated, {gib:.2f} GiB a device instead of {gib / n:.2f} GiB")
        return f"{text}; {note}" if parts else note
    return text if parts else None


def zero_padded_rows(path: tuple, value, real: ModelConfig, padded: ModelConfig):
    """A random-initialised parameter (random_weights.random_params) with the padded input rows of o_proj / down_proj
    (and of stacked experts' down_proj) set to zero: whatever the padded heads and FFN columns compute then never
    reaches the residual stream, as with a padded checkpoint."""
    import jax
    import jax.numpy as jnp

    names = [p for p in path if isinstance(p, str)]
    if names[-2:] == ["experts", "down_proj"]:
        axis = 1                                   # [E, F, D]
    elif len(names) > 1 and names[-2] in ("o_proj", "down_proj") and names[-1] == "weight":
        axis = 1                                   # fp8 weight [D, in] (its scales need no zeros)
    elif len(names) > 1 and names[-2] in ("o_proj", "down_proj") and names[-1] not in (
            "bias", "g_idx", "weight_scale", "input_scale"):
        axis = 0                                   # kernel [in, D]; qweight / qzeros / scales: rows or groups first
    else:
        return value
    f_real, f_pad = features(path, real), features(path, padded)
    if f_real == f_pad:
        return value
    keep = value.shape[axis] * f_real // f_pad
    shape = [1] * value.ndim
    shape[axis] = value.shape[axis]

    def mask(v):
        return jnp.where(jnp.arange(v.shape[axis]).reshape(shape) < keep, v, jnp.zeros((), v.dtype))

    return jax.jit(mask, out_shardings=value.sharding)(value)
