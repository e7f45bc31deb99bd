"""`qwenjax convert`: a Hugging Face checkpoint -> an orbax-checkpoint directory that restores straight into the
sharded layout (each device reads its own shard; no safetensors parsing or transposes at start-up).

Layout of the output directory: `config.json` (+ tokenizer and generation_config files copied), and `orbax/`, the
NNX parameter state saved with orbax's StandardCheckpointer. `LLM(model=that_dir)` detects `orbax/` and restores.
The saved state keeps every projection separate (q_proj, k_proj, ..., as the Hugging Face checkpoint does), so one
checkpoint serves every mesh: the fused projections' column order depends on the mesh (models/fusion.py), and
restoring fuses the parts on the devices, each device concatenating its own shards.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import time
from pathlib import Path

import jax
from flax import nnx
from jax.sharding import NamedSharding

from qwenjax.config import ModelConfig

ORBAX_DIR = "orbax"
_COPY = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
         "merges.txt", "special_tokens_map.json", "added_tokens.json")


def is_orbax_checkpoint(path: Path) -> bool:
    return (path / ORBAX_DIR).is_dir()


def convert(src: Path, dst: Path, *, dtype: str = "auto") -> float:
    """Writes dst from src; returns the seconds taken."""
    import orbax.checkpoint as ocp

    from qwenjax.config import resolve_dtype
    from qwenjax.models.loader import load_model_config, load_params

    t0 = time.perf_counter()
    cfg = load_model_config(src)
    _, params = load_params(src, cfg, resolve_dtype(dtype, cfg), fuse=False)
    dst.mkdir(parents=True, exist_ok=True)
    for name in _COPY:
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
    if dtype != "auto":  # the restored arrays carry this dtype; config.json says so
        import json

        raw = json.loads((dst / "config.json").read_text())
        raw["torch_dtype"] = str(resolve_dtype(dtype, cfg))
        (dst / "config.json").write_text(json.dumps(raw, indent=2))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save((dst / ORBAX_DIR).absolute(), nnx.to_pure_dict(params), force=True)
    return time.perf_counter() - t0


def restore_params(path: Path, cfg: ModelConfig, dtype, *, mesh) -> tuple[nnx.GraphDef, nnx.State]:
    """Restores the saved state with each array placed in its mesh sharding (read shard by shard), then fuses the
    projections `Fusion.decide` fuses for this mesh, one parameter at a time, on the devices.
    `cfg` is the saved model's; where the mesh does not divide its heads or FFN widths, the model built is
    `mesh_padding.pad_for_mesh(cfg, n)`'s and each such array is zero-padded on the devices after its restore (the
    saved array restores replicated where its real width does not split)."""
    import orbax.checkpoint as ocp

    from qwenjax.models.fusion import Fusion, part_keys
    from qwenjax.models.loader import abstract_model
    from qwenjax.models.mesh_padding import pad_for_mesh
    from qwenjax.models.sharding import param_spec

    n = mesh.shape["tp"]
    real, cfg = cfg, pad_for_mesh(cfg, n)
    graphdef, abstract = nnx.split(abstract_model(cfg, dtype, fusion=Fusion.decide(cfg, n)))
    _, saved = nnx.split(abstract_model(real, dtype, fusion=Fusion.none(n)))  # what convert() writes

    def with_sharding(p, leaf):
        sharding = NamedSharding(mesh, param_spec(_path(p), real, n, leaf.shape))
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    target = jax.tree_util.tree_map_with_path(with_sharding, nnx.to_pure_dict(saved))
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore((path / ORBAX_DIR).absolute(), target)
    arrays = {_path(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(restored)[0]}
    del restored
    if real != cfg:  # every part in the padded model's unfused shape, zeros appended, split as that model splits it
        _, unfused = nnx.split(abstract_model(cfg, dtype, fusion=Fusion.none(n)))
        for key, var in nnx.to_flat_state(unfused):
            if arrays[key].shape != var.shape:
                sharding = NamedSharding(mesh, param_spec(key, cfg, n, var.shape))
                arrays[key] = _pad_on_devices(tuple(var.shape), sharding)(arrays[key])
    values = []
    for key, var in nnx.to_flat_state(abstract):
        if key in arrays:
            value = arrays.pop(key)
        else:  # a fused parameter: each device concatenates its shards of the parts, which are then freed
            sharding = NamedSharding(mesh, param_spec(key, cfg, n, var.shape))
            value = _fuse_on_devices(n, sharding)([arrays.pop(k) for k in part_keys(key)])
        values.append((key, var.replace(value)))
    return graphdef, nnx.from_flat_state(values)


@functools.lru_cache(maxsize=None)
def _pad_on_devices(shape: tuple, sharding):
    """A jitted zero-padding to `shape` (zeros after the end of each axis, models/mesh_padding.py) into `sharding`."""
    import jax.numpy as jnp

    return jax.jit(lambda a: jnp.pad(a, [(0, s - d) for s, d in zip(shape, a.shape)]), out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _fuse_on_devices(shards: int, sharding):
    """A jitted models.fusion.interleave into `sharding`, one per (shards, sharding): every layer's fused parameter
    of a shape reuses one program. Parts split over "tp" give each device its own shards, so it runs locally."""
    from qwenjax.models.fusion import interleave

    return jax.jit(functools.partial(interleave, shards=shards), out_shardings=sharding)


def _path(keys) -> tuple:
    """A pure-dict tree path -> the NNX parameter path (layer indices as ints)."""
    path = tuple(k.key if hasattr(k, "key") else k.idx if hasattr(k, "idx") else k for k in keys)
    return tuple(int(x) if isinstance(x, str) and x.isdigit() else x for x in path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="qwenjax convert", description=__doc__)
    ap.add_argument("src", help="Hugging Face checkpoint directory")
    ap.add_argument("dst", help="output directory")
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args(argv)
    secs = convert(Path(args.src), Path(args.dst), dtype=args.dtype)
    print(f"wrote {args.dst} in {secs:.1f} s")
