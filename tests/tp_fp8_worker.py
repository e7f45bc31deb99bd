"""Run in a subprocess with 4 CPU devices: FP8 checkpoints on meshes of 1 to 4 devices (greedy tokens, shardings).
Each run is `path|mesh|kv_cache_dtype|quantization` ("-" for none)."""

from __future__ import annotations

import json
import sys

import jax
import numpy as np


def main(out: str, *runs: str) -> None:
    from flax import nnx

    from qwenjax import LLM, SamplingParams
    from tests.test_fp8_weights import ENGINE, PROMPTS

    assert jax.device_count() == 4, jax.devices()
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    result = {}
    for run in runs:
        path, n, kv, quant = run.split("|")
        llm = LLM(path, **ENGINE, tensor_parallel_size=int(n), kv_cache_dtype=kv,
                  quantization=None if quant == "-" else quant)
        outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=params, use_tqdm=False)
        runner = llm.llm_engine.runner
        layer0 = {".".join(map(str, p[3:])): v[...] for p, v in nnx.to_flat_state(runner.params)
                  if p[:3] == ("model", "layers", 0)}
        result[run] = {
            "tokens": [o.outputs[0].token_ids for o in outs],
            "specs": {k: list(a.sharding.spec) for k, a in layer0.items()},
            "dtypes": {k: str(a.dtype) for k, a in layer0.items()},
            "shard_shapes": {k: list(a.addressable_shards[0].data.shape) for k, a in layer0.items()},
            "kv_dtype": str(np.dtype(jax.tree.leaves(runner.kv_cache)[0].dtype)),
        }
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], *sys.argv[2:])
