"""FP8 weights: vLLM's `fp8` checkpoints (per-tensor scales with static or dynamic activations, 128 x 128 block
scales) and `quantization="fp8"` on a float checkpoint, against transformers computing with the same FP8 values
(tests/fp8_writer.py: dequantized weights, activations rounded to FP8 by torch's own cast).

Tolerances: a projection given the same input matches the reference to float32 rounding. Through a whole model the
two computations' float32 inputs to an activation rounding differ in the last bits, and where an element lies within
that distance of an FP8 rounding boundary the two round it to neighbouring FP8 values (one e4m3 step, up to 1/8 of
it): that token's logits, and those of later tokens attending to it, then differ by up to a few tenths. Such flips
touch a minority of positions (none in most 24-token prompts here); a wrong scale or layout moves every logit. So
the model-level checks ask for float32 agreement at most positions, FLIP_ATOL at all, and the reference's greedy
tokens from the engine.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file, save_file

from qwenjax import LLM, SamplingParams
from qwenjax.layers.fp8_linear import Fp8Linear
from qwenjax.layers.fp8_matmul import fp8_matmul
from qwenjax.models.fusion import split_columns
from qwenjax.models.loader import load_model_config, load_params
from qwenjax.quantization import QuantConfig, resolve_quant_config
from qwenjax.quantization.fp8_quant import FP8_DTYPE, quantize_activations, quantize_weight_per_channel
from tests.checkpoints import write_checkpoint
from tests.conftest import SMALL_ENGINE
from tests.fp8_writer import Fp8Scheme, reference_model, write_fp8
from tests.test_quantization import _logits
from tests.test_tensor_parallel import run_with_devices

SCHEMES = [Fp8Scheme("per_tensor", "static"), Fp8Scheme("per_tensor", "dynamic"), Fp8Scheme("block"),
           Fp8Scheme("online")]
LAYER_ATOL = 2e-5   # one projection, the same input: float32 rounding only
FLIP_ATOL = 0.5     # a whole model where an activation rounding flipped (module docstring)
ENGINE = {**SMALL_ENGINE, "max_model_len": 64, "max_num_seqs": 4, "max_num_batched_tokens": 64,
          "decode_buckets": (4,), "prefill_token_buckets": (64,)}
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
PROMPTS = [list(map(int, np.random.default_rng(5).integers(0, 512, n))) for n in (3, 17, 40)]


@pytest.fixture(scope="module")
def float_ckpt(tmp_path_factory):
    # Inputs 256 and 384: two and three 128-column groups for the block-scaled layers.
    return write_checkpoint(tmp_path_factory.mktemp("fp8") / "float", vocab_size=512, hidden_size=256,
                            intermediate_size=384, num_layers=2, num_heads=4, num_kv_heads=2, tie=False, seed=3)


@pytest.fixture(scope="module")
def fp8_dir(float_ckpt, tmp_path_factory):
    made = {}

    def get(scheme: Fp8Scheme):
        if scheme not in made:
            made[scheme] = write_fp8(float_ckpt, tmp_path_factory.mktemp(scheme.name) / "ckpt", scheme)
        return made[scheme]

    return get


def _quant(path, scheme):
    return resolve_quant_config("fp8" if scheme.kind == "online" else None, path)


# ------------------------------------------------------------------ config


def test_config_formats():
    per_tensor = QuantConfig.from_dict({"quant_method": "fp8", "activation_scheme": "static",
                                        "ignored_layers": ["lm_head"]})
    assert (per_tensor.method, per_tensor.activation_scheme, per_tensor.weight_block_size,
            per_tensor.is_checkpoint_fp8_serialized, per_tensor.num_groups(256), per_tensor.pack_factor) == \
        ("fp8", "static", None, True, 1, 1)
    block = QuantConfig.from_dict({"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                   "weight_block_size": [128, 128]})
    assert block.weight_block_size == (128, 128) and block.num_groups(384) == 3 and "128x128" in block.describe()
    online = QuantConfig.default("fp8")
    assert not online.is_checkpoint_fp8_serialized and online.activation_scheme == "dynamic"
    assert hash(block) != hash(per_tensor)


@pytest.mark.parametrize("d, err, words", [
    ({"quant_method": "fp8", "fmt": "e5m2"}, NotImplementedError, ["fmt 'e5m2'", "'e4m3'"]),
    ({"quant_method": "fp8", "activation_scheme": "per_channel"}, NotImplementedError,
     ["activation_scheme 'per_channel'", "'static', 'dynamic'"]),
    ({"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [128, 128]}, NotImplementedError,
     ["weight_block_size [128, 128]", "'static'", "dynamic"]),
    ({"quant_method": "fp8", "weight_block_size": [128]}, ValueError, ["weight_block_size", "[128]"]),
    ({"quant_method": "fp8", "ignored_layers": ["model.layers.0.mlp.down_proj"]}, NotImplementedError,
     ["ignored_layers", "down_proj", "lm_head"]),
    ({"quant_method": "compressed-tensors"}, NotImplementedError, ["'compressed-tensors'", "'fp8'"]),
    ({"quant_method": "fbgemm_fp8"}, NotImplementedError, ["'fbgemm_fp8'", "'fp8'"]),
])
def test_config_refusals_name_the_field(d, err, words):
    with pytest.raises(err) as e:
        QuantConfig.from_dict(d)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


# ------------------------------------------------------------------ the product


def test_fp8_matmul_is_the_dequantized_product():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((5, 256)) * 3, jnp.float32)
    w = jnp.asarray(rng.standard_normal((256, 48)) * 0.05, jnp.float32)
    wq, ws = quantize_weight_per_channel(w)
    assert wq.dtype == FP8_DTYPE and ws.shape == (1, 48)
    for group in (None, 128):
        xq, xs = quantize_activations(x, group=group)
        assert xs.shape == (5, 1 if group is None else 2)
        x_deq = (np.asarray(xq, np.float32).reshape(5, xs.shape[1], -1) * np.asarray(xs)[..., None]).reshape(5, 256)
        w_scale = jnp.repeat(ws, xs.shape[1], axis=0)   # the same weights as [G, O] scales
        got = fp8_matmul(xq, xs, wq.T, w_scale, out_dtype=jnp.float32)  # the model's weight [O, I]
        want = x_deq @ (np.asarray(wq, np.float32) * np.asarray(ws))
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
        # The rounding itself: within half an e4m3 step (2^-4 relative) of the float product's inputs.
        np.testing.assert_allclose(x_deq, np.asarray(x), rtol=2 ** -4, atol=float(jnp.max(xs)) * 2 ** -9)
    xq, xs = quantize_activations(x, static_scale=jnp.float32(0.01))  # saturates at +-448, never NaN
    assert np.isfinite(np.asarray(xq, np.float32)).all() and np.abs(np.asarray(xq, np.float32)).max() == 448
    zero, scale = quantize_activations(jnp.zeros((2, 256), jnp.float32))
    assert (np.asarray(scale) == 1).all() and (np.asarray(zero, np.float32) == 0).all()


def test_block_scaled_product_keeps_the_float8_rounding_fenced():
    """Quantization and the block-scaled product in one program: the float8 operands pass an optimization barrier
    before their conversion back to float32 (XLA's GPU pipeline folds float32 -> float8 -> float32 chains into
    nothing, which the CPU backend cannot show: fp8_matmul.block_scaled_reference), and the result is still the
    product of the rounded values."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((3, 256)), jnp.float32)
    wq, ws = quantize_weight_per_channel(jnp.asarray(rng.standard_normal((256, 32)) * 0.05, jnp.float32))

    def layer(x):
        xq, xs = quantize_activations(x, group=128)
        return fp8_matmul(xq, xs, wq.T, jnp.repeat(ws, 2, axis=0), out_dtype=jnp.float32)

    hlo = jax.jit(layer).lower(x).as_text()
    assert "optimization_barrier" in hlo
    xq, xs = quantize_activations(x, group=128)
    x_deq = (np.asarray(xq, np.float32).reshape(3, 2, -1) * np.asarray(xs)[..., None]).reshape(3, 256)
    np.testing.assert_allclose(np.asarray(jax.jit(layer)(x)), x_deq @ (np.asarray(wq, np.float32) * np.asarray(ws)),
                               rtol=1e-5, atol=1e-5)


