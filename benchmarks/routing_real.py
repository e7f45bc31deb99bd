"""routing-real: the routers of a real 2-replica CPU run on a shared-prefix trace, ordered by mean TTFT, against the
simulator's ordering on the same trace (issue 32: "checked against a real 2-replica CPU run for the ordering").

Two engine replicas (qwenjax.engine.data_parallel.DataParallelEngine, the "mp" backend: two engine core processes)
of the built-in tiny model on the CPU replay one trace per router (round_robin, least_loaded, prefix_aware):
Poisson arrivals, every prompt starting with one of --prefix-groups prefixes of --prefix-len tokens. Each replica's
KV cache (--num-kv-pages pages of 16 tokens) holds about half the prefixes, and --max-num-batched-tokens is small, so
a prompt whose prefix is not cached where it lands takes several prefill steps: where a router sends the prefixes
decides the TTFT. Before each router the replicas' prefix caches are emptied (and a warm-up pass compiled every step
shape first). The simulator (qwenjax.sim.cluster) runs the same trace with the same scheduler settings on the
newest H100 step-time model: its absolute times are the H100's, only the orderings are compared.

With --repeats R the whole comparison runs on R traces (seeds seed .. seed + R - 1; the routers' order rotates from
one trace to the next, so a slow drift of the host does not favour one router); the simulator runs the same R traces.

Figures: each router's real mean / p99 TTFT and prefix-cache hit rate (means over the traces; the real mean TTFT's
standard error over them too), the real and simulated orderings of the routers by mean TTFT, `orderings_agree` (1
when the two orderings are equal), `best_agrees` (1 when the same router is best in both), and
`resolved_pairs_agree`: 1 when every pair of routers whose real mean TTFTs differ by more than twice their combined
standard error (a difference the host's noise does not explain) is ordered the same way by the simulator;
`resolved_pairs` says how many pairs that is.

  JAX_PLATFORMS=cpu python benchmarks/routing_real.py [--num-requests 60] [--request-rate 6] [--repeats 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import repo_paths  # noqa: E402
import result_files  # noqa: E402
import routing_sim  # noqa: E402

BENCHMARK = "routing-real"
ROUTER_NAMES = routing_sim.ROUTER_NAMES


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-requests", type=int, default=60)
    p.add_argument("--request-rate", type=float, default=6.0, help="mean arrivals per second (Poisson)")
    p.add_argument("--prefix-groups", type=int, default=8)
    p.add_argument("--prefix-len", type=int, default=384)
    p.add_argument("--num-kv-pages", type=int, default=160, help="KV pages (16 tokens) of each replica")
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--max-num-batched-tokens", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--step-model", default=None, help="the simulator's step-time model (default: routing_sim's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="traces (seeds seed, seed + 1, ...) the comparison runs on")
    p.add_argument("--results-dir", default=str(repo_paths.RESULTS_DIR))
    p.add_argument("--out", default=None, help="also copy the result JSON here")
    return p.parse_args(argv)


def make_trace(args, n: int, seed: int):
    from qwenjax.sim import Lengths, Poisson, Uniform
    from qwenjax.sim import make_trace as build
    from qwenjax.sim.traces import SharedPrefix

    return build(n, Poisson(args.request_rate), Lengths(Uniform(args.prefix_len + 16, args.prefix_len + 64),
                                                        Uniform(4, 12)),
                 seed=seed, shared_prefix=SharedPrefix(args.prefix_groups, args.prefix_len), name="shared-prefix")


async def replay(dp, trace, vocab_size: int) -> dict:
    """Sends the trace's requests at their arrival times; TTFT of each, from its arrival to its first token."""
    from qwenjax.sampling_params import SamplingParams

    t0 = time.monotonic()
    ttfts: list[float] = []

    async def one(i, r):
        await asyncio.sleep(max(0.0, t0 + r.arrival - time.monotonic()))
        arrival = time.monotonic()
        params = SamplingParams(max_tokens=r.output_len, temperature=0, ignore_eos=True)
        stream = dp.add_request(f"{trace.name}-{trace.seed}-{i}", None, params,
                                prompt_token_ids=trace.prompt_token_ids(i, vocab_size), arrival_time=arrival)
        async for _ in stream:
            pass
        ttfts.append(stream.first_token_time - arrival)

    await asyncio.gather(*(one(i, r) for i, r in enumerate(trace.requests)))
    ttfts.sort()
    return {"ttft_ms_mean": 1e3 * sum(ttfts) / len(ttfts), "ttft_ms_p99": 1e3 * ttfts[int(0.99 * (len(ttfts) - 1))],
            "seconds": time.monotonic() - t0}


