"""Which LoRA adapter holds which of the `max_loras` device slots: plain-Python bookkeeping for the scheduler.

Slot 0 is "no adapter" (all zeros on the device, never assigned); adapters take slots 1..max_loras. An adapter is
resident while it holds a slot; it is in use while running sequences hold it (a reference count). A sequence that
needs an adapter that is not resident takes a free slot, or else the slot of the least recently released resident
adapter no running sequence uses; if every slot is in use it waits (`can_acquire` is False) until one is released.
Each slot given to a new adapter is recorded in `loads` as (slot, lora_int_id), for the engine to write the weights
into the device slot before the step that first reads them.

Invariants: `slot_of` and `adapter_in` are inverse maps of the resident adapters; `refs[a] > 0` only for resident
adapters; `idle` holds exactly the resident adapters with no references, least recently released first; a slot in
use (refs > 0) is never reassigned.
"""

from __future__ import annotations

from collections import OrderedDict

NO_ADAPTER = 0


class LoRASlots:
    def __init__(self, max_loras: int):
        if max_loras < 1:
            raise ValueError(f"max_loras must be at least 1, got {max_loras}")
        self.max_loras = max_loras
        self.slot_of: dict[int, int] = {}           # resident adapter -> its slot
        self.adapter_in: dict[int, int] = {}        # slot -> its adapter
        self.refs: dict[int, int] = {}              # resident adapter -> running sequences holding it
        self.idle: OrderedDict[int, None] = OrderedDict()  # resident, unreferenced; least recently released first
        self._free = list(range(max_loras, 0, -1))  # slots never given or given back (pop() gives the lowest)
        self.loads: list[tuple[int, int]] = []      # (slot, adapter) to write before the next step
        self.num_swaps = 0                          # adapters evicted from a slot for another (metrics, tests)

    def can_acquire(self, lora_int_id: int, also: set[int] | frozenset = frozenset()) -> bool:
        """Whether `acquire` finds slots for `lora_int_id` and the adapters `also` (rows started in the same step,
        not acquired yet) together: the ones not resident need free slots or idle ones, and an idle adapter one of
        them uses is not free for another."""
        if lora_int_id == NO_ADAPTER:
            return True
        wanted = ({a for a in also} | {lora_int_id}) - {NO_ADAPTER}
        new = [a for a in wanted if a not in self.slot_of]
        spare = len(self._free) + sum(1 for a in self.idle if a not in wanted)
        return spare >= len(new)

    def acquire(self, lora_int_id: int) -> int:
        """One more reference to the adapter; returns its slot (0 for no adapter). Only after `can_acquire`."""
        if lora_int_id == NO_ADAPTER:
            return NO_ADAPTER
        slot = self.slot_of.get(lora_int_id)
        if slot is None:
            if self._free:
                slot = self._free.pop()
            elif self.idle:
                victim, _ = self.idle.popitem(last=False)
                slot = self.slot_of.pop(victim)
                del self.refs[victim]
                self.num_swaps += 1
            else:
                raise AssertionError(f"no LoRA slot for adapter {lora_int_id}: all {self.max_loras} are in use")
            self.slot_of[lora_int_id], self.adapter_in[slot], self.refs[lora_int_id] = slot, lora_int_id, 0
            self.loads.append((slot, lora_int_id))
        self.idle.pop(lora_int_id, None)
        self.refs[lora_int_id] += 1
        return slot

    def release(self, lora_int_id: int) -> None:
        if lora_int_id == NO_ADAPTER:
            return
        self.refs[lora_int_id] -= 1
        if self.refs[lora_int_id] < 0:
            raise AssertionError(f"adapter {lora_int_id} released more often than acquired")
        if self.refs[lora_int_id] == 0:
            self.idle[lora_int_id] = None

    def evict(self, lora_int_id: int) -> bool:
        """Frees the adapter's slot (unloading it). False if running sequences use it; True otherwise."""
        if self.refs.get(lora_int_id, 0) > 0:
            return False
        slot = self.slot_of.pop(lora_int_id, None)
        if slot is not None:
            del self.adapter_in[slot], self.refs[lora_int_id]
            self.idle.pop(lora_int_id, None)
            self._free.append(slot)
            self._free.sort(reverse=True)
            self.loads = [(s, a) for s, a in self.loads if a != lora_int_id]
        return True

    def take_loads(self) -> list[tuple[int, int]]:
        loads, self.loads = self.loads, []
        return loads

    def check(self) -> None:
        """Asserts the invariants in the module docstring (tests)."""
        assert all(self.adapter_in[s] == a for a, s in self.slot_of.items())
        assert len(self.slot_of) == len(self.adapter_in) == len(self.refs)
        assert set(self.idle) == {a for a, n in self.refs.items() if n == 0}
        assert len(self._free) + len(self.slot_of) == self.max_loras
