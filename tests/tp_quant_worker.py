"""Run in a subprocess with 4 CPU devices: AWQ / GPTQ checkpoints on meshes 1, 2 and 4 (greedy tokens, shardings)."""

from __future__ import annotations

import json
import sys

import jax
import numpy as np


def main(out: str, *paths: str) -> None:
    from flax import nnx

    from qwenjax import LLM, SamplingParams
    from tests.conftest import SMALL_ENGINE

    assert jax.device_count() == 4, jax.devices()
    rng = np.random.default_rng(5)
    prompts = [list(map(int, rng.integers(0, 512, n))) for n in (6, 19, 33)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    result = {}
    for path in paths:
        for n in (1, 2, 4):
            llm = LLM(path, **SMALL_ENGINE, tensor_parallel_size=n)
            outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
            layer0 = {".".join(map(str, p[3:])): v[...] for p, v in nnx.to_flat_state(llm.llm_engine.runner.params)
                      if p[:3] == ("model", "layers", 0)}
            result[f"{path}|{n}"] = {
                "tokens": [o.outputs[0].token_ids for o in outs],
                "specs": {k: list(a.sharding.spec) for k, a in layer0.items()},
                "dtypes": {k: str(a.dtype) for k, a in layer0.items()},
                "shard_shapes": {k: list(a.addressable_shards[0].data.shape) for k, a in layer0.items()},
            }
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], *sys.argv[2:])