def test_gpu_only_product_settings(monkeypatch):
    """The opt-in GPU forms of the product (float32 accumulation from ACCUM_MIN_ROWS rows, a bf16 GEMM result) are
    chosen on a GPU only, and the traced program says so: the dot's result type and its algorithm."""
    from qwenjax.layers import fp8_matmul as fm

    for env in (fm.ACCUM_ENV, fm.GEMM_OUT_ENV):
        monkeypatch.delenv(env, raising=False)
    xq, xs = quantize_activations(jnp.ones((64, 128), jnp.float32))
    wq, ws = quantize_weight_per_channel(jnp.full((128, 16), 0.5, jnp.float32))
    hlo = lambda **kw: jax.jit(lambda *a: fm.fp8_matmul(*a, out_dtype=jnp.bfloat16, **kw)).lower(  # noqa: E731
        xq, xs, wq.T, ws).as_text()
    assert "-> tensor<64x16xf32>" in hlo(gemm_out="bf16") and fm.dot_precision("f32") is None  # CPU: unchanged
    monkeypatch.setattr(fm, "platform", lambda: "gpu")
    assert fm.gemm_out_dtype("bf16") == jnp.bfloat16 and fm.gemm_out_dtype() == jnp.float32
    assert "-> tensor<64x16xbf16>" in hlo(gemm_out="bf16")
    assert fm.dot_precision("f32", rows=64) == jax.lax.DotAlgorithmPreset.ANY_F8_ANY_F8_F32
    assert fm.dot_precision("f32", rows=63) is None and fm.dot_precision(None, rows=64) is None


