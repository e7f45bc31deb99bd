"""spec_decode: what speculative decoding's verify step costs against a decode step, and what it buys (issue 27).

In one run, on the engine's own runner (random weights of --model):

  step costs      a one-token decode step (model + sampler + reading the tokens) and a verify step scoring k + 1
                  positions a row (model + on-device acceptance + reading the tokens), k in --ks, at each batch of
                  --batches, every row at --context tokens of context (real rows over distinct pages; the KV values
                  are whatever the pages hold: the work is the same). Medians of --iters round trips.
  draft step      the draft model's (--draft-model, default the 0.5B shape) one-token decode step, same rows.
  measured        greedy generation of --output-len tokens a row from random prompts, speculation off and on
                  (n-gram, k = --measure-k, prompt lookup 1..3; the draft model): output tok/s and the acceptance
                  rate it got (random weights accept what they accept: the figure is measured, never assumed); and a
                  run whose n-gram lookup can never match (prompt_lookup_min = 64 > any repeat), whose cost against
                  speculation off is the proposer's overhead. The runs' engines are built one after another.
  speedup table   from the measured step costs: at acceptance rate a per proposed token (independent positions), a
                  verify step yields E = (1 - a^(k+1)) / (1 - a) tokens a row, so speculation's tokens/s over plain
                  decode's is E * t_decode / t_verify(k). Printed for a = 0.5 / 0.7 / 0.9.

With --profile, the decode step and the verify step at k = --measure-k are each traced over --iters round trips at
every batch (config `profile_decode_b<B>`, `profile_verify_k<k>_b<B>`: the device's busy share and its top kernels in
ms a step), to show where a verify step's time goes beyond the decode step's.

  python benchmarks/spec_decode.py --model qwen2-7b-instruct --out $OUT
  python benchmarks/spec_decode.py --model tiny --draft-model tiny --skip-warmup --batches 1,4 --ks 1,2 --iters 3 \\
      --context 32 --output-len 8      # CPU smoke run
"""

from __future__ import annotations

import dataclasses
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cli_args  # noqa: E402
import engine_setup  # noqa: E402
import model_specs  # noqa: E402
import result_files  # noqa: E402
import workloads  # noqa: E402

BENCHMARK = "spec_decode"
RATES = (0.5, 0.7, 0.9)


def parse(argv=None):
    p = cli_args.base_parser(__doc__.splitlines()[0])
    w = p.add_argument_group("workload")
    w.add_argument("--batches", type=cli_args._int_list, default=(1, 32), help="decode batch sizes")
    w.add_argument("--ks", type=cli_args._int_list, default=(1, 2, 4, 8), help="proposed tokens a verify step")
    w.add_argument("--context", type=int, default=512, help="context tokens of every row in the step timings")
    w.add_argument("--iters", type=int, default=50, help="round trips timed per figure; the median is reported")
    w.add_argument("--prompt-len", type=int, default=128, help="measured generation: prompt tokens")
    w.add_argument("--output-len", type=int, default=256, help="measured generation: new tokens a row")
    w.add_argument("--measure-k", type=int, default=4, help="k of the measured generation")
    w.add_argument("--draft-model", default="qwen2-0.5b-instruct",
                   help="the draft model's config (as --model; random weights) for the draft run and its step "
                        "time; 'none' leaves the draft run out")
    w.add_argument("--runs", default=None,
                   help="comma-separated measured runs, a subset of off,ngram,nomatch,draft (default: all of them)")
    w.add_argument("--repeats", type=int, default=1,
                   help="timed generations a run and batch; tok_s is their median (each one in tok_s_all)")
    w.add_argument("--skip-step-costs", action="store_true", help="leave the step timings (and the table) out")
    args = p.parse_args(argv)
    if str(args.draft_model).lower() == "none":
        args.draft_model = None
    return args


def expected_tokens(rate: float, k: int) -> float:
    """Tokens a verify step yields a row at acceptance `rate` per position: accepted prefix + the bonus token."""
    return float(k + 1) if rate >= 1.0 else (1 - rate ** (k + 1)) / (1 - rate)


