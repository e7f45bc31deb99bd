"""Run in a subprocess with 4 CPU devices: the skinny int4 kernel (Pallas interpret mode) per device under shard_map,
AWQ and GPTQ act-order models on meshes 1, 2 and 4; writes each mesh's logits and the kernel's local products."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def main(out: str, *paths: str) -> None:
    from flax import nnx

    from pallas_kernels import quant_skinny
    from qwenjax.layers import quant_linear as ql
    from qwenjax.layers.attention_metadata import AttentionMetadata
    from qwenjax.models.loader import load_model_config, load_params
    from qwenjax.models.sharding import kv_sharding, make_mesh
    from qwenjax.quantization import QuantConfig
    from qwenjax.worker.kv_cache import allocate

    assert jax.device_count() == 4, jax.devices()
    calls, xla, rows = [], [], [0]  # rows: the step being traced (18: prefill, 1: decode)
    kernel, dequantize = quant_skinny.quant_skinny, ql.dequantize_weight

    def counted(x, qw, *a, **kw):  # traced once per shape: the products each device runs, with their local shapes
        out_dtype = kw.get("out_dtype")
        calls.append([x.shape[0], x.shape[1], a[1].shape[-1], out_dtype and jnp.dtype(out_dtype).name])
        return kernel(x, qw, *a, **kw)

    def counted_xla(*a, **kw):
        xla.append(rows[0])
        return dequantize(*a, **kw)

    def fits_anywhere(m, k, n, dtype, quant, *, group_size=None):  # the GPU's choice, on CPU (interpret mode)
        gs = quant.group_size if group_size is None else group_size
        return 1 <= m <= ql.SKINNY_MAX_ROWS and quant_skinny.supported(m, k, n, fmt=ql.kernel_format(quant),
                                                                        bits=quant.bits, group_size=gs, dtype=dtype)

    quant_skinny.quant_skinny, ql.dequantize_weight, ql.skinny_fits = counted, counted_xla, fits_anywhere
    ids = list(map(int, np.random.default_rng(4).integers(0, 512, 22)))
    decode_from, page, pages = 18, 16, 8
    table = np.random.default_rng(0).permutation(pages).astype(np.int32)[None]
    result = {}
    for path in paths:
        cfg, quant = load_model_config(Path(path)), QuantConfig.from_checkpoint(Path(path))
        for n in (1, 2, 4):
            mesh = make_mesh(n)
            graphdef, state = load_params(Path(path), cfg, jnp.bfloat16, mesh=mesh, quant=quant)
            kv = allocate(cfg, pages, page, jnp.bfloat16, kv_sharding(mesh, cfg))  # no padding at these meshes

            @functools.partial(jax.jit, static_argnames="has_context")
            def step(state, tokens, meta, kv, has_context):
                model = nnx.merge(graphdef, state)
                hidden, kv = model(tokens, meta, kv, has_context=has_context)
                return model.logits(hidden[0]).astype(jnp.float32), kv

            calls.clear(), xla.clear()
            logits = []
            with jax.set_mesh(mesh):
                for start, end in [(0, decode_from)] + [(i, i + 1) for i in range(decode_from, len(ids))]:
                    pos = np.arange(start, end, dtype=np.int32)[None]
                    meta = AttentionMetadata(positions=pos, slot_mapping=table[0][pos // page] * page + pos % page,
                                             block_tables=table, seq_lens=np.array([end], np.int32),
                                             query_lens=np.array([end - start], np.int32))
                    rows[0] = end - start
                    y, kv = step(state, np.asarray(ids[start:end], np.int32)[None], meta, kv, start > 0)
                    logits.append(np.asarray(y))
            result[f"{path}|{n}"] = {"logits": np.concatenate(logits).tolist(), "calls": list(calls),
                                     "xla": list(xla)}
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], *sys.argv[2:])