def test_gpu_kernel_choice(monkeypatch):
    """On one GPU a product of at most fp8_skinny.MAX_ROWS rows takes the skinny kernel unless QWENJAX_FP8_SKINNY=0;
    the GEMV only when QWENJAX_FP8_GEMV=1; more rows, or a CPU, take XLA's dot."""
    from pallas_kernels import fp8_skinny
    from qwenjax.layers import fp8_matmul as fm

    for env in (fm.GEMV_ENV, fm.SKINNY_ENV):
        monkeypatch.delenv(env, raising=False)
    wq = jnp.zeros((256, 128), FP8_DTYPE)
    rows = lambda m: jnp.zeros((m, 128), FP8_DTYPE)  # noqa: E731
    assert fm.kernel_for(rows(1), wq) is None  # CPU
    monkeypatch.setattr(fm, "platform", lambda: "gpu")
    assert fm.kernel_for(rows(1), wq) == "skinny" and fm.kernel_for(rows(fp8_skinny.MAX_ROWS), wq) == "skinny"
    assert fm.kernel_for(rows(fp8_skinny.MAX_ROWS + 1), wq) is None
    monkeypatch.setenv(fm.SKINNY_ENV, "0")
    assert fm.kernel_for(rows(1), wq) is None
    monkeypatch.setenv(fm.GEMV_ENV, "1")
    assert fm.kernel_for(rows(1), wq) == "gemv"
    monkeypatch.setenv(fm.SKINNY_ENV, "yes")
    with pytest.raises(ValueError, match="QWENJAX_FP8_SKINNY must be 0 or 1, got 'yes'"):
        fm.kernel_for(rows(1), wq)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_every_projection_matches_reference(scheme, fp8_dir, float_ckpt):
    """Each Fp8Linear, unfused and fused (split back into its parts), against the reference's projection on the
    same input: float32 agreement."""
    path = fp8_dir(scheme)
    quant, cfg = _quant(path, scheme), load_model_config(path)
    ref = reference_model(float_ckpt, path, scheme)
    unfused = nnx.merge(*load_params(path, cfg, jnp.float32, quant=quant, fuse=False))
    fused = nnx.merge(*load_params(path, cfg, jnp.float32, quant=quant))
    rng = np.random.default_rng(1)
    for i in range(cfg.num_hidden_layers):
        for block, fused_name, parts in [("self_attn", "qkv_proj", ("q_proj", "k_proj", "v_proj")),
                                         ("mlp", "gate_up_proj", ("gate_proj", "up_proj")),
                                         ("self_attn", None, ("o_proj",)), ("mlp", None, ("down_proj",))]:
            ours, theirs = getattr(unfused.model.layers[i], block), getattr(ref.model.layers[i], block)
            din = getattr(theirs, parts[0]).w.shape[1]
            x = rng.standard_normal((7, din)).astype(np.float32) * 2
            with torch.no_grad():
                want = {p: getattr(theirs, p)(torch.tensor(x)).numpy() for p in parts}
            for p in parts:
                assert isinstance(getattr(ours, p), Fp8Linear) and getattr(ours, p).weight[...].dtype == FP8_DTYPE
                np.testing.assert_allclose(np.asarray(getattr(ours, p)(jnp.asarray(x))), want[p], atol=LAYER_ATOL,
                                           rtol=1e-5, err_msg=f"layer {i} {p}")
            if fused_name is not None:
                owner = getattr(fused.model.layers[i], block)
                got = split_columns(getattr(owner, fused_name)(jnp.asarray(x)), getattr(owner, f"{fused_name}_widths"),
                                    owner.shards)
                for p, g in zip(parts, got):
                    np.testing.assert_allclose(np.asarray(g), want[p], atol=LAYER_ATOL, rtol=1e-5,
                                               err_msg=f"layer {i} fused {p}")


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_logits_match_reference(scheme, fp8_dir, float_ckpt):
    """Prefill then decode through the paged cache, six prompts: float32 agreement at most positions (the median),
    FLIP_ATOL everywhere, the same argmax at 90% of positions or more (a flip can move a near tie)."""
    path = fp8_dir(scheme)
    ref = reference_model(float_ckpt, path, scheme)
    errors, same = [], []
    for seed in range(6):
        ids = list(np.random.default_rng(seed).integers(0, 512, 24))
        ours = _logits(path, ids, _quant(path, scheme), decode_from=18)
        with torch.no_grad():
            want = ref(torch.tensor([ids])).logits[0].numpy()
        np.testing.assert_allclose(ours, want, atol=FLIP_ATOL, rtol=0)
        errors.append(np.abs(ours - want).max(-1))
        same.append(ours.argmax(-1) == want.argmax(-1))
    assert np.median(np.concatenate(errors)) < 1e-4, np.concatenate(errors)
    assert np.concatenate(same).mean() >= 0.9


