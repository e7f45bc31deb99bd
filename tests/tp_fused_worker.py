"""Run in a subprocess with 4 CPU devices: for each checkpoint, logits on meshes 2 and 4 (params and pages sharded),
which projections are fused there, and whether its orbax conversion restores to the same arrays on that mesh."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np


def main(out: str, ids: str, *pairs: str) -> None:
    import jax.numpy as jnp
    from flax import nnx

    from qwenjax.models.convert import restore_params
    from qwenjax.models.loader import load_model_config, load_params
    from qwenjax.models.sharding import make_mesh
    from tests.test_model_vs_hf import _our_logits

    assert jax.device_count() == 4, jax.devices()
    token_ids = json.loads(ids)
    result = {}
    for pair in pairs:  # "safetensors dir|orbax dir"
        path, orbax = map(Path, pair.split("|"))
        cfg = load_model_config(path)
        for n in (2, 4):
            mesh = make_mesh(n)
            _, loaded = load_params(path, cfg, jnp.float32, mesh=mesh)
            _, restored = restore_params(orbax, cfg, jnp.float32, mesh=mesh)
            flat = {".".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(loaded)}
            again = {".".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(restored)}
            result[f"{path}|{n}"] = {
                "logits": _our_logits(path, token_ids, decode_from=len(token_ids) - 6, mesh=mesh).tolist(),
                "layer0": {k[len("model.layers.0."):]: list(a.sharding.spec) for k, a in flat.items()
                           if k.startswith("model.layers.0.")},
                "restored_equal": sorted(flat) == sorted(again) and all(
                    np.array_equal(np.asarray(flat[k]), np.asarray(again[k])) and flat[k].sharding == again[k].sharding
                    for k in flat),
            }
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *sys.argv[3:])
