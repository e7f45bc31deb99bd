"""Weight-only quantized checkpoints (AWQ, GPTQ): their configuration and the load-time repack. The math of their
packed layouts lives with the kernels that read them (pallas_kernels/awq_layout.py, gptq_layout.py)."""

from qwenjax.quantization.config import QuantConfig, resolve_quant_config

__all__ = ["QuantConfig", "resolve_quant_config"]