def test_params_layout(fp8_dir, float_ckpt):
    """Scales in Fp8Linear's layout: per-tensor repeated over each fused part's columns, static input scales the
    max over a fused layer's parts, block scales repeated over their block's output columns."""
    static = fp8_dir(Fp8Scheme("per_tensor", "static"))
    tensors = load_file(str(static / "model.safetensors"))
    model = nnx.merge(*load_params(static, load_model_config(static), jnp.float32,
                                   quant=QuantConfig.from_checkpoint(static)))
    qkv = model.model.layers[1].self_attn.qkv_proj
    parts = split_columns(qkv.weight_scale[...], model.model.layers[1].self_attn.qkv_proj_widths, 1)
    for p, got in zip(("q_proj", "k_proj", "v_proj"), parts):
        assert (np.asarray(got) == float(tensors[f"model.layers.1.self_attn.{p}.weight_scale"])).all()
    assert float(qkv.input_scale[...]) == float(tensors["model.layers.1.self_attn.q_proj.input_scale"])
    assert model.lm_head.kernel[...].dtype == jnp.float32  # lm_head stays float
    # Parts with different input scales: the fused layer takes the largest.
    tensors = {k: v.clone() for k, v in tensors.items()}
    tensors["model.layers.1.self_attn.k_proj.input_scale"] *= 3
    other = static.parent / "max_input_scale"
    other.mkdir()
    save_file(tensors, str(other / "model.safetensors"))
    (other / "config.json").write_text((static / "config.json").read_text())
    model = nnx.merge(*load_params(other, load_model_config(other), jnp.float32,
                                   quant=QuantConfig.from_checkpoint(other)))
    assert float(model.model.layers[1].self_attn.qkv_proj.input_scale[...]) == \
        float(tensors["model.layers.1.self_attn.k_proj.input_scale"])
    block = fp8_dir(Fp8Scheme("block"))
    scale_inv = load_file(str(block / "model.safetensors"))["model.layers.0.mlp.down_proj.weight_scale_inv"]
    model = nnx.merge(*load_params(block, load_model_config(block), jnp.float32,
                                   quant=QuantConfig.from_checkpoint(block)))
    ws = np.asarray(model.model.layers[0].mlp.down_proj.weight_scale[...])   # [3 groups of 128 inputs, 256 outputs]
    assert scale_inv.shape == (2, 3) and ws.shape == (3, 256)
    np.testing.assert_array_equal(ws, np.repeat(scale_inv.numpy().T, 128, axis=1))


