"""The scheduler's static shapes: SchedulerConfig (limits and the step buckets compiled at start-up), resolved from
the engine's arguments, and the packing rules they follow.

Frozen and hashable (a static argument of jitted functions); plain Python, so core and the simulator use it.
"""

from __future__ import annotations

import dataclasses

MIXED_CHUNK = 512  # most prompt tokens a mixed (decode + prefill) step carries
# A prefill step whose only row is a fresh prompt chunk of more than this many tokens (a long prompt with nothing
# else to start) runs as a one-row rectangular step (a (1, Q) prefill bucket, the context path) rather than packed:
# on sm90 with 16-bit pages that path is the Hopper kernel (~1x cuDNN, benchmarks/NOTES.md 28), the packed one the
# Triton ragged kernel (~0.6x). The (1, Q) buckets are compiled anyway (chunks over cached pages), so no shape is
# added. Shorter lone rows (chat turns, the latency workload) and bursts of prompts stay packed.
LONG_PREFILL_ROW = MIXED_CHUNK
# A packed prefill step lays its rows back to back on one token axis, each row starting at a multiple of this, so
# the prefill kernel's query tiles (16 tokens x the GQA group, pallas_kernels/paged_prefill.py) never span two rows.
PACKED_ROW_ALIGN = 16


def packed_len(n: int) -> int:
    """Token slots a row of `n` new tokens takes in a packed prefill step."""
    return -(-n // PACKED_ROW_ALIGN) * PACKED_ROW_ALIGN


def pow2_at_least(n: int, lo: int = 1) -> int:
    v = lo
    while v < n:
        v *= 2
    return v


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Resolved scheduling limits and the static step shapes ("buckets") compiled at start-up.

    Three kinds of prefill shape: a packed step (fresh rows starting at position 0, back to back on one token axis
    of T slots, each row aligned to PACKED_ROW_ALIGN: `packed_buckets` (R, T), R = the sampler's rows); a one-row
    step of Q tokens over cached pages (`prefill_buckets` (1, Q): the next chunk of a long prompt, a prefix-cache
    hit, and a lone fresh chunk of more than LONG_PREFILL_ROW tokens); and a mixed step's prefill row
    (`mixed_chunks`).

    Long prompts: with nothing decoding, a prompt runs in chunks of `max_prefill_chunk` tokens, the largest power of
    two within max_num_batched_tokens (vLLM's budget) and the compiled prefill_token_buckets; only a step that
    carries decodes too (mixed) cuts its chunk to MIXED_CHUNK. So the buckets stay a short fixed list (one compile
    per Q, never one per prompt length) and a 128k prompt on an H100's offline budget (16,384) takes 8 steps.

    Invariants: every decode bucket <= max_num_seqs; a packed bucket's R = min(max_num_seqs, T // PACKED_ROW_ALIGN)
    (every row takes at least PACKED_ROW_ALIGN slots, so R rows always fit); the largest packed T holds
    max_num_batched_tokens (rounded up to the alignment) and every row of max_prefill_chunk tokens.
    """

    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    block_size: int
    decode_buckets: tuple[int, ...]                 # B values of decode steps (Q = 1)
    prefill_buckets: tuple[tuple[int, int], ...]     # (1, Q) of one-row prefill steps over cached pages
    max_prefill_chunk: int                           # longest chunk one prefill row carries
    # Chunked prefill (vLLM's default): Q values of the one prefill row a mixed step adds to a decode step. Empty:
    # prefill never joins decodes (every prefill runs in a step of its own, as with enable_chunked_prefill=False).
    mixed_chunks: tuple[int, ...] = ()
    # Decode steps one dispatch runs on the device when every row can take them all (multi-step decode, see
    # scheduler._schedule_decode); 1: one step a dispatch.
    num_scheduler_steps: int = 1
    packed_buckets: tuple[tuple[int, int], ...] = ()  # (R, T) of packed prefill steps, by T

    @property
    def mixed_buckets(self) -> tuple[tuple[int, int, int], ...]:
        """(D, 1, Q) shapes of mixed steps: D decode rows (a decode bucket) and one prefill row of Q tokens."""
        return tuple((d, 1, q) for d in self.decode_buckets for q in self.mixed_chunks)

    @property
    def max_pages_per_seq(self) -> int:
        return -(-self.max_model_len // self.block_size)

    @classmethod
    def build(cls, *, max_model_len: int, max_num_seqs: int, max_num_batched_tokens: int | None, block_size: int,
              decode_buckets=None, prefill_token_buckets=None,
              enable_chunked_prefill: bool | None = True, num_scheduler_steps: int = 1) -> "SchedulerConfig":
        if max_num_batched_tokens is None:
            max_num_batched_tokens = max(2048, min(8192, max_model_len))
        budget = max_num_batched_tokens
        if decode_buckets is None:
            decode_buckets = [b for b in (1, 8, 16, 32, 64, 128, 256, 512) if b < max_num_seqs] + [max_num_seqs]
        # The largest bucket holds max_num_seqs rows: the scheduler decodes every running sequence in one step.
        decode_buckets = tuple(sorted({int(b) for b in decode_buckets if b < max_num_seqs} | {max_num_seqs}))
        # Prefill rows carry at most `chunk` tokens; longer prompts are prefilled in several chunks.
        chunk = min(pow2_at_least(min(budget, max_model_len), 16), pow2_at_least(max_model_len, 16))
        chunk = min(chunk, budget if budget & (budget - 1) == 0 else pow2_at_least(budget, 16) // 2)
        chunk = max(chunk, 16)
        if prefill_token_buckets is None:
            qs = [q for q in (128, 512, 2048, 8192) if q < chunk] + [chunk]
        else:
            qs = sorted(set(int(q) for q in prefill_token_buckets if q <= chunk)) or [chunk]
        # Packed steps: T at each Q value (a few short prompts), at the budget (a burst of prompts), and at a quarter of
        # it (the tail of a burst).
        sizes = {packed_len(q) for q in qs} | {packed_len(budget)}
        if budget // 4 > qs[-1]:
            sizes.add(packed_len(budget // 4))
        packed = tuple((min(max_num_seqs, t // PACKED_ROW_ALIGN), t) for t in sorted(sizes))
        # Mixed steps carry at most MIXED_CHUNK prompt tokens, so a decode step they join stays short (the decodes'
        # inter-token latency); the compiled Q values are the prefill Q buckets up to it, and the chunk itself.
        mixed = tuple(sorted({q for q in qs if q <= MIXED_CHUNK} | {min(MIXED_CHUNK, qs[-1])}))
        return cls(max_model_len=max_model_len, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                   block_size=block_size, decode_buckets=decode_buckets,
                   prefill_buckets=tuple((1, q) for q in qs), max_prefill_chunk=qs[-1], packed_buckets=packed,
                   mixed_chunks=mixed if enable_chunked_prefill is not False else (),
                   num_scheduler_steps=num_scheduler_steps)
