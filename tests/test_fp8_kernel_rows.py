"""FP8 activations quantized by Pallas kernels instead of XLA (layers/fp8_matmul.py's QWENJAX_FP8_ACT_KERNEL): which
path each setting takes, and a whole tiny FP8 model run on the kernel path (the kernels in Pallas interpret mode on
CPU, the GPU's choices forced) against transformers computing with the same FP8 values, as
tests/test_fp8_weights.py checks XLA's path."""
from __future__ import annotations


import jax.numpy as jnp
import numpy as np
import pytest
import torch

from qwenjax.quantization.fp8_quant import FP8_DTYPE, quantize_activations
from tests.fp8_writer import Fp8Scheme, reference_model
from tests.test_fp8_weights import FLIP_ATOL, _quant, float_ckpt, fp8_dir  # noqa: F401 (fixtures)
from tests.test_quantization import _logits


def check_logits(path, scheme, float_ckpt) -> np.ndarray:  # noqa: F811 (a path, not the fixture)
    """A 24-token prompt, prefill of 18 then decode, against transformers on the same FP8 values: FLIP_ATOL at every
    position and the same argmax at 90% of them; returns each position's largest logit error."""
    ref = reference_model(float_ckpt, path, scheme)
    ids = list(np.random.default_rng(4).integers(0, 512, 24))
    ours = _logits(path, ids, _quant(path, scheme), decode_from=18)
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(ours, want, atol=FLIP_ATOL, rtol=0)
    assert (ours.argmax(-1) == want.argmax(-1)).mean() >= 0.9
    return np.abs(ours - want).max(-1)


def _fake_gpu(monkeypatch, act_kernel: str, partials: bool = True, swiglu: bool = False) -> dict[str, int]:
    """The GPU's choices on CPU: the platform read as "gpu" by fp8_matmul and norm, every Pallas kernel those
    choices take run in interpret mode. Returns the count of calls per kernel (at trace time, by name; "_partials":
    the product returned its K splits' float32 partials [S, T, N], or the norm took them as x)."""
    from pallas_kernels import fp8_act_quant, fp8_skinny, fp8_skinny_rows, rms_norm
    from qwenjax.layers import fp8_matmul as fm
    from qwenjax.layers import norm

    calls: dict[str, int] = {}

    def counted(module, name, **fixed):
        real = getattr(module, name)

        def run(*a, **k):
            out = real(*a, **{**k, **fixed})
            partial = (out if name == "fp8_skinny_rows" else a[0] if name == "add_rms_norm" else out[0]).ndim == 3
            key = (name + ("_fp8" if k.get("fp8") else "") + ("_scale" if k.get("scale_only") else "")
                   + ("_swiglu" if k.get("swiglu") else "") + ("_partials" if partial else ""))
            calls[key] = calls.get(key, 0) + 1
            return out
        monkeypatch.setattr(module, name, run)

    for env in (fm.GEMV_ENV, fm.SKINNY_ENV):
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setenv(fm.ACT_KERNEL_ENV, act_kernel)
    monkeypatch.setenv(fm.NORM_PARTIALS_ENV, "1" if partials else "0")
    monkeypatch.setenv(fm.SWIGLU_ENV, "1" if swiglu else "0")
    monkeypatch.setattr(fm, "platform", lambda: "gpu")
    monkeypatch.setattr(norm, "platform", lambda: "gpu")
    counted(fp8_skinny, "fp8_skinny", interpret=True)
    counted(fp8_skinny_rows, "fp8_skinny_rows", interpret=True)
    counted(fp8_act_quant, "quantize_rows", interpret=True)
    counted(fp8_act_quant, "swiglu_quantize_rows", interpret=True)
    counted(rms_norm, "add_rms_norm", interpret=True)
    return calls


