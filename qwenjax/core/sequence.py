"""Host-side state of requests and their sequences (one sequence per sample of `n`)."""

from __future__ import annotations

import dataclasses
import enum
import itertools
import sys
import time

from qwenjax.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_seq_ids = itertools.count()
PENDING = -1  # an output id sampled on the device and not read yet; the step feeding it takes it from the device


@dataclasses.dataclass(eq=False)
class Sequence:
    """One generated continuation. Invariant: the KV of token_ids[:num_computed] is in the pages of block_table.

    With async scheduling a sampled token is known on the device before the host reads it: the engine appends a
    PENDING placeholder when it dispatches a step that samples (K of them for a K-step decode dispatch), and replaces
    it when it reads that step. Exactly the last `num_pending` output ids are placeholders (at most 2K while two
    dispatches overlap); with K = 1, every token before num_computed - 1 is known on the host whenever the scheduler
    runs.
    """

    request_id: str
    index: int                      # which of the request's n samples
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int                       # per-sequence sampling seed (from the request's seed, or the engine's RNG)
    arrival_time: float
    priority: int = 0
    seq_id: int = dataclasses.field(default_factory=lambda: next(_seq_ids))
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    block_table: list[int] = dataclasses.field(default_factory=list)
    num_computed: int = 0
    slot: int | None = None         # row of the device-side penalty state while running (see runner.PenaltyState)
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    cumulative_logprob: float = 0.0
    logprobs: list | None = None    # per generated token: {token_id: Logprob}
    output_text: str = ""
    detokenizer: object = None
    stop_checker: object = None
    constraint: object = None       # core/constraints.SeqConstraint: structured outputs, allowed ids, bad words
    first_token_time: float | None = None
    client: str | None = None       # who sent it, for fair-share scheduling; defaults to the request id
    # Prefix caching: names of the sequence's full blocks (a hash chain over its tokens, kept across preemption
    # since tokens never change), how many leading pages of block_table are named, and the prompt tokens found cached.
    block_hashes: list[int] = dataclasses.field(default_factory=list)
    num_named_pages: int = 0
    num_cached_tokens: int = 0
    num_pending: int = 0            # trailing output ids that are PENDING placeholders
    max_output_tokens: int = sys.maxsize  # outputs at which it ends by length (max_tokens, or max_model_len)
    # n > 1: copies 1..n-1 are forked from copy 0 (their `parent`) once its prompt is computed: they share its
    # prompt's pages instead of prefilling (see Scheduler._fork_waiting). On the parent: the pages pinned for the
    # copies (None until pinned), and how many copies have not started yet (the pins go when none is left).
    parent: "Sequence | None" = None
    copy_pending: bool = False      # a copy that has not started yet (nor left)
    fork_pages: list[int] | None = None
    num_unforked: int = 0
    # Draft-model speculation (engine/draft_model.py): num_preemptions when the draft's cache missed one of its
    # tokens (-1: never); while it equals num_preemptions the row gets no draft proposals.
    draft_stale: int = -1
    # Multi-LoRA: the adapter (0: none), the device slot it holds while running (core/lora_slots.py; 0: none), and
    # the root of its block-hash chain (None: the base model's), so two adapters never share prefix-cache pages.
    lora_int_id: int = 0
    lora_slot: int = 0
    hash_root: int | None = None

    def __post_init__(self):
        if self.client is None:
            self.client = self.request_id

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_known_outputs(self) -> int:
        return len(self.output_token_ids) - self.num_pending

    @property
    def at_length_limit(self) -> bool:
        """Its outputs, pending ones included, reach the length limit: it ends whatever they turn out to be."""
        return len(self.output_token_ids) >= self.max_output_tokens

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    def token_at(self, i: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < n else self.output_token_ids[i - n]

    def tokens(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        return (self.prompt_token_ids + self.output_token_ids)[start:end]

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED


@dataclasses.dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    arrival_time: float = dataclasses.field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    finished_time: float | None = None
    error: Exception | None = None
    prompt_logprobs: list | None = None   # [None, {token: Logprob}, ...] when params.prompt_logprobs is set
    lora_request: object = None           # its LoRARequest (multi-LoRA), None: the base model

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)