def run_real(args, traces, warmup) -> list[dict]:
    """Per trace, router name -> its real figures (one pair of replicas for all of them)."""
    from qwenjax.config import EngineArgs
    from qwenjax.core.routing import make_router
    from qwenjax.engine.data_parallel import DataParallelEngine

    eargs = EngineArgs(dtype="float32", max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                       max_num_batched_tokens=args.max_num_batched_tokens, num_kv_pages=args.num_kv_pages,
                       generation_config="vllm", usage_context="server", data_parallel_size=2, seed=args.seed)
    dp = DataParallelEngine(eargs, log_interval_s=float("inf"))
    try:
        vocab = dp.engine.model_config.vocab_size
        asyncio.run(replay(dp, warmup, vocab))  # compiles every step shape the runs use
        runs = []
        for k, trace in enumerate(traces):
            out = {}
            for name in ROUTER_NAMES[k % len(ROUTER_NAMES):] + ROUTER_NAMES[:k % len(ROUTER_NAMES)]:
                dp.engine.reset_prefix_cache()
                dp.router = make_router(name)
                q0, h0 = dp.engine.blocks.query_tokens, dp.engine.blocks.hit_tokens
                res = asyncio.run(replay(dp, trace, vocab))
                time.sleep(0.2)  # the replicas' last stats snapshots
                q, h = dp.engine.blocks.query_tokens - q0, dp.engine.blocks.hit_tokens - h0
                res["prefix_cache_hit_rate"] = h / q if q else 0.0
                out[name] = res
            runs.append(out)
        return runs
    finally:
        dp.shutdown()


def mean_over(runs: list[dict]) -> dict:
    """router -> each figure's mean over the traces, and the mean TTFT's standard error (ttft_ms_mean_se)."""
    out = {}
    for r in ROUTER_NAMES:
        vals = {f: [run[r][f] for run in runs] for f in ("ttft_ms_mean", "ttft_ms_p99", "prefix_cache_hit_rate")}
        out[r] = {f: statistics.fmean(v) for f, v in vals.items()}
        v = vals["ttft_ms_mean"]
        out[r]["ttft_ms_mean_se"] = statistics.stdev(v) / len(v) ** 0.5 if len(v) > 1 else 0.0
    return out


def resolved_pairs(real: dict, sim: dict) -> tuple[int, bool]:
    """(pairs whose real mean TTFTs differ by more than 2 combined standard errors, all of them ordered as sim)."""
    n, agree = 0, True
    for i, a in enumerate(ROUTER_NAMES):
        for b in ROUTER_NAMES[i + 1:]:
            d = real[a]["ttft_ms_mean"] - real[b]["ttft_ms_mean"]
            if abs(d) > 2 * (real[a]["ttft_ms_mean_se"] ** 2 + real[b]["ttft_ms_mean_se"] ** 2) ** 0.5:
                n += 1
                agree &= (d < 0) == (sim[a]["ttft_ms_mean"] < sim[b]["ttft_ms_mean"])
    return n, agree


