"""Weight-only quantized checkpoints (AWQ, GPTQ): their configuration and the math of their packed layouts."""

from qwenjax.quantization.config import QuantConfig, resolve_quant_config

__all__ = ["QuantConfig", "resolve_quant_config"]
