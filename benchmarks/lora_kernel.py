"""lora-kernel: the batched LoRA matmul of one projection group, timed alone on the device, per implementation.

The four LoRA matmuls of a layer of the model's shape (default qwen2-7b-instruct) as the engine holds them on one
device (worker/lora_stacks.py): qkv_proj (I = D, G * R = 3R, O = q + 2 kv), o_proj, gate_up_proj (2R, 2F) and
down_proj (I = F), with --num-loras adapters of rank --lora-rank (random A and B, slot 0 zeros), for each row count
of --rows (default 1, 8, 32, 64, 256: decode batches); row t uses adapter 1 + t mod num_loras (every row has one,
the adapters spread evenly: the throughput workload's mix). Implementations (metric suffix `_<impl>_<group>_t<T>`):
  decode   pallas_kernels/lora_decode.py: split-K shrink + expand (the engine's path for steps of <= 1024 tokens)
  grouped  pallas_kernels/lora_matmul.py: two grouped matmuls (the engine's path for larger steps; before issue 28's
           second round, also for decode)
  dense    lora_matmul_dense (XLA: every slot's shrink, masked, then one expand; the path over a mesh)
Each figure is the median us of groups of back-to-back calls ended by a device sync, the step's grouping (the
decode plan / group_by_slot) precomputed as the engine does once a step; `plan_us_t<T>` times building it.
`step_ms_<impl>_t<T>` = num_hidden_layers x the four groups' sum: what the LoRA matmuls add to a decode step.
`gbps_<impl>_<group>_t<T>`: the adapters' A and B bytes the rows use (+ x in, the delta out) / time. Each case
also records `<impl>_rel_err`, the result's relative error against the float32 dense form (a kernel that is fast
and wrong shows there; bfloat16 gives ~1e-2).

`--sweep` also times the decode kernel for the tilings in SWEEP (block_m, split_k, block_n, num_warps, num_stages,
fuse_reduction: the partials summed inside the expand, one kernel fewer) per group and row count (config.sweep, and
the best per case), for choosing the defaults on a GPU.
On CPU the Pallas kernels run in interpret mode (a smoke run; the figures mean nothing there).

  python benchmarks/lora_kernel.py [--model qwen2-7b-instruct] [--rows 1,8,32,64,256] [--sweep] [--out $OUT]
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

BENCHMARK = "lora-kernel"
IMPLS = ("decode", "grouped", "dense")
SWEEP = [  # (block_m, split_k, block_n, num_warps, num_stages, fuse_reduction); None: the default for the case
    (None, None, None, None, None, False), (None, None, None, None, None, True),
    (16, 128, 128, 4, 3, False), (16, 256, 128, 4, 3, False), (16, 512, 128, 4, 3, False), (16, 256, 64, 4, 3, False),
    (16, 256, 256, 8, 3, False), (32, 256, 128, 4, 3, False), (32, 512, 128, 4, 3, False), (64, 512, 128, 8, 3, False),
    (16, 128, 128, 2, 2, False), (16, 512, 128, 8, 4, False), (32, 128, 256, 8, 3, False), (64, 256, 128, 4, 4, False),
    (16, 512, 128, 4, 3, True), (16, 256, 128, 4, 3, True), (32, 512, 128, 4, 3, True), (64, 512, 128, 8, 3, True),
]


def parse(argv=None):
    p = cli_args.base_parser(__doc__.splitlines()[0])
    w = p.add_argument_group("workload")
    w.add_argument("--rows", type=cli_args._int_list, default=(1, 8, 32, 64, 256), help="row counts T, comma-separated")
    w.add_argument("--num-loras", type=int, default=8, help="adapters (slots 1..N; slot 0 is 'no adapter')")
    w.add_argument("--lora-rank", type=int, default=16)
    w.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {IMPLS}")
    w.add_argument("--repeats", type=int, default=7, help="timed groups per figure (median)")
    w.add_argument("--inner", type=int, default=20, help="calls per timed group")
    w.add_argument("--sweep", action="store_true", help="time the decode kernel for the tilings in SWEEP")
    w.add_argument("--sweep-configs", type=int, default=len(SWEEP), help="the first N tilings of SWEEP only")
    return p.parse_args(argv)


def groups(cfg, rank: int) -> dict[str, tuple[int, int, int]]:
    """group -> (I, G * R, O) of the engine's one-device stacks (worker/lora_stacks.py)."""
    from qwenjax.layers.lora import LORA_GROUPS
    from qwenjax.lora.peft import projection_shapes

    shapes = projection_shapes(cfg)
    out = {g: (shapes[parts[0]][0], rank * len(parts), sum(shapes[p][1] for p in parts))
           for g, parts in LORA_GROUPS.items()}
    out.update({p: (shapes[p][0], rank, shapes[p][1]) for p in ("o_proj", "down_proj")})
    return {g: out[g] for g in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")}


def main(argv=None) -> dict:
    args = parse(argv)
    spec = model_specs.resolve_model(args.model)
    engine_setup.setup_jax(args)
    import jax
    import jax.numpy as jnp

    from pallas_kernels.lora_decode import default_settings, lora_decode_matmul, plan
    from pallas_kernels.lora_matmul import group_by_slot, lora_matmul, lora_matmul_dense
    from qwenjax import compat

    cfg = model_specs.model_config(spec)
    dev = result_files.device_info()
    ceilings = device_ceilings.measure_ceilings(cfg, mode=args.ceilings, platform=dev["platform"])
    interpret = compat.platform() != "gpu"
    dtype = jnp.dtype(args.dtype)
    impls = [i for i in args.impls.split(",") if i]
    if set(impls) - set(IMPLS):
        raise SystemExit(f"--impls: unknown {sorted(set(impls) - set(IMPLS))}; allowed: {', '.join(IMPLS)}")
    S = args.num_loras + 1
    time_it = lambda fn, *a: statistics.median(device_ceilings._time_fn(fn, *a, reps=args.repeats, inner=args.inner))
    fns = {"decode": jax.jit(lambda x, a, b, ids, p: lora_decode_matmul(x, a, b, p, interpret=interpret)),
           "grouped": jax.jit(lambda x, a, b, ids, g: lora_matmul(x, a, b, ids, g, interpret=interpret)),
           "dense": jax.jit(lambda x, a, b, ids, _: lora_matmul_dense(x, a, b, ids))}

    metrics, per_case, sweep = {}, {}, []
    for T in args.rows:
        ids = (1 + jnp.arange(T, dtype=jnp.int32) % args.num_loras).astype(jnp.int32)
        used = min(T, args.num_loras)
        p, grouping = jax.jit(lambda i: plan(i, S))(ids), jax.jit(lambda i: group_by_slot(i, S))(ids)
        metrics[f"plan_us_t{T}"] = time_it(jax.jit(lambda i: plan(i, S)), ids) * 1e6
        step = dict.fromkeys(impls, 0.0)
        for name, (i, r, o) in groups(cfg, args.lora_rank).items():
            k = jax.random.split(jax.random.key(args.seed + T), 3)
            x = jax.random.normal(k[0], (T, i), dtype)
            a = (jax.random.normal(k[1], (S, i, r)) * 0.02).astype(dtype).at[0].set(0)
            b = (jax.random.normal(k[2], (S, r, o)) * 0.02).astype(dtype).at[0].set(0)
            nbytes = (used * (i * r + r * o) + T * (i + o)) * dtype.itemsize
            case = {"I": i, "R": r, "O": o, "decode_defaults": default_settings(T, i, r, o, p.block_m)}
            f32 = [v.astype(jnp.float32) for v in (x, a, b)]
            ref = lora_matmul_dense(*f32, ids)
            for impl in impls:
                got = fns[impl](x, a, b, ids, p if impl == "decode" else grouping).astype(jnp.float32)
                case[f"{impl}_rel_err"] = float(jnp.linalg.norm(got - ref) / jnp.maximum(jnp.linalg.norm(ref), 1e-9))
                us = time_it(fns[impl], x, a, b, ids, p if impl == "decode" else grouping) * 1e6
                case[f"{impl}_us"] = us
                metrics[f"us_{impl}_{name}_t{T}"] = us
                metrics[f"gbps_{impl}_{name}_t{T}"] = nbytes / us / 1e3
                step[impl] += us
            per_case[f"{name}_t{T}"] = case
            print(f"T={T} {name} (I {i}, R {r}, O {o}): " + ", ".join(f"{m} {case[f'{m}_us']:.1f} us" for m in impls),
                  flush=True)
            if args.sweep:
                sweep.append(_sweep(x, a, b, ids, S, name, T, interpret, time_it, args.sweep_configs))
        for impl in impls:
            metrics[f"step_ms_{impl}_t{T}"] = step[impl] * cfg.num_hidden_layers / 1e3
    config = {"dtype": args.dtype, "rows": list(args.rows), "num_loras": args.num_loras, "lora_rank": args.lora_rank,
              "num_hidden_layers": cfg.num_hidden_layers, "impls": impls, "seed": args.seed, "repeats": args.repeats,
              "inner": args.inner, "interpret": interpret, "groups": groups(cfg, args.lora_rank),
              "cases": per_case, "sweep": sweep,
              "method": "median us of groups of back-to-back calls ended by a device sync; the grouping precomputed"}
    result = result_files.make_result(benchmark=BENCHMARK, model=spec.name, dev=dev, config=config, ceilings=ceilings,
                                      metrics=metrics)
    path = result_files.write_result(result, devtag=dev["devtag"], results_dir=args.results_dir, out=args.out)
    rows = [("model", spec.name), ("device", dev["device"])]
    rows += [(f"T={T} LoRA matmuls a step, ms ({impl})", metrics[f"step_ms_{impl}_t{T}"])
             for T in args.rows for impl in impls]
    rows += [(f"sweep best {s['group']} T={s['rows']}", s["best"]) for s in sweep]
    rows += [("result", str(path))]
    result_files.print_table(f"{BENCHMARK} {spec.name}", rows)
    return result


def _sweep(x, a, b, ids, S, name, T, interpret, time_it, limit) -> dict:
    """The decode kernel on one group and row count for each tiling of SWEEP (those its shapes allow)."""
    import jax

    from pallas_kernels.lora_decode import lora_decode_matmul, plan

    out = []
    for tiling in SWEEP[:limit]:
        bm, ks, bn, warps, stages, fused = tiling
        if (ks and x.shape[1] % ks) or (bn and b.shape[2] % bn):
            continue  # the tiling does not divide this group's shapes
        try:
            p = jax.jit(lambda i, bm=bm: plan(i, S, block_m=bm))(ids)
            fn = jax.jit(lambda x, a, b, p, ks=ks, bn=bn, w=warps, s=stages, f=fused: lora_decode_matmul(
                x, a, b, p, split_k=ks, block_n=bn, num_warps=w, num_stages=s, fuse_reduction=f, interpret=interpret))
            out.append({"tiling": tiling, "us": round(time_it(fn, x, a, b, p) * 1e6, 2)})
        except Exception as e:  # a tiling Triton rejects is a row of the sweep, not a failed run
            out.append({"tiling": tiling, "error": f"{type(e).__name__}: {str(e)[:200]}"})
        print(f"  sweep {name} T={T}", out[-1], flush=True)
    timed = [r for r in out if "us" in r]
    best = min(timed, key=lambda r: r["us"]) if timed else None
    return {"group": name, "rows": T, "results": out, "best": None if best is None else f"{best['tiling']} "
            f"{best['us']} us"}


if __name__ == "__main__":
    main()
