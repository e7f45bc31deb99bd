"""simulator-validation: a seeded Poisson trace replayed in real time on the engine, then simulated with a step-time
model fitted elsewhere (step_profile.py), and the two compared on mean TTFT, mean TPOT and output throughput.

The trace (default 200 requests, prompts uniform in 128-1024 tokens, outputs uniform in 64-512, Poisson arrivals at
--request-rate, drawn from --trace-seed) is never part of the profile's grid. Replay: each request is added to the
LLMEngine once the wall clock passes its arrival (its arrival_time is the trace's, so waiting for the current step
counts in its TTFT), and the engine steps until every request has finished; greedy, ignore_eos, no detokenization,
as in the profile. Measured per request from its RequestOutput metrics: TTFT = first token - arrival, TPOT = (finish
- first token) / (tokens - 1); output_tok_s = output tokens / (last finish - first arrival). The simulator runs the
same trace through the same scheduler configuration (SimConfig.from_engine) and reports the same figures.

Figures: <figure>_measured, <figure>_simulated and <figure>_rel_err = simulated / measured - 1 for ttft_ms_mean,
tpot_ms_mean and output_tok_s; max_abs_rel_err; pass = every |rel_err| <= --tolerance (0.15).

  python benchmarks/sim_validate.py --model qwen2-7b-instruct --out $OUT      # model: newest step-profile result
  python benchmarks/sim_validate.py --model tiny --scale 0.02 --skip-warmup --step-model results/step-profile-...json
"""

from __future__ import annotations

import gc
import glob
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cli_args  # noqa: E402
import engine_setup  # noqa: E402
import repo_paths  # noqa: E402
import result_files  # noqa: E402
import step_profile  # noqa: E402
import workloads  # noqa: E402

BENCHMARK = "simulator-validation"
FIGURES = ("ttft_ms_mean", "tpot_ms_mean", "output_tok_s")


def parse(argv=None):
    p = cli_args.base_parser(__doc__.splitlines()[0])
    step_profile.add_engine_workload_args(p)
    w = p.add_argument_group("validation trace")
    w.add_argument("--step-model", default=None,
                   help="a step-profile result or model JSON (default: the newest step-profile-<model>-<devtag>-*"
                        ".json in --results-dir)")
    w.add_argument("--num-requests", type=int, default=None, help="default 200 (x --scale)")
    w.add_argument("--request-rate", type=float, default=12.0, help="mean arrivals per second (Poisson)")
    w.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps; 1 = Poisson")
    w.add_argument("--trace-seed", type=int, default=1234, help="seed of the trace (arrivals, lengths, prompt ids)")
    w.add_argument("--policy", default="fcfs", help="scheduling policy of the engine and the simulation")
    w.add_argument("--tolerance", type=float, default=0.15, help="largest |simulated / measured - 1| that passes")
    w.add_argument("--allow-config-mismatch", action="store_true",
                   help="simulate even if the model was fitted on another engine configuration")
    w.add_argument("--save-trace", default=None, help="also write the trace as JSONL here")
    args = p.parse_args(argv)
    step_profile.fill_sizing_defaults(args)
    args.num_requests = args.num_requests or cli_args.scaled(200, args.scale, 2)
    from qwenjax.core.policies import POLICIES

    if args.policy not in POLICIES:
        raise SystemExit(f"--policy must be one of {', '.join(POLICIES)}, got {args.policy!r}")
    return args


def make_trace(args):
    from qwenjax.sim import Gamma, Lengths, Poisson, Uniform, make_trace as build

    arrivals = Poisson(args.request_rate) if args.burstiness == 1.0 else Gamma(args.request_rate, args.burstiness)
    lengths = Lengths(Uniform(*args.prompt_range), Uniform(*args.output_range))
    return build(args.num_requests, arrivals, lengths, seed=args.trace_seed, name=f"validation-{args.trace_seed}")