@pytest.mark.parametrize("scheme", [Fp8Scheme("per_tensor", "dynamic"), Fp8Scheme("online")], ids=lambda s: s.name)
def test_kernel_quantized_rows_match_reference(scheme, fp8_dir, float_ckpt, monkeypatch):  # noqa: F811
    """QWENJAX_FP8_ACT_KERNEL=1 on the GPU's path: the add + RMSNorm kernel writes qkv's and gate/up's float8 rows,
    the SwiGLU kernel down_proj's, fp8_act_quant o_proj's (and the first layer's qkv, which has no add): prefill and
    decode logits as test_fp8_weights.test_logits_match_reference asks of XLA's path (float32 agreement at most
    positions, FLIP_ATOL at all, the same argmax at 90%)."""
    calls = _fake_gpu(monkeypatch, "1")
    errors = check_logits(fp8_dir(scheme), scheme, float_ckpt)
    assert np.median(errors) < 1e-4, errors
    # 7 steps (one prefill, six decodes) x 2 layers: layer 0's qkv input has no add (fp8_act_quant), layer 1's the
    # fused norm; every gate/up input the fused norm; every o_proj input fp8_act_quant; every down_proj input swiglu.
    # A decode step's one row splits K in two at o (K 256) and down (384): their partials go to the next norm, which
    # adds them (the post-attention norms, layer 1's input norm, the final norm); a prefill's 18 rows split nothing.
    steps, layers, decodes = 7, 2, 6
    assert calls == {"add_rms_norm_fp8": steps * (2 * layers - 1) - decodes * (2 * layers - 1),
                     "add_rms_norm_fp8_partials": decodes * (2 * layers - 1),
                     "add_rms_norm": steps - decodes, "add_rms_norm_partials": decodes,  # the final norm
                     "quantize_rows": steps * (layers + 1), "swiglu_quantize_rows": steps * layers,
                     "fp8_skinny_rows": steps * layers * 4 - decodes * layers * 2,
                     "fp8_skinny_rows_partials": decodes * layers * 2}, calls


def test_fused_quantization_matches_reference(fp8_dir, float_ckpt, monkeypatch):  # noqa: F811
    """QWENJAX_FP8_ACT_KERNEL=fused on the GPU's path: every product's activations quantized inside
    pallas_kernels/fp8_skinny_rows.py (one row at a time in decode, 18 in the prefill), gate/up's kernel writing the
    MLP's h itself (QWENJAX_FP8_SWIGLU=1): the same criteria."""
    scheme = Fp8Scheme("online")
    calls = _fake_gpu(monkeypatch, "fused", partials=False, swiglu=True)
    errors = check_logits(fp8_dir(scheme), scheme, float_ckpt)
    assert np.median(errors) < 1e-4, errors
    # the norms write no float8 rows; no quantization kernel of its own runs; the splits' partials summed by XLA
    # (QWENJAX_FP8_NORM_PARTIALS unset: its default); gate/up's kernel writes h = silu(gate) * up itself
    steps, layers = 7, 2
    assert calls == {"add_rms_norm": steps * 2 * layers, "fp8_skinny_rows": steps * layers * 3,
                     "fp8_skinny_rows_swiglu": steps * layers}, calls


def test_scaled_quantization_matches_reference(fp8_dir, float_ckpt, monkeypatch):  # noqa: F811
    """QWENJAX_FP8_ACT_KERNEL=scaled on the GPU's path: the add + RMSNorm kernel writes its rows' scales alone, and
    fp8_skinny_rows quantizes the bf16 rows by them (qkv and gate/up past layer 0's qkv); the other products find
    their scales inside (K under XLA_SCALE_MIN_K): the same criteria."""
    scheme = Fp8Scheme("online")
    calls = _fake_gpu(monkeypatch, "scaled", partials=False)
    errors = check_logits(fp8_dir(scheme), scheme, float_ckpt)
    assert np.median(errors) < 1e-4, errors
    steps, layers = 7, 2
    assert calls == {"add_rms_norm_fp8_scale": steps * (2 * layers - 1), "add_rms_norm": steps,  # the final norm
                     "fp8_skinny_rows": steps * layers * 4}, calls