# ------------------------------------------------------------------ the engine


@pytest.mark.parametrize("scheme", [SCHEMES[0], SCHEMES[2], SCHEMES[3]], ids=lambda s: s.name)
def test_engine_greedy_equals_reference(scheme, fp8_dir, float_ckpt):
    path = fp8_dir(scheme)
    llm = LLM(str(path), **ENGINE, quantization="fp8")  # an FP8 checkpoint or (online) a float one
    ours = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY,
                                                         use_tqdm=False)]
    assert ours == _reference_greedy(reference_model(float_ckpt, path, scheme), PROMPTS, 8)


def test_large_steps_of_an_fp8_model_run_their_own_program(fp8_dir, float_ckpt, monkeypatch):
    """worker/step_options with the platform taken for a GPU: an FP8 model's steps of FP8_LARGE_STEP_TOKENS tokens
    or more (lowered here to 16, so the 64-token prefill steps are large and the 4-row decode steps are not) run the
    programs compiled with FP8_LARGE_STEP_OPTIONS, the rest the default ones, and the tokens are the reference's."""
    from qwenjax.worker import model_runner, step_options

    monkeypatch.setattr(step_options, "platform", lambda: "gpu")
    monkeypatch.setattr(model_runner, "FP8_LARGE_STEP_TOKENS", 16)
    scheme = SCHEMES[3]
    llm = LLM(str(fp8_dir(scheme)), **ENGINE, quantization="fp8")
    r = llm.llm_engine.runner
    assert r._step_large is not r._step and r._decode_steps_large is not r._decode_steps
    ran = []
    for name in ("_step", "_step_large"):
        jitted = getattr(r, name)
        monkeypatch.setattr(r, name, lambda *a, _f=jitted, _n=name, **k: ran.append(_n) or _f(*a, **k))
    ours = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY,
                                                         use_tqdm=False)]
    assert "_step_large" in ran and "_step" in ran
    assert ours == _reference_greedy(reference_model(float_ckpt, fp8_dir(scheme), scheme), PROMPTS, 8)
    bf16 = LLM(str(float_ckpt), **ENGINE).llm_engine.runner  # no float8 parameters: one program
    assert bf16._step_large is bf16._step


def _reference_greedy(model, prompts, new):
    """Greedy by full forwards (tests.checkpoints.hf_greedy's `generate` masks token 0 as padding, which these
    prompts hold)."""
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = list(p)
            for _ in range(new):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            out.append(ids[len(p):])
    return out


def test_tensor_parallel_and_fp8_kv_cache(fp8_dir):
    """Meshes of 2, 3 (heads and FFN padded for the mesh) and 4 devices give mesh 1's greedy tokens, with weight
    scales split with their kernels; FP8 weights with FP8 KV pages give the same tokens on 1 and 4 devices."""
    static, block, online = (str(fp8_dir(s)) for s in (SCHEMES[0], SCHEMES[2], SCHEMES[3]))
    runs = [f"{static}|1|auto|-", f"{static}|2|auto|-", f"{block}|1|auto|-", f"{block}|3|auto|-",
            f"{online}|1|fp8_e4m3|fp8", f"{online}|4|fp8_e4m3|fp8"]
    out = online.rsplit("/", 1)[0] + "/tp.json"
    proc = run_with_devices(["-m", "tests.tp_fp8_worker", out, *runs], n=4)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(open(out).read())
    for a, b in [(0, 1), (2, 3), (4, 5)]:
        assert res[runs[a]]["tokens"] == res[runs[b]]["tokens"], (runs[a], runs[b])
    two = res[runs[1]]
    assert two["dtypes"]["self_attn.qkv_proj.weight"] == "float8_e4m3fn"   # [O, I]: split on its first axis
    assert two["specs"]["self_attn.qkv_proj.weight"] == ["tp", None]
    assert two["specs"]["self_attn.qkv_proj.weight_scale"] == [None, "tp"]
    assert two["shard_shapes"]["self_attn.qkv_proj.weight_scale"] == [1, 256]   # (256 + 2 x 128) / 2
    assert two["specs"]["mlp.down_proj.weight"] == [None, "tp"] and two["specs"]["mlp.down_proj.weight_scale"] == []
    assert two["specs"]["self_attn.qkv_proj.input_scale"] == []
    three = res[runs[3]]  # 4 q / 2 kv heads on 3 devices: padded to 6 / 3 (o_proj's 384 inputs: whole 128-blocks)
    assert three["shard_shapes"]["self_attn.o_proj.weight"] == [256, 128]
    assert three["shard_shapes"]["self_attn.o_proj.weight_scale"] == [1, 256]
    assert res[runs[5]]["kv_dtype"] == "float8_e4m3fn"
    assert res[runs[5]]["dtypes"]["mlp.gate_up_proj.weight"] == "float8_e4m3fn"


