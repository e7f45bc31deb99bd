"""Run in a subprocess with 8 CPU devices: greedy tokens and logprobs of a batch mixing two LoRA adapters and the
base model on meshes 1, 2, 3 (heads zero-padded for the mesh) and 4 (kv heads replicated), plus the slot arrays'
shardings and shapes (None: A folded into the base weight, whose shape is recorded too). Args: checkpoint, adapter
a, adapter b, output json."""

from __future__ import annotations

import json
import sys

import jax
import numpy as np


def _qkv_kernel_shape(params) -> list | None:
    """The fused qkv_proj kernel's shape of layer 0 (None where q/k/v are separate projections)."""
    attn = params["model"]["layers"][0]["self_attn"]
    try:
        return list(attn["qkv_proj"]["kernel"].shape)
    except KeyError:
        return None


def main(path: str, a: str, b: str, out: str) -> None:
    from qwenjax import LLM, LoRARequest, SamplingParams
    from tests.conftest import SMALL_ENGINE

    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(3)
    prompts = [list(map(int, rng.integers(0, 512, n))) for n in (5, 17, 40)]
    loras = [LoRARequest("a", 1, a), LoRARequest("b", 2, b), None]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0)
    result = {"prompts": prompts}
    for n in (1, 2, 3, 4):
        llm = LLM(path, **SMALL_ENGINE, tensor_parallel_size=n, enable_lora=True, max_loras=2, max_lora_rank=16)
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, lora_request=loras, use_tqdm=False)
        stacks = llm.llm_engine.runner.lora.stacks[0]
        result[n] = {
            "tokens": [o.outputs[0].token_ids for o in outs],
            "logprobs": [[lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
                         for o in outs],
            "specs": {name: [None if arr is None else [str(x) for x in arr.sharding.spec] for arr in ab]
                      for name, ab in stacks.items()},
            "shapes": {name: [None if arr is None else list(arr.shape) for arr in ab] for name, ab in stacks.items()},
            "qkv_kernel": _qkv_kernel_shape(llm.llm_engine.runner.params),
        }
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
