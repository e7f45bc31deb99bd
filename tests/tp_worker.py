"""Run in a subprocess with 8 CPU devices: greedy tokens and logits for meshes 1, 2, 4, 8, plus shardings."""

from __future__ import annotations

import json
import sys

import jax
import numpy as np


def main(path: str, out: str) -> None:
    from qwenjax import LLM, SamplingParams
    from tests.conftest import SMALL_ENGINE

    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(3)
    prompts = [list(map(int, rng.integers(0, 512, n))) for n in (5, 17, 40)]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2, prompt_logprobs=2)
    result = {}
    for n in (1, 2, 4, 8):
        llm = LLM(path, **SMALL_ENGINE, tensor_parallel_size=n)
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
        # Seeded sampling in every filter mode (top-k + top-p + min_p, top-p alone, plain), with penalties: the
        # sampler runs on each device's vocabulary columns, the draws equal mesh 1's. n=2 forks the penalty rows
        # (each device rebuilds its columns of the copy's prompt mask).
        sampled = llm.generate(prompt_token_ids=prompts, use_tqdm=False, sampling_params=[
            SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.02, repetition_penalty=1.2, seed=1,
                           max_tokens=6, ignore_eos=True, logprobs=1),
            SamplingParams(temperature=1.0, top_p=0.8, presence_penalty=0.5, frequency_penalty=0.3, seed=2,
                           max_tokens=6, ignore_eos=True),
            SamplingParams(temperature=0.7, seed=3, max_tokens=6, ignore_eos=True, n=2, repetition_penalty=1.5)])
        runner = llm.llm_engine.runner
        from flax import nnx
        specs = {".".join(map(str, p)): list(v.value.sharding.spec) for p, v in nnx.to_flat_state(runner.params)
                 if p[:3] == ("model", "layers", 0) or p[0] == "lm_head" or p[1] == "embed_tokens"}
        result[n] = {
            "tokens": [o.outputs[0].token_ids for o in outs],
            "prompt_logprobs": [[sorted((t, lp.logprob, lp.rank) for t, lp in d.items()) if d else None
                                 for d in o.prompt_logprobs] for o in outs],
            "sampled_tokens": [c.token_ids for o in sampled for c in o.outputs],
            "logprobs": [[lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
                         for o in outs],
            "param_specs": specs,
            "kv_spec": list(runner.kv_cache[0][0].sharding.spec),
            "kv_devices": len(runner.kv_cache[0][0].sharding.device_set),
            "kv_shard_shape": list(runner.kv_cache[0][0].addressable_shards[0].data.shape),
            "penalty_spec": list(runner.penalties.output_counts.sharding.spec),
            "logits_spec": list(runner.logits_sharding.spec),
            "vocab_size": runner.vocab_size,
        }
    # Multi-step decode over a mesh: one program of K steps (its HLO is checked by test_tensor_parallel.py too). These
    # rows ask for logprobs, so they run one step a dispatch: the K-step program is compiled by the warm-up alone.
    llm = LLM(path, **SMALL_ENGINE, tensor_parallel_size=2, num_scheduler_steps=4, skip_warmup=False)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    result["multi_step_mesh2_tokens"] = [o.outputs[0].token_ids for o in outs]
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
