"""A workload's requests and their runs through `LLM.generate`: seeded random prompts of regular token ids, greedy
sampling, the untimed warm-up generate, the timed generate (host wall time around the call, from a cold prefix cache)
and the engine's counters around a run."""

from __future__ import annotations

import gc
import time

# Regular (non-special) Qwen2 token ids: random prompts are drawn below this so the detokenizer sees real tokens.
NUM_REGULAR_TOKENS = 151643


def random_prompts(n: int, lengths, *, seed: int, vocab_size: int) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = [lengths] * n if isinstance(lengths, int) else list(lengths)
    hi = min(vocab_size, NUM_REGULAR_TOKENS)
    return [rng.integers(0, hi, size=int(k)).tolist() for k in lengths]


def greedy(max_tokens: int):
    from qwenjax import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=int(max_tokens), ignore_eos=True)


def warm_generate(llm, prompts: list[list[int]], max_tokens: int = 4) -> None:
    """One small untimed generate through the whole host path (the engine compiled its buckets at start-up)."""
    llm.generate(prompt_token_ids=prompts[:2], sampling_params=greedy(max_tokens), use_tqdm=False)


def timed_generate(llm, prompts, params) -> tuple[list, float]:
    """A generate timed from a cold prefix cache: hits within the run count, leftovers of earlier runs (warm-up,
    repeats of the same prompt) do not."""
    llm.reset_prefix_cache()
    gc.collect()
    t0 = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    return outs, time.perf_counter() - t0


def stats_snapshot(llm) -> dict:
    """The engine's counters now (list counters copied: speculative decoding's accepted tokens by position)."""
    return {k: list(v) if isinstance(v, list) else v for k, v in vars(llm.llm_engine.stats).items()}


def stats_delta(before: dict, after: dict) -> dict:
    """after - before, counter by counter (lists element by element); max_decode_batch as it is after."""
    def diff(k, a):
        if k == "max_decode_batch":
            return a
        b = before.get(k)
        if isinstance(a, list):
            return [x - y for x, y in zip(a, b)] if b and len(b) == len(a) else list(a)
        return a - (b or 0)
    return {k: diff(k, a) for k, a in after.items()}
