"""long-context: one prompt of 8k, 32k and 128k tokens on Qwen2-7B's shape with YaRN (factor 4), in one run
(BENCHMARKS.md `long-context`, issue 29).

Per context C (the prompt is C - --output-len tokens, so that its decode ends at C, within max_model_len):
  prefill   ttft_ms (arrival to first token, the median of --repeats requests, each a fresh random prompt alone in
            the engine), prefill_tok_s = prompt tokens / TTFT, mfu = (2 x non-embedding params x tokens + causal
            attention 2 x N x L^2 x H per layer) / the bf16 matmul rate measured in this run / TTFT;
            speedup_vs_dense_forward = prefill.py's dense forward (plain jnp Qwen2, same weights, same tokens, cuDNN
            flash attention, nothing paged) time / TTFT, where C <= --dense-max-context (the 7B's dense forward at
            128k does not fit beside the engine: skipped, and the JSON says so);
  attention the engine's attention for a lone fresh chunk of C tokens (layers.attention.context_attention:
            the Hopper kernel on sm90, the jnp reference on CPU) against jax.nn.dot_product_attention(cudnn), causal,
            one layer's shape, for C <= --attention-max-context: attention_tflops, attention_speedup_vs_cudnn;
  decode    ms_per_token over the request's --output-len tokens, mbu = (weights + the KV read at each step's
            context) / copy bandwidth measured in this run / their time.
Headline metrics (BENCHMARKS.md): prefill_speedup_vs_dense_32k, attention_speedup_vs_cudnn_8k / _32k,
decode_mbu_128k, prefill_tok_s_128k; every figure per context as <metric>_<8k|32k|128k>.

  python benchmarks/long_context.py --model qwen2-7b-instruct [--out $OUT]
  python benchmarks/long_context.py --model tiny --scale 0.01 --ceilings small      # a CPU dry run
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
import result_files  # noqa: E402
import workloads  # noqa: E402

BENCHMARK = "long-context"
CONTEXTS = (8192, 32768, 131072)


def parse(argv=None):
    p = cli_args.base_parser(__doc__.splitlines()[0])
    w = p.add_argument_group("workload")
    w.add_argument("--contexts", type=cli_args._int_list, default=None,
                   help="comma-separated contexts (prompt + output tokens), default 8192,32768,131072 (x --scale)")
    w.add_argument("--output-len", type=int, default=None, help="decode tokens a request, default 64 (x --scale)")
    w.add_argument("--repeats", type=int, default=2, help="timed requests a context; the medians are reported")
    w.add_argument("--yarn-factor", type=float, default=4.0,
                   help="YaRN through hf_overrides (original_max_position_embeddings: the config's "
                        "max_position_embeddings); 0: the config's RoPE as it is")
    w.add_argument("--dense-max-context", type=int, default=None,
                   help="run the dense forward up to this context, default 32768 (x --scale)")
    w.add_argument("--attention-max-context", type=int, default=None,
                   help="time the attention kernel against cuDNN up to this context, default 32768 (x --scale)")
    args = p.parse_args(argv)
    args.contexts = tuple(args.contexts or (cli_args.scaled(c, args.scale, 32) for c in CONTEXTS))
    args.output_len = args.output_len or cli_args.scaled(64, args.scale, 4)
    args.dense_max_context = args.dense_max_context or cli_args.scaled(32768, args.scale, 32)
    args.attention_max_context = args.attention_max_context or cli_args.scaled(32768, args.scale, 32)
    if min(args.contexts) <= args.output_len:
        p.error(f"--contexts {args.contexts} must each be longer than --output-len {args.output_len}")
    return args


def tag(context: int) -> str:
    """8192 -> "8k", 131072 -> "128k"; other contexts as they are."""
    return f"{context // 1024}k" if context % 1024 == 0 else str(context)


def pow2_at_least(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def prefill_buckets(prompts: list[int], chunk: int) -> tuple[int, ...]:
    """The Q buckets the prompts' chunks use: the chunk itself and each prompt's last piece rounded up to a power of
    two (so the engine compiles a handful of shapes, never one per prompt)."""
    tails = {min(chunk, pow2_at_least(p % chunk or chunk)) for p in prompts}
    return tuple(sorted(tails | {chunk}))


# ----------------------------------------------------------------------------------------------- attention alone


def attention_case(cfg, context: int, block_size: int, platform: str) -> dict:
    """One layer's attention for a fresh prompt of `context` tokens: the engine's path for a lone chunk (one
    rectangular row over its pages, causal) against dense causal attention on the same tokens held contiguously."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from attention_decode import time_us
    from attention_prefill import make_case

    from qwenjax.layers.attention import context_attention
    from qwenjax.layers.attention_metadata import AttentionMetadata

    N, K, H = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    (q, kp, vp, table, seq_lens, q_lens), (k, v) = make_case(jax.random.key(context), context, 0, heads=N,
                                                             kv_heads=K, head_dim=H, page=block_size)
    pos = jnp.arange(context, dtype=jnp.int32)[None]
    slots = jnp.asarray(np.asarray(table)[0][np.arange(context) // block_size] * block_size
                        + np.arange(context) % block_size, jnp.int32)[None]
    meta = AttentionMetadata(positions=pos, slot_mapping=slots, block_tables=table, seq_lens=seq_lens,
                             query_lens=q_lens)
    scale = H ** -0.5
    ours = jax.jit(lambda q, kp, vp, meta: context_attention(q, kp, vp, meta, sm_scale=scale))
    impl = "cudnn" if platform == "gpu" else "xla"
    peer = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                                implementation=impl))
    iters, reps = (10, 5) if platform == "gpu" else (1, 1)
    diff = float(jnp.max(jnp.abs(ours(q, kp, vp, meta).astype(jnp.float32) - peer(q, k, v).astype(jnp.float32))))
    us = time_us(ours, q, kp, vp, meta, iters=iters, reps=reps)
    peer_us = time_us(peer, q, k, v, iters=iters, reps=reps)
    flops = 2.0 * N * H * context * context  # causal: 4 x N x H x L^2 / 2
    return {"us": us, "tflops": flops / us / 1e6, "peer": impl, "peer_us": peer_us,
            "peer_tflops": flops / peer_us / 1e6, "speedup": peer_us / us, "max_abs_diff_vs_peer": diff}


