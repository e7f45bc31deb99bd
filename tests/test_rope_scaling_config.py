"""RoPE scaling read from config.json as transformers reads it (qwenjax/rope_scaling.py): each config form's
frequencies and cos / sin against transformers' own Qwen2 rotary embedding built from the same file, the fused RoPE +
KV write kernel fed the scaled tables, refusals by name, the max_model_len scaling allows and what the KV sizing
says about it, and the ways to turn it on without editing files (hf_overrides, --hf-overrides)."""

from __future__ import annotations

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from qwenjax.config import EngineArgs, ModelConfig
from qwenjax.layers.rotary import rope_cos_sin
from qwenjax.rope_scaling import RopeScaling, attention_scaling, inv_freq
from qwenjax.worker.kv_cache import KVCacheTooSmallError, plan_num_pages
from qwenjax.worker.model_setup import check_max_model_len

BASE = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 64, "hidden_size": 64,
        "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 64}
SCALINGS = [  # (rope type, its keys, top-level keys)
    ("yarn", {"factor": 4.0, "original_max_position_embeddings": 64}, {}),
    ("yarn", {"factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 8, "beta_slow": 2,
              "truncate": False}, {}),
    ("yarn", {"factor": 3.0, "original_max_position_embeddings": 64, "attention_factor": 1.3}, {}),
    ("yarn", {"factor": 3.0, "original_max_position_embeddings": 64, "mscale": 1.0, "mscale_all_dim": 0.5}, {}),
    ("yarn", {"factor": None, "original_max_position_embeddings": 32}, {}),  # factor = 64 / 32
    # a top-level original_max_position_embeddings wins over the dict's, as transformers reads Phi-3's
    ("yarn", {"factor": 4.0, "original_max_position_embeddings": 64}, {"original_max_position_embeddings": 32}),
    ("linear", {"factor": 2.5}, {}),
    ("dynamic", {"factor": 2.0}, {}),
    ("dynamic", {"factor": 4.0}, {"rope_theta": 1e6}),
    ("default", {}, {}),
]
FORMS = ("rope_scaling/type", "rope_scaling/rope_type", "rope_parameters")


def config_json(form: str, kind: str, keys: dict, top: dict) -> dict:
    """One scaling written in one of the forms transformers reads."""
    theta = top.get("rope_theta", 10000.0)
    keys = copy.deepcopy(keys)
    if form == "rope_scaling/type":
        return {**BASE, **top, "rope_theta": theta, "rope_scaling": {"type": kind, **keys}}
    if form == "rope_scaling/rope_type":
        return {**BASE, **top, "rope_theta": theta, "rope_scaling": {"rope_type": kind, **keys}}
    top = {k: v for k, v in top.items() if k != "rope_theta"}
    return {**BASE, **top, "rope_parameters": {"rope_type": kind, "rope_theta": theta, **keys}}


def hf_rotary(d: dict, tmp_path):
    """transformers' Qwen2RotaryEmbedding for config.json `d`, read from a file as from_pretrained reads it."""
    from transformers import AutoConfig
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    (tmp_path / "config.json").write_text(json.dumps(d))
    return Qwen2RotaryEmbedding(AutoConfig.from_pretrained(tmp_path))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kind, keys, top", SCALINGS, ids=[f"{k}{i}" for i, (k, _, _) in enumerate(SCALINGS)])
