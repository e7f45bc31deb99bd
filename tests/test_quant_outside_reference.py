"""AWQ and GPTQ layouts checked against code that is not ours: compressed-tensors (the vLLM project's library for
quantized checkpoints, pure torch on CPU). Its AutoAWQ converter unpacks AutoAWQ GEMM tensors with AutoAWQ's own
nibble order (`unpack_awq`, `reverse_awq_order`); its `pack_to_int32` packs int4 / int8 values into int32 words along
either axis, which is GPTQ's layout (qweight along the input rows, qzeros along the output columns).

tests/quant_writer.py and the loader were both written from our reading of the formats, so a shared misreading
would pass tests/test_quantization.py; here each side is compared with the outside code instead.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.entrypoints.convert.converters.autoawq import AutoAWQConverter
from flax import nnx
from safetensors.torch import load_file

from qwenjax.layers.quant_linear import dequantize_weight
from qwenjax.models.fusion import FUSED, GATE_UP, QKV, split_columns
from qwenjax.models.loader import load_model_config, load_params
from qwenjax.quantization import QuantConfig
from tests.checkpoints import write_checkpoint
from tests.quant_writer import Scheme, write_quantized


@pytest.fixture(scope="module")
def float_ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("outside") / "float", vocab_size=512, hidden_size=128,
                            intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2, tie=False, seed=23)


def _write(float_ckpt, tmp_path, scheme):
    grids = write_quantized(float_ckpt, tmp_path / "q", tmp_path / "deq", scheme, seed=5)
    return tmp_path / "q", grids


def loaded_weights(qdir) -> dict[str, np.ndarray]:
    """module name -> the float weight [I, O] our loader's parameters dequantize to (fused layers split back)."""
    quant = QuantConfig.from_checkpoint(qdir)
    cfg = load_model_config(qdir)
    model = nnx.merge(*load_params(qdir, cfg, jnp.float32, quant=quant))
    head = cfg.hidden_size // cfg.num_attention_heads
    widths = {QKV: (cfg.num_attention_heads * head, cfg.num_key_value_heads * head, cfg.num_key_value_heads * head),
              GATE_UP: (cfg.intermediate_size, cfg.intermediate_size)}
    out = {}
    for i, layer in enumerate(model.model.layers):
        for owner, name, proj in [("self_attn", QKV, layer.self_attn.qkv_proj), ("self_attn", "o_proj",
                                   layer.self_attn.o_proj), ("mlp", GATE_UP, layer.mlp.gate_up_proj),
                                  ("mlp", "down_proj", layer.mlp.down_proj)]:
            g_idx = proj.g_idx[...] if quant.method == "gptq" else None
            w = np.asarray(dequantize_weight(proj.qweight[...], proj.qzeros[...], proj.scales[...], g_idx,
                                             quant=quant, dtype=jnp.float32))
            if quant.desc_act:  # act-order rows held in group order: row k is the checkpoint's row perm[k]
                w = w[np.argsort(np.asarray(proj.perm[...]))]
            parts = FUSED.get(name, (name,))
            pieces = split_columns(w, widths[name], 1) if name in FUSED else [w]
            for part, piece in zip(parts, pieces):
                out[f"model.layers.{i}.{owner}.{part}"] = np.asarray(piece)
    return out


def test_awq_checkpoint_read_by_autoawqs_unpacking_equals_our_loader(float_ckpt, tmp_path):
    """compressed-tensors converts the AWQ checkpoint to its own packed format (AutoAWQ's unpacking and nibble
    order); decoded with its own unpacker, every layer's integers are the writer's grid and its weights are exactly
    what our loader's parameters dequantize to."""
    scheme = Scheme("awq", group_size=64)
    qdir, grids = _write(float_ckpt, tmp_path, scheme)
    qcfg = json.loads((qdir / "config.json").read_text())["quantization_config"]
    converter = AutoAWQConverter.from_autoawq_config(qcfg)
    theirs = converter.process(dict(load_file(str(qdir / "model.safetensors"))))
    ours = loaded_weights(qdir)
    assert set(grids) == set(ours) and len(grids) == 14
    g = scheme.group_size
    for module, grid in grids.items():
        O, I = (int(x) for x in theirs[f"{module}.weight_shape"])
        # compressed-tensors holds signed values (q - 8) with weights [O, I] packed along I, zeros [O, G] along O
        q = unpack_from_int32(theirs[f"{module}.weight_packed"], 4, torch.Size((O, I))).numpy().astype(np.int64) + 8
        z = unpack_from_int32(theirs[f"{module}.weight_zero_point"], 4, torch.Size((O, I // g)),
                              packed_dim=0).numpy().astype(np.int64) + 8
        s = theirs[f"{module}.weight_scale"].numpy()  # [O, G]
        np.testing.assert_array_equal(q.T, grid.q, err_msg=module)
        np.testing.assert_array_equal(z.T, grid.z, err_msg=module)
        w = ((q.T - np.repeat(z.T, g, axis=0)).astype(np.float32) * np.repeat(s.T, g, axis=0).astype(np.float32))
        np.testing.assert_array_equal(ours[module], w, err_msg=module)


@pytest.mark.parametrize("scheme", [
    Scheme("gptq", bits=4, group_size=32, sym=False, checkpoint_format="gptq_v2"),
    Scheme("gptq", bits=8, group_size=64, sym=True, desc_act=True, checkpoint_format="gptq_v2"),
], ids=lambda s: s.name)
def test_gptq_words_equal_compressed_tensors_packing_and_load_to_its_integers(float_ckpt, tmp_path, scheme):
    """Each layer's integer grid packed by compressed-tensors (qweight [I/pf, O] along the input rows, qzeros
    [G, O/pf] along the output columns; gptq_v2 stores the zero itself) gives the checkpoint's words bit for bit,
    its unpacker reads the checkpoint's words back to the grid, and our loader dequantizes them to the grid's
    weights."""
    qdir, grids = _write(float_ckpt, tmp_path, scheme)
    tensors = load_file(str(qdir / "model.safetensors"))
    ours = loaded_weights(qdir)
    bits, offset = scheme.bits, 1 << (scheme.bits - 1)  # compressed-tensors packs signed values, q - offset
    for module, grid in grids.items():
        qweight, qzeros = tensors[f"{module}.qweight"], tensors[f"{module}.qzeros"]
        signed_q = torch.from_numpy(grid.q - offset).to(torch.int8)
        signed_z = torch.from_numpy(grid.z - offset).to(torch.int8)
        assert torch.equal(pack_to_int32(signed_q, bits, packed_dim=0), qweight), module
        assert torch.equal(pack_to_int32(signed_z, bits, packed_dim=1), qzeros), module
        back = unpack_from_int32(qweight, bits, torch.Size(grid.q.shape), packed_dim=0).numpy()
        np.testing.assert_array_equal(back.astype(np.int64) + offset, grid.q, err_msg=module)
        np.testing.assert_array_equal(ours[module], grid.dequantized(), err_msg=module)
