"""Benchmarks of quantized models on CPU: --model NAME-awq / -gptq-int4 resolve, packed-byte floors, a tiny-scale run
of latency and throughput-fixed for each format, the quant_matmul sweep in interpret mode, and the 72B AWQ budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.test_benchmarks_smoke import REPO, bench_modules

floors, model_specs, result_files = bench_modules("floors", "model_specs", "result_files")


def test_quantized_model_names_resolve():
    awq = model_specs.resolve_model("qwen2-7b-instruct-awq")
    gptq = model_specs.resolve_model("qwen2-7b-instruct-gptq-int4")
    base = model_specs.resolve_model("qwen2-7b-instruct")
    assert awq.name == "qwen2-7b-instruct-awq" and gptq.name == "qwen2-7b-instruct-gptq-int4"
    assert {k: v for k, v in awq.config.items() if k != "quantization_config"} == base.config
    assert awq.config["quantization_config"] == {"quant_method": "awq", "bits": 4, "group_size": 128,
                                                 "zero_point": True, "version": "gemm",
                                                 "modules_to_not_convert": None}
    q = gptq.config["quantization_config"]
    assert (q["quant_method"], q["bits"], q["group_size"], q["desc_act"], q["sym"]) == ("gptq", 4, 128, False, True)
    from qwenjax.quantization import QuantConfig

    assert QuantConfig.from_checkpoint(awq.dir) == QuantConfig("awq", 4, 128, checkpoint_format="gemm")
    assert QuantConfig.from_checkpoint(gptq.dir) == QuantConfig("gptq", 4, 128, sym=True, checkpoint_format="gptq")
    assert model_specs.resolve_model("tiny-awq").config["quantization_config"]["group_size"] == 64  # hidden 64
    with pytest.raises(SystemExit, match="-gptq-int4"):
        model_specs.resolve_model("no-such-model")


def packed_layer_bytes(cfg, bits: int, group: int) -> tuple[int, int]:
    """(weights, packed bytes) of every layer's q k v o gate up down, worked out from the config: per projection of
    i inputs and o outputs, i x o weights packed at bits / 8 bytes each, and per group of `group` input rows one
    bf16 scale and one packed zero per output."""
    D, F, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (D // cfg.num_attention_heads)
    per_layer = [(D, D), (D, kv), (D, kv), (D, D), (D, F), (D, F), (F, D)]
    weights = L * sum(i * o for i, o in per_layer)
    packed = L * sum(i * o * bits // 8 + (i // group) * o * 2 + (i // group) * o * bits // 8 for i, o in per_layer)
    return weights, packed


def test_decode_floor_counts_packed_bytes():
    cfg = model_specs.model_config(model_specs.resolve_model("qwen2-7b-instruct"))
    q4 = model_specs.resolve_model("qwen2-7b-instruct-awq").config["quantization_config"]
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_key_value_heads) == \
        (3584, 18944, 28, 4)
    weights, packed = packed_layer_bytes(cfg, 4, 128)
    want = floors.decode_weight_bytes(cfg) - 2 * weights + packed  # the rest (lm_head, norms, biases) stays bf16
    assert floors.decode_weight_bytes(cfg, quant=q4) == want
    q8 = model_specs.resolve_model("qwen2-7b-instruct-gptq-int8").config["quantization_config"]
    assert floors.decode_weight_bytes(cfg, quant=q8) - want == packed_layer_bytes(cfg, 8, 128)[1] - packed
    floor = floors.decode_floor_seconds(cfg, [200], 2.0, quant=q4)
    assert floor == (want + 200 * floors.kv_bytes_per_token(cfg)) / 2e12
    big = model_specs.model_config(model_specs.resolve_model("qwen2-72b-instruct"))
    q72 = model_specs.resolve_model("qwen2-72b-instruct-awq").config["quantization_config"]
    weights72, packed72 = packed_layer_bytes(big, 4, q72["group_size"])
    assert floors.decode_weight_bytes(big, quant=q72) == floors.decode_weight_bytes(big) - 2 * weights72 + packed72


def test_72b_awq_fits_one_80gb_h100():
    """The quant-72b stage's numbers: weights (the decode bytes plus the embedding table), 0.9 of an H100's 80 GB,
    and 96 sequences of 768 tokens of bf16 KV beside them with room for activations."""
    spec = model_specs.resolve_model("qwen2-72b-instruct-awq")
    cfg = model_specs.model_config(spec)
    weights = floors.decode_weight_bytes(cfg, quant=spec.config["quantization_config"]) + \
        cfg.vocab_size * cfg.hidden_size * 2
    pool = 0.9 * 81559 * 2**20
    kv = 96 * 768 * floors.kv_bytes_per_token(cfg)
    assert weights / 2**30 < 39.0 and kv / 2**30 < 22.6
    assert pool - weights - kv > 6 * 2**30  # left for the activation peak (a few GiB at 8192 prefill tokens)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    res = tmp_path_factory.mktemp("results")
    out = tmp_path_factory.mktemp("out")
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO / 'benchmarks')!r})
        import latency, throughput, quant_matmul
        for m in ("tiny-awq", "tiny-gptq-int4"):
            a = ["--model", m, "--results-dir", {str(res)!r}, "--out", {str(out)!r}, "--ceilings", "small",
                 "--skip-warmup"]
            latency.main(a + ["--prompt-len", "12", "--output-len", "5", "--repeats", "1"])
            throughput.main(a + ["--num-prompts", "4", "--prompt-len", "10", "--output-len", "4"])
        quant_matmul.main(["--interpret", "--grid", "none", "--rows", "1", "--layers", "kv",
                           "--results-dir", {str(res)!r}])
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu", QWENJAX_COMMIT="smoke-test")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {p.name: json.loads(p.read_text()) for p in res.glob("*.json")}


def test_quantized_benchmarks_write_results(results):
    for m in ("tiny-awq", "tiny-gptq-int4"):
        lat = results[result_files.result_name("latency", m, "cpu")]
        fixed = results[result_files.result_name("throughput-fixed", m, "cpu")]
        assert lat["model"] == m and lat["metrics"]["tok_s"] > 0 and lat["metrics"]["mbu"] > 0
        assert fixed["metrics"]["output_tok_s"] > 0 and fixed["config"]["output_tokens"] == 16
        assert lat["config"]["quantization"]["quant_method"] == m.split("-")[1]
        assert fixed["config"]["quantization"]["group_size"] == 64
        cfg = model_specs.model_config(model_specs.resolve_model(m))
        assert lat["config"]["floor"]["decode_weight_bytes"] == \
            floors.decode_weight_bytes(cfg, quant=lat["config"]["quantization"]) < floors.decode_weight_bytes(cfg)
    sweep = results[result_files.result_name("quant-matmul", "qwen2-7b-instruct", "cpu")]
    assert sweep["config"]["interpret"] and sweep["metrics"]["variants_failed"] == 0
    ran = {(r["fmt"], r["variant"]) for r in sweep["config"]["runs"] if r["status"] == "ok"}
    assert {("bf16", "bf16"), ("gptq", "xla"), ("gptq", "gemv"), ("awq", "xla"), ("awq", "gemv"),
            ("gptq", "skinny"), ("awq", "skinny"), ("gptq", "auto_act_order")} <= ran
    assert sweep["config"]["search"] == ["skinny"] and "skinny_configs" in sweep["config"]
    assert sweep["metrics"]["gptq_kv_m1_us"] > 0
