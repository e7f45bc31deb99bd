"""A Hugging Face PEFT LoRA adapter directory -> numpy A / B per (layer, projection), checked against the model.

PEFT stores, for each adapted projection W [out, in] (torch layout), `lora_A.weight` [r, in] and `lora_B.weight`
[out, r], and computes y = x W^T + scaling * (x A^T) B^T with scaling = lora_alpha / r, or lora_alpha / sqrt(r) with
rsLoRA (`use_rslora`). Here A is kept as [in, r] and B as [r, out] with the scaling folded into B (float32 on the host),
so the device computes y + (x @ A) @ B.

What is refused, by name (ValueError): a missing directory or file, a pickled `adapter_model.bin` only, a peft_type
other than LORA, a rank above `max_lora_rank`, a target module other than the seven projections of a Qwen2 layer, a
tensor whose shape does not match the model, and the PEFT options that change the math and are not built: `bias`
other than "none" / `lora_bias`, DoRA (`use_dora`), `modules_to_save`, `fan_in_fan_out`, and per-module
`rank_pattern` / `alpha_pattern`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np

from qwenjax.config import ModelConfig
from qwenjax.models.loader import SafetensorsFile

# The projections an adapter may target, in a layer's order; their module inside the decoder layer.
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
OWNER = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
         "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_(A|B)(?:\.default)?"
                  r"\.weight$")


def projection_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of each target projection of a decoder layer of `cfg`."""
    D, F, N, K, H = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads, \
        cfg.head_dim
    return {"q_proj": (D, N * H), "k_proj": (D, K * H), "v_proj": (D, K * H), "o_proj": (N * H, D),
            "gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D)}


@dataclasses.dataclass(frozen=True, eq=False)
class LoRAWeights:
    """One adapter on the host. `modules[(layer, projection)] = (A [in, r], B [r, out] * scaling)`, float32."""

    lora_name: str
    lora_int_id: int
    rank: int
    scaling: float
    modules: dict

    @property
    def target_modules(self) -> tuple[str, ...]:
        names = {p for _, p in self.modules}
        return tuple(p for p in TARGET_MODULES if p in names)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.modules.values())


def _refuse(name: str, msg: str) -> ValueError:
    return ValueError(f"LoRA adapter {name!r}: {msg}")


def read_config(path: Path, name: str) -> dict:
    """adapter_config.json, after the checks of the module docstring that need no weights."""
    if not path.is_dir():
        raise _refuse(name, f"lora_path {str(path)!r} is not a directory (expected {CONFIG_FILE} and {WEIGHTS_FILE})")
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise _refuse(name, f"missing file {str(cfg_file)!r} (a PEFT adapter saved with save_pretrained has it)")
    try:
        conf = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise _refuse(name, f"cannot read {str(cfg_file)!r}: {e}") from None
    if conf.get("peft_type", "LORA") != "LORA":
        raise _refuse(name, f"peft_type {conf.get('peft_type')!r} is not supported; only LORA adapters are")
    unsupported = []
    if conf.get("bias", "none") != "none":
        unsupported.append(f"bias={conf['bias']!r} (only 'none')")
    if conf.get("lora_bias"):
        unsupported.append("lora_bias=true")
    if conf.get("use_dora"):
        unsupported.append("use_dora=true (DoRA)")
    if conf.get("modules_to_save"):
        unsupported.append(f"modules_to_save={conf['modules_to_save']!r}")
    if conf.get("fan_in_fan_out"):
        unsupported.append("fan_in_fan_out=true")
    for key in ("rank_pattern", "alpha_pattern"):
        if conf.get(key):
            unsupported.append(f"{key}={conf[key]!r} (one r / lora_alpha for every module)")
    if unsupported:
        raise _refuse(name, f"not supported: {', '.join(unsupported)}")
    targets = conf.get("target_modules")
    if isinstance(targets, (list, tuple)):  # a regex string is checked through the tensors it produced
        unknown = sorted(set(targets) - set(TARGET_MODULES))
        if unknown:
            raise _refuse(name, f"target module(s) {unknown} are not supported; an adapter may target "
                                f"{', '.join(TARGET_MODULES)}")
    return conf


def load_adapter(path: str | Path, *, lora_name: str, lora_int_id: int, cfg: ModelConfig,
                 max_lora_rank: int) -> LoRAWeights:
    """Reads and checks a PEFT adapter for a model of `cfg` (its real, unpadded shapes)."""
    path = Path(path).expanduser()
    conf = read_config(path, lora_name)
    r = conf.get("r")
    if not isinstance(r, int) or r < 1:
        raise _refuse(lora_name, f"r must be a positive integer in {CONFIG_FILE}, got {r!r}")
    if r > max_lora_rank:
        raise _refuse(lora_name, f"rank r={r} exceeds max_lora_rank={max_lora_rank}; raise max_lora_rank "
                                 f"(--max-lora-rank) to at least {r}")
    alpha = float(conf.get("lora_alpha", r))
    scaling = alpha / math.sqrt(r) if conf.get("use_rslora") else alpha / r
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        bin_only = (path / "adapter_model.bin").is_file()
        raise _refuse(lora_name, f"missing file {str(weights)!r}" + (
            " (adapter_model.bin, a pickle, is not read: save the adapter with safe_serialization=True)"
            if bin_only else ""))
    shapes = projection_shapes(cfg)
    found: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, arr in SafetensorsFile(weights).items():
        m = _KEY.match(key)
        if m is None:
            raise _refuse(lora_name, f"tensor {key!r} is not a LoRA A/B weight of a decoder layer projection; an "
                                     f"adapter may target {', '.join(TARGET_MODULES)}")
        layer, owner, proj, ab = int(m[1]), m[2], m[3], m[4]
        if proj not in OWNER or OWNER[proj] != owner:
            raise _refuse(lora_name, f"target module {owner}.{proj} ({key!r}) is not supported; an adapter may "
                                     f"target {', '.join(TARGET_MODULES)}")
        if layer >= cfg.num_hidden_layers:
            raise _refuse(lora_name, f"tensor {key!r} is for layer {layer}; the model has {cfg.num_hidden_layers}")
        din, dout = shapes[proj]
        want = (r, din) if ab == "A" else (dout, r)
        if tuple(arr.shape) != want:
            raise _refuse(lora_name, f"tensor {key!r} has shape {tuple(arr.shape)}, expected {want} (r={r}, "
                                     f"{proj} of this model: {din} -> {dout} features)")
        found.setdefault((layer, proj), {})[ab] = np.asarray(arr, np.float32)
    if not found:
        raise _refuse(lora_name, f"{str(weights)!r} holds no LoRA weights")
    modules = {}
    for (layer, proj), ab in sorted(found.items()):
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise _refuse(lora_name, f"layer {layer} {proj} has no {missing} weight")
        modules[(layer, proj)] = (np.ascontiguousarray(ab["A"].T), np.ascontiguousarray(ab["B"].T) * scaling)
    return LoRAWeights(lora_name=lora_name, lora_int_id=lora_int_id, rank=r, scaling=scaling, modules=modules)