def test_static_activations_keep_xla_quantization(fp8_dir, float_ckpt, monkeypatch):  # noqa: F811
    """A static input scale is not the kernels' rule: with QWENJAX_FP8_ACT_KERNEL=1 the norms write no float8 rows and
    no quantization kernel runs; the skinny kernel still takes the products."""
    path = fp8_dir(Fp8Scheme("per_tensor", "static"))
    calls = _fake_gpu(monkeypatch, "1")
    _logits(path, list(range(5)), _quant(path, Fp8Scheme("per_tensor", "static")), decode_from=4)
    # 2 steps (4 rows, then 1): at both, o's K (256) and down's (384) split in two and the next norm adds the
    # partials (the post-attention norms, layer 1's input norm, the final norm); qkv and gate/up are summed by XLA
    assert calls == {"add_rms_norm_partials": 2 * 4, "fp8_skinny_rows": 2 * 2 * 2,
                     "fp8_skinny_rows_partials": 2 * 2 * 2}, calls


def test_fused_activation_quantization_choice(monkeypatch):
    """fp8_linear: pallas_kernels/fp8_skinny_rows.py quantizing x itself where QWENJAX_FP8_ACT_KERNEL=fused and the
    skinny kernel takes a product of dynamic per-token activations on a GPU, the same kernel on float8 rows with =1,
    quantize_for + fp8_matmul (fp8_skinny.py on the GPU) otherwise. The kernels are faked here (this is the choice;
    their values are tests/test_fp8_skinny_rows_kernel.py's); the fallback's result is the real XLA form's."""
    from pallas_kernels import fp8_act_quant, fp8_skinny, fp8_skinny_rows
    from qwenjax.layers import fp8_matmul as fm

    for env in (fm.GEMV_ENV, fm.SKINNY_ENV, fm.ACT_KERNEL_ENV):
        monkeypatch.delenv(env, raising=False)
    rows, skinny = [], []   # fp8_skinny_rows' calls (x's dtype), fp8_skinny's
    monkeypatch.setattr(fp8_skinny_rows, "fp8_skinny_rows", lambda x, wq, ws, xs=None, out_dtype=None,
                        partials=False: rows.append(jnp.dtype(x.dtype).name + ("+scale" if xs is not None and
                                                                                x.dtype != FP8_DTYPE else ""))
                        or jnp.zeros((x.shape[0], wq.shape[0])))
    monkeypatch.setattr(fp8_skinny, "fp8_skinny", lambda xq, xs, wq, ws, out_dtype:
                        skinny.append(xq.shape) or jnp.zeros((xq.shape[0], wq.shape[0])))
    wq = jnp.full((256, 128), 2, FP8_DTYPE)
    ws = jnp.full((1, 256), 0.5, jnp.float32)
    x = jnp.ones((3, 128), jnp.bfloat16)
    monkeypatch.setenv(fm.ACT_KERNEL_ENV, "fused")
    y = fm.fp8_linear(x, wq, ws, out_dtype=jnp.float32)                # the CPU: XLA's form, the real product
    np.testing.assert_array_equal(np.asarray(y), np.full((3, 256), 128.0))
    assert rows == [] and skinny == []
    monkeypatch.setattr(fm, "platform", lambda: "gpu")
    fm.fp8_linear(x, wq, ws, out_dtype=jnp.float32)                   # x quantized inside
    assert rows == ["bfloat16"] and skinny == []
    fm.fp8_linear(x, wq, jnp.concatenate([ws, ws]), group=64, out_dtype=jnp.float32)  # per-group: not skinny
    fm.fp8_linear(x, wq, ws, static_scale=jnp.float32(0.1), out_dtype=jnp.float32)  # static: the skinny kernel
    assert rows == ["bfloat16"] and skinny == [(3, 128)]
    monkeypatch.setenv(fm.ACT_KERNEL_ENV, "1")                        # the quantizer kernel, then the rows kernel
    monkeypatch.setattr(fp8_act_quant, "quantize_rows", lambda x: quantize_activations(x))
    fm.fp8_linear(x, wq, ws, out_dtype=jnp.float32)
    assert rows == ["bfloat16", "float8_e4m3fn"] and skinny == [(3, 128)]
    monkeypatch.setenv(fm.ACT_KERNEL_ENV, "0")                        # XLA's quantization, fp8_skinny
    fm.fp8_linear(x, wq, ws, out_dtype=jnp.float32)
    assert rows == ["bfloat16", "float8_e4m3fn"] and skinny == [(3, 128)] * 2
    monkeypatch.delenv(fm.ACT_KERNEL_ENV)                             # the default, "auto": fused up to 8 rows
    fm.fp8_linear(x, wq, ws, out_dtype=jnp.float32)
    fm.fp8_linear(jnp.ones((fm.AUTO_FUSED_ROWS + 1, 128), jnp.bfloat16), wq, ws, out_dtype=jnp.float32)
    assert rows == ["bfloat16", "float8_e4m3fn", "bfloat16"] and skinny == [(3, 128)] * 2 + [(9, 128)]
    monkeypatch.setenv(fm.ACT_KERNEL_ENV, "scaled")   # the scales by XLA from XLA_SCALE_MIN_K columns, else inside
    fm.fp8_linear(x, wq, ws, out_dtype=jnp.float32)
    wide = jnp.full((256, fm.XLA_SCALE_MIN_K), 2, FP8_DTYPE)
    fm.fp8_linear(jnp.ones((3, fm.XLA_SCALE_MIN_K), jnp.bfloat16), wide, ws, out_dtype=jnp.float32)
    assert rows[-2:] == ["bfloat16", "bfloat16+scale"] and len(skinny) == 3
    monkeypatch.setenv(fm.ACT_KERNEL_ENV, "2")
    with pytest.raises(ValueError, match="must be one of auto, 0, 1, fused, scaled; got '2'"):
        fm.fp8_linear(x, wq, ws, out_dtype=jnp.float32)