def run_sim(args, trace) -> dict:
    from qwenjax.sim import SimConfig, StepTimeModel
    from qwenjax.sim.cluster import compare_routers

    path = args.step_model or routing_sim._newest(str(repo_paths.RESULTS_DIR))
    config = SimConfig.build(max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                             num_kv_pages=args.num_kv_pages, max_num_batched_tokens=args.max_num_batched_tokens)
    reports = compare_routers(trace, StepTimeModel.load(path), config, 2, ROUTER_NAMES)
    return {r: rep.metrics for r, rep in reports.items()}, os.path.relpath(path, repo_paths.REPO)


def main(argv=None) -> dict:
    args = parse(argv)
    traces = [make_trace(args, args.num_requests, args.seed + k) for k in range(args.repeats)]
    warmup = make_trace(args, max(8, args.num_requests // 4), args.seed + 100)
    real = mean_over(run_real(args, traces, warmup))
    sims = [run_sim(args, t) for t in traces]
    sim, step_model = mean_over([s for s, _ in sims]), sims[0][1]
    order_real = sorted(ROUTER_NAMES, key=lambda r: real[r]["ttft_ms_mean"])
    order_sim = sorted(ROUTER_NAMES, key=lambda r: sim[r]["ttft_ms_mean"])
    n_resolved, resolved_agree = resolved_pairs(real, sim)
    metrics = {"orderings_agree": int(order_real == order_sim), "best_agrees": int(order_real[0] == order_sim[0]),
               "resolved_pairs": n_resolved, "resolved_pairs_agree": int(resolved_agree),
               "ttft_mean_speedup_prefix_vs_round_robin_real":
                   real["round_robin"]["ttft_ms_mean"] / real["prefix_aware"]["ttft_ms_mean"],
               "ttft_mean_speedup_prefix_vs_round_robin_sim":
                   sim["round_robin"]["ttft_ms_mean"] / sim["prefix_aware"]["ttft_ms_mean"]}
    for r in ROUTER_NAMES:
        for f in ("ttft_ms_mean", "ttft_ms_p99", "prefix_cache_hit_rate"):
            metrics[f"real_{r}_{f}"] = real[r][f]
            metrics[f"sim_{r}_{f}"] = sim[r][f]
        metrics[f"real_{r}_ttft_ms_mean_se"] = real[r]["ttft_ms_mean_se"]
    dev = {"device": "cpu (2 engine replicas of the built-in tiny model)", "devtag": "cpu", "platform": "cpu"}
    cfg = {k: getattr(args, k) for k in ("num_requests", "request_rate", "prefix_groups", "prefix_len",
                                         "num_kv_pages", "max_num_seqs", "max_num_batched_tokens", "max_model_len",
                                         "seed", "repeats")}
    cfg.update(replicas=2, step_model=step_model, order_real=order_real, order_sim=order_sim, dtype="float32",
               traces=[t.summary() for t in traces])
    result = result_files.make_result(benchmark=BENCHMARK, model="tiny-random-qwen2", dev=dev, config=cfg,
                                      ceilings={}, metrics=metrics)
    out = result_files.write_result(result, devtag="cpu", results_dir=args.results_dir, out=args.out)
    rows = [(f"{r}: real TTFT mean (se) / p99 ms, hit rate | sim TTFT mean ms, hit rate",
             f"{real[r]['ttft_ms_mean']:.1f} ({real[r]['ttft_ms_mean_se']:.1f}) / {real[r]['ttft_ms_p99']:.1f}, "
             f"{real[r]['prefix_cache_hit_rate']:.2f} | "
             f"{sim[r]['ttft_ms_mean']:.1f}, {sim[r]['prefix_cache_hit_rate']:.2f}") for r in ROUTER_NAMES]
    rows += [("order real", " < ".join(order_real)), ("order sim", " < ".join(order_sim)),
             ("orderings_agree", metrics["orderings_agree"]),
             ("resolved pairs (beyond 2 se) / agree", f"{n_resolved} / {metrics['resolved_pairs_agree']}")]
    result_files.print_result_table(f"{BENCHMARK} (2 CPU replicas vs the simulator)", rows, result, False, out)
    return result


if __name__ == "__main__":
    main()
