"""Checkpoint loading: a local HF directory (or a hub id already in the huggingface_hub cache) -> model parameters.

Hugging Face names map onto the NNX module tree by splitting on dots; Linear weights are stored [out, in] by torch
and [in, out] by Flax, so they are transposed, and an Embed's `weight` is its `embedding`. The parts of a fused
projection (q_proj/k_proj/v_proj -> qkv_proj, gate_proj/up_proj -> gate_up_proj, models/fusion.py) are gathered
from the checkpoint and placed as one parameter, its columns in per-shard order (fusion.FusedColumns).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from pallas_kernels import gptq_layout as gptq
from qwenjax.config import ModelConfig
from qwenjax.layers.fp8_kv import KVScale
from qwenjax.models.fusion import FUSED, Fusion, fused_host_array, fused_key, part_keys, part_shape
from qwenjax.models.mesh_padding import ZeroPadded, pad_for_mesh, padded_array
from qwenjax.models.qwen2 import Qwen2ForCausalLM
from qwenjax.models.qwen2_moe import Qwen2MoeForCausalLM
from qwenjax.quantization import act_order, repack
from qwenjax.quantization.config import QuantConfig
from qwenjax.quantization.fp8_load import Fp8Loading, is_fp8

logger = logging.getLogger("qwenjax")


class ModelNotFoundError(FileNotFoundError):
    pass


def resolve_model_path(model: str, *, revision: str | None = None, download_dir: str | None = None) -> Path:
    """A local directory, or a hub id resolved offline through the huggingface_hub cache (`download_dir`, else
    HF_HOME's), at `revision` (a branch, tag or commit of the cache; default: main). Nothing is downloaded."""
    path = Path(os.path.expanduser(model))
    if path.is_file() and path.name.endswith(".json"):
        raise ModelNotFoundError(f"model {model!r} is a file; pass the checkpoint directory that holds config.json")
    if path.is_dir():
        if revision is not None:
            raise ValueError(f"revision={revision!r} picks a revision of a hub id in the Hugging Face cache, but model "
                             f"{model!r} is a local directory, which has no revisions: drop the revision, or pass "
                             f"the hub id")
        if download_dir is not None:
            logger.warning("download_dir=%r is not used: model %r is a local directory", download_dir, model)
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model directory {str(path)!r} has no config.json")
        return path
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ModelNotFoundError(f"model {model!r} is not a directory with a Hugging Face checkpoint "
                                 f"(config.json and *.safetensors), nor a hub id like 'Qwen/Qwen2-7B-Instruct'")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, revision=revision, cache_dir=download_dir, local_files_only=True))
    except Exception as e:  # the hub's own errors differ across versions; ours says what to do
        cache = download_dir or os.environ.get("HF_HOME", "~/.cache/huggingface")
        at = f" at revision {revision!r}" if revision is not None else ""
        flags = (f" --revision {revision}" if revision is not None else "") + \
            (f" --cache-dir {download_dir}" if download_dir is not None else "")
        raise ModelNotFoundError(
            f"model {model!r}{at} is not available offline: it is not a local directory and not in the Hugging Face "
            f"cache ({cache}). Download it first (`hf download {model}{flags}`) or pass a local "
            f"checkpoint path. ({type(e).__name__})") from None


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [path / n for n in names]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(path.glob("*.safetensors"))
    if not found:
        raise ModelNotFoundError(f"no *.safetensors weights in {str(path)!r}")
    return found


def hf_name_to_path(name: str) -> tuple[tuple, bool]:
    """'model.layers.3.self_attn.q_proj.weight' -> (('model','layers',3,'self_attn','q_proj','kernel'), transpose).

    Quantized tensors (`qweight`, `qzeros`, `scales`, `g_idx`) keep their names and layouts: QuantLinear holds them
    exactly as the checkpoint stores them, never transposed.
    """
    parts: list = [int(p) if p.isdigit() else p for p in name.split(".")]
    leaf = parts[-1]
    if parts[-2] == "embed_tokens":
        return tuple(parts[:-1]) + ("embedding",), False
    if leaf == "weight" and (parts[-2].endswith("_proj") or parts[-2] in ("lm_head", "gate", "shared_expert_gate")):
        return tuple(parts[:-1]) + ("kernel",), True
    return tuple(parts), False


def hf_expert_name(name: str) -> tuple[tuple, int] | None:
    """'model.layers.3.mlp.experts.7.up_proj.weight' -> (('model','layers',3,'mlp','experts','up_proj'), 7): the
    stacked [E, ...] array this expert's (transposed) weight is row 7 of; None for any other tensor."""
    parts: list = [int(p) if p.isdigit() else p for p in name.split(".")]
    if len(parts) >= 4 and parts[-4] == "experts" and isinstance(parts[-3], int) and parts[-1] == "weight":
        return tuple(parts[:-3]) + (parts[-2],), parts[-3]
    return None