def find_model(args, devtag: str, model_name: str) -> str:
    if args.step_model:
        return args.step_model
    kv = "" if args.kv_cache_dtype == "auto" else f"-kv{args.kv_cache_dtype}"  # result_files.write_result's naming
    pattern = os.path.join(args.results_dir, f"{step_profile.BENCHMARK}{kv}-{model_name}-{devtag}-*.json")
    found = sorted(glob.glob(pattern), key=os.path.getmtime)
    if not found:
        raise SystemExit(f"no step-time model: run benchmarks/step_profile.py first, or pass --step-model "
                         f"(looked for {pattern})")
    return found[-1]


def replay(engine, trace, prompts: list[list[int]]) -> dict[int, dict]:
    """Real-time replay; returns per request: arrival, first token and finish times (monotonic seconds), tokens."""
    params = [step_profile.sampling(r.output_len) for r in trace]
    done: dict[int, dict] = {}
    n, nxt = len(trace), 0
    gc.collect()
    t0 = time.monotonic() + 0.01
    while len(done) < n:
        now = time.monotonic()
        while nxt < n and t0 + trace[nxt].arrival <= now:
            r = trace[nxt]
            engine.add_request(str(nxt), None, params[nxt], prompt_token_ids=prompts[nxt],
                               arrival_time=t0 + r.arrival, priority=r.priority, client=r.client)
            nxt += 1
        if engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    m = out.metrics
                    done[int(out.request_id)] = {"arrival": m.arrival_time, "scheduled": m.first_scheduled_time,
                                                 "first": m.first_token_time, "finish": m.finished_time,
                                                 "tokens": len(out.outputs[0].token_ids)}
        elif nxt < n:
            time.sleep(max(0.0, t0 + trace[nxt].arrival - time.monotonic()))
    return done


def summarize(done: dict[int, dict], trace) -> dict:
    import numpy as np

    recs = [done[i] for i in range(len(trace))]
    bad = [(i, r["tokens"], trace[i].output_len) for i, r in enumerate(recs) if r["tokens"] != trace[i].output_len]
    if bad:
        raise RuntimeError(f"{len(bad)} requests produced the wrong token count, e.g. (index, got, want) {bad[:3]}")
    ttft = [(r["first"] - r["arrival"]) * 1e3 for r in recs]
    # TTFT in two parts: waiting for the host to schedule it (arrival -> its first step dispatched: the rest of the
    # step the host is waiting on), then that step's way through the device (behind the step dispatched ahead of
    # it, with async scheduling) until its token is read.
    queue = [(r["scheduled"] - r["arrival"]) * 1e3 for r in recs if r.get("scheduled") is not None]
    run = [(r["first"] - r["scheduled"]) * 1e3 for r in recs if r.get("scheduled") is not None]
    tpot = [(r["finish"] - r["first"]) / (r["tokens"] - 1) * 1e3 for r in recs if r["tokens"] > 1]
    total = max(r["finish"] for r in recs) - min(r["arrival"] for r in recs)
    out_tokens = sum(r["tokens"] for r in recs)
    return {"num_requests": len(recs), "output_tokens": out_tokens, "total_time_s": total,
            "output_tok_s": out_tokens / total, "ttft_ms_mean": statistics.fmean(ttft),
            "ttft_ms_p50": float(np.percentile(ttft, 50)), "ttft_ms_p99": float(np.percentile(ttft, 99)),
            "tpot_ms_mean": statistics.fmean(tpot) if tpot else None,
            "tpot_ms_p50": float(np.percentile(tpot, 50)) if tpot else None,
            "tpot_ms_p99": float(np.percentile(tpot, 99)) if tpot else None,
            "ttft_queue_ms_p50": float(np.percentile(queue, 50)) if queue else None,
            "ttft_after_scheduled_ms_p50": float(np.percentile(run, 50)) if run else None}


