"""Test-side AWQ / GPTQ writer: quantizes a float HF checkpoint into the published layouts, independently of qwenjax.

The packing here is written straight from the format descriptions (issue 5), with loops over bit fields, so that
the library's vectorised unpacking is checked against a second implementation:
  AWQ   qweight int32 [I, O/8]: nibble i of packed column c = output column c*8 + ORDER[i], ORDER = 0,2,4,6,1,3,5,7;
        qzeros int32 [G, O/8] packed the same way; scales fp16 [G, O]; W = (q - z[k // g]) * s[k // g].
  GPTQ  qweight int32 [I/pf, O]: value j of word w = input row w*pf + j; qzeros int32 [G, O/pf] packed along
        outputs, holding zero - 1 ("gptq", v1) or the zero ("gptq_v2"); scales fp16 [G, O]; g_idx int32 [I];
        W = s[g_idx[k]] * (q - z[g_idx[k]]).
Besides the quantized checkpoint it writes the dequantized float checkpoint (same code path, float weights), and
returns the integer grid of every layer so tests can compare exactly.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class Scheme:
    method: str                 # "awq" | "gptq"
    bits: int = 4
    group_size: int = 128       # -1: one group (GPTQ)
    sym: bool = True            # GPTQ only; AWQ is always asymmetric (zero_point)
    desc_act: bool = False      # GPTQ: rows assigned to groups through a shuffled g_idx
    # desc_act: layers that read one input (q/k/v, gate/up) share its row order, as GPTQ's does (the order comes
    # from that input's Hessian); False shuffles every layer on its own, which qwenjax's fused layers refuse.
    shared_act_order: bool = True
    checkpoint_format: str = "gptq"  # GPTQ "gptq" | "gptq_v2"
    legacy_file: bool = False   # write quant_config.json / quantize_config.json instead of quantization_config

    @property
    def name(self) -> str:
        if self.method == "awq":
            return f"awq-g{self.group_size}" + ("-legacy" if self.legacy_file else "")
        return (f"gptq-{self.checkpoint_format}-{self.bits}b-g{self.group_size}-{'sym' if self.sym else 'asym'}"
                + ("-descact" if self.desc_act else "") + ("-own-order" if not self.shared_act_order else "")
                + ("-legacy" if self.legacy_file else ""))

    def config_dict(self) -> dict:
        if self.method == "awq":
            if self.legacy_file:  # older AutoAWQ spelling
                return {"zero_point": True, "q_group_size": self.group_size, "w_bit": self.bits, "version": "GEMM"}
            return {"quant_method": "awq", "bits": self.bits, "group_size": self.group_size, "zero_point": True,
                    "version": "gemm", "modules_to_not_convert": None}
        d = {"bits": self.bits, "group_size": self.group_size, "desc_act": self.desc_act, "sym": self.sym,
             "damp_percent": 0.01, "true_sequential": True, "static_groups": False}
        if self.legacy_file:
            return {**d, "model_name_or_path": None, "model_file_base_name": "model"}
        return {"quant_method": "gptq", **d, "checkpoint_format": self.checkpoint_format}


@dataclasses.dataclass
class Grid:
    """One layer's quantization: W_deq[k, n] = (q[k, n] - z[g_idx[k], n]) * s[g_idx[k], n]."""

    q: np.ndarray       # int64 [I, O]
    z: np.ndarray       # int64 [G, O] true zeros
    s: np.ndarray       # float16 [G, O]
    g_idx: np.ndarray   # int32 [I]

    def dequantized(self) -> np.ndarray:
        return ((self.q - self.z[self.g_idx]).astype(np.float32) * self.s[self.g_idx].astype(np.float32))