# A layer's fp8 KV-cache scale tensors, as spelled after `...self_attn.` (vLLM's maybe_remap_kv_scale_name):
# the standard k_scale / v_scale, ModelOpt's k_proj.k_scale / v_proj.v_scale, compressed-tensors'
# k_proj.output_scale / v_proj.output_scale, and the deprecated single kv_scale, which sets both.
_KV_SCALE_NAMES = {("k_scale",): ("k_scale",), ("v_scale",): ("v_scale",),
                   ("k_proj", "k_scale"): ("k_scale",), ("v_proj", "v_scale"): ("v_scale",),
                   ("k_proj", "output_scale"): ("k_scale",), ("v_proj", "output_scale"): ("v_scale",),
                   ("kv_scale",): ("k_scale", "v_scale")}


def hf_kv_scale_paths(name: str) -> tuple[tuple, ...] | None:
    """'model.layers.3.self_attn.k_scale' -> (('model','layers',3,'self_attn','k_scale'),): the KVScale variables
    a checkpoint's KV-cache scale sets; None for any other tensor."""
    parts: list = [int(p) if p.isdigit() else p for p in name.split(".")]
    if "self_attn" not in parts:
        return None
    at = parts.index("self_attn") + 1
    leaves = _KV_SCALE_NAMES.get(tuple(parts[at:]))
    return None if leaves is None else tuple(tuple(parts[:at]) + (leaf,) for leaf in leaves)


def kv_scale_value(name: str, arr: np.ndarray) -> np.float32:
    """A checkpoint's KV-cache scale as a float32 scalar; per-tensor (one value) and positive, or an error."""
    if arr.size != 1:
        raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(arr.shape)}; a KV-cache scale must be one "
                         f"per-tensor value (shape [] or [1]): per-head or per-channel KV scales are not supported")
    value = np.float32(np.asarray(arr, np.float32).reshape(()))
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"checkpoint tensor {name!r} is {value}; a KV-cache scale must be positive and finite")
    return value


def replicated_scalar(value: np.float32, mesh) -> jax.Array:
    return jax.device_put(np.asarray(value, np.float32), NamedSharding(mesh, PartitionSpec()))


def model_class(cfg: ModelConfig):
    return Qwen2MoeForCausalLM if cfg.architecture == "Qwen2MoeForCausalLM" else Qwen2ForCausalLM


def abstract_model(cfg: ModelConfig, dtype, quant: QuantConfig | None = None,
                   fusion: Fusion = Fusion()) -> Qwen2ForCausalLM:
    cls = model_class(cfg)
    return nnx.eval_shape(lambda: cls(cfg, dtype=dtype, rngs=nnx.Rngs(0), quant=quant, fusion=fusion))


