"""warmup-breakdown: where a start-up's warm-up goes, bucket by bucket: Python tracing, lowering to StableHLO, and
XLA's compile (or, with a warm persistent cache, its load), cold and warm.

Two fresh processes share one new compilation cache directory: the first compiles (cold), the second finds the
programs in the cache (warm). Each builds the engine with `skip_warmup=True` (random weights), then takes every step
bucket the engine would warm up through `jit.trace`, `.lower()` and `.compile()` separately, timing each.

  python benchmarks/warmup_breakdown.py --model qwen2-7b-instruct [--out $OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

BENCHMARK = "warmup-breakdown"


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen2-7b-instruct")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--results-dir", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def child(args) -> dict:
    import jax

    import model_specs
    from qwenjax import LLM
    from qwenjax.worker import packing
    from qwenjax.worker.model_runner import dummy_input

    t = time.perf_counter()
    llm = LLM(model=model_specs.resolve_model(args.model).dir, load_format="dummy", max_model_len=args.max_model_len,
              skip_warmup=True, compilation_cache_dir=args.cache_dir)
    engine_s = time.perf_counter() - t
    r, sc = llm.llm_engine.runner, llm.llm_engine.scheduler_config
    buckets = [(b, 1, False, 0) for b in sc.decode_buckets] + [(n, t, False, 0) for n, t in sc.packed_buckets] + \
              [(1, q, True, 0) for _, q in sc.prefill_buckets] + [(b, q, True, d) for d, b, q in sc.mixed_buckets]
    rows = []
    for b, q, ctx, d in buckets:
        inp = dummy_input(b, q, r.num_pages, r.page_size, r.block_table_width, r.scratch_slot, has_context=ctx,
                          decode_rows=d)
        i_buf, f_buf, layout = packing.pack(inp)
        with jax.set_mesh(r.mesh):
            t0 = time.perf_counter()
            traced = r._step.trace(r._param_leaves, r.kv_cache, r.penalties, r.last_tokens, i_buf, f_buf,
                                   has_context=ctx, layout=layout)
            t1 = time.perf_counter()
            lowered = traced.lower()
            t2 = time.perf_counter()
            lowered.compile()
            t3 = time.perf_counter()
        rows.append({"bucket": [b, q, ctx, d], "trace_s": t1 - t0, "lower_s": t2 - t1, "compile_s": t3 - t2})
    return {"engine_s": engine_s, "buckets": rows,
            "totals": {k: sum(x[k] for x in rows) for k in ("trace_s", "lower_s", "compile_s")}}


def main(argv=None) -> dict:
    args = parse(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return {}
    import result_files

    runs = {}
    with tempfile.TemporaryDirectory(prefix="qwenjax-warmup-cache-") as cache:
        for name in ("cold", "warm"):
            cmd = [sys.executable, __file__, "--child", "--model", args.model, "--cache-dir", cache,
                   "--max-model-len", str(args.max_model_len)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                raise RuntimeError(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            runs[name] = json.loads(line[len("RESULT "):])
    dev = result_files.device_info()
    metrics = {f"{run}_{k}": v for run in runs for k, v in runs[run]["totals"].items()}
    metrics.update({f"{run}_engine_s": runs[run]["engine_s"] for run in runs})
    config = {"max_model_len": args.max_model_len, "num_buckets": len(runs["cold"]["buckets"]), "runs": runs}
    result = result_files.make_result(benchmark=BENCHMARK, model=args.model, dev=dev, config=config, ceilings={},
                                      metrics=metrics)
    path = result_files.write_result(result, devtag=dev["devtag"], results_dir=args.results_dir
                                     or str(Path(__file__).resolve().parent / "results"), out=args.out)
    rows = [("model", args.model), ("device", dev["device"]), ("buckets", config["num_buckets"])]
    for run in runs:
        tot = runs[run]["totals"]
        rows.append((f"{run}: engine / trace / lower / compile s",
                     f"{runs[run]['engine_s']:.1f} / {tot['trace_s']:.1f} / {tot['lower_s']:.1f} / "
                     f"{tot['compile_s']:.1f}"))
    result_files.print_table(f"{BENCHMARK} {args.model}", rows + [("result", str(path))])
    return result


if __name__ == "__main__":
    main()
