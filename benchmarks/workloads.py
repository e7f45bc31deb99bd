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
    return dict(vars(llm.llm_engine.stats))


def stats_delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before.get(k, 0) if k != "max_decode_batch" else after[k] for k in after}