def load_params(path: Path, cfg: ModelConfig, dtype, *, mesh=None, quant: QuantConfig | None = None,
                fuse: bool = True) -> tuple[nnx.GraphDef, nnx.State]:
    """Reads every tensor into its place on the mesh; raises if any parameter is missing or has the wrong shape.

    Each device receives only its shard: tensors are memory-mapped and every shard is sliced (and cast) from the
    map on its own, so no full host copy of the model is made.
    With `quant` (QuantConfig.from_checkpoint(path)), the projections' packed int32 arrays load as int32, unchanged;
    float tensors (scales included) are cast to `dtype`.
    fp8 KV-cache scales (`self_attn.k_scale` / `v_scale` and older spellings, see `hf_kv_scale_paths`) load into
    each layer's KVScale variables when present, 1.0 otherwise; only fp8_e4m3 KV pages use them.
    Projections are fused as `Fusion.decide` says for this mesh; `fuse=False` keeps every projection separate (the
    layout convert.py saves). A GPTQ act-order checkpoint whose fused parts have different g_idx raises ValueError.
    `cfg` is the checkpoint's config; the model built is `mesh_padding.pad_for_mesh(cfg, n, quant)`'s, its heads and
    FFN widths zero-padded where the mesh does not divide them.
    FP8 (`quant.method == "fp8"`): the projections' tensors go through quantization/fp8_load.py (scales into
    Fp8Linear's layout, static input scales, float weights quantized on the devices when the checkpoint is float).
    """
    from qwenjax.models.sharding import make_mesh, param_spec

    mesh = mesh or make_mesh(1)
    n = mesh.shape["tp"]
    real, cfg = cfg, pad_for_mesh(cfg, n, quant)
    fusion = Fusion.decide(cfg, n, quant) if fuse else Fusion.none(n)
    model = abstract_model(cfg, dtype, quant, fusion)
    graphdef, abstract = nnx.split(model)
    model_wanted = {p: v for p, v in nnx.to_flat_state(abstract)}
    fp8 = Fp8Loading(quant) if quant is not None and quant.method == "fp8" else None
    wanted = fp8.loading_view(model_wanted) if fp8 else model_wanted  # FP8 weights read as [I, O] kernels
    loaded: dict[tuple, jax.Array] = {}
    experts: dict[tuple, dict[int, np.ndarray]] = {}   # stacked key -> expert id -> [in, out] (a memmap view)
    # fused key -> part index -> the part (a memmap view) until every part has been read: parts may sit in different
    # files, and a view holds no host memory of its own.
    pending: dict[tuple, dict[int, np.ndarray]] = {}
    for file in safetensors_files(path):
        for name, arr in SafetensorsFile(file).items():
            if name.endswith("rotary_emb.inv_freq"):
                continue
            scale_paths = hf_kv_scale_paths(name)
            if scale_paths is not None and all(k in wanted for k in scale_paths):
                value = replicated_scalar(kv_scale_value(name, arr), mesh)
                for k in scale_paths:
                    loaded[k] = value
                continue
            if cfg.num_experts and not cfg.shared_expert_intermediate_size and ".shared_expert" in name:
                continue  # zero-width shared expert: HF stores [0, D] tensors and a gate that scales zero
            expert = hf_expert_name(name)
            if expert is not None and expert[0] in wanted:
                key, e = expert
                want = tuple(wanted[key].shape[1:])
                if arr.ndim != 2 or not 0 <= e < wanted[key].shape[0]:
                    raise ValueError(f"checkpoint tensor {name!r} has shape {arr.shape}, the model expects "
                                     f"{want[::-1]} for each of {wanted[key].shape[0]} experts")
                experts.setdefault(key, {})[e] = padded_array(name, arr.T, want, key, real, cfg)  # raises if wrong
                continue
            key, transpose = hf_name_to_path(name)
            if fp8 is not None:
                key = fp8.param_key(name, key)
                if key[-1] == "input_scale":  # one scale per Fp8Linear, the max over a fused layer's parts
                    fused = fused_key(key) if key not in wanted else None
                    target = fused[0] if fused is not None else key
                    fp8.add_input_scale(target if target in wanted else None, name, arr,
                                        len(FUSED[target[-2]]) if fused is not None else 1)
                    continue
            elif is_fp8(arr):
                raise ValueError(f"checkpoint tensor {name!r} is {arr.dtype}; float8 weights load only with an fp8 "
                                 f"quantization_config in config.json (quant_method 'fp8')")
            part_path, part = key, None
            fused = fused_key(key) if key not in wanted else None
            if fused is not None and fused[0] in wanted:
                key, part = fused
            if key not in wanted:
                if name == "lm_head.weight" and cfg.tie_word_embeddings:
                    continue
                if quant is None and name.endswith((".qweight", ".weight_scale", ".weight_scale_inv", ".input_scale")):
                    raise ValueError(f"checkpoint {str(path)!r} is quantized (it holds {name!r}); load it with "
                                     f"quant=QuantConfig.from_checkpoint(path)")
                raise ValueError(f"checkpoint tensor {name!r} has no place in {cfg.architecture}"
                                 + (f" quantized with {quant.method}" if quant else ""))
            wants_int = np.issubdtype(wanted[key].dtype, np.integer)
            if wants_int != np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f"checkpoint tensor {name!r} is {arr.dtype}, the model expects "
                                 f"{'an integer (packed)' if wants_int else 'a float'} tensor")
            if transpose:
                arr = arr.T
            shape = tuple(wanted[key].shape)
            if part is not None:
                shape = part_shape(key, shape, _submodule(model, key[:-2]), part)
            if fp8 is not None:
                arr = fp8.host_array(name, key[-1], arr, shape, wanted[key].dtype)
            arr = padded_array(name, arr, shape, part_path, real, cfg)  # zeros where padded for the mesh, else arr
            if key[-1] == "g_idx" and isinstance(arr, ZeroPadded):  # padded rows (x is 0 there) in padded groups,
                arr = act_order.padded_g_idx(arr.arr, shape[0], quant.group_size)  # so act-order sorts stay whole
            if arr.shape != shape:
                raise ValueError(f"checkpoint tensor {name!r} has shape {arr.shape}, the model expects {shape}")
            if part is not None:
                parts = pending.setdefault(key, {})
                parts[part] = arr
                if len(parts) < len(FUSED[key[-2]]):
                    continue
                arr = fused_host_array(key, [parts[i] for i in range(len(parts))], n, quant)
                del pending[key]
            loaded[key] = place(arr, NamedSharding(mesh, param_spec(key, cfg, n, wanted[key].shape)),
                                fp8.place_dtype(key, wanted[key].dtype, dtype) if fp8 else wanted[key].dtype)
    for key, per_expert in experts.items():
        if len(per_expert) != wanted[key].shape[0]:
            absent = sorted(set(range(wanted[key].shape[0])) - set(per_expert))
            raise ValueError(f"checkpoint {str(path)!r} lacks experts {absent[:5]} of {'.'.join(map(str, key))}")
        loaded[key] = place(StackedExperts(per_expert), NamedSharding(mesh, param_spec(key, cfg, n, wanted[key].shape)),
                            wanted[key].dtype)
    if quant is not None and not quant.desc_act:  # g_idx is implied (k // group_size); some checkpoints omit it
        for k in wanted:
            if k[-1] == "g_idx" and k not in loaded:
                loaded[k] = place(gptq.default_g_idx(wanted[k].shape[0], quant.group_size),
                                  NamedSharding(mesh, param_spec(k, cfg, n, wanted[k].shape)), np.int32)
    if fp8 is not None:
        loaded = fp8.finish(loaded, wanted, lambda k: NamedSharding(mesh, param_spec(k, cfg, n, wanted[k].shape)))
    loaded = repack.repack_loaded(loaded, quant)  # AWQ words -> the decode kernel's layout, same shapes
    loaded = act_order.act_order_loaded(loaded, wanted, quant, place=lambda a, k: place(  # GPTQ act-order rows ->
        a, NamedSharding(mesh, param_spec(k, cfg, n, a.shape)), a.dtype))                 # group order, plus perm
    for k in wanted:  # no KV-cache scales in the checkpoint: fp8 pages hold the values themselves
        if isinstance(wanted[k], KVScale) and k not in loaded:
            loaded[k] = replicated_scalar(np.float32(1.0), mesh)
    missing = [".".join(map(str, k)) for k in wanted if k not in loaded and k not in pending and k[-1] != "perm"]
    missing += [".".join(map(str, p)) for k, parts in pending.items() if k not in loaded
                for i, p in enumerate(part_keys(k)) if i not in parts]   # a fused parameter's absent parts
    if missing:
        raise ValueError(f"checkpoint {str(path)!r} lacks {len(missing)} parameters, e.g. {missing[:3]}")
    if fp8 is not None:  # FP8 kernels [I, O] -> Fp8Linear's weight [O, I]
        loaded = fp8.to_model_layout(loaded, wanted, lambda k: NamedSharding(
            mesh, param_spec(k, cfg, n, model_wanted[k].shape)))
    state = nnx.from_flat_state([(k, model_wanted[k].replace(loaded[k])) for k in model_wanted])
    return graphdef, state