def test_tables_equal_transformers(form, kind, keys, top, tmp_path):
    d = config_json(form, kind, keys, top)
    cfg = ModelConfig.from_dict(copy.deepcopy(d))
    assert (cfg.rope_scaling is None) == (kind == "default")
    assert cfg.rope_scaling is None or cfg.rope_scaling.rope_type == kind
    rotary = hf_rotary(d, tmp_path)
    positions = torch.arange(cfg.derived_max_model_len)[None]
    x = torch.zeros(1, 1, cfg.head_dim)
    if kind == "dynamic":
        # transformers grows dynamic NTK to the longest forward call so far; qwenjax's static form is its state
        # after a call reaching factor x max_position_embeddings (rope_scaling.py's docstring says why)
        rotary(x, positions)
    np.testing.assert_allclose(inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling), rotary.inv_freq.numpy(),
                               rtol=1e-6)
    assert attention_scaling(cfg.rope_scaling) == pytest.approx(rotary.attention_scaling, rel=1e-12)
    with torch.no_grad():
        hf_cos, hf_sin = rotary(x, positions)
    cos, sin = rope_cos_sin(jnp.asarray(positions.numpy()[0]), cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    np.testing.assert_allclose(np.asarray(cos), hf_cos[0].numpy(), atol=2e-6)
    np.testing.assert_allclose(np.asarray(sin), hf_sin[0].numpy(), atol=2e-6)


def test_dynamic_is_the_static_form_not_a_fresh_transformers(tmp_path):
    """What is claimed and no more: a fresh transformers model (nothing longer than max_position_embeddings seen
    yet) uses plain RoPE, qwenjax the static dynamic-NTK base from the first token."""
    d = config_json("rope_parameters", "dynamic", {"factor": 2.0}, {})
    cfg = ModelConfig.from_dict(copy.deepcopy(d))
    fresh = hf_rotary(d, tmp_path).inv_freq.numpy()
    ours = inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    np.testing.assert_allclose(fresh, inv_freq(cfg.head_dim, cfg.rope_theta, None), rtol=1e-6)
    assert np.abs(ours - fresh).max() > 1e-2


def test_nested_and_overridden_forms():
    flat = ModelConfig.from_dict(config_json("rope_parameters", "yarn", SCALINGS[0][1], {}))
    nested = ModelConfig.from_dict({**BASE, "rope_parameters": {"full_attention": {
        "rope_type": "yarn", "rope_theta": 10000.0, **SCALINGS[0][1]}}})
    assert nested.rope_scaling == flat.rope_scaling and nested.rope_theta == flat.rope_theta
    # rope_scaling (an hf_overrides of it) over a transformers-5 file: it wins, and the file's theta is kept
    both = ModelConfig.from_dict({**BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
                                  "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert both.rope_scaling == RopeScaling("linear", 2.0, 64) and both.rope_theta == 1e6
    assert ModelConfig.from_dict({**BASE, "rope_scaling": None, "rope_theta": 5.0}).rope_scaling is None


@pytest.mark.parametrize("scaling, error, words", [
    ({"type": "longrope", "short_factor": [1.0], "long_factor": [2.0]}, NotImplementedError, ["'longrope'"]),
    ({"rope_type": "llama3", "factor": 8.0}, NotImplementedError, ["'llama3'"]),
    ({"type": "foo", "factor": 2.0}, ValueError, ["unknown", "'foo'"]),
    ({"type": "linear"}, ValueError, ["'linear'", "needs a factor"]),
    ({"type": "yarn", "factor": "4"}, ValueError, ["factor", "'4'"]),
    ({"type": "yarn", "factor": -1.0}, ValueError, ["positive"]),
    ({"type": "yarn", "factor": 2.0, "partial_rotary_factor": 0.5}, NotImplementedError, ["partial_rotary_factor"]),
])
def test_what_is_not_computed_is_refused_by_name(scaling, error, words):
    with pytest.raises(error) as e:
        ModelConfig.from_dict({**BASE, "rope_scaling": scaling})
    for w in words:
        assert w in str(e.value)
    if "unknown" in words or error is NotImplementedError and "partial_rotary_factor" not in scaling:
        assert "'default', 'linear', 'dynamic', 'yarn'" in str(e.value)


def _qwen2_7b(**extra) -> ModelConfig:
    from pathlib import Path

    import qwenjax

    path = Path(qwenjax.__file__).parent / "assets" / "configs" / "qwen2-7b-instruct.json"
    return ModelConfig.from_dict({**json.loads(path.read_text()), **extra})


QWEN_YARN = {"rope_scaling": {"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"}}


def test_max_model_len_follows_the_scaling_as_vllm_derives_it():
    plain, yarn = _qwen2_7b(), _qwen2_7b(**QWEN_YARN)
    assert plain.derived_max_model_len == 32768 and yarn.derived_max_model_len == 131072
    assert check_max_model_len(None, yarn) == 131072 and check_max_model_len(4096, yarn) == 4096
    with pytest.raises(ValueError) as e:
        check_max_model_len(131072, plain)
    assert "32768" in str(e.value) and "hf_overrides=" in str(e.value) and "--hf-overrides" in str(e.value)
    with pytest.raises(ValueError) as e:
        check_max_model_len(131073, yarn)
    assert "yarn factor 4 x original_max_position_embeddings 32768 = 131072" in str(e.value)
    linear = ModelConfig.from_dict({**BASE, "rope_scaling": {"type": "linear", "factor": 2.5}})
    dynamic = ModelConfig.from_dict({**BASE, "rope_scaling": {"type": "dynamic", "factor": 2.0}})
    assert (linear.derived_max_model_len, dynamic.derived_max_model_len) == (160, 128)


def test_kv_sizing_says_what_one_128k_sequence_takes():
    """Qwen2-7B at 131072 tokens: 56 KiB a token in bfloat16 -> 7 GiB (7.5 GB) for the one sequence, half in fp8."""
    cfg = _qwen2_7b(**QWEN_YARN)
    with pytest.raises(KVCacheTooSmallError) as e:
        plan_num_pages(cfg=cfg, page_size=16, dtype=jnp.bfloat16, max_model_len=131072, free_bytes=4 << 30,
                       detail="test")
    msg = str(e.value)
    assert "one sequence of max_model_len=131072 tokens needs 8192 pages (7.00 GiB: 56 KiB a token in bfloat16)" in msg
    assert "at most 74896" in msg and "--kv-cache-dtype fp8" in msg and "3.50 GiB for that sequence" in msg
    assert plan_num_pages(cfg=cfg, page_size=16, dtype=jnp.float8_e4m3fn, max_model_len=131072,
                          free_bytes=4 << 30, detail="test") == 9362


def test_the_fused_rope_kv_write_kernel_takes_the_scaled_tables():
    """The kernel takes cos / sin as given: with YaRN's tables (|cos| up to the attention factor) it still equals
    its jnp reference bit for bit, and the rotation equals transformers' apply_rotary_pos_emb."""
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    from pallas_kernels.rope_kv_write import rope_kv_write, rope_kv_write_reference

    cfg = ModelConfig.from_dict({**BASE, "rope_scaling": {"type": "yarn", "factor": 4.0,
                                                          "original_max_position_embeddings": 64}})
    T, N, K, H, P, S = 6, 4, 2, cfg.head_dim, 4, 16
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (T, n, H), jnp.float32) for key, n in ((kq, N), (kk, K), (kv, K)))
    positions = jnp.asarray([0, 63, 64, 65, 200, 255], jnp.int32)
    cos, sin = rope_cos_sin(positions, H, cfg.rope_theta, cfg.rope_scaling)
    assert float(jnp.abs(cos).max()) > 1.0  # the attention factor is in the tables
    pages = jnp.zeros((K, P, S, H), jnp.float32)
    slots = jnp.arange(T, dtype=jnp.int32) * 3
    out = rope_kv_write(q, k, v, cos, sin, pages, pages, slots, interpret=True)
    ref = jax.jit(rope_kv_write_reference)(q, k, v, cos, sin, pages, pages, slots)
    for got, want in zip(out, ref):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    t = lambda x: torch.from_numpy(np.array(x))  # noqa: E731
    hf_q, hf_k = apply_rotary_pos_emb(t(q), t(k), t(cos), t(sin), unsqueeze_dim=1)
    np.testing.assert_allclose(np.asarray(out[0]), hf_q.numpy(), atol=1e-5)
    k_pages = np.asarray(out[1]).reshape(K, P * S, H)
    np.testing.assert_allclose(k_pages[:, np.asarray(slots)].transpose(1, 0, 2), hf_k.numpy(), atol=1e-5)


YARN_JSON = '{"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}'


def test_engine_args_keep_hf_overrides_as_canonical_json():
    a = EngineArgs(hf_overrides=json.loads(YARN_JSON))
    b = EngineArgs(hf_overrides=YARN_JSON)
    assert a == b and hash(a) == hash(b) and a.hf_overrides_dict() == json.loads(YARN_JSON)
    assert EngineArgs(hf_overrides={}).hf_overrides is None and EngineArgs().hf_overrides_dict() == {}
    for bad, words in ((lambda c: c, "function"), ("[1, 2]", "dict"), ("{not json", "JSON object"),
                       ({"x": {1, 2}}, "JSON values")):
        with pytest.raises(ValueError, match=words):
            EngineArgs(hf_overrides=bad)


def test_server_flag_parses_to_the_same_overrides(tmp_path):
    from server.__main__ import engine_args, make_parser

    args = engine_args(make_parser().parse_args(["--hf-overrides", YARN_JSON]))
    assert args.hf_overrides_dict() == json.loads(YARN_JSON) and args.usage_context == "server"
    assert engine_args(make_parser().parse_args([])).hf_overrides is None
    conf = tmp_path / "serve.yaml"
    conf.write_text("hf-overrides:\n  rope_scaling: {type: yarn, factor: 4.0, original_max_position_embeddings: "
                    "32768}\nmax-model-len: 131072\n")
    from_file = engine_args(make_parser().parse_args(["--config", str(conf)]))
    assert from_file.hf_overrides == args.hf_overrides and from_file.max_model_len == 131072
    for bad in ("{not json", "[1]"):
        with pytest.raises(SystemExit):
            make_parser().parse_args(["--hf-overrides", bad])
