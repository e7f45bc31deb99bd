"""AWQ / GPTQ checkpoints: config parsing, the packed layouts, packed parameters, and logits and greedy tokens equal to
the dequantized float model's (a float checkpoint holding exactly the dequantized weights, run through the same code).
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from pallas_kernels import awq_layout as awq, gptq_layout as gptq
from qwenjax import LLM, SamplingParams
from qwenjax.layers.attention_metadata import AttentionMetadata
from qwenjax.layers.quant_linear import QuantLinear, dequantize_weight
from qwenjax.models.fusion import FUSED, GATE_UP, QKV, FusedColumns, split_columns
from qwenjax.models.loader import load_model_config, load_params
from qwenjax.quantization import QuantConfig, act_order, repack, resolve_quant_config
from qwenjax.worker.kv_cache import allocate
from tests.checkpoints import write_checkpoint
from tests.conftest import SMALL_ENGINE
from tests.quant_writer import Scheme, pack_rows, write_quantized

SCHEMES = [
    Scheme("awq", group_size=128),
    Scheme("awq", group_size=64),
    Scheme("gptq", bits=4, group_size=128, sym=True, checkpoint_format="gptq"),
    Scheme("gptq", bits=4, group_size=32, sym=False, checkpoint_format="gptq_v2"),
    Scheme("gptq", bits=4, group_size=32, sym=True, desc_act=True, checkpoint_format="gptq"),
    Scheme("gptq", bits=4, group_size=96, sym=False, checkpoint_format="gptq"),  # ragged last group
    Scheme("gptq", bits=8, group_size=-1, sym=False, checkpoint_format="gptq"),
    Scheme("gptq", bits=8, group_size=64, sym=True, desc_act=True, checkpoint_format="gptq_v2"),
]
ATOL = 2e-4  # float32 end to end, the same weights: only summation order differs


@pytest.fixture(scope="module")
def float_ckpt(tmp_path_factory):
    # Every projection's input width (128, 256) is a multiple of every group size used above except 96.
    return write_checkpoint(tmp_path_factory.mktemp("quant") / "float", vocab_size=512, hidden_size=128,
                            intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2, tie=False, seed=21)


@pytest.fixture(scope="module")
def quantized(float_ckpt, tmp_path_factory):
    """scheme -> (quantized dir, dequantized float dir, grids), written on first use."""
    made = {}

    def get(scheme: Scheme):
        if scheme not in made:
            root = tmp_path_factory.mktemp(scheme.name)
            grids = write_quantized(float_ckpt, root / "q", root / "deq", scheme, seed=len(made))
            made[scheme] = (root / "q", root / "deq", grids)
        return made[scheme]

    return get


def _logits(path, ids, quant, *, decode_from: int, dtype=jnp.float32):
    """Logits at every position through the paged cache: one prefill, then one token per decode step."""
    cfg = load_model_config(path)
    model = nnx.merge(*load_params(path, cfg, dtype, quant=quant))
    page, pages = 16, 8
    kv = allocate(cfg, pages, page, dtype)
    table = np.random.default_rng(0).permutation(pages).astype(np.int32)[None]
    out = []
    for start, end in [(0, decode_from)] + [(i, i + 1) for i in range(decode_from, len(ids))]:
        pos = np.arange(start, end, dtype=np.int32)[None]
        meta = AttentionMetadata(positions=pos, slot_mapping=table[0][pos // page] * page + pos % page,
                                 block_tables=table, seq_lens=np.array([end], np.int32),
                                 query_lens=np.array([end - start], np.int32))
        hidden, kv = model(np.asarray(ids[start:end], np.int32)[None], meta, kv, has_context=start > 0)
        out.append(np.asarray(model.logits(hidden[0])))
    return np.concatenate(out)


# ------------------------------------------------------------------ config


def test_config_spellings():
    awq_new = QuantConfig.from_dict({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True,
                                     "version": "gemm", "modules_to_not_convert": None})
    awq_old = QuantConfig.from_dict({"zero_point": True, "q_group_size": 128, "w_bit": 4, "version": "GEMM"},
                                    default_method="awq")
    assert awq_new == awq_old == QuantConfig("awq", 4, 128, checkpoint_format="gemm")
    g = QuantConfig.from_dict({"quant_method": "gptq", "bits": 8, "group_size": -1, "desc_act": True, "sym": False,
                               "checkpoint_format": "gptq_v2"})
    assert (g.bits, g.group_size, g.desc_act, g.sym, g.checkpoint_format, g.pack_factor) == \
        (8, -1, True, False, "gptq_v2", 4)
    assert QuantConfig.from_dict({"bits": 4, "group_size": 128}, default_method="gptq").checkpoint_format == "gptq"
    assert hash(g) == hash(QuantConfig.from_dict(dict(quant_method="gptq", bits=8, group_size=-1, desc_act=True,
                                                      sym=False, checkpoint_format="gptq_v2")))


@pytest.mark.parametrize("d, err, words", [
    ({"quant_method": "gptq", "bits": 3, "group_size": 128}, NotImplementedError, ["bits=3", "(4, 8)"]),
    ({"quant_method": "awq", "bits": 8, "group_size": 128}, NotImplementedError, ["bits=8", "(4,)"]),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, NotImplementedError,
     ["'gemv'", "'gemm'"]),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": False}, NotImplementedError,
     ["zero_point"]),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "modules_to_not_convert": ["mlp"]},
     NotImplementedError, ["modules_to_not_convert"]),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"}, NotImplementedError,
     ["'marlin'", "'gptq', 'gptq_v2'"]),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "is_marlin_format": True}, NotImplementedError,
     ["is_marlin_format"]),
    ({"quant_method": "gptq", "bits": 4, "group_size": 0}, ValueError, ["group_size", "-1", "got 0"]),
    ({"quant_method": "bitsandbytes", "bits": 8}, NotImplementedError, ["'bitsandbytes'", "'awq', 'gptq', 'fp8'"]),
    ({"quant_method": "gptq", "group_size": 128}, ValueError, ["bits"]),
    ({"quant_method": "gptq", "bits": "4", "group_size": 128}, ValueError, ["bits must be an integer"]),
])
def test_config_errors_name_the_field(d, err, words):
    with pytest.raises(err) as e:
        QuantConfig.from_dict(d)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


# ------------------------------------------------------------------ bit layouts


def test_awq_nibble_order():
    # Nibble i holds the value i: output column c*8 + order[i] must read i.
    word = sum(i << (4 * i) for i in range(8))
    packed = np.array([[word, word]], np.uint32).view(np.int32)
    expect = np.array([0, 4, 1, 5, 2, 6, 3, 7] * 2)
    np.testing.assert_array_equal(awq.unpack(packed), [expect])
    np.testing.assert_array_equal(np.asarray(awq.unpack(jnp.asarray(packed))), [expect])


def test_gptq_packing_and_v1_zero_offset():
    word = np.array(0x76543210, np.uint32).view(np.int32)
    q = gptq.unpack_qweight(np.full((1, 3), word, np.int32), 4)  # value j of a word is input row j
    np.testing.assert_array_equal(q, np.repeat(np.arange(8)[:, None], 3, axis=1))
    sym = np.array([[0x77777777]], np.uint32).view(np.int32)
    np.testing.assert_array_equal(gptq.unpack_qzeros(sym, 4, "gptq"), np.full((1, 8), 8))  # v1 stores zero - 1
    np.testing.assert_array_equal(gptq.unpack_qzeros(sym, 4, "gptq_v2"), np.full((1, 8), 7))
    sym8 = np.array([[0x7F7F7F7F]], np.uint32).view(np.int32)
    np.testing.assert_array_equal(np.asarray(gptq.unpack_qzeros(jnp.asarray(sym8), 8, "gptq")), np.full((1, 4), 128))


def test_awq_repack_is_exact_and_shard_local():
    rng = np.random.default_rng(11)
    I, O, g = 64, 48, 32
    qweight = rng.integers(-2**31, 2**31, (I, O // 8), dtype=np.int64).astype(np.int32)
    qzeros = rng.integers(-2**31, 2**31, (I // g, O // 8), dtype=np.int64).astype(np.int32)
    scales = rng.uniform(0.5, 1.5, (I // g, O)).astype(np.float32)
    kp, zn = repack.awq_to_kpacked(qweight), repack.awq_zeros_natural(qzeros)
    assert kp.shape == qweight.shape and kp.dtype == np.int32 and zn.shape == qzeros.shape
    want = awq.dequantize(qweight, qzeros, scales, group_size=g)
    np.testing.assert_array_equal(awq.dequantize_kpacked(kp, zn, scales, group_size=g), want)
    np.testing.assert_array_equal(awq.unpack_kpacked(kp), awq.unpack(qweight))
    # The device (jnp) repack gives the same words.
    np.testing.assert_array_equal(np.asarray(repack.awq_to_kpacked(jnp.asarray(qweight))), kp)
    np.testing.assert_array_equal(np.asarray(repack.awq_zeros_natural(jnp.asarray(qzeros))), zn)
    # Tensor-parallel shards (rows of o/down, packed columns of q/k/v/gate/up) repack on their own to the same words.
    np.testing.assert_array_equal(repack.awq_to_kpacked(qweight[16:40]), kp[16:40])
    np.testing.assert_array_equal(repack.awq_to_kpacked(qweight[:, 2:5]), kp[:, 2:5])
    np.testing.assert_array_equal(repack.awq_zeros_natural(qzeros[:, 2:5]), zn[:, 2:5])


def test_act_order_rows_sorted_into_group_order():
    """An act-order layer's rows in group order (quantization/act_order.py): the writer's packed words of the
    sorted rows, on host and device, and a g_idx that GPTQ never writes (a group of 17 rows) refused by name."""
    rng = np.random.default_rng(7)
    I, O, g = 64, 16, 16
    g_idx = (np.arange(I) // g)[rng.permutation(I)].astype(np.int32)
    q = rng.integers(0, 16, (I, O))
    perm = act_order.group_order(g_idx, g)
    assert perm.dtype == np.int32 and (g_idx[perm] == np.arange(I) // g).all()
    assert (np.diff(perm[g_idx[perm] == 1]) > 0).all()  # stable: a group's rows keep their order
    want = pack_rows(q[perm], 4)
    np.testing.assert_array_equal(act_order.permute_qweight(pack_rows(q, 4), perm, 4), want)
    np.testing.assert_array_equal(np.asarray(act_order.permute_qweight(jnp.asarray(pack_rows(q, 4)),
                                                                       jnp.asarray(perm), 4)), want)
    np.testing.assert_array_equal(act_order.padded_g_idx(g_idx, 96, g)[I:], [4] * 16 + [5] * 16)
    bad = g_idx.copy()
    bad[np.flatnonzero(bad == 2)[0]] = 1
    with pytest.raises(ValueError, match=r"g_idx of down_proj \(64 rows, group_size 16\).*row 32 is in group 1, "
                                         r"expected 2"):
        act_order.group_order(bad, g, name="down_proj")


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_dequantized_weights_equal_grid(scheme, quantized):
    qdir, _, grids = quantized(scheme)
    quant = QuantConfig.from_checkpoint(qdir)
    tensors = load_file(str(qdir / "model.safetensors"))
    if scheme.method == "gptq" and scheme.sym and scheme.checkpoint_format == "gptq" and scheme.bits == 4:
        assert (tensors["model.layers.0.mlp.up_proj.qzeros"].view(np.uint32) == 0x77777777).all()
    for module, grid in grids.items():
        t = {k: tensors[f"{module}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx") if f"{module}.{k}" in
             tensors}
        want = grid.dequantized()
        g_idx = t.get("g_idx")
        if scheme.method == "awq":  # QuantLinear holds AWQ repacked (the loader does this on the device)
            t["qweight"], t["qzeros"] = repack.awq_to_kpacked(t["qweight"]), repack.awq_zeros_natural(t["qzeros"])
        host = dequantize_weight(t["qweight"], t["qzeros"], t["scales"], g_idx, quant=quant, dtype=np.float32)
        dev = dequantize_weight(*(jnp.asarray(t[k]) for k in ("qweight", "qzeros", "scales")),
                                None if g_idx is None else jnp.asarray(g_idx), quant=quant, dtype=jnp.float32)
        np.testing.assert_array_equal(host, want, err_msg=module)
        np.testing.assert_array_equal(np.asarray(dev), want, err_msg=module)


# ------------------------------------------------------------------ the model


@pytest.mark.parametrize("scheme", [SCHEMES[1], SCHEMES[4]], ids=lambda s: s.name)
def test_params_hold_packed_int32(scheme, quantized):
    qdir, _, grids = quantized(scheme)
    quant = QuantConfig.from_checkpoint(qdir)
    cfg = load_model_config(qdir)
    graphdef, params = load_params(qdir, cfg, jnp.float32, quant=quant)
    model = nnx.merge(graphdef, params)
    tensors = load_file(str(qdir / "model.safetensors"))
    layer = model.model.layers[1]
    # One device: a fused layer's arrays are its parts' side by side along their last axis (models/fusion.py); the
    # shared input's g_idx is the parts' own.
    for name, proj, parts in [("self_attn", layer.self_attn.qkv_proj, FUSED[QKV]),
                              ("mlp", layer.mlp.gate_up_proj, FUSED[GATE_UP]),
                              ("mlp", layer.mlp.down_proj, ("down_proj",))]:
        assert isinstance(proj, QuantLinear) and not hasattr(proj, "kernel")
        # act-order: the rows sorted into group order at load (stable, by the checkpoint's g_idx), kept in `perm`
        g_ckpt = tensors[f"model.layers.1.{name}.{parts[0]}.g_idx"] if scheme.desc_act else None
        order = np.argsort(g_ckpt, kind="stable") if scheme.desc_act else None
        if scheme.desc_act:
            np.testing.assert_array_equal(np.asarray(proj.perm[...]), order)
            assert proj.perm[...].dtype == jnp.int32
        for leaf in ("qweight", "qzeros") + (("g_idx",) if scheme.method == "gptq" else ()):
            arr = getattr(proj, leaf)[...]
            assert arr.dtype == jnp.int32, (name, leaf, arr.dtype)
            want = [tensors[f"model.layers.1.{name}.{p}.{leaf}"] for p in parts]
            want = want[0] if leaf == "g_idx" else np.concatenate(want, axis=-1)
            if scheme.method == "awq":  # repacked at load within 8 x 8 blocks, same shape (repack.py)
                want = {"qweight": repack.awq_to_kpacked, "qzeros": repack.awq_zeros_natural}[leaf](want)
            if scheme.desc_act and leaf == "g_idx":
                assert (np.diff(want[order]) >= 0).all()
                want = np.arange(want.shape[0]) // scheme.group_size  # the natural groups, once sorted
            if scheme.desc_act and leaf == "qweight":  # the writer's grid and packing, rows sorted
                q = np.concatenate([grids[f"model.layers.1.{name}.{p}"].q for p in parts], axis=1)
                want = pack_rows(q[order], scheme.bits)
            np.testing.assert_array_equal(np.asarray(arr), want)
        assert proj.scales[...].dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(proj.scales[...]), np.concatenate(
            [tensors[f"model.layers.1.{name}.{p}.scales"] for p in parts], axis=-1))
    # q/k/v biases are kept (fused like the weights); o/gate/up/down have none; embeddings and lm_head stay float.
    np.testing.assert_array_equal(np.asarray(layer.self_attn.qkv_proj.bias[...]), np.concatenate(
        [tensors[f"model.layers.1.self_attn.{p}.bias"] for p in FUSED[QKV]]))
    assert layer.self_attn.o_proj.bias is None and layer.mlp.gate_up_proj.bias is None
    assert isinstance(model.lm_head, nnx.Linear) and model.lm_head.kernel[...].dtype == jnp.float32
    # The packed words hold exactly `bits` bits per weight: nothing was dequantized or widened at load.
    packed = sum(x.nbytes for p, x in nnx.to_flat_state(params) if p[-1] in ("qweight",))
    floats = sum(g.q.size for g in quantized(scheme)[2].values()) * 4
    assert packed * (32 // scheme.bits) == floats


@pytest.mark.parametrize("shards", [1, 2, 4])
@pytest.mark.parametrize("scheme", [SCHEMES[0], SCHEMES[3], SCHEMES[4], SCHEMES[7]], ids=lambda s: s.name)
def test_fused_packed_arrays_dequantize_to_the_parts(scheme, shards, quantized):
    """The loader's view of a fused layer's packed arrays in per-shard order for 1, 2 and 4 shards (AWQ words of 8
    columns, GPTQ qweight columns and qzeros words of 8 or 4, scales, q/k/v biases) dequantizes to the unfused
    layers' exact weights once `split_columns` takes the parts back out; and every shard's slice, as `place`
    reads it for one device, is the same as that slice of the whole fused array."""
    qdir, _, grids = quantized(scheme)
    quant = QuantConfig.from_checkpoint(qdir)
    tensors = load_file(str(qdir / "model.safetensors"))
    for fused, parts in FUSED.items():
        owner = "model.layers.0." + ("self_attn" if fused == QKV else "mlp")
        leaves = ("qweight", "qzeros", "scales") + (("bias",) if fused == QKV else ())
        views = {leaf: FusedColumns([tensors[f"{owner}.{p}.{leaf}"] for p in parts], shards) for leaf in leaves}
        arrays = {leaf: v[(slice(None),) * len(v.shape)] for leaf, v in views.items()}
        for leaf, v in views.items():
            block = v.shape[-1] // shards
            for j in range(shards):
                cols = (slice(None),) * (len(v.shape) - 1) + (slice(j * block, (j + 1) * block),)
                np.testing.assert_array_equal(v[cols], arrays[leaf][cols], err_msg=leaf)
        if scheme.method == "awq":
            w = awq.dequantize(arrays["qweight"], arrays["qzeros"], arrays["scales"], group_size=quant.group_size,
                               dtype=np.float32)
        else:
            w = gptq.dequantize(arrays["qweight"], arrays["qzeros"], arrays["scales"], tensors[f"{owner}.q_proj.g_idx"
                                if fused == QKV else f"{owner}.gate_proj.g_idx"], bits=quant.bits,
                                checkpoint_format=quant.checkpoint_format, dtype=np.float32)
        widths = tuple(grids[f"{owner}.{p}"].q.shape[1] for p in parts)
        assert w.shape[1] == sum(widths)
        for p, got in zip(parts, split_columns(w, widths, shards)):
            np.testing.assert_array_equal(got, grids[f"{owner}.{p}"].dequantized(), err_msg=p)
        if fused == QKV:
            for p, got in zip(parts, split_columns(arrays["bias"], widths, shards)):
                np.testing.assert_array_equal(got, tensors[f"{owner}.{p}.bias"], err_msg=p)


def test_gptq_act_order_parts_with_different_g_idx_are_refused(float_ckpt, tmp_path):
    """q/k/v (and gate/up) read one input; fused, they have one g_idx. An act-order checkpoint whose parts order
    their rows differently cannot be fused, and loading says so, naming the layer and the parts."""
    scheme = Scheme("gptq", bits=4, group_size=32, desc_act=True, shared_act_order=False)
    write_quantized(float_ckpt, tmp_path / "q", None, scheme, seed=3)
    tensors = load_file(str(tmp_path / "q" / "model.safetensors"))
    g = [tensors[f"model.layers.0.self_attn.{p}.g_idx"] for p in FUSED[QKV]]
    assert not np.array_equal(g[0], g[1])  # the writer did shuffle them apart
    with pytest.raises(ValueError, match=r"act-order .* the g_idx of (q_proj/k_proj/v_proj|gate_proj/up_proj) in "
                                         r"model\.layers\.0\.(self_attn|mlp) differ"):
        load_params(tmp_path / "q", load_model_config(tmp_path / "q"), jnp.float32,
                    quant=QuantConfig.from_checkpoint(tmp_path / "q"))


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_logits_match_dequantized_float_model(scheme, quantized):
    qdir, ddir, _ = quantized(scheme)
    ids = list(np.random.default_rng(3).integers(0, 512, 24))
    ours = _logits(qdir, ids, QuantConfig.from_checkpoint(qdir), decode_from=18)
    ref = _logits(ddir, ids, None, decode_from=18)
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=1e-4)
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("scheme", [SCHEMES[0], SCHEMES[2], SCHEMES[4]], ids=lambda s: s.name)
def test_skinny_kernel_in_the_model(scheme, quantized, monkeypatch):
    """The bfloat16 model with every product the skinny kernel supports routed through it (Pallas interpret mode:
    the 18-token prefill takes its dot mode, the decode steps its fma mode) against the float32 model of the
    dequantized checkpoint (the writer's, independent of qwenjax): logits within bfloat16 rounding, as close as the
    bfloat16 XLA path's, and the same greedy tokens wherever the exact top two are further apart than that rounding
    (the XLA path itself flips a near tie of this GPTQ case: 2.7996 against 2.7829)."""
    from pallas_kernels import quant_skinny
    from qwenjax.layers import quant_linear as ql

    qdir, ddir, _ = quantized(scheme)
    quant = QuantConfig.from_checkpoint(qdir)
    ids = list(np.random.default_rng(4).integers(0, 512, 24))
    exact = _logits(ddir, ids, None, decode_from=18)
    xla = np.asarray(_logits(qdir, ids, quant, decode_from=18, dtype=jnp.bfloat16), np.float32)
    rows, kernel = [], quant_skinny.quant_skinny

    def counted(x, *a, **kw):
        rows.append(x.shape[0])
        return kernel(x, *a, **kw)

    def skinny_if_supported(x, n, q):
        m = int(np.prod(x.shape[:-1]))
        return "skinny" if quant_skinny.supported(m, x.shape[-1], n, fmt=ql.kernel_format(q), bits=q.bits,
                                                  group_size=q.group_size, dtype=x.dtype) else None

    monkeypatch.setattr(ql, "kernel_path", skinny_if_supported)
    monkeypatch.setattr(quant_skinny, "quant_skinny", counted)
    ours = np.asarray(_logits(qdir, ids, quant, decode_from=18, dtype=jnp.bfloat16), np.float32)
    assert {18, 1} <= set(rows) and len(rows) == 4 * 2 * 7  # 4 products a layer, 2 layers, 7 steps
    err = np.abs(ours - exact).max()
    # bfloat16 weights, activations and KV cache over two layers; no worse than the XLA path's own rounding
    assert err <= max(2.0 ** -5 * np.abs(exact).max(), 1.25 * np.abs(xla - exact).max())
    top2 = -np.sort(-exact, axis=-1)[:, :2]
    clear = top2[:, 0] - top2[:, 1] > 2 * err  # where that error cannot flip the top token
    assert clear.sum() >= len(ids) // 2 and (ours.argmax(-1) == exact.argmax(-1))[clear].all()


def test_loading_quantized_checkpoint_without_quant_is_a_clear_error(quantized):
    qdir, _, _ = quantized(SCHEMES[0])
    with pytest.raises(ValueError, match="is quantized"):
        load_params(qdir, load_model_config(qdir), jnp.float32)


# ------------------------------------------------------------------ the engine

# SMALL_ENGINE with three buckets (decode B=4, one 64-token prefill row, and its cached-prefix variant): each LLM here
# compiles in a few seconds on CPU.
ENGINE = {**SMALL_ENGINE, "max_model_len": 64, "max_num_seqs": 4, "max_num_batched_tokens": 64,
          "decode_buckets": (4,), "prefill_token_buckets": (64,)}
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
PROMPTS = [list(map(int, np.random.default_rng(5).integers(0, 512, n))) for n in (3, 17, 40)]


def _greedy(path, **kw):
    llm = LLM(str(path), **{**ENGINE, **kw})
    return [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY,
                                                         use_tqdm=False)]


@pytest.mark.parametrize("scheme, arg", [
    (Scheme("awq", group_size=64, legacy_file=True), None),  # quant_config.json, quantization= omitted
    (SCHEMES[4], "gptq"),
])
def test_engine_greedy_equals_dequantized(scheme, arg, quantized):
    qdir, ddir, _ = quantized(scheme)
    assert _greedy(qdir, quantization=arg) == _greedy(ddir)


def test_quantization_argument_checked_against_checkpoint(quantized, float_ckpt):
    gdir, _, _ = quantized(SCHEMES[2])
    with pytest.raises(ValueError, match="requested but the checkpoint .* quantized with 'gptq'"):
        LLM(str(gdir), quantization="awq", **ENGINE)
    with pytest.raises(ValueError, match="not quantized"):
        LLM(str(float_ckpt), quantization="gptq", **ENGINE)
    with pytest.raises(ValueError, match="quantization='fp8' was requested but .* quantized with 'gptq'"):
        LLM(str(gdir), quantization="fp8", **ENGINE)
    with pytest.raises(NotImplementedError, match="quantization='int8' .*supported: 'awq', 'gptq', 'fp8'"):
        LLM(str(gdir), quantization="int8", **ENGINE)
    assert resolve_quant_config(None, gdir) == QuantConfig("gptq", 4, 128, sym=True, checkpoint_format="gptq")
    assert resolve_quant_config(None, float_ckpt) is None
    assert resolve_quant_config("awq", None) == QuantConfig.default("awq")


def test_legacy_gptq_quantize_config(quantized):
    qdir, _, _ = quantized(Scheme("gptq", bits=4, group_size=64, sym=False, legacy_file=True))
    assert "quantization_config" not in json.loads((qdir / "config.json").read_text())
    q = QuantConfig.from_checkpoint(qdir)
    assert (q.method, q.bits, q.group_size, q.sym, q.checkpoint_format) == ("gptq", 4, 64, False, "gptq")


def test_layer_shape_errors_name_the_numbers():
    with pytest.raises(ValueError, match="group_size 128 must divide the layer's 96 inputs"):
        QuantLinear(96, 64, use_bias=False, quant=QuantConfig("awq", 4, 128, checkpoint_format="gemm"),
                    dtype=jnp.float32, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="60 outputs is not a multiple of 8"):
        QuantLinear(128, 60, use_bias=False, quant=QuantConfig("gptq", 4, 128), dtype=jnp.float32,
                    rngs=nnx.Rngs(0))


def test_random_quantized_params_run():
    from qwenjax.config import ModelConfig
    from qwenjax.models.random_weights import random_params

    cfg = ModelConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=64)
    graphdef, params = random_params(cfg, jnp.float32, quant=QuantConfig.default("gptq"))
    model = nnx.merge(graphdef, params)
    assert model.model.layers[0].mlp.gate_up_proj.qweight[...].dtype == jnp.int32
    y = model.model.layers[0].mlp(jnp.ones((2, 128), jnp.float32))
    assert np.isfinite(np.asarray(y)).all() and 0.01 < float(jnp.std(y)) < 10


def test_kernel_path_per_shape(monkeypatch):
    """Which product takes which path on a GPU (decided by shape and format; the kernels themselves are tested in
    test_quant_matmul_kernel.py and, compiled, in tests/gpu)."""
    import jax

    from qwenjax.layers import quant_linear as ql

    gptq, awq = QuantConfig("gptq", 4, 128), QuantConfig("awq", 4, 128, checkpoint_format="gemm")
    x = lambda m: jnp.zeros((m, 3584), jnp.bfloat16)
    assert ql.kernel_path(x(1), 18944, gptq) is None  # CPU: always XLA
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.delenv(ql.SKINNY_ENV, raising=False)  # by default the measured kernels, not the skinny one
    assert ql.kernel_path(x(1), 18944, gptq) == ql.kernel_path(x(ql.GEMV_MAX_ROWS), 512, awq) == "gemv"
    assert ql.kernel_path(x(ql.GEMV_MAX_ROWS + 1), 3584, gptq) == "mma"
    monkeypatch.setenv(ql.SKINNY_ENV, "1")
    for m in (1, 4, 16, 33, ql.SKINNY_MAX_ROWS):  # decode batches: the skinny kernel, fused shapes included
        for n in (4608, 37888, 512, 3584):
            assert ql.kernel_path(x(m), n, gptq) == ql.kernel_path(x(m), n, awq) == "skinny"
    assert ql.kernel_path(x(ql.SKINNY_MAX_ROWS + 1), 3584, gptq) is None
    assert ql.kernel_path(x(512), 3584, awq) is None
    # 4-bit groups of 64: a 16-word dot block spans two groups (per-row zeros and scales)
    gptq64, awq64 = QuantConfig("gptq", 4, 64), QuantConfig("awq", 4, 64, checkpoint_format="gemm")
    assert ql.kernel_path(x(8), 3584, gptq64) == ql.kernel_path(x(9), 3584, gptq64) == "skinny"
    assert ql.kernel_path(x(64), 3584, awq64) == "skinny"
    monkeypatch.setattr(ql, "SKINNY_MAX_ROWS", 0)  # the paths before it, still reachable
    assert ql.kernel_path(x(1), 18944, gptq) == ql.kernel_path(x(ql.GEMV_MAX_ROWS), 512, awq) == "gemv"
    assert ql.kernel_path(x(ql.GEMV_MAX_ROWS + 1), 3584, gptq) == "mma"
    assert ql.kernel_path(x(ql.GEMV_MAX_ROWS + 1), 3584, awq) is None
    monkeypatch.undo()
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setenv(ql.SKINNY_ENV, "1")
    # act-order reaches kernel_path sorted into group order (quant_matmul gathers x through perm); unsorted, never
    assert ql.kernel_path(x(1), 3584, QuantConfig("gptq", 4, 128, desc_act=True)) is None
    assert ql.kernel_path(x(1), 3584, QuantConfig("gptq", 8, 128)) is None  # not yet checked on a GPU
    assert ql.kernel_path(x(1).astype(jnp.float32), 3584, gptq) is None
    assert ql.kernel_format(awq) == "awq_kp" and ql.kernel_format(gptq) == "gptq"
    assert ql.skinny_mode() is None
    monkeypatch.setenv(ql.SKINNY_ENV, "lop3")  # the lop3_t mode: 4 bits, block_n / 8 >= 16 for AWQ
    assert ql.skinny_mode() == "lop3_t"
    assert ql.kernel_path(x(1), 37888, gptq) == ql.kernel_path(x(64), 3584, awq) == "skinny"
    assert ql.kernel_path(x(1), 64, awq) != "skinny"  # 64 columns: 8 a class, under the dot's 16
    monkeypatch.setenv(ql.SKINNY_ENV, "yes")
    with pytest.raises(ValueError, match="QWENJAX_QUANT_SKINNY='yes': allowed 0, 1, lop3"):
        ql.kernel_path(x(1), 3584, gptq)