def _submodule(model, path: tuple):
    for p in path:
        model = model[p] if isinstance(p, int) else getattr(model, p)
    return model


def place(arr: np.ndarray, sharding, dtype) -> jax.Array:
    """A (memory-mapped) host array onto the devices of `sharding`, each device reading only its own slice."""
    dtype = np.dtype(dtype)
    return jax.make_array_from_callback(arr.shape, sharding,
                                        lambda index: np.ascontiguousarray(arr[index]).astype(dtype, copy=False))


class StackedExperts:
    """E per-expert [in, out] arrays seen as one [E, in, out] array; indexing reads only the experts and the slice
    asked for, so `place` gives each device its shard without stacking the whole layer on the host."""

    def __init__(self, per_expert: dict[int, np.ndarray]):
        self.parts = [per_expert[e] for e in range(len(per_expert))]
        self.shape = (len(self.parts),) + self.parts[0].shape
        self.dtype = self.parts[0].dtype

    def __getitem__(self, index):
        index = tuple(index) + (slice(None),) * (3 - len(tuple(index)))
        rows = range(*index[0].indices(self.shape[0]))
        return np.stack([self.parts[e][index[1:]] for e in rows])


class SafetensorsFile:
    """A memory-mapped safetensors file: tensors come out as numpy views (bfloat16 through ml_dtypes), no copy."""

    _DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
               "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
               "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            self.header = json.loads(f.read(n))
        self.header.pop("__metadata__", None)
        self._data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)

    def keys(self) -> list[str]:
        return list(self.header)

    def get(self, name: str) -> np.ndarray:
        info = self.header[name]
        start, end = info["data_offsets"]
        dtype = np.dtype(self._DTYPES[info["dtype"]])
        return self._data[start:end].view(dtype).reshape(info["shape"])

    def items(self):
        for name in self.keys():
            yield name, self.get(name)


def load_model_config(path: Path, overrides: dict | None = None) -> ModelConfig:
    """config.json, with `overrides` (EngineArgs.hf_overrides) replacing its top-level keys first."""
    if not overrides:
        return ModelConfig.from_file(str(path / "config.json"))
    with open(path / "config.json") as f:
        return ModelConfig.from_dict({**json.load(f), **overrides})