def main(argv=None) -> dict:
    args = parse(argv)
    spec, cfg, dev, ceilings = step_profile.prepare(args)
    from qwenjax.sim import SimConfig, StepTimeModel, simulate

    model_path = find_model(args, dev["devtag"], spec.name)
    model = StepTimeModel.load(model_path)
    trace = make_trace(args)
    if args.save_trace:
        trace.save_jsonl(args.save_trace)
    prompts = [trace.prompt_token_ids(i, cfg.vocab_size) for i in range(len(trace))]
    llm, kwargs, startup = step_profile.build_engine(args, spec, scheduling_policy=args.policy)
    engine = llm.llm_engine
    sim_config = SimConfig.from_engine(engine)
    here = dict(sim_config.to_dict(), kv_cache_dtype=args.kv_cache_dtype, dtype=args.dtype)
    fitted_on = {k: model.meta[k] for k in ("sim_config", "kv_cache_dtype", "dtype") if k in model.meta}
    fitted_on = dict(fitted_on.pop("sim_config", {}), **fitted_on)
    mismatch = sorted(k for k in fitted_on if fitted_on[k] != here.get(k))
    if mismatch and not args.allow_config_mismatch:
        raise SystemExit(f"the step-time model {model_path} was fitted on another engine configuration ("
                         f"{', '.join(mismatch)} differ):\n  fitted: {fitted_on}\n  here:   {here}\nrun "
                         f"step_profile.py with the same flags, or pass --allow-config-mismatch")
    workloads.warm_generate(llm, prompts[:2])

    t_replay = time.perf_counter()
    measured = summarize(replay(engine, trace, prompts), trace)
    replay_s = time.perf_counter() - t_replay
    t_sim = time.perf_counter()
    simulated = simulate(trace, model, sim_config, args.policy, vocab_size=cfg.vocab_size).metrics
    sim_s = time.perf_counter() - t_sim

    metrics = {}
    for f in FIGURES:
        m, s = measured[f], simulated[f]
        metrics[f"{f}_measured"] = m
        metrics[f"{f}_simulated"] = s
        metrics[f"{f}_rel_err"] = s / m - 1 if m else None
    errs = [abs(metrics[f"{f}_rel_err"]) for f in FIGURES if metrics[f"{f}_rel_err"] is not None]
    metrics["max_abs_rel_err"] = max(errs) if errs else None
    metrics["pass"] = bool(errs) and len(errs) == len(FIGURES) and max(errs) <= args.tolerance
    config = {"num_requests": args.num_requests, "request_rate": args.request_rate, "burstiness": args.burstiness,
              "prompt_len_range": list(args.prompt_range), "output_len_range": list(args.output_range),
              "seed": args.trace_seed, "policy": args.policy, "tolerance": args.tolerance, "dtype": args.dtype,
              "kv_cache_dtype": args.kv_cache_dtype, "greedy": True,
              "ignore_eos": True, "detokenize": False, "trace": trace.summary(), "replay_s": round(replay_s, 3),
              "simulate_s": round(sim_s, 3), "step_model_path": _display_path(model_path),
              "step_model": model.to_dict(), "config_mismatch": mismatch, "measured": measured,
              "simulated": simulated}
    config.update(engine_setup.engine_config(llm, kwargs, startup))
    config["sim_config"] = sim_config.to_dict()
    result = result_files.make_result(benchmark=BENCHMARK, model=spec.name, dev=dev, config=config, ceilings=ceilings,
                                      metrics=metrics)
    path = result_files.write_result(result, devtag=dev["devtag"], results_dir=args.results_dir, out=args.out)
    rows = [("model", spec.name), ("device", dev["device"]), ("step model", config["step_model_path"]),
            ("trace", f"{len(trace)} requests, {args.request_rate:g} req/s, seed {args.trace_seed}")]
    for f in FIGURES:
        rows.append((f"{f} measured / simulated", f"{metrics[f + '_measured']:.4g} / {metrics[f + '_simulated']:.4g}"
                                                   f"  ({metrics[f + '_rel_err']:+.1%})"))
    rows += [("max_abs_rel_err", metrics["max_abs_rel_err"]), ("pass", metrics["pass"]), ("replay_s", replay_s),
             ("startup_s (load + compile)", startup)]
    result_files.print_result_table(f"{BENCHMARK} {spec.name}", rows, result, False, path)
    return result


def _display_path(path: str) -> str:
    p = Path(path).resolve()
    return str(p.relative_to(repo_paths.REPO)) if p.is_relative_to(repo_paths.REPO) else str(p)


if __name__ == "__main__":
    main()