# ------------------------------------------------------------------ refusals


def _rewrite(src, dst, edit_tensors=None, edit_config=None):
    dst.mkdir(parents=True)
    tensors = load_file(str(src / "model.safetensors"))
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    if edit_config:
        edit_config(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _load(path):
    return load_params(path, load_model_config(path), jnp.float32, quant=QuantConfig.from_checkpoint(path))


def test_bad_fp8_checkpoints_are_refused_by_name(fp8_dir, float_ckpt, tmp_path):
    static, block = fp8_dir(SCHEMES[0]), fp8_dir(SCHEMES[2])
    name = "model.layers.0.mlp.up_proj"
    # A config that says fp8 over float weights.
    bad = _rewrite(float_ckpt, tmp_path / "float_weights",
                   edit_config=lambda c: c.update(quantization_config={"quant_method": "fp8"}))
    with pytest.raises(ValueError, match=r"'model\.layers\.\d\.\w+\.\w+_proj\.weight' is float32; .*float8_e4m3fn"):
        _load(bad)
    # Per-channel weight scales (compressed-tensors' layout) under quant_method fp8.
    bad = _rewrite(static, tmp_path / "per_channel", lambda t: t.__setitem__(
        f"{name}.weight_scale", t[f"{name}.weight_scale"].reshape(1).repeat(384).reshape(384, 1)))
    with pytest.raises(NotImplementedError, match=r"up_proj\.weight_scale' has shape \(384, 1\).*per-tensor"):
        _load(bad)
    # Block scales in a checkpoint whose config has no weight_block_size, and the reverse.
    bad = _rewrite(block, tmp_path / "no_block_size",
                   edit_config=lambda c: c["quantization_config"].pop("weight_block_size"))
    with pytest.raises(ValueError, match="block scale, but quantization_config has no weight_block_size"):
        _load(bad)
    bad = _rewrite(static, tmp_path / "block_size",
                   edit_config=lambda c: c["quantization_config"].update(weight_block_size=[128, 128],
                                                                         activation_scheme="dynamic"))
    with pytest.raises(ValueError,
                       match=r"per-tensor scale, but quantization_config has weight_block_size \[128, 128\]"):
        _load(bad)
    # A block size whose block_k does not divide a layer's inputs.
    bad = _rewrite(block, tmp_path / "block_k", edit_config=lambda c: c["quantization_config"].update(
        weight_block_size=[128, 96]))
    with pytest.raises(ValueError, match="block_k 96 must divide the layer's 256 inputs"):
        _load(bad)
    # float8 weights without an fp8 quantization_config.
    bad = _rewrite(fp8_dir(SCHEMES[1]), tmp_path / "no_config", edit_config=lambda c: c.pop("quantization_config"))
    with pytest.raises(ValueError,
                       match=r"float8 weights load only with an fp8 quantization_config|is quantized \(it holds"):
        load_params(bad, load_model_config(bad), jnp.float32)
    # Missing input scale of one fused part.
    bad = _rewrite(static, tmp_path / "missing_input_scale",
                   lambda t: t.pop("model.layers.0.self_attn.v_proj.input_scale"))
    with pytest.raises(ValueError, match=r"2 of the 3 input_scale tensors of model\.layers\.0\.self_attn\.qkv_proj"):
        _load(bad)


def test_fp8_moe_and_mismatched_requests_are_refused(fp8_dir, float_ckpt):
    from qwenjax.config import ModelConfig
    from qwenjax.models.qwen2_moe import Qwen2MoeForCausalLM

    cfg = ModelConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=64,
                      architecture="Qwen2MoeForCausalLM", num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=64, shared_expert_intermediate_size=64)
    with pytest.raises(NotImplementedError, match="fp8 quantized Qwen2MoeForCausalLM"):
        Qwen2MoeForCausalLM(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0), quant=QuantConfig.default("fp8"))
    with pytest.raises(ValueError, match="requested but the checkpoint .* quantized with 'fp8'"):
        LLM(str(fp8_dir(SCHEMES[0])), quantization="awq", **ENGINE)
    assert resolve_quant_config("fp8", float_ckpt) == QuantConfig.default("fp8")
    assert resolve_quant_config(None, float_ckpt) is None


