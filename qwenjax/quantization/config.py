"""QuantConfig: how a checkpoint's linear layers are quantized, read from the checkpoint's own files.

Where it comes from, first match wins:
  config.json `quantization_config`   (transformers / optimum / AutoAWQ >= 0.2 / GPTQModel)
  quant_config.json                   (older AutoAWQ: `w_bit`, `q_group_size`, `zero_point`, `version`) -> awq
  quantize_config.json                (older AutoGPTQ: `bits`, `group_size`, `desc_act`, `sym`)         -> gptq

Supported: AWQ GEMM (4 bits, zero_point true), GPTQ (4 or 8 bits, checkpoint_format "gptq" or "gptq_v2") and FP8
(vLLM's `fp8` method: per-tensor or block weight scales; or quantized at load from a float checkpoint: fp8_config.py).
Anything else raises ValueError (a value that is malformed) or NotImplementedError (a valid format not built here),
naming the field, its value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from qwenjax.quantization.fp8_config import check_fp8, describe_fp8, fp8_fields, online_fp8_fields

METHODS = ("awq", "gptq", "fp8")
AWQ_BITS = (4,)
GPTQ_BITS = (4, 8)
GPTQ_FORMATS = ("gptq", "gptq_v2")
AWQ_VERSIONS = ("gemm",)
# Files older quantizers wrote next to config.json, and the method each implies when it does not say.
LEGACY_FILES = (("quant_config.json", "awq"), ("quantize_config.json", "gptq"))
# Modules that published checkpoints leave in float and that are float here anyway.
_ALWAYS_FLOAT = ("lm_head", "embed_tokens")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """A validated, hashable description of a weight-only quantized checkpoint.

    group_size: input rows sharing one scale/zero; -1 means one group over the whole input dimension (GPTQ only).
    desc_act:   GPTQ's act-order; rows are assigned to groups by `g_idx` (any permutation), not by k // group_size.
    sym:        GPTQ symmetric quantization (the stored zero is then the mid-point; it is loaded, not assumed).
    zero_point: AWQ asymmetric quantization; only true is supported, as published AWQ checkpoints use.
    checkpoint_format: GPTQ "gptq" (v1: qzeros hold zero - 1) or "gptq_v2" (qzeros hold the zero); "gemm" for AWQ.
    FP8 (fp8_config.py; bits 8, group_size block_k or -1): activation_scheme "static" | "dynamic",
    weight_block_size (block_n, block_k) or None, is_checkpoint_fp8_serialized False when quantized at load.
    """

    method: str
    bits: int
    group_size: int
    desc_act: bool = False
    sym: bool = True
    zero_point: bool = True
    checkpoint_format: str = "gptq"
    activation_scheme: str = "dynamic"
    weight_block_size: tuple[int, int] | None = None
    is_checkpoint_fp8_serialized: bool = True

    def __post_init__(self):
        if self.method not in METHODS:
            raise NotImplementedError(f"quantization method {self.method!r} is not supported; supported: "
                                      f"{', '.join(map(repr, METHODS))}")
        if self.method == "fp8":
            check_fp8(self.activation_scheme, self.weight_block_size, self.is_checkpoint_fp8_serialized)
        elif self.method == "awq":
            if self.bits not in AWQ_BITS:
                raise NotImplementedError(f"AWQ bits={self.bits} is not supported; supported: {AWQ_BITS}")
            if self.group_size <= 0:
                raise ValueError(f"AWQ group_size must be a positive number of input rows, got {self.group_size}")
            if not self.zero_point:
                raise NotImplementedError("AWQ zero_point=false is not supported; supported: zero_point=true")
            if self.checkpoint_format not in AWQ_VERSIONS:
                raise NotImplementedError(f"AWQ version {self.checkpoint_format!r} is not supported; supported: "
                                          f"{', '.join(map(repr, AWQ_VERSIONS))}")
            if self.desc_act:
                raise ValueError("desc_act applies to GPTQ only; AWQ groups are always consecutive rows")
        else:
            if self.bits not in GPTQ_BITS:
                raise NotImplementedError(f"GPTQ bits={self.bits} is not supported; supported: {GPTQ_BITS}")
            if self.group_size != -1 and self.group_size <= 0:
                raise ValueError(f"GPTQ group_size must be -1 (one group) or a positive number of input rows, got "
                                 f"{self.group_size}")
            if self.checkpoint_format not in GPTQ_FORMATS:
                raise NotImplementedError(f"GPTQ checkpoint_format {self.checkpoint_format!r} is not supported; "
                                          f"supported: {', '.join(map(repr, GPTQ_FORMATS))}")

    @property
    def pack_factor(self) -> int:
        """Quantized values per int32 word (FP8 weights are one float8 each, not packed: 1)."""
        return 1 if self.method == "fp8" else 32 // self.bits

    def describe(self) -> str:
        """For the start-up log."""
        if self.method == "fp8":
            return describe_fp8(self.activation_scheme, self.weight_block_size, self.is_checkpoint_fp8_serialized)
        return f"{self.method} {self.bits}-bit, group {self.group_size}"

    def num_groups(self, in_features: int) -> int:
        """Rows of `scales` / `qzeros` for a layer with `in_features` inputs."""
        if self.group_size == -1:
            return 1
        return -(-in_features // self.group_size)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, default_method: str | None = None,
                  source: str = "quantization_config") -> "QuantConfig":
        """Parses any of the spellings above. `default_method` applies when the dict names no `quant_method`."""
        d = {k.lower() if isinstance(k, str) else k: v for k, v in d.items()}
        method = str(d.get("quant_method") or default_method or "").lower()
        if not method:
            raise ValueError(f"{source} has no quant_method; expected one of {', '.join(map(repr, METHODS))}")
        if method not in METHODS:
            raise NotImplementedError(f"{source}: quant_method {method!r} is not supported; supported: "
                                      f"{', '.join(map(repr, METHODS))}")
        if method == "fp8":
            return cls(**fp8_fields(d, source))
        bits = _int(d, ("bits", "w_bit"), source)
        group = _int(d, ("group_size", "q_group_size"), source)
        if method == "awq":
            version = str(d.get("version") or "gemm").lower()
            _check_not_converted(d.get("modules_to_not_convert"), source)
            return cls(method="awq", bits=bits, group_size=group, zero_point=bool(d.get("zero_point", True)),
                       checkpoint_format=version)
        if d.get("is_marlin_format"):
            raise NotImplementedError(f"{source}: is_marlin_format=true (Marlin-repacked GPTQ) is not supported; "
                                      f"supported checkpoint_format: {', '.join(map(repr, GPTQ_FORMATS))}")
        fmt = str(d.get("checkpoint_format") or d.get("format") or "gptq").lower()
        return cls(method="gptq", bits=bits, group_size=group, desc_act=bool(d.get("desc_act", False)),
                   sym=bool(d.get("sym", True)), checkpoint_format=fmt)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> "QuantConfig | None":
        """The checkpoint's quantization, or None for a float checkpoint."""
        path = Path(path)
        config = path / "config.json"
        if config.is_file():
            with open(config) as f:
                qc = json.load(f).get("quantization_config")
            if qc:
                return cls.from_dict(qc, source=f"{config} quantization_config")
        for name, method in LEGACY_FILES:
            legacy = path / name
            if legacy.is_file():
                with open(legacy) as f:
                    return cls.from_dict(json.load(f), default_method=method, source=str(legacy))
        return None

    @classmethod
    def default(cls, method: str) -> "QuantConfig":
        """The common published layout of a method (4 bits, groups of 128), for random-weight runs."""
        if method not in METHODS:
            raise NotImplementedError(f"quantization={method!r} is not supported; supported: "
                                      f"{', '.join(map(repr, METHODS))}")
        if method == "fp8":
            return cls(**online_fp8_fields())
        return cls(method=method, bits=4, group_size=128,
                   checkpoint_format="gemm" if method == "awq" else "gptq")


