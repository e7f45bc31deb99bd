"""The engine's counters: what /metrics, the offline stats and the benchmarks read."""

from __future__ import annotations


class EngineStats:
    """Counters read by the server's /metrics and the tests."""

    def __init__(self):
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.steps = 0
        self.max_decode_batch = 0
        self.prefill_steps = 0         # steps of prompt tokens only
        self.decode_steps = 0          # steps of one new token a row only
        self.mixed_steps = 0           # steps whose decodes took a prefill chunk along (chunked prefill)
        self.async_steps = 0           # steps dispatched while the step before was still unread (async scheduling)
        self.multi_steps = 0           # decode dispatches that ran num_scheduler_steps steps (counted once in steps)
        self.step_rows = 0             # rows over all steps (step_rows / steps: the mean rows a step)
        self.preemptions = 0
        self.prefix_cache_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_cache_hits = 0     # of those, tokens found cached (not computed)
        self.host_dispatch_s = 0.0     # seconds in runner.execute(_steps): JAX's dispatch of the step(s) and sampler
        self.host_wait_s = 0.0         # seconds blocked reading steps' sampled ids (the device still running)
        self.late_samplers = 0         # steps whose sampler waited for the previous step's tokens (constraints)
        self.late_sampler_s = 0.0      # seconds building (masks included) and dispatching those samplers
        self.host_process_s = 0.0      # seconds handling read tokens: append, detokenize, stops (after the wait)
        # Speculative decoding (engine/spec_step.py), under vLLM's names (vllm:spec_decode_*):
        self.spec_decode_verify_steps = 0          # verify steps run (each counted once in steps and decode_steps)
        self.spec_decode_drains = 0                # async steps ended early: the next step verifies proposals
        self.spec_decode_num_drafts = 0            # rows that verified at least one proposed token
        self.spec_decode_num_draft_tokens = 0      # proposed tokens verified
        self.spec_decode_num_accepted_tokens = 0   # of those, accepted
        self.spec_decode_num_accepted_tokens_per_pos: list[int] = []  # [k]: accepted at draft position i

    @property
    def spec_decode_acceptance_rate(self) -> float | None:
        """Accepted / proposed tokens (None before any proposal was verified)."""
        n = self.spec_decode_num_draft_tokens
        return self.spec_decode_num_accepted_tokens / n if n else None
