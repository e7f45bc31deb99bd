"""Test-side FP8 checkpoints and their reference model, independently of qwenjax (torch and safetensors only).

Writer: a float HF checkpoint -> vLLM's `fp8` layouts, as AutoFP8 (per-tensor) and Qwen's FP8 releases (128 x 128
blocks) write them: `weight` torch.float8_e4m3fn [O, I] and
  per-tensor  `weight_scale` float32 [] (W ~ weight x weight_scale), `input_scale` float32 [] when static (each
              layer's input max over a calibration batch of the float model / 448);
  block       `weight_scale_inv` float32 [ceil(O/bn), ceil(I/bk)] (W ~ weight x the block's scale).
Reference: transformers' Qwen2ForCausalLM on the float checkpoint with every projection's weight replaced by the
dequantized FP8 weight and its input rounded to FP8 as the format says (static: x / input_scale; dynamic: per token,
or per token per group of bk columns; scale = max|x| / 448, 1 where that is 0), so it sees the same rounded values
the engine should, through torch's own float8 cast.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FP8_MAX = 448.0
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class Fp8Scheme:
    kind: str                      # "per_tensor" | "block" | "online" (a float checkpoint quantized by the engine)
    activation_scheme: str = "dynamic"
    block: tuple[int, int] = (128, 128)

    @property
    def name(self) -> str:
        return self.kind if self.kind != "per_tensor" else f"per_tensor-{self.activation_scheme}"


def _scale(amax: torch.Tensor) -> torch.Tensor:
    return torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)).float()


def _cast(v: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (v.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def _blocks(w: torch.Tensor, bn: int, bk: int):
    """w [O, I] -> (fp8 [O, I], scale_inv [ceil(O/bn), ceil(I/bk)]), one scale per block."""
    O, I = w.shape
    q = torch.empty(O, I, dtype=torch.float8_e4m3fn)
    s = torch.empty(-(-O // bn), -(-I // bk))
    for a in range(s.shape[0]):
        for b in range(s.shape[1]):
            blk = w[a * bn:(a + 1) * bn, b * bk:(b + 1) * bk]
            s[a, b] = _scale(blk.abs().max())
            q[a * bn:(a + 1) * bn, b * bk:(b + 1) * bk] = _cast(blk, s[a, b])
    return q, s


def _projections(tensors: dict) -> list[str]:
    return sorted(k[:-len(".weight")] for k in tensors if k.endswith(".weight") and k.split(".")[-2] in PROJECTIONS)


def _input_amax(float_dir: Path, seed: int) -> dict[str, float]:
    """Each projection's input max over a calibration batch through the float model (forward pre-hooks)."""
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(float_dir, torch_dtype=torch.float32).eval()
    amax: dict[str, float] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: amax.__setitem__(
        n, max(amax.get(n, 0.0), float(args[0].abs().max())))) for n, m in model.named_modules()
        if n.split(".")[-1] in PROJECTIONS]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model(torch.randint(0, model.config.vocab_size, (2, 32), generator=g))
    for h in hooks:
        h.remove()
    return amax


def write_fp8(float_dir: Path, out: Path, scheme: Fp8Scheme, *, seed: int = 0) -> Path:
    """The FP8 checkpoint of `float_dir` in `out` ("online": the float checkpoint itself)."""
    tensors = load_file(str(float_dir / "model.safetensors"))
    out.mkdir(parents=True, exist_ok=True)
    for f in float_dir.iterdir():  # generation_config.json and the rest as they are
        if f.is_file():
            shutil.copy(f, out / f.name)
    if scheme.kind == "online":
        return out
    cfg = json.loads((float_dir / "config.json").read_text())
    amax = _input_amax(float_dir, seed) if scheme.activation_scheme == "static" else {}
    for mod in _projections(tensors):
        w = tensors[f"{mod}.weight"].float()
        if scheme.kind == "block":
            q, s = _blocks(w, *scheme.block)
            tensors[f"{mod}.weight"], tensors[f"{mod}.weight_scale_inv"] = q, s
        else:
            s = _scale(w.abs().max())
            tensors[f"{mod}.weight"], tensors[f"{mod}.weight_scale"] = _cast(w, s), s.reshape(())
            if scheme.activation_scheme == "static":
                tensors[f"{mod}.input_scale"] = _scale(torch.tensor(amax[mod])).reshape(())
    qc = {"quant_method": "fp8", "activation_scheme": scheme.activation_scheme}
    if scheme.kind == "block":
        qc.update(fmt="e4m3", weight_block_size=list(scheme.block))
    else:
        qc["ignored_layers"] = ["lm_head"]
    cfg["quantization_config"] = qc
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


class Fp8Act(torch.nn.Module):
    """A projection as the FP8 format computes it: x rounded to FP8 (dequantized back), times the dequantized W."""

    def __init__(self, linear: torch.nn.Linear, w_deq: torch.Tensor, *, static: float | None, group: int | None):
        super().__init__()
        self.w, self.b, self.static, self.group = w_deq, linear.bias, static, group

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1]).float()
        if self.static is not None:
            s = torch.tensor(self.static)
            xd = _cast(x, s).float() * s
        else:
            g = self.group or x.shape[-1]
            xg = x.reshape(x.shape[0], -1, g)
            s = _scale(xg.abs().amax(-1, keepdim=True))
            xd = (_cast(xg, s).float() * s).reshape(x.shape)
        y = xd @ self.w.T
        if self.b is not None:
            y = y + self.b
        return y.reshape(*shape[:-1], -1)


def reference_model(float_dir: Path, fp8_dir: Path, scheme: Fp8Scheme):
    """transformers' model of `float_dir` computing as the FP8 checkpoint `fp8_dir` says (module docstring)."""
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(float_dir, torch_dtype=torch.float32).eval()
    tensors = load_file(str(fp8_dir / "model.safetensors"))
    for name, module in list(model.named_modules()):
        if name.split(".")[-1] not in PROJECTIONS:
            continue
        if scheme.kind == "online":  # per output channel, from the float weight
            w = module.weight.detach().float()
            s = _scale(w.abs().amax(1, keepdim=True))
            w_deq = _cast(w, s).float() * s
        elif scheme.kind == "block":
            bn, bk = scheme.block
            q, s = tensors[f"{name}.weight"].float(), tensors[f"{name}.weight_scale_inv"]
            w_deq = q * s.repeat_interleave(bn, 0)[:q.shape[0]].repeat_interleave(bk, 1)[:, :q.shape[1]]
        else:
            w_deq = tensors[f"{name}.weight"].float() * tensors[f"{name}.weight_scale"]
        static = float(tensors[f"{name}.input_scale"]) if scheme.activation_scheme == "static" else None
        group = scheme.block[1] if scheme.kind == "block" else None
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        setattr(parent, name.rsplit(".", 1)[1], Fp8Act(module, w_deq, static=static, group=group))
    return model
