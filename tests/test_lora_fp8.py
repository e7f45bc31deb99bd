"""LoRA adapters over FP8 weights (issues 28 and 30 together): the adapter's delta is added to the FP8 projection's
output, computed from the projection's unrounded input, as PEFT adds it to a base layer.

Oracle: transformers computing the FP8 projections as tests/fp8_writer.reference_model does (dequantized weights,
activations rounded by torch's own FP8 cast), each targeted projection then adding x @ A^T @ B^T * scaling with A, B
and lora_alpha read from the adapter PEFT itself saved (adapter_model.safetensors, adapter_config.json).
"""

from __future__ import annotations

import json

import numpy as np
import torch
from safetensors.torch import load_file

from qwenjax import LLM, LoRARequest, SamplingParams
from tests.checkpoints import write_checkpoint
from tests.conftest import SMALL_ENGINE
from tests.fp8_writer import Fp8Scheme, reference_model, write_fp8
from tests.lora_adapters import ALL_SEVEN, write_adapter

ENGINE = {**SMALL_ENGINE, "max_model_len": 64, "max_num_seqs": 4, "max_num_batched_tokens": 64,
          "decode_buckets": (4,), "prefill_token_buckets": (64,), "enable_lora": True, "max_loras": 2,
          "max_lora_rank": 16}
NEW = 8


class _WithLoRA(torch.nn.Module):
    def __init__(self, base, a, b, scaling):
        super().__init__()
        self.base, self.a, self.b, self.scaling = base, a, b, scaling

    def forward(self, x):
        return self.base(x) + (x.float() @ self.a.T @ self.b.T) * self.scaling


def _reference(float_dir, fp8_dir, adapter_dir):
    model = reference_model(float_dir, fp8_dir, Fp8Scheme("online"))
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    scaling = cfg["lora_alpha"] / cfg["r"]
    for key, a in tensors.items():
        if ".lora_A." not in key:
            continue
        name = key.split("base_model.model.", 1)[1].split(".lora_A.")[0]  # e.g. model.layers.0.self_attn.q_proj
        b = tensors[key.replace(".lora_A.", ".lora_B.")]
        parent, leaf = name.rsplit(".", 1)
        owner = model.get_submodule(parent)
        setattr(owner, leaf, _WithLoRA(getattr(owner, leaf), a.float(), b.float(), scaling))
    return model


def _greedy(model, prompts):
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = list(p)
            for _ in range(NEW):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            out.append(ids[len(p):])
    return out


def test_adapters_over_fp8_weights_match_the_reference(tmp_path):
    base = write_checkpoint(tmp_path / "float", vocab_size=512, hidden_size=256, intermediate_size=384, num_layers=2,
                            num_heads=4, num_kv_heads=2, tie=False, seed=3)
    online = write_fp8(base, tmp_path / "online", Fp8Scheme("online"))  # only the reference reads it
    adapter = write_adapter(base, tmp_path / "a", r=8, alpha=16, targets=ALL_SEVEN, seed=4)
    prompts = [list(map(int, np.random.default_rng(6).integers(0, 512, n))) for n in (5, 19, 33)]
    llm = LLM(str(base), quantization="fp8", **ENGINE)
    greedy = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)
    req = LoRARequest("a", 1, str(adapter))
    ours = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=greedy,
                                                         lora_request=req, use_tqdm=False)]
    plain = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=greedy,
                                                          use_tqdm=False)]
    assert ours == _greedy(_reference(base, online, adapter), prompts)
    assert plain == _greedy(reference_model(base, online, Fp8Scheme("online")), prompts)
    assert ours != plain  # the adapter changes the output
