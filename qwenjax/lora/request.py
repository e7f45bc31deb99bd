"""`LoRARequest`: which adapter a request runs with, as vLLM names it."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class LoRARequest:
    """A PEFT LoRA adapter for one request: `lora_name` (unique, what the server lists as a model),
    `lora_int_id` (unique, >= 1; 0 means "no adapter" inside the engine) and `lora_path` (a directory holding
    `adapter_config.json` and `adapter_model.safetensors`). Positional order and names are vLLM's."""

    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    base_model_name: str | None = None

    def __post_init__(self):
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError(f"lora_name must be a non-empty string, got {self.lora_name!r}")
        if isinstance(self.lora_int_id, bool) or not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be an integer >= 1 (0 is the base model), got {self.lora_int_id!r}")
        if not self.lora_path:
            raise ValueError(f"LoRARequest {self.lora_name!r}: lora_path is empty; give the adapter's directory "
                             f"(adapter_config.json + adapter_model.safetensors)")

    # vLLM's short aliases
    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path