def resolve_quant_config(requested: str | None, path: str | Path | None) -> QuantConfig | None:
    """The engine's `quantization=` argument checked against the checkpoint.

    None / "none" -> whatever the checkpoint says (a float checkpoint gives None). A method the checkpoint does not
    use raises ValueError naming both. Without a checkpoint (random weights) the method's default layout is used.
    "fp8" on a float checkpoint quantizes it at load (vLLM's online FP8); on an FP8 checkpoint it reads its scales.
    """
    if requested is not None:
        requested = requested.lower()
        if requested == "none":
            requested = None
        elif requested not in METHODS:
            raise NotImplementedError(f"quantization={requested!r} is not supported; supported: "
                                      f"{', '.join(map(repr, METHODS))} (or None to read it from config.json)")
    found = QuantConfig.from_checkpoint(path) if path is not None else None
    if requested is None:
        return found
    if path is None:
        return QuantConfig.default(requested)
    if found is None and requested == "fp8":
        return QuantConfig.default("fp8")
    if found is None:
        raise ValueError(f"quantization={requested!r} was requested but the checkpoint at {str(path)!r} is not "
                         f"quantized (no quantization_config in config.json, no quant_config.json or "
                         f"quantize_config.json)")
    if found.method != requested:
        raise ValueError(f"quantization={requested!r} was requested but the checkpoint at {str(path)!r} is "
                         f"quantized with {found.method!r}; pass quantization={found.method!r} or omit it")
    return found


def _int(d: dict, keys: tuple[str, ...], source: str) -> int:
    for k in keys:
        if d.get(k) is not None:
            v = d[k]
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{source}: {k} must be an integer, got {v!r}")
            return v
    raise ValueError(f"{source} lacks {' / '.join(keys)}")


def _check_not_converted(modules, source: str) -> None:
    """AWQ's modules_to_not_convert: only modules that are float here anyway may be listed."""
    extra = [m for m in (modules or []) if m not in _ALWAYS_FLOAT]
    if extra:
        raise NotImplementedError(f"{source}: modules_to_not_convert={modules!r} is not supported (every q/k/v/o/"
                                  f"gate/up/down projection is quantized here); supported: null or "
                                  f"{list(_ALWAYS_FLOAT)}")
