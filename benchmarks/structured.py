"""structured: 64 concurrent requests under a realistic JSON schema against the same requests unconstrained; and
batch 1 (BENCHMARKS.md).

The constrained run goes first (temperature 1, seeded); the unconstrained run then asks each request for exactly the
number of tokens its constrained twin produced (ignore_eos), so both runs emit the same token counts through the
same buckets. Figures: speedup_vs_unconstrained = output tok/s constrained / unconstrained at batch 64 (each the
median of --repeats timed runs after an untimed one); tpot_ratio_batch1 = time per output token of one constrained
request / one unconstrained request of the same length (medians of --repeats); grammar_compile_ms = the schema's
compile on a cold cache (llguidance's tokenizer, built once per engine, reported apart). Host time spent building
masks and the number of late samplers (sampler dispatched after reading the previous step) are reported beside.

  python benchmarks/structured.py --model qwen2-7b-instruct [--out $OUT]
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cli_args  # noqa: E402
import device_ceilings  # noqa: E402
import engine_setup  # noqa: E402
import result_files  # noqa: E402
import workloads  # noqa: E402

BENCHMARK = "structured"

# An order record, as an agent framework would ask for one: nested objects, an array of objects, enums, a pattern,
# integer bounds, required fields and no extra properties.
SCHEMA = {
    "type": "object",
    "properties": {
        "order_id": {"type": "string", "pattern": "^ORD-[0-9]{6}$"},
        "customer": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 40}, "email": {"type": "string", "maxLength": 40},
                           "tier": {"enum": ["free", "pro", "enterprise"]}},
            "required": ["name", "email", "tier"], "additionalProperties": False,
        },
        "items": {
            "type": "array", "minItems": 1, "maxItems": 8,
            "items": {"type": "object",
                      "properties": {"sku": {"type": "string", "maxLength": 12},
                                     "quantity": {"type": "integer", "minimum": 1, "maximum": 100},
                                     "price_cents": {"type": "integer", "minimum": 0, "maximum": 1000000}},
                      "required": ["sku", "quantity", "price_cents"], "additionalProperties": False},
        },
        "notes": {"type": "string", "maxLength": 200},
        "paid": {"type": "boolean"},
    },
    "required": ["order_id", "customer", "items", "paid"],
    "additionalProperties": False,
}


def parse(argv=None):
    p = cli_args.base_parser(__doc__.splitlines()[0])
    w = p.add_argument_group("workload")
    w.add_argument("--batch", type=int, default=None, help="concurrent requests, default 64 (x --scale)")
    w.add_argument("--prompt-len", type=int, default=None, help="default 128 (x --scale)")
    w.add_argument("--max-tokens", type=int, default=None, help="cap of a constrained output, default 512")
    w.add_argument("--repeats", type=int, default=3, help="timed runs of each kind; medians are reported")
    w.add_argument("--mask-variants", default="thread:0,inline:4",
                   help="MODE:THREADS variants run after the main runs: the constrained batch again with the masks "
                   "built on a worker thread (thread), inline (inline), or on a thread with the GIL switch interval "
                   "at 0.2 ms (thread-si), by THREADS llguidance workers (0: one per core); each variant also times "
                   "the batch's masks filled alone (engine idle)")
    args = p.parse_args(argv)
    args.batch = args.batch or cli_args.scaled(64, args.scale, 2)
    args.prompt_len = args.prompt_len or cli_args.scaled(128, args.scale, 4)
    args.max_tokens = args.max_tokens or cli_args.scaled(512, args.scale, 32)
    return args


def _params(seed: int, max_tokens: int, so=None, exact: bool = False):
    from qwenjax import SamplingParams

    return SamplingParams(temperature=1.0, seed=seed, max_tokens=max_tokens, structured_outputs=so,
                          ignore_eos=exact, min_tokens=max_tokens if exact else 0)


def _run(llm, prompts, params):
    outs, wall = workloads.timed_generate(llm, prompts, params)
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    return outs, n / wall


def _tpot_ms(out) -> float:
    m, n = out.metrics, len(out.outputs[0].token_ids)
    return (m.finished_time - m.first_token_time) / max(n - 1, 1) * 1e3


def main(argv=None) -> dict:
    import jsonschema

    from qwenjax.structured_outputs import StructuredOutputsParams

    args = parse(argv)
    spec, cfg, dev = engine_setup.prepare(args)
    ceilings = device_ceilings.measure_ceilings(cfg, mode=args.ceilings, platform=dev["platform"])
    B, P, O = args.batch, args.prompt_len, args.max_tokens
    buckets = tuple(sorted({b for b in (1, 8, 16, 32, 64, 128, 256) if b < B} | {B}))
    kwargs = engine_setup.engine_kwargs(args, max_model_len=cli_args.round_up(P + O, args.block_size), max_num_seqs=B,
                                        max_num_batched_tokens=None, decode_buckets=buckets, prefill_buckets=(P,))
    llm, startup = engine_setup.build_llm(spec, kwargs)
    eng = llm.llm_engine
    grammars = eng.constraints.grammars
    t0 = time.perf_counter()
    grammars._ll_tokenizer()
    tokenizer_ms = (time.perf_counter() - t0) * 1e3
    so = StructuredOutputsParams(json=SCHEMA)
    t0 = time.perf_counter()
    grammars.compile(so)
    compile_ms = (time.perf_counter() - t0) * 1e3

    prompts = workloads.random_prompts(B, P, seed=args.seed, vocab_size=cfg.vocab_size)
    constrained = [_params(i, O, so) for i in range(B)]
    _run(llm, prompts, constrained)  # untimed: compiles the masked sampler at every bucket the batch passes
    runs_c, runs_u = [], []
    for _ in range(args.repeats):
        before = workloads.stats_snapshot(llm)
        mask_s0, mask_n0 = eng.constraints.mask_seconds, eng.constraints.mask_steps
        outs, tok_s = _run(llm, prompts, constrained)
        st = workloads.stats_delta(before, workloads.stats_snapshot(llm))
        lengths = [len(o.outputs[0].token_ids) for o in outs]
        valid = 0
        for o in outs:
            if o.outputs[0].finish_reason == "stop":
                jsonschema.validate(json.loads(o.outputs[0].text), SCHEMA)
                valid += 1
        masks = eng.constraints.mask_steps - mask_n0
        steps = max(st["steps"], 1)
        # The host's critical path per step: waiting for tokens, handling them, the late sampler (masks included)
        runs_c.append({"tok_s": tok_s, "tokens": sum(lengths), "valid_json": valid, "steps": st["steps"],
                       "late_samplers": st["late_samplers"],
                       "mask_ms_per_step": (eng.constraints.mask_seconds - mask_s0) / max(masks, 1) * 1e3,
                       **{f"{k}_ms_per_step": st[f"{k}_s"] / steps * 1e3
                          for k in ("host_wait", "host_process", "late_sampler", "host_dispatch")}})
    outs_c = outs
    exact = [_params(i, n, exact=True) for i, n in enumerate(lengths)]
    _run(llm, prompts, exact)  # untimed
    for _ in range(args.repeats):
        before = workloads.stats_snapshot(llm)
        outs, tok_s = _run(llm, prompts, exact)
        st = workloads.stats_delta(before, workloads.stats_snapshot(llm))
        steps = max(st["steps"], 1)
        runs_u.append({"tok_s": tok_s, "tokens": sum(len(o.outputs[0].token_ids) for o in outs), "steps": st["steps"],
                       **{f"{k}_ms_per_step": st[f"{k}_s"] / steps * 1e3
                          for k in ("host_wait", "host_process", "host_dispatch")}})

    # Batch 1: one constrained request, then one unconstrained request of the same length.
    one_c, one_u = [], []
    for r in range(args.repeats + 1):
        out = llm.generate(prompt_token_ids=prompts[:1], sampling_params=_params(1000 + r, O, so), use_tqdm=False)[0]
        n = len(out.outputs[0].token_ids)
        free = llm.generate(prompt_token_ids=prompts[:1], sampling_params=_params(1000 + r, n, exact=True),
                            use_tqdm=False)[0]
        if r:  # the first pair is untimed (compiles the batch-1 masked sampler)
            one_c.append(_tpot_ms(out))
            one_u.append(_tpot_ms(free))

    sweep = _thread_sweep(llm, prompts, constrained, so, outs_c, args)

    c_tok_s = statistics.median(r["tok_s"] for r in runs_c)
    u_tok_s = statistics.median(r["tok_s"] for r in runs_u)
    tpot_c, tpot_u = statistics.median(one_c), statistics.median(one_u)
    metrics = {"speedup_vs_unconstrained": c_tok_s / u_tok_s, "tpot_ratio_batch1": tpot_c / tpot_u,
               "grammar_compile_ms": compile_ms, "constrained_tok_s": c_tok_s, "unconstrained_tok_s": u_tok_s,
               "tpot_ms_constrained": tpot_c, "tpot_ms_unconstrained": tpot_u, "tokenizer_init_ms": tokenizer_ms,
               "mask_ms_per_step": statistics.median(r["mask_ms_per_step"] for r in runs_c)}
    config = {"batch": B, "prompt_len": P, "max_tokens": O, "dtype": args.dtype, "kv_cache_dtype": args.kv_cache_dtype,
              "seed": args.seed, "repeats": args.repeats, "temperature": 1.0, "schema": SCHEMA,
              "runs_constrained": runs_c,
              "runs_unconstrained": runs_u, "mask_variants": sweep,
              "tpot_ms_constrained": one_c, "tpot_ms_unconstrained": one_u}
    config.update(engine_setup.engine_config(llm, kwargs, startup))
    result = result_files.make_result(benchmark=BENCHMARK, model=spec.name, dev=dev, config=config, ceilings=ceilings,
                                      metrics=metrics)
    path = result_files.write_result(result, devtag=dev["devtag"], results_dir=args.results_dir, out=args.out)
    rows = [("model", spec.name), ("device", dev["device"]), ("batch / prompt / max tokens", f"{B} / {P} / {O}"),
            ("constrained tok/s", c_tok_s), ("unconstrained tok/s", u_tok_s),
            ("speedup_vs_unconstrained", metrics["speedup_vs_unconstrained"]),
            ("tpot ms constrained / free (batch 1)", f"{tpot_c:.3f} / {tpot_u:.3f}"),
            ("tpot_ratio_batch1", metrics["tpot_ratio_batch1"]), ("grammar_compile_ms", compile_ms),
            ("mask ms a step", metrics["mask_ms_per_step"]),
            ("host ms a step, wait / handle / late sampler",
             " / ".join(f"{statistics.median(r[f'{k}_ms_per_step'] for r in runs_c):.2f}"
                        for k in ("host_wait", "host_process", "late_sampler"))),
            *((f"masks {r['variant']}: fill alone, in run p50/mean / mask / late ms, tok/s",
               f"{r['fill_ms_alone']:.2f}, {r['fill_ms_in_run']['median']:.2f}/{r['fill_ms_in_run']['mean']:.2f} / "
               f"{r['mask_ms_per_step']:.2f} / {r['late_sampler_ms_per_step']:.2f}, {r['tok_s']:.0f}") for r in sweep),
            ("valid JSON (stopped) / requests", f"{runs_c[-1]['valid_json']} / {B}")]
    result_files.print_result_table(f"{BENCHMARK} {spec.name}", rows, result, False, path)
    return result


def _time_fills(grammars) -> list[float]:
    """Wraps `grammars.fill_bitmasks` on the instance to record each call's seconds (llguidance's fill alone)."""
    fills, fill = [], grammars.fill_bitmasks

    def timed(rows, bitmask):
        t0 = time.perf_counter()
        fill(rows, bitmask)
        if rows:
            fills.append(time.perf_counter() - t0)

    grammars.fill_bitmasks = timed
    return fills


def _thread_sweep(llm, prompts, constrained, so, outs, args) -> list[dict]:
    """For each variant (where masks are built, by how many llguidance workers): the batch's masks filled alone, on
    fresh copies of matchers halfway through the outputs of the last constrained run (the median of 20 fills, the
    engine idle), then the constrained batch run again with each fill timed."""
    import numpy as np

    eng = llm.llm_engine
    grammars = eng.constraints.grammars
    matchers = []
    for o in outs:
        m = grammars.matcher(so)
        ids = list(o.outputs[0].token_ids)
        m.consume_tokens(ids[:len(ids) // 2])
        matchers.append(m)
    live = [(m, i) for i, m in enumerate(matchers) if not m.is_stopped()]
    mask = np.zeros((len(matchers), grammars.bitmask_width), np.int32)
    sweep = []
    switch = sys.getswitchinterval()
    for variant in (v for v in args.mask_variants.split(",") if v):
        mode, n = variant.split(":")
        n = int(n) or None
        grammars.use_threads(n)
        eng.constraints.masks_on_thread = mode != "inline"
        sys.setswitchinterval(2e-4 if mode == "thread-si" else switch)
        times = []
        for _ in range(20):
            rows = [(m.deep_copy(), i) for m, i in live]
            t0 = time.perf_counter()
            grammars.fill_bitmasks(rows, mask)
            times.append(time.perf_counter() - t0)
        fills = _time_fills(grammars)
        before = workloads.stats_snapshot(llm)
        mask_s0, mask_n0 = eng.constraints.mask_seconds, eng.constraints.mask_steps
        _, tok_s = _run(llm, prompts, constrained)
        st = workloads.stats_delta(before, workloads.stats_snapshot(llm))
        steps = max(st["steps"], 1)
        del grammars.fill_bitmasks  # the class's method again
        fill_ms = sorted(t * 1e3 for t in fills)
        sweep.append({"variant": variant, "threads": n, "rows": len(live), "tok_s": tok_s,
                      "fill_ms_alone": statistics.median(times) * 1e3,
                      "fill_ms_in_run": {"median": fill_ms[len(fill_ms) // 2], "p90": fill_ms[len(fill_ms) * 9 // 10],
                                         "mean": statistics.mean(fill_ms), "max": fill_ms[-1]} if fill_ms else None,
                      "mask_ms_per_step": (eng.constraints.mask_seconds - mask_s0)
                      / max(eng.constraints.mask_steps - mask_n0, 1) * 1e3,
                      **{f"{k}_ms_per_step": st[f"{k}_s"] / steps * 1e3
                         for k in ("host_wait", "host_process", "late_sampler", "host_dispatch")}})
    grammars.use_threads(None)
    eng.constraints.masks_on_thread = False
    sys.setswitchinterval(switch)
    return sweep


if __name__ == "__main__":
    main()