# ----------------------------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    args = parse(argv)
    spec, cfg0, dev = engine_setup.prepare(args)
    O = args.output_len
    prompts = [c - O for c in args.contexts]
    budget = args.max_num_batched_tokens or cli_args.scaled(16384, args.scale, 16)  # an H100's offline default
    chunk = min(budget if budget & (budget - 1) == 0 else pow2_at_least(budget) // 2, pow2_at_least(max(prompts)))
    overrides = {"rope_scaling": {"type": "yarn", "factor": args.yarn_factor,
                                  "original_max_position_embeddings": cfg0.max_position_embeddings}} \
        if args.yarn_factor else None
    kwargs = engine_setup.engine_kwargs(args, max_model_len=cli_args.round_up(max(args.contexts), args.block_size),
                                        max_num_seqs=1, max_num_batched_tokens=budget, decode_buckets=(1,),
                                        prefill_buckets=prefill_buckets(prompts, chunk))
    kwargs["hf_overrides"] = overrides
    ceilings = device_ceilings.measure_ceilings(cfg0, mode=args.ceilings, platform=dev["platform"],
                                                gemm_tokens=chunk)
    llm, startup = engine_setup.build_llm(spec, kwargs)
    cfg = llm.llm_engine.model_config  # with the overrides: the dense forward's RoPE is the engine's
    mm, copy = ceilings["matmul_tflops"], ceilings["copy_tbps"]
    workloads.warm_generate(llm, workloads.random_prompts(1, prompts[0], seed=args.seed + 999,
                                                          vocab_size=cfg.vocab_size), max_tokens=2)

    metrics, cases = {}, []
    for C, P in zip(args.contexts, prompts):
        t = tag(C)
        reqs = workloads.random_prompts(args.repeats, P, seed=args.seed + C, vocab_size=cfg.vocab_size)
        runs, first_tokens, steps = [], [], []
        for prompt in reqs:
            before = workloads.stats_snapshot(llm)
            outs, wall = workloads.timed_generate(llm, [prompt], workloads.greedy(O))
            st = workloads.stats_delta(before, workloads.stats_snapshot(llm))
            out, m = outs[0], outs[0].metrics
            n = len(out.outputs[0].token_ids)
            if n != O:
                raise RuntimeError(f"context {C}: expected {O} tokens, got {n} ({out.outputs[0].finish_reason})")
            runs.append({"ttft_s": m.first_token_time - m.arrival_time,
                         "decode_s_per_token": (m.finished_time - m.first_token_time) / max(n - 1, 1),
                         "wall_s": wall})
            first_tokens.append(out.outputs[0].token_ids[0])
            steps.append({k: st.get(k) for k in ("prefill_steps", "mixed_steps", "decode_steps", "steps")})
        ttft = statistics.median(r["ttft_s"] for r in runs)
        tpot = statistics.median(r["decode_s_per_token"] for r in runs)
        flops = floors.request_flops(cfg, P, 0)
        total = flops["linear"] + flops["attention"]
        floor_s = floors.decode_floor_seconds(cfg, [P + i for i in range(1, O)], copy * args.mesh) if copy else None
        metrics.update({f"prefill_tok_s_{t}": P / ttft, f"ttft_ms_{t}": ttft * 1e3,
                        f"mfu_{t}": floors.ratio(total / (mm * 1e12), ttft) if mm else None,
                        f"ms_per_token_{t}": tpot * 1e3,
                        f"decode_mbu_{t}": floors.ratio(floor_s / max(O - 1, 1), tpot) if floor_s else None})
        case = {"context": C, "prompt_len": P, "output_len": O, "runs": runs, "engine_steps": steps,
                "flops": {**flops, "total": total}}

        # The dense forward on the same weights and the same tokens, where it fits.
        if C <= args.dense_max_context:
            case["dense_forward"] = dense = run_dense(llm, cfg, reqs, first_tokens, dev, args.repeats)
            if "ms" in dense:
                metrics[f"prefill_speedup_vs_dense_{t}"] = dense["ms"] / 1e3 / ttft
                metrics[f"dense_forward_mfu_{t}"] = floors.ratio(total / (mm * 1e12), dense["ms"] / 1e3) if mm else None
        else:
            case["dense_forward"] = {"skipped": f"context {C} > --dense-max-context {args.dense_max_context}: the "
                                                "dense forward's activations do not fit beside the engine"}
        if C <= args.attention_max_context:
            att = attention_case(cfg, C, args.block_size, dev["platform"])
            case["attention"] = att
            metrics[f"attention_tflops_{t}"] = att["tflops"]
            metrics[f"attention_speedup_vs_cudnn_{t}"] = att["speedup"]
        cases.append(case)
        print(f"context {C}: ttft {ttft * 1e3:.1f} ms, {P / ttft:,.0f} tok/s, decode {tpot * 1e3:.3f} ms/token",
              flush=True)

    config = {"contexts": list(args.contexts), "prompt_lens": prompts, "output_len": O, "batch": 1,
              "dtype": args.dtype, "kv_cache_dtype": args.kv_cache_dtype, "seed": args.seed,
              "repeats": args.repeats, "hf_overrides": overrides, "prefill_chunk": chunk,
              "dense_max_context": args.dense_max_context, "attention_max_context": args.attention_max_context,
              "standard": tuple(args.contexts) == CONTEXTS and spec.name == "qwen2-7b-instruct",
              "method": "prefill: TTFT of a lone request; decode: (finished - first token) / (n - 1); floors from "
                        "BENCHMARKS.md (attention FLOPs causal; decode bytes = weights + KV at each step's context)",
              "cases": cases}
    config.update(engine_setup.engine_config(llm, kwargs, startup))
    result = result_files.make_result(benchmark=BENCHMARK, model=spec.name, dev=dev, config=config,
                                      ceilings=ceilings, metrics=metrics)
    path = result_files.write_result(result, devtag=dev["devtag"], results_dir=args.results_dir, out=args.out)
    rows = [("model", spec.name), ("device", dev["device"]), ("yarn factor", args.yarn_factor),
            ("prefill chunk", chunk)]
    for C in args.contexts:
        t = tag(C)
        rows += [(f"{t}: {k}", metrics.get(f"{k}_{t}")) for k in
                 ("prefill_tok_s", "ttft_ms", "mfu", "prefill_speedup_vs_dense", "attention_speedup_vs_cudnn",
                  "ms_per_token", "decode_mbu") if metrics.get(f"{k}_{t}") is not None]
    rows += [("copy_tbps", copy), ("matmul_tflops", mm), ("startup_s (load + compile)", startup),
             ("result", str(path))]
    result_files.print_table(f"{BENCHMARK} {spec.name}", rows)
    return result


def run_dense(llm, cfg, reqs: list[list[int]], engine_first: list[int], dev: dict, repeats: int) -> dict:
    """prefill.py's dense forward over each request's prompt: the median time, whether its greedy token equals the
    engine's first token, or why it did not run (out of memory)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import prefill

    impl = "cudnn" if dev["platform"] == "gpu" and llm.llm_engine.model.dtype in (jnp.bfloat16, jnp.float16) \
        else "xla"
    try:
        fwd = prefill.dense_forward(cfg, impl, llm.llm_engine.runner.mesh.shape["tp"])
        w = prefill.dense_weights(llm)
        t0 = time.perf_counter()
        jax.block_until_ready(fwd(w, np.asarray(reqs[:1], np.int32)))
        compile_s = time.perf_counter() - t0
        walls, agree = [], []
        for r in range(repeats):
            t0 = time.perf_counter()
            tok = np.asarray(fwd(w, np.asarray(reqs[r:r + 1], np.int32)))
            walls.append(time.perf_counter() - t0)
            agree.append(int(tok[0]) == int(engine_first[r]))
    except Exception as e:  # noqa: BLE001 - out of device memory is recorded, not fatal
        if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
            raise
        return {"skipped": f"out of device memory: {str(e)[:300]}"}
    return {"ms": statistics.median(walls) * 1e3, "walls_ms": [round(x * 1e3, 3) for x in walls],
            "attention_implementation": impl, "compile_seconds": round(compile_s, 2),
            "token_agreement": sum(agree) / len(agree)}


if __name__ == "__main__":
    main()
