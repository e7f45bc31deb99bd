"""startup: how long a new user waits, from `python` to the first generated token, cold and with a warm cache.

Each run is a fresh process (`--child`), started twice against one new JAX compilation cache directory: the first
start compiles what it needs (cold), the second loads it from the cache (warm, what every later start of the same
model gets). A child reports, from its own clock: import_s (import qwenjax), engine_s (LLM(...): load and, where the
engine warms up, compile every bucket; load_s and warmup_s are the engine's own split), first_token_s (a 16-token
prompt's first output token, through any compile the warm-up left to the first request) and the process wall time
the parent saw (interpreter start included).

  python benchmarks/startup.py                                 # the built-in default model, engine defaults
  python benchmarks/startup.py --model qwen2-7b-instruct       # the 7B shape, random weights (on a GPU)
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
T0 = time.perf_counter()  # the child's clock starts before anything heavy is imported

BENCHMARK = "startup"
BUILTIN = "builtin"


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=BUILTIN, help="'builtin' (the default model) or a config stem (random weights)")
    p.add_argument("--results-dir", default=None, help="default: benchmarks/results")
    p.add_argument("--out", default=None, help="also copy the result file here")
    p.add_argument("--no-cache", action="store_true",
                   help="both starts without a compilation cache (two cold starts)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def child(args) -> dict:
    import qwenjax

    import_s = time.perf_counter() - T0
    kwargs = {"compilation_cache_dir": args.cache_dir or None}
    if args.model != BUILTIN:
        import model_specs

        kwargs.update(model=model_specs.resolve_model(args.model).dir, load_format="dummy", max_model_len=4096)
    t = time.perf_counter()
    llm = qwenjax.LLM(**kwargs)
    engine_s = time.perf_counter() - t
    t = time.perf_counter()
    params = qwenjax.SamplingParams(max_tokens=1, ignore_eos=True)
    out = llm.generate(prompt_token_ids=[list(range(1000, 1016))], sampling_params=params, use_tqdm=False)[0]
    first_token_s = time.perf_counter() - t
    assert len(out.outputs[0].token_ids) == 1
    m = llm.llm_engine.model
    import result_files

    return {"device": result_files.device_info(), "import_s": import_s, "engine_s": engine_s, "load_s": m.load_seconds, "warmup_s": m.warmup_seconds,
            "first_token_s": first_token_s, "to_first_token_s": time.perf_counter() - T0}


def run_child(args, cache_dir: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--model", args.model, "--cache-dir", "" if args.no_cache else cache_dir]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise RuntimeError(f"startup child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**figures, "process_wall_s": wall}  # "device": the child's (the parent never starts JAX's backend)


def main(argv=None) -> dict:
    args = parse(argv)
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return {}
    import repo_paths
    import result_files

    with tempfile.TemporaryDirectory(prefix="qwenjax-startup-cache-") as cache:
        cold = run_child(args, cache)
        warm = run_child(args, cache)
    dev = cold.pop("device")
    warm.pop("device")
    metrics = {f"{k}_{run}": v for run, figures in (("cold", cold), ("warm", warm)) for k, v in figures.items()}
    model = "tiny-random-qwen2" if args.model == BUILTIN else args.model
    result = result_files.make_result(benchmark=BENCHMARK, model=model, dev=dev, config={
        "engine_args": {} if args.model == BUILTIN else {"load_format": "dummy", "max_model_len": 4096},
        "prompt_len": 16, "output_len": 1, "dtype": "auto", "compilation_cache": not args.no_cache},
        ceilings={}, metrics=metrics)
    path = result_files.write_result(result, devtag=dev["devtag"], out=args.out,
                                     results_dir=args.results_dir or str(repo_paths.RESULTS_DIR))
    rows = [(k, f"{cold[k]:.2f} s / {warm[k]:.2f} s") for k in cold]
    runs = "two starts, no cache" if args.no_cache else "cold / warm cache"
    result_files.print_table(f"startup, {model} on {dev['device']} ({runs})", rows)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