def _median_s(fn, iters: int) -> float:
    fn()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _profiled(fn, iters: int, logdir: str) -> dict:
    """`iters` round trips of fn under jax.profiler: the device's busy share and its top kernels, in ms a step."""
    import profiling

    with profiling.quiet_trace(logdir, host_tracer_level=1):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        wall = time.perf_counter() - t0
    prof = profiling.device_busy_from_trace(logdir, wall, top=15)
    for kernel in prof.get("top_kernels", []):
        kernel["ms_per_step"] = round(kernel["ms"] / iters, 4)
    prof.pop("top_host_events", None)
    return {"wall_ms_per_step": 1e3 * wall / iters, **prof}


def step_costs(runner, batch: int, ks, context: int, iters: int, vocab: int, profile_dir: str | None = None,
               profile_ks=()) -> dict:
    """Seconds of a decode round trip and of each k's verify round trip, `batch` rows at `context` tokens; with
    `profile_dir`, also a trace of the decode step and of the verify steps of `profile_ks` (`profile_<name>`)."""
    import numpy as np

    from qwenjax.core.scheduler_output import ScheduledSeq, SchedulerOutput
    from qwenjax.core.sequence import Sequence
    from qwenjax.engine.llm_engine import WARMUP_MODES
    from qwenjax.worker import sampler
    from qwenjax.worker.lockstep import to_host
    from qwenjax.worker.spec_verify import build_verify_input
    from qwenjax.worker.step_input import build_step_input

    from qwenjax import SamplingParams

    ps, width = runner.page_size, runner.block_table_width
    need = -(-(context + max(ks, default=0) + 1) // ps)
    rng = np.random.default_rng(0)
    seqs = []
    for b in range(batch):  # distinct pages a row (wrapping if the cache is small: the reads are the same size)
        s = Sequence(str(b), 0, rng.integers(0, vocab, context + 1).tolist(), SamplingParams(temperature=0.0), 0, 0.0)
        s.block_table = [(b * need + i) % runner.num_pages for i in range(need)]
        s.num_computed, s.slot = context, b
        seqs.append(s)
    out = SchedulerOutput("decode", [ScheduledSeq(s, 1, True) for s in seqs], False, (batch, 1))
    inp = build_step_input(out, page_size=ps, num_pages=runner.num_pages, max_pages_per_seq=width,
                           scratch_slot=runner.scratch_slot)
    mode = dataclasses.replace(WARMUP_MODES[0], penalties=True)  # the engine's greedy decode mode
    tensors = sampler.build_tensors([], num_rows=batch, vocab_size=vocab, with_history=False)
    def decode():
        return to_host(runner.execute(inp, False, tensors, mode)[0].token_ids)

    res = {"decode_s": _median_s(decode, iters)}
    if profile_dir:
        res["profile_decode"] = _profiled(decode, iters, os.path.join(profile_dir, f"decode-b{batch}"))
    vmode = dataclasses.replace(WARMUP_MODES[0], penalties=False)  # choose_mode of plain greedy rows
    for k in ks:
        drafts = [rng.integers(0, vocab, k).tolist() for _ in seqs]
        vin, d, n = build_verify_input(seqs, drafts, rows=batch, num_positions=k + 1, page_size=ps,
                                       num_pages=runner.num_pages, max_pages_per_seq=width,
                                       scratch_slot=runner.scratch_slot)
        vt = sampler.build_tensors([], num_rows=batch * (k + 1), vocab_size=vocab, with_history=False)
        def verify(vin=vin, d=d, n=n, vt=vt):
            return to_host(runner.verify(vin, d, n, vt, vmode).token_ids)

        res[f"verify_k{k}_s"] = _median_s(verify, iters)
        if profile_dir and k in profile_ks:
            res[f"profile_verify_k{k}"] = _profiled(verify, iters, os.path.join(profile_dir, f"verify-b{batch}-k{k}"))
    return res


def run_configs(args) -> dict:
    """Each measured run's speculative_config: off, n-gram, an n-gram lookup that never matches, a draft model."""
    ngram = {"method": "ngram", "num_speculative_tokens": args.measure_k, "prompt_lookup_max": 3,
             "prompt_lookup_min": 1}
    runs = {"off": None, "ngram": ngram, "nomatch": dict(ngram, prompt_lookup_max=64, prompt_lookup_min=64)}
    if args.draft_model:
        runs["draft"] = {"model": model_specs.resolve_model(args.draft_model).dir,
                         "num_speculative_tokens": args.measure_k}
    if args.runs:
        wanted = args.runs.split(",")
        unknown = [n for n in wanted if n not in runs]
        if unknown:
            raise SystemExit(f"--runs: unknown or unavailable run(s) {unknown}; available: {', '.join(runs)}")
        runs = {n: runs[n] for n in wanted}
    return runs


def build_engine(spec, args, speculative_config):
    """An engine with every --batches bucket (the runs' engines are built one at a time: one model's memory)."""
    P, O, B = args.prompt_len, args.output_len, max(args.batches)
    mml = cli_args.round_up(max(P + O, args.context) + max(max(args.ks), args.measure_k) + 16, args.block_size)
    kwargs = engine_setup.engine_kwargs(args, max_model_len=mml, max_num_seqs=B,
                                        max_num_batched_tokens=max(2048, B * P), decode_buckets=tuple(args.batches),
                                        prefill_buckets=(16, P))
    if speculative_config is not None:
        kwargs["speculative_config"] = speculative_config
    return (*engine_setup.build_llm(spec, kwargs), kwargs)


def measured_generation(llm, args, batch: int, vocab: int, speculates: bool) -> dict:
    """Greedy generation of --output-len tokens a row at `batch`: output tok/s and, speculating, the acceptance."""
    prompts = workloads.random_prompts(batch, args.prompt_len, seed=args.seed, vocab_size=vocab)
    workloads.warm_generate(llm, prompts[:2], max_tokens=16)
    before = workloads.stats_snapshot(llm)
    rates = []
    for _ in range(args.repeats):
        outs, wall = workloads.timed_generate(llm, prompts, workloads.greedy(args.output_len))
        rates.append(sum(len(o.outputs[0].token_ids) for o in outs) / wall)
    st = workloads.stats_delta(before, workloads.stats_snapshot(llm))
    res = {"tok_s": statistics.median(rates), "steps": st["steps"] // args.repeats}
    if args.repeats > 1:
        res["tok_s_all"] = rates
    if speculates:
        drafted = st["spec_decode_num_draft_tokens"]
        res["acceptance"] = st["spec_decode_num_accepted_tokens"] / drafted if drafted else 0.0
        res["draft_tokens"] = drafted
    return res


def _named_metrics(metrics: dict, table: list, k: int) -> dict:
    """BENCHMARKS.md's names for the spec-decode figures, beside this script's own: verify_cost_k4_b<B> (verify over
    decode step time), ngram_nomatch_slowdown_b<B> (tok/s off / on with no match), projected_speedup_a07 (the table's
    0.7 row at batch 1), for k = measure_k."""
    named = {}
    for key, v in metrics.items():
        if key.startswith("verify_over_decode_b") and key.endswith(f"_k{k}"):
            named[f"verify_cost_k{k}_b{key[len('verify_over_decode_b'):-len(f'_k{k}')]}"] = v
        if key.startswith("nomatch_slowdown_b"):
            named[f"ngram_{key}"] = v + 1
    for row in table:
        if row["batch"] == 1 and row["k"] == k and row["rate"] == 0.7:
            named["projected_speedup_a07"] = row["speedup"]
    return named


def main(argv=None) -> dict:
    args = parse(argv)
    spec, cfg, dev = engine_setup.prepare(args)
    V = cfg.vocab_size
    metrics, table = {}, []
    profile_dir = (args.profile_dir or tempfile.mkdtemp(prefix="qwenjax-spec-profile-")) if args.profile else None
    config = {"batches": list(args.batches), "ks": list(args.ks), "context": args.context, "iters": args.iters,
              "prompt_len": args.prompt_len, "output_len": args.output_len, "measure_k": args.measure_k,
              "draft_model": args.draft_model, "repeats": args.repeats}
    for name, sc in run_configs(args).items():
        llm, startup, kwargs = build_engine(spec, args, sc)
        if name == "off" and not args.skip_step_costs:  # the step costs, on the target's runner
            config.update(engine_setup.engine_config(llm, kwargs, startup))
            for B in args.batches:
                costs = step_costs(llm.llm_engine.runner, B, args.ks, args.context, args.iters, V,
                                   profile_dir=profile_dir, profile_ks=(args.measure_k,))
                config.update({f"{key}_b{B}": v for key, v in costs.items() if key.startswith("profile_")})
                t_dec = costs["decode_s"]
                metrics[f"decode_ms_b{B}"] = t_dec * 1e3
                for k in args.ks:
                    t_ver = costs[f"verify_k{k}_s"]
                    metrics[f"verify_ms_b{B}_k{k}"] = t_ver * 1e3
                    metrics[f"verify_over_decode_b{B}_k{k}"] = t_ver / t_dec
                    for a in RATES:
                        E = expected_tokens(a, k)
                        table.append({"batch": B, "k": k, "rate": a, "tokens_per_step": E,
                                      "speedup": E * t_dec / t_ver, "tok_s": B * E / t_ver, "tok_s_off": B / t_dec})
        if name == "draft":  # the draft's own one-token decode step
            for B in args.batches:
                draft = llm.llm_engine.spec.draft.runner
                metrics[f"draft_decode_ms_b{B}"] = step_costs(draft, B, (), args.context, args.iters,
                                                              draft.vocab_size)["decode_s"] * 1e3
        for B in args.batches:
            gen = measured_generation(llm, args, B, V, sc is not None)
            metrics.update({f"{key}_{name}_b{B}": v for key, v in gen.items()})
        del llm
        gc.collect()
    for B in args.batches:
        if f"tok_s_off_b{B}" in metrics and f"tok_s_ngram_b{B}" in metrics:
            metrics[f"speedup_ngram_b{B}"] = metrics[f"tok_s_ngram_b{B}"] / metrics[f"tok_s_off_b{B}"]
        if f"tok_s_off_b{B}" in metrics and f"tok_s_nomatch_b{B}" in metrics:
            metrics[f"nomatch_slowdown_b{B}"] = metrics[f"tok_s_off_b{B}"] / metrics[f"tok_s_nomatch_b{B}"] - 1
    metrics.update(_named_metrics(metrics, table, args.measure_k))
    config["speedup_table"] = table
    result = result_files.make_result(benchmark=BENCHMARK, model=spec.name, dev=dev, config=config, ceilings={},
                                      metrics=metrics)
    path = result_files.write_result(result, devtag=dev["devtag"], results_dir=args.results_dir, out=args.out)
    rows = [("model", spec.name), ("device", dev["device"]), ("context", args.context)]
    runs = list(run_configs(args))
    for B in args.batches:
        if f"decode_ms_b{B}" in metrics:
            rows.append((f"decode step ms (batch {B})", metrics[f"decode_ms_b{B}"]))
            for k in args.ks:
                rows.append((f"  verify k={k} ms / x decode", f"{metrics[f'verify_ms_b{B}_k{k}']:.3f} / "
                             f"{metrics[f'verify_over_decode_b{B}_k{k}']:.3f}"))
        if f"draft_decode_ms_b{B}" in metrics:
            rows.append((f"  draft ({args.draft_model}) step ms", metrics[f"draft_decode_ms_b{B}"]))
        rows.append((f"  measured tok/s (batch {B}) {' / '.join(runs)}",
                     " / ".join(f"{metrics[f'tok_s_{n}_b{B}']:.1f}" for n in runs)))
        spec_runs = [n for n in runs if n != "off"]
        if spec_runs:
            rows.append((f"  measured acceptance (k={args.measure_k}) {' / '.join(spec_runs)}",
                         " / ".join(f"{metrics[f'acceptance_{n}_b{B}']:.3f}" for n in spec_runs)))
        if f"nomatch_slowdown_b{B}" in metrics:
            rows.append(("  no-match slowdown", f"{metrics[f'nomatch_slowdown_b{B}']:.4f}"))
    rows.append(("result", str(path)))
    result_files.print_table(f"{BENCHMARK} {spec.name}", rows)
    print("\nspeedup over speculation off from the measured step costs (E = tokens a verify step yields a row)")
    print(f"{'batch':>5} {'k':>3} {'rate':>5} {'E':>6} {'speedup':>8} {'tok/s':>10} {'tok/s off':>10}")
    for r in table:
        print(f"{r['batch']:>5} {r['k']:>3} {r['rate']:>5.1f} {r['tokens_per_step']:>6.2f} {r['speedup']:>8.2f} "
              f"{r['tok_s']:>10.1f} {r['tok_s_off']:>10.1f}")
    return result


if __name__ == "__main__":
    main()
