"""Multi-LoRA serving: PEFT adapters over one base model, mixed in one batch.

Host half (plain Python / numpy, no JAX): `request.py` (vLLM's `LoRARequest`), `peft.py` (an adapter directory ->
padded numpy A / B per layer and projection), `registry.py` (the adapters the engine knows and the LRU of
`max_cpu_loras` host copies). The device half lives with its layer: `qwenjax/core/lora_slots.py` (which adapter holds
which of the `max_loras` device slots), `qwenjax/worker/lora_stacks.py` (the stacked slot arrays),
`qwenjax/layers/lora.py` and `pallas_kernels/lora_matmul.py` (the batched matmul).
"""

from qwenjax.lora.request import LoRARequest

__all__ = ["LoRARequest"]
