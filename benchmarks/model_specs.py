"""--model resolved to a config: 'tiny', a config stem from qwenjax/assets/configs or a path, any of them with a
quantized suffix (-awq, -gptq-int4, -gptq-int8), written to a directory the engine loads with random weights."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tempfile
from pathlib import Path

from repo_paths import CONFIG_DIR


@dataclasses.dataclass
class ModelSpec:
    name: str        # short name used in result files (config stem)
    config: dict     # HF config.json contents
    dir: str         # a directory holding config.json (weights are random: load_format="dummy")


def resolve_model(name: str) -> ModelSpec:
    name, cfg = model_config_dict(name)
    d = tempfile.mkdtemp(prefix=f"qwenjax-bench-{name}-")
    (Path(d) / "config.json").write_text(json.dumps(cfg))
    return ModelSpec(name=re.sub(r"[^A-Za-z0-9._-]", "_", name), config=cfg, dir=d)


def model_config_dict(name: str) -> tuple[str, dict]:
    """--model's (result name, HF config dict): 'tiny', a config stem, or a path to a config.json / its directory."""
    if name == "tiny":
        from qwenjax.models.default_model import CONFIG

        return name, dict(CONFIG)
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        path = CONFIG_DIR / f"{name}.json"
    if not path.is_file() and quantized_suffix(name):
        suffix = quantized_suffix(name)
        base, cfg = model_config_dict(name[:-len(suffix)])
        return name, with_quantization(cfg, suffix)
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise SystemExit(f"--model {name!r}: no such config; known: tiny, {', '.join(known)}, or a path; any of "
                         f"them with {', '.join(QUANTIZED_SUFFIXES)} appended for quantized weights")
    return (path.stem if path.name != "config.json" else path.parent.name), json.loads(path.read_text())


# --model NAME-awq / NAME-gptq-int4 / NAME-gptq-int8: NAME's config plus the quantization_config that Qwen's published
# checkpoints of that kind carry (AWQ: AutoAWQ GEMM 4-bit, group 128, zero point; GPTQ: AutoGPTQ v1, group 128,
# desc_act false, sym true). The weights are random packed words (QuantLinear's init), created on the device.
QUANTIZED_SUFFIXES = {
    "-awq": {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm",
             "modules_to_not_convert": None},
    "-gptq-int4": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True,
                   "static_groups": False, "true_sequential": True, "damp_percent": 0.01},
    "-gptq-int8": {"quant_method": "gptq", "bits": 8, "group_size": 128, "desc_act": False, "sym": True,
                   "static_groups": False, "true_sequential": True, "damp_percent": 0.01},
}


def quantized_suffix(name: str) -> str | None:
    return next((s for s in QUANTIZED_SUFFIXES if name.endswith(s) and len(name) > len(s)), None)


def with_quantization(cfg: dict, suffix: str) -> dict:
    """`cfg` with the suffix's quantization_config. Group 128 where it divides every projection's inputs, else the
    largest power of two (>= 16) that does: only the tiny CPU configs need that (hidden 64), and the result records
    it."""
    qc = dict(QUANTIZED_SUFFIXES[suffix])
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    ins = math.gcd(cfg["hidden_size"], cfg["intermediate_size"], heads * head_dim)
    while qc["group_size"] > 16 and ins % qc["group_size"]:
        qc["group_size"] //= 2
    return dict(cfg, quantization_config=qc)


def model_config(spec: ModelSpec):
    from qwenjax.config import ModelConfig

    return ModelConfig.from_dict(spec.config)
