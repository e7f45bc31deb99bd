"""The adapters an engine knows (by `lora_int_id`) and the LRU of host copies (`max_cpu_loras`).

A request's adapter is read and checked when the request is added (a bad adapter fails that request only, nothing is
queued); the copy stays on the host while fewer than `max_cpu_loras` others were used since, and an evicted one is
read from its directory again when a device slot needs it.
"""

from __future__ import annotations

from collections import OrderedDict

from qwenjax.config import LoRAConfig, ModelConfig
from qwenjax.lora.peft import LoRAWeights, load_adapter
from qwenjax.lora.request import LoRARequest


class LoRARegistry:
    def __init__(self, config: LoRAConfig, model_config: ModelConfig):
        self.config = config
        self.model_config = model_config
        self.known: dict[int, LoRARequest] = {}          # lora_int_id -> its request
        self._host: OrderedDict[int, LoRAWeights] = OrderedDict()  # least recently used first
        self.loads = 0                                    # reads from disk (tests, metrics)

    @property
    def host_ids(self) -> list[int]:
        """Adapters with a host copy, least recently used first."""
        return list(self._host)

    def check(self, req: LoRARequest) -> None:
        """One id, one adapter: a request may not reuse another adapter's id. (Names are the server's: one unloaded
        and loaded again comes back under a new id.)"""
        if not isinstance(req, LoRARequest):
            raise TypeError(f"lora_request must be a LoRARequest, got {type(req).__name__}")
        old = self.known.get(req.lora_int_id)
        if old is not None and (old.lora_name, old.lora_path) != (req.lora_name, req.lora_path):
            raise ValueError(f"lora_int_id {req.lora_int_id} is already adapter {old.lora_name!r} "
                             f"({old.lora_path!r}); give {req.lora_name!r} an id of its own")

    def add(self, req: LoRARequest) -> LoRAWeights:
        """Checks `req`, reads it unless a host copy exists, and makes it the most recently used."""
        self.check(req)
        weights = self._host.get(req.lora_int_id)
        if weights is None:
            weights = load_adapter(req.lora_path, lora_name=req.lora_name, lora_int_id=req.lora_int_id,
                                   cfg=self.model_config, max_lora_rank=self.config.max_lora_rank)
            self.loads += 1
            self._host[req.lora_int_id] = weights
            while len(self._host) > self.config.host_capacity:
                self._host.popitem(last=False)
        self._host.move_to_end(req.lora_int_id)
        self.known[req.lora_int_id] = req
        return weights

    def weights(self, lora_int_id: int) -> LoRAWeights:
        """A known adapter's host copy (read again if the LRU dropped it)."""
        if lora_int_id not in self.known:
            raise KeyError(f"LoRA adapter id {lora_int_id} is not known")
        return self.add(self.known[lora_int_id])
