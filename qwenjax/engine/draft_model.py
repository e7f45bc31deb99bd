"""Draft-model speculation (`speculative_config={"model": DRAFT, "num_speculative_tokens": k}`): a second, smaller
model of the same vocabulary proposes k tokens a row, greedily, in one jitted multi-step call; the target verifies.

The draft's paged KV cache mirrors the target's page for page: the same number of pages of the same size, addressed
by the same block tables, so the scheduler's pages, prefix-cache hits and n > 1 forks serve both caches. The draft is
kept in step by running its forward over every step the target runs without speculating (prefill, mixed and plain
decode steps: `mirror`, the same StepInput), and in a verify step by its own proposal call: k + 1 greedy decode
steps from the row's newest token (position p), so it writes positions p .. p + k, which covers every accepted run
(at most k proposals accepted; the next round starts after them). A row that verifies without proposals (its pages
could not grow by k, or it is within k tokens of max_model_len) is padding in that call, so the draft misses its
newest token: it is marked stale (Sequence.draft_stale) and gets no proposals until a recompute after preemption
refills the draft's cache. Stale draft KV could only lower acceptance, never change the output: acceptance compares
against the target. Greedy proposals are deterministic (one-hot q), which is what the rejection sampler assumes.

Placement: the draft is loaded with the target's engine arguments (mesh included: on a mesh it is sharded the same
way, its KV heads split like the target's), its own weights and a cache of the target's page count. Its memory comes
on top of the target's: on a GPU, leave room with a lower gpu_memory_utilization.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from qwenjax.config import EngineArgs, resolve_dtype
from qwenjax.models.loader import load_model_config, resolve_model_path
from qwenjax.core.scheduler_output import SchedulerOutput
from qwenjax.worker.kv_cache import device_memory, kv_dtype, page_bytes
from qwenjax.worker.lockstep import to_host
from qwenjax.worker.model_runner import dummy_input
from qwenjax.worker.model_setup import LoadedModel, load_model
from qwenjax.worker.sampler import WARMUP_MODES, build_tensors
from qwenjax.worker.step_input import build_step_input

GREEDY = dataclasses.replace(WARMUP_MODES[0], penalties=False)  # the draft's proposals: argmax, no penalties


def check_draft_memory(draft_args: EngineArgs, num_pages: int) -> None:
    """Start-up check that the draft's weights and its KV cache (the target's page count) fit in what the target
    left free on the device (a ValueError with the numbers and the fix, rather than an allocation failure)."""
    mem = device_memory()
    if mem is None:  # CPU: no pool to check
        return
    path = resolve_model_path(draft_args.model)
    cfg = load_model_config(path)
    dtype = resolve_dtype(draft_args.dtype, cfg)
    per_device = (cfg.num_params() * np.dtype(dtype).itemsize + num_pages * page_bytes(
        cfg, draft_args.block_size, kv_dtype(draft_args.kv_cache_dtype, dtype))) / draft_args.tensor_parallel_size
    free = mem.limit - mem.in_use
    if per_device > free:
        gib = 1 << 30
        raise ValueError(f"the draft model {draft_args.model!r} needs {per_device / gib:.2f} GiB a device (weights and "
                         f"a KV cache of the target's {num_pages} pages), but the target left {free / gib:.2f} GiB "
                         f"free: lower gpu_memory_utilization (now {draft_args.gpu_memory_utilization}) or set "
                         f"num_kv_pages to leave room for it")


class DraftModel:
    def __init__(self, path: str, args: EngineArgs, target: LoadedModel, k: int):
        sc = target.scheduler_config
        draft_args = dataclasses.replace(
            args, model=path, tokenizer=None, speculative_config=None, hf_overrides=None, quantization=None,
            max_model_len=sc.max_model_len, max_num_seqs=sc.max_num_seqs,
            max_num_batched_tokens=sc.max_num_batched_tokens, decode_buckets=sc.decode_buckets,
            num_kv_pages=target.num_pages, generation_config="vllm")
        check_draft_memory(draft_args, target.num_pages)
        self.model = load_model(draft_args)
        self.runner = self.model.runner
        if (self.runner.num_pages, self.runner.page_size, self.runner.block_table_width) != \
                (target.runner.num_pages, target.runner.page_size, target.runner.block_table_width):
            raise ValueError(f"the draft's KV cache ({self.runner.num_pages} pages of {self.runner.page_size}, "
                             f"{self.runner.block_table_width} a row) does not mirror the target's "
                             f"({target.runner.num_pages}, {target.runner.page_size}, "
                             f"{target.runner.block_table_width})")
        self.k = k
        self.max_model_len = sc.max_model_len
        if self.model.warmup_seconds > 0:  # the target's warm-up ran: compile the proposal call of every bucket
            for b in sc.decode_buckets:
                inp = dummy_input(b, 1, self.runner.num_pages, self.runner.page_size, self.runner.block_table_width,
                                  self.runner.scratch_slot)
                tensors = build_tensors([], num_rows=b, vocab_size=self.runner.vocab_size, with_history=False)
                self.runner.execute_steps(inp, tensors, GREEDY, k + 1).token_ids.block_until_ready()

    def mirror(self, out: SchedulerOutput, inp) -> None:
        """The draft computes the KV of a step the target runs without speculating (forks first, as the target)."""
        if out.forks:
            self.runner.fork(out.forks)
        self.runner.forward(inp, out.has_context)

    def propose(self, out: SchedulerOutput, blocks) -> list[list[int]]:
        """Up to k greedy proposals for each row of a decode step (rows that cannot take them get none and, missing
        from the draft's call, are marked stale); grows the rows that do to hold k more slots."""
        if out.forks:  # copies started this step read their forked pages (forking twice, should the plain step
            self.runner.fork(out.forks)  # run instead and mirror it, copies the same pages again: idempotent)
        eng_rows = out.rows
        live = []
        for r in eng_rows:
            s = r.seq
            room = min(self.k, s.max_output_tokens - len(s.output_token_ids) - 1)
            ok = (room >= 1 and s.draft_stale != s.num_preemptions and s.constraint is None
                  and s.num_tokens + self.k <= self.max_model_len
                  and blocks.grow(s.block_table, s.num_tokens + self.k))
            live.append(room if ok else 0)
        if not any(live):
            return [[] for _ in eng_rows]  # the plain decode step runs, and the draft mirrors it
        for r, n in zip(eng_rows, live):
            if not n:  # verified without the draft seeing its newest token
                r.seq.draft_stale = r.seq.num_preemptions
        inp = build_step_input(SchedulerOutput("decode", eng_rows, False, out.bucket), page_size=blocks.page_size,
                               num_pages=blocks.num_pages, max_pages_per_seq=self.runner.block_table_width,
                               scratch_slot=self.runner.scratch_slot)
        meta = inp.meta
        for b, n in enumerate(live):
            if not n:  # padding in the draft's call: nothing read, every write dropped
                meta.query_lens[b] = meta.seq_lens[b] = 0
                meta.slot_mapping[b, 0] = blocks.num_pages * blocks.page_size + b
        tensors = build_tensors([], num_rows=out.bucket[0], vocab_size=self.runner.vocab_size, with_history=False)
        tokens = np.asarray(to_host(self.runner.execute_steps(inp, tensors, GREEDY, self.k + 1).token_ids))
        return [tokens[:n, b].tolist() for b, n in enumerate(live)]
