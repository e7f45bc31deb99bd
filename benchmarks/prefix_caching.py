"""prefix-caching: 200 requests sharing one 1024-token system prompt, each with its own 64-token suffix, arriving at a
fixed rate, replayed in real time on an engine with automatic prefix caching and on one without; TTFT compared.

Workload: request i arrives at i / --request-rate seconds (a fixed rate, default 8 req/s: no bursts, so the uncached
engine queues only behind its own prefills), its prompt is the shared prefix (--prefix-len, 1024) then
--suffix-len (64) ids of its own (seeded random ids, `Trace.prompt_token_ids` of a trace seeded by --seed); greedy,
ignore_eos, --output-len (32) tokens, no detokenization. The same requests are replayed twice, each time on a fresh
engine (the first one freed before the second is built): uncached (enable_prefix_caching=False) first, then cached.
The replay is sim_validate.py's: each request is added once the wall clock passes its arrival, with that arrival as
its arrival_time, so waiting for the step in flight counts in its TTFT. The untimed warm-up uses another trace's
prompts (another prefix), so the timed run starts with nothing of its prefix cached: the first request computes the
prefix, the later ones find it.

Per run (suffix _cached / _uncached): ttft_ms_{mean,p50,median,p99} (first token - arrival), tpot_ms_{mean,p50,p99}
((finish - first token) / (tokens - 1)), output_tok_s (output tokens over last finish - first arrival),
prefix_cache_hits / prefix_cache_queries (prompt tokens found cached / looked up, over the timed replay). Then
prefix_cache_hit_rate (the cached run's hits / queries) and speedup_vs_no_prefix_caching = median uncached TTFT /
median cached TTFT. TTFT's two parts: ttft_queue_ms_p50 (arrival -> the request's first step dispatched) and
ttft_after_scheduled_ms_p50 (-> its first token read). --sync-run adds a third run (suffix _cached_sync): cached,
async scheduling off, which shows what the step dispatched ahead of a new arrival costs its TTFT.

Engine defaults, sized to the workload: max_model_len = prompt + output rounded up to a page (1120), max_num_seqs 32,
a 4096-token prefill budget, prefill Q buckets 64 (the suffix after a prefix hit, with its cached context) and 1088
(a whole prompt), decode buckets 8 and 32, KV pages for every sequence at full length.

  python benchmarks/prefix_caching.py --model qwen2-7b-instruct --compilation-cache-dir .jaxcache --out $OUT
  python benchmarks/prefix_caching.py --model tiny --scale 0.05 --skip-warmup      # CPU smoke run
"""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cli_args  # noqa: E402
import device_ceilings  # noqa: E402
import engine_setup  # noqa: E402
import floors  # noqa: E402
import result_files  # noqa: E402
import sim_validate  # noqa: E402
import workloads  # noqa: E402

BENCHMARK = "prefix-caching"
RUNS = ("uncached", "cached")  # the order they run in
DEFAULTS = dict(num_requests=200, prefix_len=1024, suffix_len=64, output_len=32)


def parse(argv=None):
    p = cli_args.base_parser(__doc__.splitlines()[0])
    w = p.add_argument_group("workload (x --scale unless set)")
    w.add_argument("--num-requests", type=int, default=None, help=f"default {DEFAULTS['num_requests']}")
    w.add_argument("--prefix-len", type=int, default=None, help=f"shared prefix, default {DEFAULTS['prefix_len']}")
    w.add_argument("--suffix-len", type=int, default=None, help=f"unique suffix, default {DEFAULTS['suffix_len']}")
    w.add_argument("--output-len", type=int, default=None, help=f"default {DEFAULTS['output_len']}")
    w.add_argument("--request-rate", type=float, default=8.0, help="arrivals per second, evenly spaced (not scaled)")
    p.add_argument("--sync-run", action="store_true",
                   help="a third run, cached without async scheduling (what the step dispatched ahead costs TTFT)")
    args = p.parse_args(argv)
    args.standard = all(getattr(args, k) is None for k in DEFAULTS) and args.scale == 1.0 and args.request_rate == 8.0
    lo = {"num_requests": 2, "prefix_len": 1, "suffix_len": 1, "output_len": 2}
    for k, v in DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, cli_args.scaled(v, args.scale, lo[k]))
    if args.request_rate <= 0:
        raise SystemExit(f"--request-rate must be > 0, got {args.request_rate}")
    return args


def make_trace(args, seed: int):
    """Requests at i / rate, each the shared prefix (prefix_id 0) plus its own suffix."""
    from qwenjax.sim import Trace, TraceRequest

    plen = args.prefix_len + args.suffix_len
    reqs = tuple(TraceRequest(arrival=i / args.request_rate, prompt_len=plen, output_len=args.output_len,
                              prefix_id=0, prefix_len=args.prefix_len) for i in range(args.num_requests))
    return Trace(reqs, name=f"prefix-caching-{seed}", seed=seed)


