"""spec_decode: what speculative decoding's verify step costs against a decode step, and what it buys (issue 27).

In one run, on the engine's own runner (random weights of --model):

  step costs      a one-token decode step (model + sampler + reading the tokens) and a verify step scoring k + 1
                  positions a row (model + on-device acceptance + reading the tokens), k in --ks, at each batch of
                  --batches, every row at --context tokens of context (real rows over distinct pages; the KV values
                  are whatever the pages hold: the work is the same). Medians of --iters round trips.
  measured        greedy generation of --output-len tokens a row from random prompts, speculation off and on
                  (n-gram, k = --measure-k, prompt lookup 1..3): output tok/s and the acceptance rate it got (random
                  weights accept what they accept: the figure is measured, never assumed); and a run whose n-gram
                  lookup can never match (prompt_lookup_min = 64 > any repeat), whose cost against speculation off is
                  the proposer's overhead.
  speedup table   from the measured step costs: at acceptance rate a per proposed token (independent positions), a
                  verify step yields E = (1 - a^(k+1)) / (1 - a) tokens a row, so speculation's tokens/s over plain
                  decode's is E * t_decode / t_verify(k). Printed for a = 0.5 / 0.7 / 0.9.

The draft-model method is not built yet (its step time is reported as null).

  python benchmarks/spec_decode.py --model qwen2-7b-instruct --out $OUT
  python benchmarks/spec_decode.py --model tiny --skip-warmup --batches 1,4 --ks 1,2 --iters 3 --context 32 \\
      --output-len 8      # CPU smoke run
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
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
    return p.parse_args(argv)


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


def step_costs(llm, batch: int, ks, context: int, iters: int, vocab: int) -> dict:
    """Seconds of a decode round trip and of each k's verify round trip, `batch` rows at `context` tokens."""
    import numpy as np

    from qwenjax.core.scheduler_output import ScheduledSeq, SchedulerOutput
    from qwenjax.core.sequence import Sequence
    from qwenjax.engine.llm_engine import WARMUP_MODES
    from qwenjax.worker import sampler
    from qwenjax.worker.lockstep import to_host
    from qwenjax.worker.spec_verify import build_verify_input
    from qwenjax.worker.step_input import build_step_input

    from qwenjax import SamplingParams

    eng = llm.llm_engine
    runner, ps = eng.runner, eng.blocks.page_size
    width = eng.scheduler_config.max_pages_per_seq
    need = -(-(context + max(ks) + 1) // ps)
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
    res = {"decode_s": _median_s(lambda: to_host(runner.execute(inp, False, tensors, mode)[0].token_ids), iters)}
    vmode = dataclasses.replace(WARMUP_MODES[0], penalties=False)  # choose_mode of plain greedy rows
    for k in ks:
        drafts = [rng.integers(0, vocab, k).tolist() for _ in seqs]
        vin, d, n = build_verify_input(seqs, drafts, rows=batch, num_positions=k + 1, page_size=ps,
                                       num_pages=runner.num_pages, max_pages_per_seq=width,
                                       scratch_slot=runner.scratch_slot)
        vt = sampler.build_tensors([], num_rows=batch * (k + 1), vocab_size=vocab, with_history=False)
        res[f"verify_k{k}_s"] = _median_s(lambda: to_host(runner.verify(vin, d, n, vt, vmode).token_ids), iters)
    return res


SPEC_RUNS = ("off", "ngram", "nomatch")


def build_engines(spec, args) -> dict:
    """One engine per run (speculation off, n-gram, n-gram that never matches), each with every --batches bucket."""
    P, O, B = args.prompt_len, args.output_len, max(args.batches)
    ngram = {"method": "ngram", "num_speculative_tokens": args.measure_k, "prompt_lookup_max": 3,
             "prompt_lookup_min": 1}
    configs = {"off": None, "ngram": ngram, "nomatch": dict(ngram, prompt_lookup_max=64, prompt_lookup_min=64)}
    mml = cli_args.round_up(max(P + O, args.context) + max(max(args.ks), args.measure_k) + 16, args.block_size)
    engines = {}
    for name in SPEC_RUNS:
        kwargs = engine_setup.engine_kwargs(args, max_model_len=mml, max_num_seqs=B,
                                            max_num_batched_tokens=max(2048, B * P),
                                            decode_buckets=tuple(args.batches), prefill_buckets=(16, P))
        if configs[name] is not None:
            kwargs["speculative_config"] = configs[name]
        engines[name] = (*engine_setup.build_llm(spec, kwargs), kwargs)
    return engines


def measured_generation(engines: dict, args, batch: int, vocab: int) -> dict:
    """Greedy generation speculation off / n-gram on / n-gram that never matches: output tok/s, acceptance."""
    prompts = workloads.random_prompts(batch, args.prompt_len, seed=args.seed, vocab_size=vocab)
    res = {}
    for name in SPEC_RUNS:
        llm = engines[name][0]
        workloads.warm_generate(llm, prompts[:2], max_tokens=16)
        before = workloads.stats_snapshot(llm)
        outs, wall = workloads.timed_generate(llm, prompts, workloads.greedy(args.output_len))
        st = workloads.stats_delta(before, workloads.stats_snapshot(llm))
        res[f"tok_s_{name}"] = sum(len(o.outputs[0].token_ids) for o in outs) / wall
        res[f"steps_{name}"] = st["steps"]
        if name != "off":
            drafted = st["spec_decode_num_draft_tokens"]
            res[f"acceptance_{name}"] = st["spec_decode_num_accepted_tokens"] / drafted if drafted else 0.0
            res[f"draft_tokens_{name}"] = drafted
    res["speedup_ngram"] = res["tok_s_ngram"] / res["tok_s_off"]
    res["nomatch_slowdown"] = res["tok_s_off"] / res["tok_s_nomatch"] - 1
    return res


def main(argv=None) -> dict:
    args = parse(argv)
    spec = model_specs.resolve_model(args.model)
    engine_setup.setup_jax(args)
    cfg = model_specs.model_config(spec)
    dev = result_files.device_info()
    V = cfg.vocab_size
    engines = build_engines(spec, args)
    llm, startup, kwargs = engines["off"]
    metrics, table = {}, []
    config = {"batches": list(args.batches), "ks": list(args.ks), "context": args.context, "iters": args.iters,
              "prompt_len": args.prompt_len, "output_len": args.output_len, "measure_k": args.measure_k,
              "draft_step_s": None, "draft_note": "method draft_model is not implemented",
              **engine_setup.engine_config(llm, kwargs, startup)}
    for B in args.batches:
        costs = step_costs(llm, B, args.ks, args.context, args.iters, V)
        t_dec = costs["decode_s"]
        metrics[f"decode_ms_b{B}"] = t_dec * 1e3
        for k in args.ks:
            t_ver = costs[f"verify_k{k}_s"]
            metrics[f"verify_ms_b{B}_k{k}"] = t_ver * 1e3
            metrics[f"verify_over_decode_b{B}_k{k}"] = t_ver / t_dec
            for a in RATES:
                E = expected_tokens(a, k)
                table.append({"batch": B, "k": k, "rate": a, "tokens_per_step": E, "speedup": E * t_dec / t_ver,
                              "tok_s": B * E / t_ver, "tok_s_off": B / t_dec})
        metrics.update({f"{key}_b{B}": v for key, v in measured_generation(engines, args, B, V).items()})
    config["speedup_table"] = table
    result = result_files.make_result(benchmark=BENCHMARK, model=spec.name, dev=dev, config=config, ceilings={},
                                      metrics=metrics)
    path = result_files.write_result(result, devtag=dev["devtag"], results_dir=args.results_dir, out=args.out)
    rows = [("model", spec.name), ("device", dev["device"]), ("context", args.context)]
    for B in args.batches:
        rows.append((f"decode step ms (batch {B})", metrics[f"decode_ms_b{B}"]))
        for k in args.ks:
            rows.append((f"  verify k={k} ms / x decode", f"{metrics[f'verify_ms_b{B}_k{k}']:.3f} / "
                         f"{metrics[f'verify_over_decode_b{B}_k{k}']:.3f}"))
        rows.append(("  measured tok/s off / ngram / no-match", f"{metrics[f'tok_s_off_b{B}']:.1f} / "
                     f"{metrics[f'tok_s_ngram_b{B}']:.1f} / {metrics[f'tok_s_nomatch_b{B}']:.1f}"))
        rows.append((f"  measured acceptance (k={args.measure_k})", metrics[f"acceptance_ngram_b{B}"]))
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
