"""FP8 weights: what a checkpoint's `quantization_config` with `quant_method: "fp8"` may say, and what
`quantization="fp8"` on a float checkpoint means. Plain Python (parsed before JAX starts).

The formats (vLLM's `fp8` method, model_executor/layers/quantization/fp8.py; Qwen's and AutoFP8's FP8 checkpoints):
  per-tensor   `weight` float8_e4m3fn [O, I], `weight_scale` float32 [] or [1] (W = weight x weight_scale);
               activation_scheme "static": `input_scale` float32 [] or [1] (x is quantized as x / input_scale);
               "dynamic": no input_scale, activations get per-token scales at run time.
  block        `weight_block_size: [block_n, block_k]` (128 x 128 in published checkpoints): `weight_scale_inv`
               float32 [ceil(O / block_n), ceil(I / block_k)], one scale per block (W = weight x weight_scale_inv of
               its block, "inv" being DeepSeek's name); activations dynamic, one scale per token per group of
               block_k input columns.
  online       `quantization="fp8"` on a float checkpoint (vLLM's is_checkpoint_fp8_serialized=False): weights
               quantized at load with one scale per output channel, activations dynamic per token.
Everything else is refused by name: other `fmt`s than e4m3, other activation schemes, block scales with static
activations, modules left unquantized beyond embeddings and lm_head.
"""

from __future__ import annotations

from typing import Any

FP8_ACTIVATION_SCHEMES = ("static", "dynamic")
FP8_FORMATS = ("e4m3",)
# Modules that FP8 checkpoints leave in bf16 and that are float here anyway.
FP8_ALWAYS_FLOAT = ("lm_head", "embed_tokens")


def fp8_fields(d: dict[str, Any], source: str) -> dict[str, Any]:
    """QuantConfig keyword arguments from an fp8 `quantization_config` (keys lower-cased by the caller)."""
    fmt = str(d.get("fmt") or "e4m3").lower()
    if fmt not in FP8_FORMATS:
        raise NotImplementedError(f"{source}: fp8 fmt {fmt!r} is not supported; supported: "
                                  f"{', '.join(map(repr, FP8_FORMATS))} (float8_e4m3fn weights)")
    scheme = str(d.get("activation_scheme") or "dynamic").lower()
    block = d.get("weight_block_size")
    if block is not None:
        if (not isinstance(block, (list, tuple)) or len(block) != 2
                or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
            raise ValueError(f"{source}: weight_block_size must be two positive integers [block_n, block_k], got "
                             f"{block!r}")
        block = (int(block[0]), int(block[1]))
    ignored = d.get("ignored_layers") or d.get("modules_to_not_convert") or []
    extra = [m for m in ignored if str(m).split(".")[-1] not in FP8_ALWAYS_FLOAT]
    if extra:
        raise NotImplementedError(f"{source}: fp8 ignored_layers / modules_to_not_convert {extra[:3]!r} are not "
                                  f"supported (every q/k/v/o/gate/up/down projection is FP8 here); supported: "
                                  f"null or {list(FP8_ALWAYS_FLOAT)}")
    return dict(method="fp8", bits=8, group_size=block[1] if block else -1, activation_scheme=scheme,
                weight_block_size=block, is_checkpoint_fp8_serialized=True)


def check_fp8(activation_scheme: str, weight_block_size, serialized: bool) -> None:
    """QuantConfig.__post_init__'s fp8 checks."""
    if activation_scheme not in FP8_ACTIVATION_SCHEMES:
        raise NotImplementedError(f"fp8 activation_scheme {activation_scheme!r} is not supported; supported: "
                                  f"{', '.join(map(repr, FP8_ACTIVATION_SCHEMES))}")
    if weight_block_size is not None and activation_scheme != "dynamic":
        raise NotImplementedError(f"fp8 weight_block_size {list(weight_block_size)} with activation_scheme "
                                  f"{activation_scheme!r} is not supported; block-scaled weights take dynamic "
                                  f"per-token-group activations (activation_scheme 'dynamic'), as in vLLM")
    if not serialized and (weight_block_size is not None or activation_scheme != "dynamic"):
        raise ValueError("quantization='fp8' on a float checkpoint quantizes weights per output channel with "
                         "dynamic activations; block sizes and static scales come only from an FP8 checkpoint")


def online_fp8_fields() -> dict[str, Any]:
    """quantization='fp8' on a float checkpoint: per-output-channel weights quantized at load, dynamic activations."""
    return dict(method="fp8", bits=8, group_size=-1, activation_scheme="dynamic", weight_block_size=None,
                is_checkpoint_fp8_serialized=False)


def describe_fp8(activation_scheme: str, weight_block_size, serialized: bool) -> str:
    """For the start-up log."""
    if not serialized:
        return "fp8 e4m3, quantized at load: per-output-channel weight scales, dynamic per-token activations"
    if weight_block_size is not None:
        return (f"fp8 e4m3 checkpoint, {weight_block_size[0]}x{weight_block_size[1]} block weight scales, dynamic "
                f"per-token activations in groups of {weight_block_size[1]}")
    return f"fp8 e4m3 checkpoint, per-tensor weight scales, {activation_scheme} activations"
