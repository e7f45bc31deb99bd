"""PEFT LoRA adapters for the tiny test checkpoints, written by `peft` itself (the oracle's library)."""

from __future__ import annotations

from pathlib import Path

ALL_SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_adapter(base: Path, out: Path, *, r: int, alpha: float, targets, seed: int, use_rslora: bool = False,
                  std: float = 0.15, **lora_kwargs) -> Path:
    """get_peft_model on the base checkpoint, lora_A and lora_B drawn at random (PEFT starts B at zero, which would
    make the adapter a no-op), then save_pretrained (adapter_config.json + adapter_model.safetensors)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tests.checkpoints import hf_model

    model = get_peft_model(hf_model(base), LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                                                      use_rslora=use_rslora, lora_dropout=0.0, **lora_kwargs))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    model.save_pretrained(out)
    return out


def peft_model(base: Path, adapter: Path | None):
    """transformers' model of `base` with the adapter applied by PEFT (None: the base model itself)."""
    from peft import PeftModel

    from tests.checkpoints import hf_model

    model = hf_model(base)
    return model if adapter is None else PeftModel.from_pretrained(model, str(adapter)).eval()


def peft_greedy(model, prompts: list[list[int]], new: int) -> list[list[int]]:
    """Greedy tokens by a full forward of the whole sequence at every step (no KV cache). With transformers 5.25 and
    peft 0.21 on these tiny models, PeftModel.generate's cached decoding drifts from the full forward after a few
    tokens, so the oracle is the forward itself, the definition of the adapter's logits."""
    import torch

    out = []
    with torch.no_grad():
        for p in prompts:
            ids = list(p)
            for _ in range(new):
                ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
            out.append(ids[len(p):])
    return out


def peft_logprobs(model, prompt: list[int], tokens: list[int]) -> list[float]:
    """The log-probability the model gives each of `tokens` after the prompt and the tokens before it."""
    import torch

    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    n = len(prompt)
    return [float(lp[n - 1 + i, t]) for i, t in enumerate(tokens)]
