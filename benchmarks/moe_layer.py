"""moe-layer: one Qwen2-MoE sparse block (router, top-k routed experts, shared expert), timed alone on the device.

The block of the model's shape (default qwen2-57b-a14b-instruct: D 3584, 64 experts of F 2560, top 8, shared expert
of 20480) with random weights, jitted, fed T random tokens ([T, D], the layer's input after its norm), for each T of
--tokens (default 1, 64, 256: decode at batch 1 and at larger batches). Figures per T (metric suffix `_t<T>`):
  us            the block's time (median of groups of back-to-back calls, each group ended by a device sync)
  routed_us     the routed experts alone (routing precomputed): three grouped matmuls and the sort around them
  unique_experts  distinct experts the T tokens picked (the router's own choice on these inputs)
  activated_gb  the bytes the block must read: unique experts x 3 x D x F, the shared expert (3 x D x Fs) and its
                gate, the router (D x E), at the weights' itemsize, plus x in and out
  mbu           activated bytes / copy bandwidth measured in this run / us (the block's own MBU); `mbu_routed`
                the same for the routed experts alone (their bytes over routed_us)
  tflops        2 x T x (k x 3 x D x F + 3 x D x Fs + D x E + D) / us
  speedup_vs_xla_ragged_dot   (GPU) the routed experts through `jax.lax.ragged_dot`, which XLA expands on CUDA into
                a dense dot over all E experts, over the Pallas grouped matmul the model uses
`--sweep` also times the grouped-matmul kernel alone on gate_proj's shape for a few tilings (config.sweep).

  python benchmarks/moe_layer.py [--model qwen2-57b-a14b-instruct] [--tokens 1,64,256] [--out $OUT]
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cli_args  # noqa: E402
import device_ceilings  # noqa: E402
import engine_setup  # noqa: E402
import model_specs  # noqa: E402
import result_files  # noqa: E402

BENCHMARK = "moe-layer"
SWEEP = [  # (block_m, block_n, block_k, num_warps, num_stages); None: the kernel's default for that M
    None, (16, 64, 64, 4, 3), (16, 128, 64, 4, 3), (16, 64, 128, 4, 4), (64, 128, 64, 4, 3), (128, 128, 64, 8, 3),
    (64, 64, 64, 4, 4), (128, 128, 32, 4, 4),
]


def parse(argv=None):
    p = cli_args.base_parser(__doc__.splitlines()[0])
    p.set_defaults(model="qwen2-57b-a14b-instruct")
    w = p.add_argument_group("workload")
    w.add_argument("--tokens", type=cli_args._int_list, default=(1, 64, 256), help="token counts T, comma-separated")
    w.add_argument("--repeats", type=int, default=7, help="timed groups per figure (median)")
    w.add_argument("--inner", type=int, default=10, help="calls per timed group")
    w.add_argument("--no-compare-xla", action="store_true", help="skip the jax.lax.ragged_dot comparison (GPU)")
    w.add_argument("--sweep", action="store_true", help="time the kernel alone for the tilings in SWEEP (GPU)")
    return p.parse_args(argv)


def block_figures(cfg, T: int, unique: int, itemsize: int) -> dict:
    """Bytes the block must read and the FLOPs it must do for T tokens that picked `unique` distinct experts."""
    D, E, k, F, Fs = (cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size,
                      cfg.shared_expert_intermediate_size)
    routed = unique * 3 * D * F * itemsize
    shared = (3 * D * Fs + D) * itemsize if Fs else 0
    router = D * E * itemsize
    acts = 2 * T * D * itemsize
    flops = 2 * T * (k * 3 * D * F + (3 * D * Fs + D if Fs else 0) + D * E)
    return {"routed_bytes": routed, "activated_bytes": routed + shared + router + acts, "flops": flops}


def main(argv=None) -> dict:
    args = parse(argv)
    spec = model_specs.resolve_model(args.model)
    engine_setup.setup_jax(args)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from qwenjax import compat
    from qwenjax.models import qwen2_moe
    from qwenjax.models.qwen2_moe import Qwen2MoeSparseMoeBlock, route

    cfg = model_specs.model_config(spec)
    if not cfg.num_experts:
        raise SystemExit(f"--model {args.model!r} has no experts (num_experts 0)")
    dev = result_files.device_info()
    ceilings = device_ceilings.measure_ceilings(cfg, mode=args.ceilings, platform=dev["platform"])
    dtype = jnp.dtype(args.dtype)
    make = lambda: Qwen2MoeSparseMoeBlock(cfg, dtype=dtype, rngs=nnx.Rngs(args.seed))
    graphdef, _ = nnx.split(nnx.eval_shape(make))
    state = jax.jit(lambda: nnx.split(make())[1])()  # random weights made on the device
    jax.block_until_ready(state)
    block = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    routed = jax.jit(lambda s, x, w, e: nnx.merge(graphdef, s).experts(x, w, e))
    router = jax.jit(lambda s, x: route(nnx.merge(graphdef, s).gate(x), cfg.num_experts_per_tok,
                                        cfg.norm_topk_prob, x.dtype))
    gpu = compat.platform() == "gpu"
    copy_bps = ceilings["copy_tbps"] * 1e12 if ceilings["copy_tbps"] else None
    mm = ceilings["matmul_tflops"]
    time_it = lambda fn, *a: statistics.median(device_ceilings._time_fn(fn, *a, reps=args.repeats, inner=args.inner))

    per_t, metrics = {}, {}
    for T in args.tokens:
        x = jax.random.normal(jax.random.key(args.seed + T), (T, cfg.hidden_size), dtype)
        weights, experts = router(state, x)
        unique = int(np.unique(np.asarray(experts)).size)
        fig = block_figures(cfg, T, unique, dtype.itemsize)
        t = time_it(block, state, x)
        t_routed = time_it(routed, state, x, weights, experts)
        row = {"us": t * 1e6, "routed_us": t_routed * 1e6, "unique_experts": unique,
               "activated_bytes": fig["activated_bytes"], "activated_gb": fig["activated_bytes"] / 1e9, "routed_gb": fig["routed_bytes"] / 1e9,
               "mbu": fig["activated_bytes"] / copy_bps / t if copy_bps else None,
               "mbu_routed": fig["routed_bytes"] / copy_bps / t_routed if copy_bps else None,
               "tflops": fig["flops"] / t / 1e12, "mfu": fig["flops"] / (mm * 1e12) / t if mm else None}
        if gpu and not args.no_compare_xla:
            row["xla_ragged_dot_routed_us"] = _xla_routed_us(qwen2_moe, graphdef, state, x, weights, experts,
                                                             time_it) * 1e6
            row["speedup_vs_xla_ragged_dot"] = row["xla_ragged_dot_routed_us"] / row["routed_us"]
        if gpu and args.sweep:
            row["sweep"] = _sweep(state, graphdef, x, experts, cfg, time_it)
        per_t[T] = row
        metrics.update({f"{k}_t{T}": v for k, v in row.items() if k != "sweep" and v is not None})
        print(f"T={T}: {row['us']:.1f} us (routed {row['routed_us']:.1f} us), {unique} experts, "
              f"{row['activated_gb']:.3f} GB, mbu {row['mbu']}", flush=True)
    first = args.tokens[0]
    metrics.update(us=per_t[first]["us"], mbu=per_t[first]["mbu"])  # headline: the first T (batch-1 decode)
    config = {"dtype": args.dtype, "tokens": list(args.tokens), "seed": args.seed, "repeats": args.repeats,
              "inner": args.inner, "implementation": "pallas grouped_matmul" if gpu else "jax.lax.ragged_dot",
              "shape": {"hidden_size": cfg.hidden_size, "num_experts": cfg.num_experts,
                        "num_experts_per_tok": cfg.num_experts_per_tok, "moe_intermediate_size":
                        cfg.moe_intermediate_size, "shared_expert_intermediate_size":
                        cfg.shared_expert_intermediate_size, "norm_topk_prob": cfg.norm_topk_prob},
              "per_tokens": {str(T): {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                             for T, r in per_t.items()},
              "method": "bytes: unique experts x 3 x D x F + shared expert + router + x in/out, at the weights' "
                        "itemsize; mbu = bytes / copy_tbps / time"}
    result = result_files.make_result(benchmark=BENCHMARK, model=spec.name, dev=dev, config=config, ceilings=ceilings,
                                      metrics=metrics)
    path = result_files.write_result(result, devtag=dev["devtag"], results_dir=args.results_dir, out=args.out)
    rows = [("model", spec.name), ("device", dev["device"])]
    for T, r in per_t.items():
        rows += [(f"T={T} us", r["us"]), (f"T={T} routed_us", r["routed_us"]), (f"T={T} experts", r["unique_experts"]),
                 (f"T={T} activated_gb", r["activated_gb"]), (f"T={T} mbu", r["mbu"]),
                 (f"T={T} mbu_routed", r["mbu_routed"])]
        if "speedup_vs_xla_ragged_dot" in r:
            rows.append((f"T={T} speedup_vs_xla_ragged_dot", r["speedup_vs_xla_ragged_dot"]))
    rows += [("copy_tbps", ceilings["copy_tbps"]), ("result", str(path))]
    result_files.print_table(f"{BENCHMARK} {spec.name}", rows)
    return result


def _xla_routed_us(qwen2_moe, graphdef, state, x, weights, experts, time_it) -> float:
    """The routed experts with jax.lax.ragged_dot in place of the kernel (the module's function swapped while this
    one program is traced)."""
    import jax
    from flax import nnx

    kernel_fn = qwen2_moe.grouped_matmul
    qwen2_moe.grouped_matmul = jax.lax.ragged_dot
    try:
        fn = jax.jit(lambda s, x, w, e: nnx.merge(graphdef, s).experts(x, w, e))
        fn.lower(state, x, weights, experts)  # traced now, with ragged_dot
        return time_it(fn, state, x, weights, experts)
    finally:
        qwen2_moe.grouped_matmul = kernel_fn


def _sweep(state, graphdef, x, experts, cfg, time_it) -> list[dict]:
    """The kernel alone on gate_proj's [E, D, F] for the rows these tokens route, per tiling in SWEEP."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from pallas_kernels.grouped_matmul import default_settings, grouped_matmul

    w = nnx.merge(graphdef, state).experts.gate_proj[...]
    k = experts.shape[1]
    flat = experts.reshape(-1)
    xs = x[jnp.argsort(flat, stable=True) // k]
    gs = jnp.bincount(flat, length=cfg.num_experts).astype(jnp.int32)
    out = []
    for tiling in SWEEP:
        kw = {} if tiling is None else dict(zip(("block_m", "block_n", "block_k", "num_warps", "num_stages"), tiling))
        name = "default " + str(default_settings(xs.shape[0], *w.shape[1:], w.shape[0])) if tiling is None else \
            str(tiling)
        try:
            fn = jax.jit(lambda xs, w, gs, kw=kw: grouped_matmul(xs, w, gs, **kw))
            out.append({"tiling": name, "us": round(time_it(fn, xs, w, gs) * 1e6, 2)})
        except Exception as e:  # a tiling Triton rejects is a row of the sweep, not a failed run
            out.append({"tiling": name, "error": f"{type(e).__name__}: {str(e)[:200]}"})
        print("  sweep", out[-1], flush=True)
    return out


if __name__ == "__main__":
    main()
