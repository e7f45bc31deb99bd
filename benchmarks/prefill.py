"""prefill: 8 prompts of 2048 tokens, 1 new token each, through LLM.generate (BENCHMARKS.md).

Figures: tok_s = prompt tokens / wall of one generate call (median of --repeats); mfu = the FLOP floor (2 x
non-embedding params per prompt token plus causal attention) over the bf16 matmul rate measured in this run, divided
by that wall; speedup_vs_dense_forward = the dense forward's time / ours, where the dense forward is a plain jnp
Qwen2 forward of the same prompts with the same random weights (the engine's own arrays), no pages, attention through
jax.nn.dot_product_attention (cuDNN on GPU, XLA elsewhere), layers unrolled, logits and argmax of the last position
only, timed the same way (host numpy ids in, host-visible token out, median of --repeats after a warm-up).

  python benchmarks/prefill.py --model qwen2-7b-instruct [--out $OUT]
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cli_args  # noqa: E402
import device_ceilings  # noqa: E402
import engine_setup  # noqa: E402
import floors  # noqa: E402
import model_specs  # noqa: E402
import profiling  # noqa: E402
import result_files  # noqa: E402
import workloads  # noqa: E402

BENCHMARK = "prefill"


def parse(argv=None):
    p = cli_args.base_parser(__doc__.splitlines()[0])
    w = p.add_argument_group("workload")
    w.add_argument("--batch", type=int, default=None, help="prompts per generate call, default 8 (x --scale)")
    w.add_argument("--prompt-len", type=int, default=None, help="default 2048 (x --scale)")
    w.add_argument("--repeats", type=int, default=5, help="timed generate calls; the median is reported")
    args = p.parse_args(argv)
    args.batch = args.batch or cli_args.scaled(8, args.scale)
    args.prompt_len = args.prompt_len or cli_args.scaled(2048, args.scale, 2)
    return args


# ----------------------------------------------------------------------------------------------- dense forward


def dense_weights(llm) -> dict:
    """The engine's parameter arrays (no copies), by role: q/k/v and gate/up as the engine holds them, fused
    (`qkv`, `gate_up`: models/fusion.py) or separate. FP8 projections (--quantization fp8) are dequantized to the
    embedding's dtype: the dense forward is then the bf16 model of the same weights, the peer FP8 is measured
    against."""
    from flax import nnx

    flat = {tuple(k): (v.get_value() if hasattr(v, "get_value") else v.value)
            for k, v in nnx.to_flat_state(llm.llm_engine.runner.params)}
    cfg = llm.llm_engine.model_config
    layers = []
    dtype = flat[("model", "embed_tokens", "embedding")].dtype
    for i in range(cfg.num_hidden_layers):
        g = lambda *path: _dequantized(flat, ("model", "layers", i) + path, dtype)  # noqa: E731
        has = lambda *path: any(("model", "layers", i) + path + (w,) in flat for w in ("kernel", "weight"))  # noqa
        attn = ("qkv_proj",) if has("self_attn", "qkv_proj") else ("q_proj", "k_proj", "v_proj")
        mlp = ("gate_up_proj",) if has("mlp", "gate_up_proj") else ("gate_proj", "up_proj")
        layers.append({n: g("self_attn", n, "kernel") for n in attn + ("o_proj",)} |
                      {n + "_b": g("self_attn", n, "bias") for n in attn} |
                      {n: g("mlp", n, "kernel") for n in mlp + ("down_proj",)} |
                      {"ln1": g("input_layernorm", "weight"), "ln2": g("post_attention_layernorm", "weight")})
    embed = flat[("model", "embed_tokens", "embedding")]
    head = None if cfg.tie_word_embeddings else flat[("lm_head", "kernel")]  # tied: the table, transposed in jit
    return {"embed": embed, "layers": layers, "norm": flat[("model", "norm", "weight")], "head": head}


def _dequantized(flat: dict, path: tuple, dtype):
    """flat[path]; for a `kernel` path of an FP8 layer (layers/fp8_linear.py: `weight` [O, I] float8), its weight
    transposed to [I, O] times weight_scale [G, O], in `dtype`."""
    import jax
    import jax.numpy as jnp

    fp8 = path[:-1] + ("weight",)
    if path[-1] != "kernel" or fp8 not in flat or flat[fp8].dtype != jnp.float8_e4m3fn:
        return flat[path]
    scale = flat[path[:-1] + ("weight_scale",)]

    def deq(w, s):
        k = w.T
        return (k.astype(jnp.float32) * jnp.repeat(s, k.shape[0] // s.shape[0], axis=0)).astype(dtype)

    return jax.jit(deq)(flat[fp8], scale)


def dense_forward(cfg, impl: str, shards: int = 1):
    """ids [B, T] -> greedy next token [B]: Qwen2 as plain jnp, causal attention over the prompt, nothing cached.
    `shards`: the mesh size the fused weights' columns are ordered for (models/fusion.py)."""
    import jax
    import jax.numpy as jnp

    from qwenjax.layers.rotary import rope_cos_sin
    from qwenjax.models.fusion import split_columns

    N, K, H, eps = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps
    F = cfg.intermediate_size

    def qkv(h, lw):
        if "qkv_proj" in lw:
            return split_columns(h @ lw["qkv_proj"] + lw["qkv_proj_b"], (N * H, K * H, K * H), shards)
        return [h @ lw[n] + lw[n + "_b"] for n in ("q_proj", "k_proj", "v_proj")]

    def gate_up(h, lw):
        if "gate_up_proj" in lw:
            return split_columns(h @ lw["gate_up_proj"], (F, F), shards)
        return h @ lw["gate_proj"], h @ lw["up_proj"]

    def rms(x, w):
        x32 = x.astype(jnp.float32)
        return w * (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps)).astype(x.dtype)

    def rope(x, cos, sin):  # x [B, T, heads, H]; rotate-half layout
        xf = x.astype(jnp.float32)
        rot = jnp.concatenate([-xf[..., H // 2:], xf[..., :H // 2]], -1)
        return (xf * cos + rot * sin).astype(x.dtype)

    def fwd(w, ids):
        B, T = ids.shape
        x = w["embed"][ids]
        cos, sin = rope_cos_sin(jnp.arange(T), H, cfg.rope_theta, cfg.rope_scaling)  # the engine's tables
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
        for lw in w["layers"]:  # unrolled
            h = rms(x, lw["ln1"])
            q, k, v = qkv(h, lw)
            q, k, v = q.reshape(B, T, N, H), k.reshape(B, T, K, H), v.reshape(B, T, K, H)
            a = jax.nn.dot_product_attention(rope(q, cos, sin), rope(k, cos, sin), v, is_causal=True,
                                             scale=H ** -0.5, implementation=impl)
            x = x + a.reshape(B, T, N * H) @ lw["o_proj"]
            h = rms(x, lw["ln2"])
            gate, up = gate_up(h, lw)
            x = x + (jax.nn.silu(gate) * up) @ lw["down_proj"]
        head = w["embed"].T if w["head"] is None else w["head"]
        logits = (rms(x[:, -1], w["norm"]) @ head).astype(jnp.float32)
        return jnp.argmax(logits, -1).astype(jnp.int32)

    return jax.jit(fwd)


# ----------------------------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    args = parse(argv)
    engine_setup.setup_jax(args)
    import jax
    import jax.numpy as jnp
    import numpy as np

    spec = engine_setup.model_spec(args)
    cfg = model_specs.model_config(spec)
    dev = result_files.device_info()
    B, P = args.batch, args.prompt_len
    budget = 16  # max_model_len: the prompt and its one new token (a prompt of max_model_len tokens gets none)
    while budget < B * P:
        budget *= 2
    kwargs = engine_setup.engine_kwargs(args, max_model_len=cli_args.round_up(P + 1, args.block_size), max_num_seqs=B,
                                        max_num_batched_tokens=budget, decode_buckets=(B,), prefill_buckets=(P,))
    ceilings = device_ceilings.measure_ceilings(cfg, mode=args.ceilings, platform=dev["platform"], gemm_tokens=B * P)
    llm, startup = engine_setup.build_llm(spec, kwargs)
    sets = [workloads.random_prompts(B, P, seed=args.seed + r, vocab_size=cfg.vocab_size)
            for r in range(args.repeats + 1)]
    workloads.warm_generate(llm, sets[-1], max_tokens=1)

    before = workloads.stats_snapshot(llm)
    walls, engine_tokens = [], []
    for r in range(args.repeats):
        outs, wall = workloads.timed_generate(llm, sets[r], workloads.greedy(1))
        walls.append(wall)
        engine_tokens.append([o.outputs[0].token_ids[0] for o in outs])
    stats = workloads.stats_delta(before, workloads.stats_snapshot(llm))
    wall = statistics.median(walls)

    # The dense forward, on the same weights and the same prompts.
    impl = "cudnn" if dev["platform"] == "gpu" and llm.llm_engine.model.dtype in (jnp.bfloat16, jnp.float16) \
        else "xla"
    w = dense_weights(llm)
    fwd = dense_forward(cfg, impl, llm.llm_engine.runner.mesh.shape["tp"])
    t0 = time.perf_counter()
    jax.block_until_ready(fwd(w, np.asarray(sets[-1], np.int32)))
    dense_compile = time.perf_counter() - t0
    dense_walls, agree = [], []
    for r in range(args.repeats):
        ids = np.asarray(sets[r], np.int32)
        t0 = time.perf_counter()
        toks = np.asarray(fwd(w, ids))
        dense_walls.append(time.perf_counter() - t0)
        agree += [int(a) == int(b) for a, b in zip(toks, engine_tokens[r])]
    dense = statistics.median(dense_walls)

    tokens = B * P
    flops = floors.sum_flops([floors.request_flops(cfg, P, 0)] * B)
    mm = ceilings["matmul_tflops"]
    metrics = {"tok_s": tokens / wall, "mfu": floors.ratio(flops["total"] / (mm * 1e12), wall) if mm else None,
               "speedup_vs_dense_forward": dense / wall, "ms": wall * 1e3, "dense_forward_ms": dense * 1e3,
               "dense_forward_tok_s": tokens / dense,
               "dense_forward_mfu": floors.ratio(flops["total"] / (mm * 1e12), dense) if mm else None,
               "dense_token_agreement": sum(agree) / len(agree)}
    config = {"batch": B, "prompt_len": P, "output_len": 1, "dtype": args.dtype, "kv_cache_dtype": args.kv_cache_dtype,
              "seed": args.seed, "repeats": args.repeats, "standard": (B, P) == (8, 2048),
              "dense_forward": {"attention_implementation": impl, "compile_seconds": round(dense_compile, 2),
                                "walls_ms": [round(x * 1e3, 3) for x in dense_walls]},
              "walls_ms": [round(x * 1e3, 3) for x in walls], "flops": flops, "engine_stats": stats}
    config.update(engine_setup.engine_config(llm, kwargs, startup))
    if args.profile:
        prof = profiling.profile_generate(llm, sets[0], workloads.greedy(1), profile_dir=args.profile_dir,
                                          unprofiled_wall_s=walls[0])
        metrics["device_busy"] = prof.get("device_busy")
        config["profile"] = prof
    result = result_files.make_result(benchmark=BENCHMARK, model=spec.name, dev=dev, config=config, ceilings=ceilings,
                                      metrics=metrics)
    path = result_files.write_result(result, devtag=dev["devtag"], results_dir=args.results_dir, out=args.out)
    rows = [("model", spec.name), ("device", dev["device"]), ("batch x prompt", f"{B} x {P}"),
            ("ms", wall * 1e3), ("tok_s", metrics["tok_s"]), ("mfu", metrics["mfu"]),
            ("dense forward ms", dense * 1e3), ("speedup_vs_dense_forward", metrics["speedup_vs_dense_forward"]),
            ("dense token agreement", metrics["dense_token_agreement"]), ("matmul_tflops", mm),
            ("startup_s (load + compile)", startup)]
    if "device_busy" in metrics:
        rows.append(("device_busy", metrics["device_busy"]))
    rows.append(("result", str(path)))
    result_files.print_table(f"{BENCHMARK} {spec.name}", rows)
    return result


if __name__ == "__main__":
    main()
