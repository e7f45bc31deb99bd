"""What the scheduler decides for one step, handed to the worker and the engine: which sequences run, how many new
tokens each brings, the step's static bucket, and the n > 1 copies to fork first (vLLM's SchedulerOutput)."""

from __future__ import annotations

import dataclasses

from qwenjax.core.sequence import Sequence


@dataclasses.dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int      # tokens [seq.num_computed, seq.num_computed + num_new_tokens) run this step
    samples: bool            # the step reaches the end of the sequence, so its last logits are sampled


@dataclasses.dataclass(frozen=True)
class Fork:
    """A copy of an n > 1 request started from its parent's computed prompt (Scheduler._fork_waiting): on the device,
    page `src` (the parent's page holding the positions before the prompt's last token, None when that page starts
    at the last token) is copied to `dst`, and the copy's penalty row `slot` is rebuilt from `prompt` (its prompt
    tokens; no outputs yet)."""

    src: int | None
    dst: int
    slot: int
    prompt: list[int]


@dataclasses.dataclass
class SchedulerOutput:
    kind: str                          # "prefill" | "decode" | "mixed"
    rows: list[ScheduledSeq]           # mixed: the decode rows, then the prefill row
    has_context: bool                  # some prefill row starts after position 0 (reads cached pages)
    bucket: tuple[int, int]            # (B, Q) static step shape; mixed: of the prefill segment; packed: (R, T)
    preempted: list[Sequence] = dataclasses.field(default_factory=list)
    decode_bucket: int = 0             # mixed: D, the decode segment's padded rows (rows[:num_decode] fill the first)
    num_decode: int = 0                # mixed: decode rows scheduled
    num_steps: int = 1                 # decode: steps the dispatch runs (multi-step); each row samples one per step
    forks: list["Fork"] = dataclasses.field(default_factory=list)  # copies started this step: the engine forks
                                                                    # their device state before the step runs
    # Multi-LoRA: (device slot, lora_int_id) of adapters given a slot this step; the engine writes their weights
    # into the slots before dispatching the step (core/lora_slots.py).
    lora_loads: list[tuple[int, int]] = dataclasses.field(default_factory=list)

    @property
    def packed(self) -> bool:
        """A prefill step of fresh rows (all at position 0): packed on one token axis, bucket (R rows, T slots)."""
        return self.kind == "prefill" and not self.has_context

    @property
    def num_slots(self) -> int:
        """Token slots of the compiled step, padding included."""
        B, Q = self.bucket
        return Q if self.packed else self.decode_bucket + B * Q

    @property
    def num_rows(self) -> int:
        """Rows of the step's sampler (padding included): a mixed step's prefill rows come after its D."""
        return self.decode_bucket + self.bucket[0]

    def row_index(self, i: int) -> int:
        """The sampler / penalty row of `rows[i]`."""
        return i if i < self.num_decode else self.decode_bucket + i - self.num_decode
