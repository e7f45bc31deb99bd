"""chunked-prefill: 32 streams decoding while 8k-token prompts arrive; the streams' inter-token latency with chunked
prefill (prompt chunks ride along with the decodes in mixed steps) against without (each prompt stalls them all).

Workload: --streams (32) requests with --stream-prompt-len (128) prompt tokens start together and decode (greedy,
ignore_eos) until the run ends. Once every stream has its first token, --num-long (4) requests of --long-prompt-len
(8192) tokens arrive, one every --interval (0.5) s, each asking for --long-output-len (16) tokens. The run ends when
the last long request finishes; the streams are then aborted. Prompts are seeded random ids. The same workload runs
twice, each on a fresh engine (the first freed before the second is built): enable_chunked_prefill=False first, then
True (the default).

Measured per run (suffix _chunked / _unchunked), from the host's wall clock at each engine step that returned a
stream's new token: itl_ms_{mean,p50,p99,max} over every gap between consecutive tokens of a stream that overlaps
the window from the first long arrival to the last long finish, the long requests' ttft_ms_mean (first token -
arrival), steps and mixed_steps.
speedup_vs_no_chunked_prefill = itl_ms_p99 unchunked / itl_ms_p99 chunked.

Engine, sized to the workload: max_model_len = long prompt + output rounded up to a page, max_num_seqs = streams +
num_long, decode bucket max_num_seqs, prefill Q buckets 512 (the streams' prompts, padded; the mixed chunk) and the
long prompt, an 8192-token prefill budget; KV pages for every sequence at full length.

  python benchmarks/chunked_prefill.py --model qwen2-7b-instruct --out $OUT
  python benchmarks/chunked_prefill.py --model tiny --scale 0.05 --ceilings small      # CPU smoke run
"""

from __future__ import annotations

import gc
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

BENCHMARK = "chunked-prefill"
RUNS = ("unchunked", "chunked")  # the order they run in
DEFAULTS = dict(streams=32, stream_prompt_len=128, long_prompt_len=8192, long_output_len=16, num_long=4)


def parse(argv=None):
    p = cli_args.base_parser(__doc__.splitlines()[0])
    w = p.add_argument_group("workload (x --scale unless set)")
    for k, v in DEFAULTS.items():
        w.add_argument("--" + k.replace("_", "-"), type=int, default=None, help=f"default {v}")
    w.add_argument("--interval", type=float, default=0.5, help="seconds between long arrivals (not scaled)")
    args = p.parse_args(argv)
    args.standard = all(getattr(args, k) is None for k in DEFAULTS) and args.scale == 1.0 and args.interval == 0.5
    for k, v in DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, cli_args.scaled(v, args.scale, 2 if k != "num_long" else 1))
    return args


def engine_kwargs(args, chunked: bool) -> dict:
    from qwenjax.scheduler_config import pow2_at_least

    bs = args.block_size
    seqs = args.streams + args.num_long
    long_q = pow2_at_least(args.long_prompt_len, 16)
    chunk = min(512, long_q)
    kw = engine_setup.engine_kwargs(args,
                                    max_model_len=cli_args.round_up(args.long_prompt_len + args.long_output_len, bs),
                                    max_num_seqs=seqs, max_num_batched_tokens=max(long_q, 16),
                                    decode_buckets=(seqs,), prefill_buckets=tuple(sorted({chunk, long_q})))
    kw["enable_chunked_prefill"] = chunked
    return kw