def quantize(w: np.ndarray, scheme: Scheme, rng: np.random.Generator, order: np.ndarray | None = None) -> Grid:
    """w [I, O] float -> its grid: round-to-nearest per group (the formats, not GPTQ's error feedback, are tested).
    desc_act: the rows in `order` fill group 0, then group 1, ... (default: a random order)."""
    I, O = w.shape
    maxq = 2 ** scheme.bits - 1
    group = I if scheme.group_size == -1 else scheme.group_size
    G = -(-I // group)
    if not scheme.desc_act:
        order = np.arange(I)
    elif order is None:
        order = rng.permutation(I)
    g_idx = np.empty(I, np.int32)
    g_idx[order] = np.arange(I) // group  # desc_act: the rows of a group are scattered over the matrix
    w = w.astype(np.float64)
    lo = np.stack([w[g_idx == g].min(0) for g in range(G)])
    hi = np.stack([w[g_idx == g].max(0) for g in range(G)])
    if scheme.method == "gptq" and scheme.sym:
        top = np.maximum(np.abs(lo), hi)
        scale = 2 * top / maxq
        zero = np.full((G, O), (maxq + 1) // 2)
    else:
        if scheme.method == "gptq":  # GPTQ's asymmetric range always contains 0
            lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
        scale = (hi - lo) / maxq
        zero = np.round(-lo / np.maximum(scale, 1e-8))
    s = np.maximum(scale, 1e-4).astype(np.float16)
    # v1 stores zero - 1 in `bits` bits, so a zero of 0 cannot be written; AutoGPTQ's v1 has the same limit.
    zmin = 1 if scheme.method == "gptq" and scheme.checkpoint_format == "gptq" else 0
    z = np.clip(zero, zmin, maxq).astype(np.int64)
    s64 = s.astype(np.float64)
    q = np.clip(np.round(w / s64[g_idx] + z[g_idx]), 0, maxq).astype(np.int64)
    return Grid(q=q, z=z, s=s, g_idx=g_idx)


def _to_int32(words: np.ndarray) -> np.ndarray:
    return words.astype(np.uint32).view(np.int32)


def pack_awq(vals: np.ndarray) -> np.ndarray:
    """[R, C] 4-bit values -> int32 [R, C/8]; nibble i of word c holds column c*8 + AWQ_ORDER[i]."""
    R, C = vals.shape
    words = np.zeros((R, C // 8), np.uint64)
    for c in range(C // 8):
        for i, col in enumerate(AWQ_ORDER):
            words[:, c] |= vals[:, c * 8 + col].astype(np.uint64) << np.uint64(4 * i)
    return _to_int32(words)


def pack_rows(vals: np.ndarray, bits: int) -> np.ndarray:
    """[R, C] -> int32 [R/pf, C]; value j of word w is row w*pf + j."""
    pf = 32 // bits
    R, C = vals.shape
    words = np.zeros((R // pf, C), np.uint64)
    for w in range(R // pf):
        for j in range(pf):
            words[w] |= vals[w * pf + j].astype(np.uint64) << np.uint64(bits * j)
    return _to_int32(words)


def pack_cols(vals: np.ndarray, bits: int) -> np.ndarray:
    """[R, C] -> int32 [R, C/pf]; value j of word c is column c*pf + j."""
    return pack_rows(vals.T, bits).T.copy()


def pack_awq_kp(vals: np.ndarray) -> np.ndarray:
    """[I, O] 4-bit values -> the repacked AWQ layout (qwenjax/quantization/repack.py) int32 [I, O/8]: nibble j of
    word (8w + a, b) is row 8w + j, column 8b + a. Written with loops, independently of the library."""
    I, O = vals.shape
    words = np.zeros((I, O // 8), np.uint64)
    for j in range(8):
        for a in range(8):
            words[a::8, :] |= vals[j::8, a::8].astype(np.uint64) << np.uint64(4 * j)
    return _to_int32(words)


def layer_tensors(grid: Grid, scheme: Scheme) -> dict[str, np.ndarray]:
    """The checkpoint tensors of one quantized layer (without bias)."""
    if scheme.method == "awq":
        return {"qweight": pack_awq(grid.q), "qzeros": pack_awq(grid.z), "scales": grid.s}
    stored = grid.z - 1 if scheme.checkpoint_format == "gptq" else grid.z
    return {"qweight": pack_rows(grid.q, scheme.bits), "qzeros": pack_cols(stored, scheme.bits), "scales": grid.s,
            "g_idx": grid.g_idx}


def write_quantized(src: Path, dst: Path, dequant_dst: Path | None, scheme: Scheme, *,
                    seed: int = 0) -> dict[str, Grid]:
    """Quantizes every projection of the float checkpoint `src` into `dst` (and its dequantized twin into
    `dequant_dst`); returns the grid of each layer by HF module name ('model.layers.0.self_attn.q_proj')."""
    rng = np.random.default_rng(seed)
    tensors = load_file(str(src / "model.safetensors"))
    quantized, dequantized, grids = {}, {}, {}
    orders: dict[str, np.ndarray] = {}  # desc_act with shared_act_order: one row order per layer input
    for name, arr in tensors.items():
        module, leaf = name.rsplit(".", 1)
        if leaf == "weight" and module.rsplit(".", 1)[-1] in PROJECTIONS:
            order = None
            if scheme.desc_act and scheme.shared_act_order:
                parent, proj = module.rsplit(".", 1)
                key = parent + ("." + proj if proj in ("o_proj", "down_proj") else "")
                order = orders.setdefault(key, rng.permutation(arr.shape[1]))
            grid = quantize(arr.T, scheme, rng, order)  # torch stores [out, in]
            grids[module] = grid
            for k, v in layer_tensors(grid, scheme).items():
                quantized[f"{module}.{k}"] = v
            dequantized[name] = np.ascontiguousarray(grid.dequantized().T)
        else:
            quantized[name] = dequantized[name] = arr
    with open(src / "config.json") as f:
        config = json.load(f)
    dst.mkdir(parents=True, exist_ok=True)
    save_file(quantized, str(dst / "model.safetensors"), metadata={"format": "pt"})
    qconfig = dict(config)
    if scheme.legacy_file:
        name = "quant_config.json" if scheme.method == "awq" else "quantize_config.json"
        with open(dst / name, "w") as f:
            json.dump(scheme.config_dict(), f, indent=2)
    else:
        qconfig["quantization_config"] = scheme.config_dict()
    with open(dst / "config.json", "w") as f:
        json.dump(qconfig, f, indent=2)
    for extra in ("generation_config.json",):
        if (src / extra).is_file():
            shutil.copy(src / extra, dst / extra)
    if dequant_dst is not None:
        dequant_dst.mkdir(parents=True, exist_ok=True)
        save_file(dequantized, str(dequant_dst / "model.safetensors"), metadata={"format": "pt"})
        shutil.copy(src / "config.json", dequant_dst / "config.json")
        if (src / "generation_config.json").is_file():
            shutil.copy(src / "generation_config.json", dequant_dst / "generation_config.json")
    return grids
