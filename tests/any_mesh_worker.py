"""Run in a subprocess with 8 CPU devices: greedy tokens of each checkpoint at mesh 1 and at meshes that do not
divide its heads (models/mesh_padding.py pads them), plus the padded shapes and the KV cache's kv heads."""

from __future__ import annotations

import json
import sys

import jax
import numpy as np


def main(out: str, meshes: str, *paths: str) -> None:
    from qwenjax import LLM, SamplingParams
    from tests.conftest import SMALL_ENGINE

    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(5)
    prompts = [list(map(int, rng.integers(0, 512, n))) for n in (5, 17, 40)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
    result = {}
    for path in paths:
        for n in [1] + [int(m) for m in meshes.split(",")]:
            llm = LLM(path, **SMALL_ENGINE, tensor_parallel_size=n)
            outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
            runner = llm.llm_engine.runner
            kv = runner.kv_cache[0][0]
            result[f"{path}|{n}"] = {
                "tokens": [o.outputs[0].token_ids for o in outs],
                "logprobs": [[lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
                             for o in outs],
                "kv_heads": kv.shape[0], "kv_shard_heads": kv.addressable_shards[0].data.shape[0],
            }
            del llm
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *sys.argv[3:])
