"""routing-sim: 8 simulated data-parallel replicas behind each router (round_robin, least_loaded, prefix_aware) on a
shared-prefix trace and on a random trace (BENCHMARKS.md), timed by a step-time model fitted on the H100.

Each replica is the engine's real Scheduler and BlockManager (qwenjax.sim.cluster); the clock is the step-time model
(default: the newest step-profile result for qwen2-7b-instruct on the H100 in benchmarks/results/). Both traces have
Poisson arrivals at --request-rate and outputs uniform in 32-256 tokens. Shared-prefix: every prompt starts with one
of --prefix-groups prefixes of --prefix-len tokens (a long system prompt or a conversation's history), prompts uniform
in (prefix-len + 128)-(prefix-len + 928) tokens; random: prompts uniform in 128-(prefix-len + 928) tokens (128-4000
by default), nothing shared. Each
replica has --num-kv-pages pages of 16 tokens (the default, 16,384 pages = 262,144 tokens, is 15 GB of Qwen2-7B's
bf16 KV cache), so on the shared trace the replicas' caches cannot hold every prefix everywhere.

Figures: ttft_mean_speedup_prefix_vs_round_robin (shared trace: round-robin mean TTFT / prefix-aware mean TTFT; target
>= 1.5) and ttft_mean_ratio_random (random trace: prefix-aware / round-robin mean TTFT; target <= 1.0), and each
router's mean / p99 TTFT, mean TPOT, output tok/s and prefix-cache hit rate on both.

  python benchmarks/routing_sim.py [--num-requests 1500] [--request-rate 40] [--out DIR]
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import repo_paths  # noqa: E402
import result_files  # noqa: E402

BENCHMARK = "routing-sim"
ROUTER_NAMES = ("round_robin", "least_loaded", "prefix_aware")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--step-model", default=None, help="a step-profile result or model JSON (default: the newest "
                   "step-profile-qwen2-7b-instruct-h100-*.json in benchmarks/results/)")
    p.add_argument("--replicas", type=int, default=8)
    p.add_argument("--num-requests", type=int, default=1500)
    p.add_argument("--request-rate", type=float, default=40.0, help="mean arrivals per second (Poisson)")
    p.add_argument("--prefix-groups", type=int, default=128)
    p.add_argument("--prefix-len", type=int, default=3072)
    p.add_argument("--num-kv-pages", type=int, default=16384, help="KV pages (16 tokens) of each replica")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results-dir", default=str(repo_paths.RESULTS_DIR))
    p.add_argument("--out", default=None, help="also copy the result JSON here")
    return p.parse_args(argv)


def traces(args):
    from qwenjax.sim import Lengths, Poisson, Uniform, make_trace
    from qwenjax.sim.traces import SharedPrefix

    out = Uniform(32, 256)
    shared = make_trace(args.num_requests, Poisson(args.request_rate),
                        Lengths(Uniform(args.prefix_len + 128, args.prefix_len + 928), out), seed=args.seed,
                        shared_prefix=SharedPrefix(args.prefix_groups, args.prefix_len), name="shared-prefix")
    rand = make_trace(args.num_requests, Poisson(args.request_rate), Lengths(Uniform(128, args.prefix_len + 928), out),
                      seed=args.seed + 1, name="random")
    return shared, rand


def main(argv=None) -> dict:
    from qwenjax.sim import SimConfig, StepTimeModel
    from qwenjax.sim.cluster import compare_routers

    args = parse(argv)
    path = args.step_model or _newest(str(repo_paths.RESULTS_DIR))
    model = StepTimeModel.load(path)
    config = SimConfig.build(max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                             num_kv_pages=args.num_kv_pages, max_num_batched_tokens=8192)
    shared, rand = traces(args)
    runs = {t.name: compare_routers(t, model, config, args.replicas, ROUTER_NAMES) for t in (shared, rand)}
    ttft = {(t, r): runs[t][r].metrics["ttft_ms_mean"] for t in runs for r in ROUTER_NAMES}
    metrics = {"ttft_mean_speedup_prefix_vs_round_robin":
               ttft["shared-prefix", "round_robin"] / ttft["shared-prefix", "prefix_aware"],
               "ttft_mean_ratio_random": ttft["random", "prefix_aware"] / ttft["random", "round_robin"]}
    for t, reports in runs.items():
        for r, rep in reports.items():
            for f in ("ttft_ms_mean", "ttft_ms_p99", "tpot_ms_mean", "output_tok_s", "prefix_cache_hit_rate"):
                metrics[f"{t}_{r}_{f}"] = rep.metrics[f]
    dev = {"device": "simulator (step-time model fitted on the H100)", "devtag": "sim", "platform": "sim"}
    cfg = {"replicas": args.replicas, "step_model": os.path.relpath(path, repo_paths.REPO),
           "sim_config": config.to_dict(), "traces": {t.name: t.summary() for t in (shared, rand)},
           "prefix_groups": args.prefix_groups, "prefix_len": args.prefix_len, "seed": args.seed,
           "replica_requests": {t: {r: [x["requests"] for x in rep.replicas] for r, rep in reports.items()}
                                for t, reports in runs.items()}}
    result = result_files.make_result(benchmark=BENCHMARK, model="qwen2-7b-instruct", dev=dev, config=cfg,
                                      ceilings={}, metrics=metrics)
    out = result_files.write_result(result, devtag="sim", results_dir=args.results_dir, out=args.out)
    rows = [(f"{t} {r}: TTFT mean / p99 ms, hit rate",
             f"{rep.metrics['ttft_ms_mean']:.1f} / {rep.metrics['ttft_ms_p99']:.1f}, "
             f"{rep.metrics['prefix_cache_hit_rate']:.2f}") for t, reports in runs.items()
            for r, rep in reports.items()]
    rows += [(k, v) for k, v in metrics.items() if not k.startswith(("shared-prefix_", "random_"))]
    result_files.print_result_table(f"{BENCHMARK} ({args.replicas} replicas)", rows, result, False, out)
    return result


def _newest(results_dir: str) -> str:
    found = sorted(glob.glob(os.path.join(results_dir, "step-profile-qwen2-7b-instruct-h100-*.json")))
    if not found:
        raise SystemExit(f"no step-profile-qwen2-7b-instruct-h100-*.json in {results_dir}; pass --step-model")
    return found[-1]


if __name__ == "__main__":
    main()