def test_random_fp8_weights_zero_the_padded_inputs():
    """Random FP8 weights for a mesh that pads heads (4 q heads on 3 devices: 6): o_proj's weight is [D, in], so
    the padded heads' inputs are its last columns, set to zero as a padded checkpoint has them; the rest is kept."""
    from qwenjax.config import ModelConfig
    from qwenjax.models.mesh_padding import pad_for_mesh, zero_padded_rows

    real = ModelConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=64)
    padded = pad_for_mesh(real, 3)
    assert padded.num_attention_heads == 6
    w = jnp.ones((128, 6 * 32), FP8_DTYPE)
    out = np.asarray(zero_padded_rows(("model", "layers", 0, "self_attn", "o_proj", "weight"), w, real, padded),
                     np.float32)
    assert (out[:, :4 * 32] == 1).all() and (out[:, 4 * 32:] == 0).all()


def test_activation_quantization_choice(monkeypatch):
    """quantize_for: the Pallas kernel (pallas_kernels/fp8_act_quant.py) where QWENJAX_FP8_ACT_KERNEL=1 and the skinny
    kernel takes a product of dynamic per-token activations on a GPU; XLA's form everywhere else, and by default
    (which fuses the quantization into the product instead where it does, test_fp8_kernel_rows.py).
    The kernel is faked here (this is the choice; its values are tests/test_fp8_act_quant_kernel.py's)."""
    from pallas_kernels import fp8_act_quant
    from qwenjax.layers import fp8_matmul as fm

    for env in (fm.GEMV_ENV, fm.SKINNY_ENV, fm.ACT_KERNEL_ENV):
        monkeypatch.delenv(env, raising=False)
    calls = []
    monkeypatch.setattr(fp8_act_quant, "quantize_rows", lambda x: calls.append(x.shape) or quantize_activations(x))
    wq = jnp.zeros((256, 128), FP8_DTYPE)
    x = jnp.ones((3, 128), jnp.bfloat16)
    fm.quantize_for(x, wq)
    monkeypatch.setattr(fm, "platform", lambda: "gpu")
    fm.quantize_for(x, wq)
    assert calls == []  # the CPU, then the default (off)
    monkeypatch.setenv(fm.ACT_KERNEL_ENV, "1")
    monkeypatch.setattr(fm, "platform", lambda: "cpu")
    fm.quantize_for(x, wq)
    assert calls == []  # the CPU
    monkeypatch.setattr(fm, "platform", lambda: "gpu")
    fm.quantize_for(x, wq)
    assert calls == [(3, 128)]
    fm.quantize_for(x, wq, group=64)                                  # per-group scales: XLA's form
    fm.quantize_for(x, wq, static_scale=jnp.float32(0.1))             # a static scale: nothing to reduce
    fm.quantize_for(jnp.ones((513, 128), jnp.bfloat16), wq)           # past the skinny kernel's rows
    monkeypatch.setenv(fm.ACT_KERNEL_ENV, "0")
    fm.quantize_for(x, wq)
    assert calls == [(3, 128)]
    monkeypatch.setenv(fm.ACT_KERNEL_ENV, "on")
    with pytest.raises(ValueError, match="QWENJAX_FP8_ACT_KERNEL must be one of auto, 0, 1, fused, scaled; got 'on'"):
        fm.quantize_for(x, wq)