def run_one(args, spec, cfg, *, chunked: bool) -> dict:
    import numpy as np

    from qwenjax import SamplingParams

    kwargs = engine_kwargs(args, chunked)
    llm, startup = engine_setup.build_llm(spec, kwargs)
    rng = np.random.default_rng(args.seed)
    ids = lambda n: list(map(int, rng.integers(0, cfg.vocab_size, n)))  # noqa: E731
    # Warm-up (untimed): a long prompt alone, then one arriving while another decodes (the mixed-step path).
    workloads.warm_generate(llm, [ids(args.long_prompt_len)])
    engine = llm.llm_engine
    engine.add_request("warm-a", None, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                       prompt_token_ids=ids(args.stream_prompt_len))
    engine.step()
    engine.add_request("warm-b", None, SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True),
                       prompt_token_ids=ids(args.long_prompt_len))
    while engine.has_unfinished_requests():
        engine.step()
    engine.reset_prefix_cache()
    engine.final_only = False  # every step reports the streams' new tokens (LLM.generate had set it)

    stream_params = SamplingParams(temperature=0.0, max_tokens=kwargs["max_model_len"] - args.stream_prompt_len,
                                   ignore_eos=True, detokenize=False)
    long_params = SamplingParams(temperature=0.0, max_tokens=args.long_output_len, ignore_eos=True, detokenize=False)
    streams = [f"s{i}" for i in range(args.streams)]
    for rid in streams:
        engine.add_request(rid, None, stream_params, prompt_token_ids=ids(args.stream_prompt_len))
    longs = [ids(args.long_prompt_len) for _ in range(args.num_long)]
    counts = {rid: 0 for rid in streams}
    token_times: dict[str, list[float]] = {rid: [] for rid in streams}
    long_done: dict[str, dict] = {}
    before = workloads.stats_snapshot(llm)
    gc.collect()

    def step():  # only called before `del engine, llm` below, which clears this closure's cell on purpose
        now_outs = engine.step()  # noqa: F821
        now = time.monotonic()
        for out in now_outs:
            rid = out.request_id
            if rid in counts:
                n = len(out.outputs[0].token_ids)
                token_times[rid].extend([now] * (n - counts[rid]))
                counts[rid] = n
            elif out.finished:
                m = out.metrics
                long_done[rid] = {"arrival": m.arrival_time, "first": m.first_token_time, "finish": m.finished_time,
                                  "tokens": len(out.outputs[0].token_ids)}

    while min(counts.values()) == 0:  # every stream decoding
        step()
    t0 = time.monotonic()
    nxt = 0
    while len(long_done) < args.num_long:
        now = time.monotonic()
        while nxt < args.num_long and t0 + nxt * args.interval <= now:
            engine.add_request(f"long{nxt}", None, long_params, prompt_token_ids=longs[nxt],
                               arrival_time=t0 + nxt * args.interval)
            nxt += 1
        step()
    t_end = max(r["finish"] for r in long_done.values())
    engine.abort_request(streams)
    while engine.has_unfinished_requests():
        engine.step()
    stats = workloads.stats_delta(before, workloads.stats_snapshot(llm))
    econf = engine_setup.engine_config(llm, kwargs, startup)
    del engine, llm
    gc.collect()

    # Every gap that overlaps the window from the first long arrival to the last long finish.
    gaps = [(b - a) * 1e3 for times in token_times.values() for a, b in zip(times, times[1:]) if b > t0 and a < t_end]
    ttft = [(r["first"] - r["arrival"]) * 1e3 for r in long_done.values()]
    bad = [(k, r["tokens"]) for k, r in long_done.items() if r["tokens"] != args.long_output_len]
    if bad:
        raise RuntimeError(f"long requests produced the wrong token count: {bad}")
    summary = {"itl_ms_mean": statistics.fmean(gaps), "itl_ms_p50": float(np.percentile(gaps, 50)),
               "itl_ms_p99": float(np.percentile(gaps, 99)), "itl_ms_max": max(gaps), "itl_samples": len(gaps),
               "long_ttft_ms_mean": statistics.fmean(ttft), "window_s": t_end - t0,
               "steps": stats["steps"], "mixed_steps": stats["mixed_steps"]}
    return {"summary": summary, "stats": stats, "engine": econf}


def main(argv=None) -> dict:
    args = parse(argv)
    spec, cfg, dev = engine_setup.prepare(args)
    ceilings = device_ceilings.measure_ceilings(cfg, mode=args.ceilings, platform=dev["platform"],
                                                gemm_tokens=engine_kwargs(args, True)["max_num_batched_tokens"])
    runs = {name: run_one(args, spec, cfg, chunked=name == "chunked") for name in RUNS}
    metrics = {f"{k}_{name}": v for name in RUNS for k, v in runs[name]["summary"].items()}
    metrics["itl_ms_p99"] = runs["chunked"]["summary"]["itl_ms_p99"]
    metrics["speedup_vs_no_chunked_prefill"] = floors.ratio(runs["unchunked"]["summary"]["itl_ms_p99"],
                                                            runs["chunked"]["summary"]["itl_ms_p99"])
    config = {"streams": args.streams, "stream_prompt_len": args.stream_prompt_len,
              "long_prompt_len": args.long_prompt_len, "long_output_len": args.long_output_len,
              "num_long": args.num_long, "interval_s": args.interval, "seed": args.seed, "standard": args.standard,
              "dtype": args.dtype, "kv_cache_dtype": args.kv_cache_dtype, "greedy": True, "ignore_eos": True,
              "runs": runs}
    config.update(runs["chunked"]["engine"])
    result = result_files.make_result(benchmark=BENCHMARK, model=spec.name, dev=dev, config=config, ceilings=ceilings,
                                      metrics=metrics)
    path = result_files.write_result(result, devtag=dev["devtag"], results_dir=args.results_dir, out=args.out)
    rows = [("model", spec.name), ("device", dev["device"]),
            ("workload", f"{args.streams} streams ({args.stream_prompt_len} prompt) + {args.num_long} x "
                         f"{args.long_prompt_len} -> {args.long_output_len} every {args.interval:g} s")]
    rows += result_files.paired_rows(metrics, ("itl_ms_p50", "itl_ms_p99", "itl_ms_max", "long_ttft_ms_mean", "steps",
                                               "mixed_steps"), RUNS)
    rows.append(("speedup_vs_no_chunked_prefill", metrics["speedup_vs_no_chunked_prefill"]))
    result_files.print_result_table(f"{BENCHMARK} {spec.name}", rows, result, False, path)
    return result


if __name__ == "__main__":
    main()
