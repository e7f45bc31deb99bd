"""The engine loop's small pieces: a prepared step, a dispatched step whose tokens are unread, and the GC freeze
after start-up."""

from __future__ import annotations

import dataclasses
import gc
from typing import NamedTuple

import jax

from qwenjax.core.sequence import Sequence


def freeze_gc_heap() -> None:
    """Moves every object alive now (modules, the model, compiled executables) out of reach of Python's cyclic GC.

    A full collection walks every tracked object, millions of them once JAX and transformers are imported; during
    generation the steps' allocations trigger one every second or so, and it stalls the host for milliseconds
    while the device waits (measured on CPU: ~9 ms of a 512-row decode step's host time). vLLM's engine core does the
    same after start-up. Unfreezing first lets an earlier, dropped engine's cycles be collected rather than kept.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


@dataclasses.dataclass(frozen=True)
class InFlight:
    """A dispatched step: its device results, and (row, sequence, first output index) of each row that samples.
    Row b's tokens are the results' flat entries k * B + b, k < num_steps: its outputs index, index + 1, ..."""

    result: object          # SamplerOutput of device arrays
    ranks: jax.Array | None
    wants_lp: bool
    samples: list[tuple[int, Sequence, int]]
    num_steps: int = 1      # K of a multi-step dispatch
    # A late sampler (core/constraints.py): the model call is on the device, the sampler waits for the previous
    # step's tokens: (scheduler output, step input, its logits; None where the model call waits too)
    late: tuple | None = None
    out: object = None      # its SchedulerOutput (speculation reads its kind and bucket: engine/spec_step.py)


class Prepared(NamedTuple):
    """A scheduled step's numpy inputs, built but not yet on the device (LLMEngine._prepare)."""

    out: object  # SchedulerOutput
    inp: object  # StepInput
    late: bool  # the sampler's inputs wait for the previous step's tokens (mode, tensors, wants_lp: None)
    mode: object
    tensors: object
    wants_lp: bool | None