def engine_kwargs(args, enable_prefix_caching: bool) -> dict:
    from qwenjax.scheduler_config import pow2_at_least

    bs = args.block_size
    prompt = args.prefix_len + args.suffix_len
    # After a hit, the cached pages are the prefix's full blocks (never the prompt's last token): the rest is computed.
    ctx_q = prompt - bs * min(args.prefix_len // bs, (prompt - 1) // bs)
    seqs = cli_args.scaled(32, args.scale, 2)
    kw = engine_setup.engine_kwargs(args, max_model_len=cli_args.round_up(prompt + args.output_len, bs),
                                    max_num_seqs=seqs, max_num_batched_tokens=pow2_at_least(2 * prompt, 16),
                                    decode_buckets=tuple(sorted({max(1, seqs // 4), seqs})),
                                    prefill_buckets=tuple(sorted({ctx_q, prompt})))
    kw["enable_prefix_caching"] = enable_prefix_caching
    return kw


def run_one(args, spec, cfg, trace, warm_trace, *, cached: bool, async_scheduling: bool = True) -> dict:
    """One engine, built, warmed, replayed, freed: its summary, stats over the replay and engine configuration."""
    kwargs = engine_kwargs(args, cached)
    if not async_scheduling:
        kwargs["async_scheduling"] = False
    llm, startup = engine_setup.build_llm(spec, kwargs)
    # Two warm-up prompts one after the other: the second hits the first's prefix (the context-prefill path).
    warm = [warm_trace.prompt_token_ids(i, cfg.vocab_size) for i in range(2)]
    for p in warm:
        workloads.warm_generate(llm, [p])
    engine = llm.llm_engine
    engine.final_only = True  # as in sim_validate: only finished requests are reported
    prompts = [trace.prompt_token_ids(i, cfg.vocab_size) for i in range(len(trace))]
    before = workloads.stats_snapshot(llm)
    t0 = time.perf_counter()
    summary = sim_validate.summarize(sim_validate.replay(engine, trace, prompts), trace)
    replay_s = time.perf_counter() - t0
    stats = workloads.stats_delta(before, workloads.stats_snapshot(llm))
    econf = engine_setup.engine_config(llm, kwargs, startup)
    del engine, llm
    gc.collect()
    summary["ttft_ms_median"] = summary["ttft_ms_p50"]
    summary["prefix_cache_hits"] = stats["prefix_cache_hits"]
    summary["prefix_cache_queries"] = stats["prefix_cache_queries"]
    return {"summary": summary, "stats": stats, "engine": econf, "replay_s": round(replay_s, 3)}


def main(argv=None) -> dict:
    args = parse(argv)
    spec, cfg, dev = engine_setup.prepare(args)
    ceilings = device_ceilings.measure_ceilings(cfg, mode=args.ceilings, platform=dev["platform"],
                                                gemm_tokens=engine_kwargs(args, True)["max_num_batched_tokens"])
    trace, warm_trace = make_trace(args, args.seed), make_trace(args, args.seed + 1)
    names = RUNS + (("cached_sync",) if args.sync_run else ())
    runs = {name: run_one(args, spec, cfg, trace, warm_trace, cached=name != "uncached",
                          async_scheduling=name != "cached_sync") for name in names}

    metrics = {}
    for name in names:
        for k, v in runs[name]["summary"].items():
            if k not in ("num_requests", "output_tokens", "total_time_s"):
                metrics[f"{k}_{name}"] = v
    c = runs["cached"]["summary"]
    metrics["prefix_cache_hit_rate"] = floors.ratio(c["prefix_cache_hits"], c["prefix_cache_queries"])
    metrics["speedup_vs_no_prefix_caching"] = floors.ratio(runs["uncached"]["summary"]["ttft_ms_p50"],
                                                           c["ttft_ms_p50"])
    config = {"num_requests": args.num_requests, "prompt_len": args.prefix_len + args.suffix_len,
              "prefix_len": args.prefix_len, "suffix_len": args.suffix_len, "output_len": args.output_len,
              "request_rate": args.request_rate, "arrivals": "fixed", "seed": args.seed, "standard": args.standard,
              "dtype": args.dtype, "kv_cache_dtype": args.kv_cache_dtype, "greedy": True, "ignore_eos": True,
              "detokenize": False, "trace": trace.summary(), "runs": runs}
    config.update(runs["cached"]["engine"])  # the engine's configuration (the same for both but the cache switch)
    result = result_files.make_result(benchmark=BENCHMARK, model=spec.name, dev=dev, config=config, ceilings=ceilings,
                                      metrics=metrics)
    path = result_files.write_result(result, devtag=dev["devtag"], results_dir=args.results_dir, out=args.out)
    rows = [("model", spec.name), ("device", dev["device"]),
            ("workload", f"{args.num_requests} x ({args.prefix_len} shared + {args.suffix_len} -> "
                         f"{args.output_len}), {args.request_rate:g} req/s")]
    rows += result_files.paired_rows(metrics, ("ttft_ms_p50", "ttft_ms_mean", "ttft_ms_p99", "ttft_queue_ms_p50",
                                               "ttft_after_scheduled_ms_p50", "tpot_ms_mean", "output_tok_s",
                                               "prefix_cache_hits"), names)
    rows += [("prefix_cache_hit_rate", metrics["prefix_cache_hit_rate"]),
             ("speedup_vs_no_prefix_caching", metrics["speedup_vs_no_prefix_caching"]),
             ("startup_s uncached / cached", f"{runs['uncached']['engine']['startup_seconds']:.1f} / "
                                             f"{runs['cached']['engine']['startup_seconds']:.1f}")]
    result_files.print_result_table(f"{BENCHMARK} {spec.name}", rows, result, False, path)
    return result


if __name__ == "__main__":
    main()
