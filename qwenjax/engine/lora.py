"""The engine's multi-LoRA half: adapters known on the host (qwenjax/lora/registry.py), the scheduler's device slots
(core/lora_slots.py), and the writes of adapters into those slots (worker/lora_stacks.py), as vLLM's LoRA manager.

A request's adapter is read and checked when the request is added: a bad adapter (missing file, rank above
max_lora_rank, a module we do not have) raises ValueError for that request and nothing is queued. Its sequences carry
the adapter's id and the root of their block-hash chain (the prefix cache keys on the adapter). The scheduler gives
the adapter a device slot when a sequence starts (or keeps it waiting while every slot is used by running
sequences); the engine writes the adapter into each newly given slot before dispatching the step.
"""

from __future__ import annotations

import logging

from qwenjax.config import LoRAConfig, ModelConfig
from qwenjax.core.block_manager import root_hash
from qwenjax.core.lora_slots import LoRASlots
from qwenjax.core.sequence import Sequence
from qwenjax.lora.registry import LoRARegistry
from qwenjax.lora.request import LoRARequest

logger = logging.getLogger("qwenjax")


class EngineLoRA:
    def __init__(self, config: LoRAConfig, model_config: ModelConfig):
        self.config = config
        self.registry = LoRARegistry(config, model_config)
        self.slots = LoRASlots(config.max_loras)

    def add(self, req: LoRARequest) -> None:
        """Registers (reads and checks) an adapter; ValueError for a bad one."""
        self.registry.add(req)

    def admit(self, req: LoRARequest, seqs: list[Sequence]) -> None:
        """Checks the adapter and tags a new request's sequences with it."""
        self.registry.add(req)
        root = root_hash(f"lora:{req.lora_int_id}:{req.lora_name}:{req.lora_path}")
        for seq in seqs:
            seq.lora_int_id, seq.hash_root = req.lora_int_id, root

    def load(self, runner, loads: list[tuple[int, int]], fail) -> None:
        """Writes the adapters of `loads` [(slot, lora_int_id)] into their device slots. An adapter that cannot be
        read again (its directory changed since it was checked) fails the requests using it (`fail(lora_int_id,
        exc)`) and its slot is zeroed."""
        for slot, lora_id in loads:
            try:
                weights = self.registry.weights(lora_id)
            except Exception as e:  # noqa: BLE001 - one adapter's requests fail, the others run
                logger.error("LoRA adapter %d could not be loaded into slot %d: %s", lora_id, slot, e)
                runner.load_lora(slot, None)
                fail(lora_id, e)
                continue
            runner.load_lora(slot, weights)
