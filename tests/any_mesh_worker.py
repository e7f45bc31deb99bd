"""Run in a subprocess with 8 CPU devices: greedy tokens of each checkpoint at mesh 1 and at meshes that do not
divide its heads (models/mesh_padding.py pads them), plus the padded shapes and the KV cache's kv heads."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np

ASSETS = Path(__file__).resolve().parents[1] / "qwenjax" / "assets"


def main(out: str, meshes: str, *paths: str) -> None:
    from qwenjax import LLM, SamplingParams
    from tests.conftest import SMALL_ENGINE

    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(5)
    prompts = [list(map(int, rng.integers(0, 512, n))) for n in (5, 17, 40)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
    result = {}
    for path in paths:  # "ep:<path>": with enable_expert_parallel
        for n in [1] + [int(m) for m in meshes.split(",")]:
            llm = LLM(path.removeprefix("ep:"), **SMALL_ENGINE, tensor_parallel_size=n,
                      enable_expert_parallel=path.startswith("ep:"))
            outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
            runner = llm.llm_engine.runner
            kv = runner.kv_cache[0][0]
            result[f"{path}|{n}"] = {
                "tokens": [o.outputs[0].token_ids for o in outs],
                "logprobs": [[lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
                             for o in outs],
                "kv_heads": kv.shape[0], "kv_shard_heads": kv.addressable_shards[0].data.shape[0],
                "expert_parallel": llm.llm_engine.model_config.expert_parallel,
            }
            del llm
    with open(out, "w") as f:
        json.dump(result, f)


def layouts(out: str, n: str, *names: str) -> None:
    """Shapes only: each packaged config's model, padded for a mesh of `n`, as abstract arrays in their shardings,
    and its KV pages; every split must divide (shard_shape raises otherwise). No weights are made."""
    from flax import nnx

    from qwenjax.config import ModelConfig
    from qwenjax.models.fusion import Fusion
    from qwenjax.models.loader import abstract_model
    from qwenjax.models.mesh_padding import pad_for_mesh
    from qwenjax.models.sharding import check_divisible, kv_sharding, make_mesh, param_spec

    n = int(n)
    mesh = make_mesh(n)
    result = {}
    for name in names:
        real = ModelConfig.from_file(str(ASSETS / "configs" / name))
        cfg = pad_for_mesh(real, n)
        check_divisible(cfg, n)
        model = abstract_model(cfg, jax.numpy.bfloat16, fusion=Fusion.decide(cfg, n))
        shards = {}
        for path, var in nnx.to_flat_state(nnx.state(model)):
            spec = param_spec(path, cfg, n, var.shape)
            shard = jax.sharding.NamedSharding(mesh, spec).shard_shape(var.shape)
            if path[:3] == ("model", "layers", 0) or path[0] == "lm_head":
                shards[".".join(map(str, path))] = [list(spec), list(shard)]
        kv_shape = (cfg.num_key_value_heads, 4, 16, cfg.head_dim)
        result[name] = {"shards": shards, "heads": [cfg.num_attention_heads, cfg.num_key_value_heads],
                        "kv_shard": list(kv_sharding(mesh, cfg).shard_shape(kv_shape))}
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    if sys.argv[1] == "layouts":
        layouts(*sys.argv[2:])
    else:
        main(sys.argv[1], sys.argv[2], *sys.argv[3:])