def test_swiglu_choice(monkeypatch):
    """swiglu_linear: h by the kernel only with QWENJAX_FP8_SWIGLU=1 where the step's activations are quantized
    inside the GEMM on a GPU; None otherwise (the caller's projection, slices and multiply); a bad value refused."""
    from pallas_kernels import fp8_skinny_rows
    from qwenjax.layers import fp8_matmul as fm

    for env in (fm.GEMV_ENV, fm.SKINNY_ENV, fm.ACT_KERNEL_ENV, fm.SWIGLU_ENV):
        monkeypatch.delenv(env, raising=False)
    calls = []
    monkeypatch.setattr(fp8_skinny_rows, "fp8_skinny_rows", lambda x, wq, ws, out_dtype=None, swiglu=False:
                        calls.append(swiglu) or jnp.zeros((x.shape[0], wq.shape[0] // 2)))
    monkeypatch.setattr(fm, "platform", lambda: "gpu")
    wq, ws = jnp.full((256, 128), 2, FP8_DTYPE), jnp.full((1, 256), 0.5, jnp.float32)
    x = jnp.ones((1, 128), jnp.bfloat16)
    assert fm.swiglu_linear(x, wq, ws, out_dtype=jnp.bfloat16) is None            # off by default
    monkeypatch.setenv(fm.SWIGLU_ENV, "1")
    assert fm.swiglu_linear(x, wq, ws, out_dtype=jnp.bfloat16).shape == (1, 128)  # "auto" at one row: fused
    assert fm.swiglu_linear(jnp.ones((9, 128), jnp.bfloat16), wq, ws, out_dtype=jnp.bfloat16) is None  # "auto": 0
    monkeypatch.setenv(fm.ACT_KERNEL_ENV, "1")
    assert fm.swiglu_linear(x, wq, ws, out_dtype=jnp.bfloat16) is None
    monkeypatch.setattr(fm, "platform", lambda: "cpu")
    monkeypatch.setenv(fm.ACT_KERNEL_ENV, "fused")
    assert fm.swiglu_linear(x, wq, ws, out_dtype=jnp.bfloat16) is None            # no GPU
    assert calls == [True]
    monkeypatch.setenv(fm.SWIGLU_ENV, "yes")
    with pytest.raises(ValueError, match="QWENJAX_FP8_SWIGLU must be 0 or 1, got 'yes'"):
        fm.swiglu_linear(x, wq, ws, out_dtype=jnp.bfloat16)
