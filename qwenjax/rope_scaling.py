"""RoPE scaling as transformers reads it from config.json: which frequencies each rotary pair turns at, and the
factor on cos / sin, for `linear`, `dynamic` (static form, as vLLM) and `yarn`; `default` (or none) is plain RoPE.

Host-side and JAX-free (numpy only), so config.py and the scheduler side can import it; layers/rotary.py turns
`inv_freq` into the cos / sin tables every attention path takes (the jnp reference, the fused RoPE + KV write
kernel): scaling never reaches kernel code, only the tables change.

Config forms accepted, as transformers 5 (modeling_rope_utils.RotaryEmbeddingConfigMixin) reads them:
  - legacy `rope_scaling: {"type": "yarn", ...}` or `{"rope_type": "yarn", ...}` (`rope_type` wins over `type`),
    with `rope_theta` at the top level;
  - transformers 5's `rope_parameters: {"rope_type": ..., "rope_theta": ..., ...}`, also nested under
    "full_attention" (Qwen2's only layer type when sliding windows are off);
  - both present: `rope_scaling` wins (transformers: `rope_scaling or rope_parameters`).
rope_theta: the scaling dict's, else the top-level one, else `rope_parameters`' (so that an `hf_overrides` of
`rope_scaling` on a transformers-5 config.json keeps the checkpoint's theta), else 10000.

`dynamic` (dynamic NTK) in transformers recomputes the base from the longest position of each forward call once it
passes max_position_embeddings, so a token's rotated K depends on how its sequence was split into forward calls.
A paged engine splits sequences into chunks and shares prefix pages between sequences, and a K page must be a
function of the tokens alone; so `dynamic` here is vLLM's static form: the base transformers uses for a forward
call reaching factor x max_position_embeddings (the longest context it allows), for every position. It equals
transformers once transformers' rotary has grown to that length (tests/test_rope_scaling.py primes it so); a fresh
transformers model differs for every forward call shorter than that.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn")
# rope types transformers defines that qwenjax does not compute (refused by name, with the supported ones)
KNOWN_UNSUPPORTED = ("longrope", "llama3", "proportional", "su", "mrope", "axial")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """One scaled RoPE, resolved from config.json (never "default": plain RoPE is `None`)."""

    rope_type: str                       # "linear", "dynamic" or "yarn"
    factor: float
    # yarn: the pretraining context (the dict's, or config.json's top-level one, or max_position_embeddings);
    # linear / dynamic: max_position_embeddings (dynamic's base formula divides by it)
    original_max_position_embeddings: int
    attention_factor: float = 1.0        # yarn: the factor on cos and sin, resolved as transformers does
    beta_fast: float = 32.0              # yarn: the ramp's ends, in rotations over the original context
    beta_slow: float = 1.0
    truncate: bool = True                # yarn: floor / ceil the ramp's ends

    @property
    def max_model_len(self) -> int:
        """The longest context this scaling reaches, as vLLM derives it (its `_get_and_verify_max_len`): factor x
        the original context for yarn, factor x max_position_embeddings for linear and dynamic."""
        return int(self.original_max_position_embeddings * self.factor)

    def describe(self) -> str:
        return (f"rope_scaling {self.rope_type} factor {self.factor:g} x "
                f"{'original_max_position_embeddings' if self.rope_type == 'yarn' else 'max_position_embeddings'} "
                f"{self.original_max_position_embeddings} = {self.max_model_len}")


def _unsupported(rope_type: Any) -> Exception:
    names = ", ".join(map(repr, SUPPORTED_ROPE_TYPES))
    if rope_type in KNOWN_UNSUPPORTED:
        return NotImplementedError(f"rope_scaling type {rope_type!r} is not supported; qwenjax computes {names}")
    return ValueError(f"unknown rope_scaling type {rope_type!r}; supported: {names}")


def _number(params: dict, key: str, *, positive: bool = True) -> float:
    value = params[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (positive and not value > 0):
        raise ValueError(f"rope_scaling {key} must be a {'positive ' if positive else ''}number, got {value!r}")
    return float(value)


def rope_parameters(d: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """config.json's dict -> (rope_theta, scaling or None for plain RoPE); refuses what it cannot compute."""
    file_params = d.get("rope_parameters") or {}
    params = d.get("rope_scaling") or file_params
    if not isinstance(params, dict):
        raise ValueError(f"rope_scaling must be a mapping, got {params!r}")
    if isinstance(params.get("full_attention"), dict):  # transformers 5 nests it by layer type
        params = params["full_attention"]
    theta = params.get("rope_theta", d.get("rope_theta", file_params.get("rope_theta", 10000.0)))
    theta = _number({"rope_theta": theta}, "rope_theta")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in (None, "default"):
        return theta, None  # transformers' Qwen2 default RoPE ignores partial_rotary_factor too
    partial = params.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise NotImplementedError(f"partial_rotary_factor={partial!r} is not supported (Qwen2 rotates whole heads)")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise _unsupported(rope_type)
    max_pos = int(d.get("max_position_embeddings", 32768))
    if rope_type != "yarn":
        if params.get("factor") is None:
            raise ValueError(f"rope_scaling type {rope_type!r} needs a factor, got {params!r}")
        return theta, RopeScaling(rope_type, _number(params, "factor"), max_pos)
    # yarn: transformers takes a top-level original_max_position_embeddings over the dict's (Phi-3 writes it there)
    original = int(d.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
                   or max_pos)
    factor = max_pos / original if params.get("factor") is None else _number(params, "factor")
    attention = params.get("attention_factor")
    if attention is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
        else:
            attention = yarn_get_mscale(factor)
    else:
        attention = _number(params, "attention_factor")
    # `or`, as transformers: 0 or None means the paper's defaults
    beta_fast = float(params.get("beta_fast") or 32)
    beta_slow = float(params.get("beta_slow") or 1)
    return theta, RopeScaling("yarn", factor, original, attention_factor=float(attention), beta_fast=beta_fast,
                              beta_slow=beta_slow, truncate=bool(params.get("truncate", True)))


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    """YaRN's attention temperature (the paper's eq. 21): 0.1 * mscale * ln(scale) + 1, 1 for scale <= 1."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _pow_freqs(base: float, dim: int) -> np.ndarray:
    """base ** (2i / dim) for the dim / 2 rotary pairs, in float32 as transformers computes it."""
    return np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))


def inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """[head_dim // 2] float32: the angle each rotary pair turns per position (transformers' `inv_freq`)."""
    f32 = np.float32
    if scaling is None:
        return (f32(1.0) / _pow_freqs(theta, head_dim)).astype(np.float32)
    dim, factor = head_dim, scaling.factor
    if scaling.rope_type == "linear":
        return (f32(1.0) / _pow_freqs(theta, dim) / f32(factor)).astype(np.float32)
    if scaling.rope_type == "dynamic":
        # transformers' dynamic NTK base at seq_len = factor x max_position_embeddings (vLLM's static form)
        seq_len = factor * scaling.original_max_position_embeddings
        base = theta * ((factor * seq_len / scaling.original_max_position_embeddings) - (factor - 1)) ** (
            dim / (dim - 2))
        return (f32(1.0) / _pow_freqs(base, dim)).astype(np.float32)
    # yarn: high-frequency pairs (more than beta_fast turns over the original context) keep their frequency, pairs
    # under beta_slow turns are interpolated (divided by factor), a linear ramp in between
    pos_freqs = _pow_freqs(theta, dim)
    extrapolation = f32(1.0) / pos_freqs
    interpolation = f32(1.0) / (f32(factor) * pos_freqs)
    low, high = _yarn_correction_range(scaling, dim, theta)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - f32(low)) / f32(high - low), 0, 1)
    extrapolation_factor = f32(1.0) - ramp
    out = interpolation * (f32(1.0) - extrapolation_factor) + extrapolation * extrapolation_factor
    return out.astype(np.float32)


def _yarn_correction_range(s: RopeScaling, dim: int, base: float) -> tuple[float, float]:
    def correction_dim(rotations: float) -> float:
        return dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def attention_scaling(scaling: RopeScaling | None) -> float:
    """The factor transformers multiplies cos and sin by (yarn's attention factor; 1 otherwise)."""
    return scaling.attention_factor if scaling is not None else 1.0
