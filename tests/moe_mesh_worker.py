"""Run in a subprocess with 4 CPU devices: one MoE checkpoint at mesh 1, tensor parallel 4 and expert parallel 4.

For each placement: greedy tokens, the top-5 logprobs of every generated step and of every prompt position (the
latter from one full forward over the prompt: a logits check at every position), the expert shardings and the
shape of one device's expert shard. Written as JSON for tests/test_qwen2_moe.py.
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np

PLACEMENTS = {"mesh1": dict(tensor_parallel_size=1), "tp4": dict(tensor_parallel_size=4),
              "ep4": dict(tensor_parallel_size=4, enable_expert_parallel=True)}
PROMPT_LENS = (5, 17, 28)
NEW_TOKENS = 6
TOP = 5


def prompts() -> list[list[int]]:
    rng = np.random.default_rng(3)
    return [list(map(int, rng.integers(0, 512, n))) for n in PROMPT_LENS]


def _top(entries) -> dict:
    return {str(t): lp.logprob for t, lp in entries.items()}


def main(path: str, out: str) -> None:
    from flax import nnx

    from qwenjax import LLM, SamplingParams
    from tests.conftest import SMALL_ENGINE

    assert jax.device_count() == 4, jax.devices()
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=TOP, prompt_logprobs=TOP)
    result = {}
    for name, placement in PLACEMENTS.items():
        llm = LLM(path, **{**SMALL_ENGINE, "prefill_token_buckets": (32,), "skip_warmup": True}, **placement)
        outs = llm.generate(prompt_token_ids=prompts(), sampling_params=params, use_tqdm=False)
        flat = {".".join(map(str, p)): v.value for p, v in nnx.to_flat_state(llm.llm_engine.runner.params)}
        result[name] = {
            "tokens": [o.outputs[0].token_ids for o in outs],
            "logprobs": [[_top(step) for step in o.outputs[0].logprobs] for o in outs],
            "prompt_logprobs": [[_top(p) if p else None for p in o.prompt_logprobs] for o in outs],
            "specs": {k: list(v.sharding.spec) for k, v in flat.items() if k.startswith("model.layers.0.")},
            "expert_shard_shape": list(flat["model.layers.0.mlp.experts.gate_proj"].addressable_shards[0].data.shape),
            "down_shard_shape": list(flat["model.layers.0.mlp.experts.down_proj"].addressable_shards[0].data.shape),
        }
        del llm
    result["dummy_ep4_specs"] = _dummy_specs(path)
    with open(out, "w") as f:
        json.dump(result, f)


def _dummy_specs(path: str) -> dict:
    """Random weights made straight into the expert-parallel layout of a mesh of 4 (load_format="dummy")."""
    import dataclasses
    from pathlib import Path

    import jax.numpy as jnp
    from flax import nnx

    from qwenjax.models.loader import load_model_config
    from qwenjax.models.random_weights import random_params
    from qwenjax.models.sharding import make_mesh

    cfg = dataclasses.replace(load_model_config(Path(path)), expert_parallel=True)
    _, state = random_params(cfg, jnp.float32, seed=0, mesh=make_mesh(4))
    return {".".join(map(str, p)): list(v[...].sharding.spec) for p, v in nnx.to_flat_state(state)
            if p[:3] == ("model", "layers", 0)}


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
