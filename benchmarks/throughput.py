"""throughput: offline batched generation through LLM.generate, greedy, ignore_eos (BENCHMARKS.md).

Workloads: `fixed` (throughput-fixed): 512 requests, prompt 512, 256 new tokens; `random` (throughput-random): 1000
requests, prompt lengths uniform in [128, 1024], output lengths uniform in [64, 512], seed 0. All requests are
submitted at once; the timed region is one generate call over all of them.

Figures: output_tok_s = generated tokens / wall; total_tok_s = (prompt + generated tokens) / wall; wall_s; mfu = the
FLOP floor (2 x non-embedding params per prompt and output token, plus causal attention; BENCHMARKS.md) over the bf16
matmul rate measured in this run, divided by wall. With a peer file of the same workload (from `--peer transformers`,
run in its own call on the same machine), speedup_vs_transformers = output_tok_s / the peer's output_tok_s.

  python benchmarks/throughput.py --workload fixed --model qwen2-7b-instruct [--profile] [--out $OUT]
  python benchmarks/throughput.py --workload fixed --model qwen2-7b-instruct --peer transformers
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cli_args  # noqa: E402
import device_ceilings  # noqa: E402
import engine_setup  # noqa: E402
import floors  # noqa: E402
import model_specs  # noqa: E402
import peers  # noqa: E402
import profiling  # noqa: E402
import result_files  # noqa: E402
import workloads  # noqa: E402

WORKLOADS = {"fixed": "throughput-fixed", "random": "throughput-random"}


def parse(argv=None):
    p = cli_args.base_parser(__doc__.splitlines()[0])
    w = p.add_argument_group("workload")
    w.add_argument("--workload", choices=sorted(WORKLOADS), default="fixed")
    w.add_argument("--num-prompts", type=int, default=None, help="default 512 (fixed) / 1000 (random), x --scale")
    w.add_argument("--prompt-len", type=int, default=None, help="fixed: default 512 (x --scale)")
    w.add_argument("--output-len", type=int, default=None, help="fixed: default 256 (x --scale)")
    w.add_argument("--prompt-range", type=cli_args._int_list, default=None, help="random: lo,hi (default 128,1024)")
    w.add_argument("--output-range", type=cli_args._int_list, default=None, help="random: lo,hi (default 64,512)")
    w.add_argument("--peer", choices=("transformers",), default=None,
                   help="run the peer (transformers continuous batching, bf16, random init) on the same workload "
                        "instead of qwenjax, and write its figure where the qwenjax run merges it")
    return fill_workload_defaults(p.parse_args(argv), random_prompts=1000)


def fill_workload_defaults(args, *, random_prompts: int):
    """BENCHMARKS.md's sizes (x --scale) for whatever the command line left unset: fixed 512 x (512 -> 256);
    random `random_prompts` requests of 128-1024 -> 64-512 tokens."""
    s = args.scale
    if args.workload == "fixed":
        args.num_prompts = args.num_prompts or cli_args.scaled(512, s)
        args.prompt_len = args.prompt_len or cli_args.scaled(512, s, 2)
        args.output_len = args.output_len or cli_args.scaled(256, s, 2)
    else:
        args.num_prompts = args.num_prompts or cli_args.scaled(random_prompts, s)
        args.prompt_range = tuple(args.prompt_range or (cli_args.scaled(128, s, 2), cli_args.scaled(1024, s, 2)))
        args.output_range = tuple(args.output_range or (cli_args.scaled(64, s, 2), cli_args.scaled(512, s, 2)))
    return args


def make_workload(args, vocab_size: int) -> tuple[list[list[int]], list[int]]:
    import numpy as np

    n = args.num_prompts
    if args.workload == "fixed":
        return workloads.random_prompts(n, args.prompt_len, seed=args.seed, vocab_size=vocab_size), \
            [args.output_len] * n
    rng = np.random.default_rng(args.seed)
    plens = rng.integers(args.prompt_range[0], args.prompt_range[1] + 1, size=n)
    olens = rng.integers(args.output_range[0], args.output_range[1] + 1, size=n)
    return workloads.random_prompts(n, plens.tolist(), seed=args.seed + 1, vocab_size=vocab_size), olens.tolist()


def workload_config(args, prompts, olens) -> dict:
    c = {"workload": args.workload, "num_requests": args.num_prompts, "seed": args.seed, "dtype": args.dtype,
         "kv_cache_dtype": args.kv_cache_dtype, "greedy": True, "ignore_eos": True, "detokenize": True,
         "prompt_tokens": sum(map(len, prompts)), "output_tokens": sum(olens)}
    if args.workload == "fixed":
        c.update(prompt_len=args.prompt_len, output_len=args.output_len,
                 standard=(args.num_prompts, args.prompt_len, args.output_len) == (512, 512, 256))
    else:
        c.update(prompt_len_range=list(args.prompt_range), output_len_range=list(args.output_range),
                 standard=(args.num_prompts, tuple(args.prompt_range), tuple(args.output_range)) ==
                 (1000, (128, 1024), (64, 512)))
    return c


def engine_defaults(args, prompts, olens) -> dict:
    """Few buckets, each compiled at start-up (a 7B bucket takes 10-30 s), within the engine's own defaults for this
    device (`engine_setup.batch_limits`: vLLM's offline defaults, 1024 sequences and 16,384 tokens a step on an H100;
    256 and 8,192 elsewhere): fixed: one decode bucket at full concurrency (every decode step has all rows) and one
    prefill Q, the prompt length; random: decode at 1/4, 1/2 and all of max_num_seqs, prefill Q at half and all of
    the longest prompt."""
    limit_seqs, limit_tokens = engine_setup.batch_limits()
    limit_tokens = limit_tokens or 8192
    pmax = max(map(len, prompts))
    mml = cli_args.round_up(pmax + max(olens), args.block_size)
    seqs = min(args.num_prompts, limit_seqs)
    if args.workload == "fixed":
        decode = (seqs,)
        prefill = (args.prompt_len,)
    else:
        decode = tuple(sorted({max(1, seqs // 4), max(1, seqs // 2), seqs}))
        prefill = tuple(sorted({max(2, pmax // 2), pmax}))
    budget = min(limit_tokens, _pow2(len(prompts) * pmax))
    budget = max(budget, _pow2(pmax))
    return dict(max_model_len=mml, max_num_seqs=seqs, max_num_batched_tokens=budget, decode_buckets=decode,
                prefill_buckets=prefill)


def _pow2(n: int) -> int:
    v = 16
    while v < n:
        v *= 2
    return v


def main(argv=None) -> dict:
    args = parse(argv)
    bench = WORKLOADS[args.workload]
    spec = engine_setup.model_spec(args)
    cfg_vocab = spec.config["vocab_size"]
    prompts, olens = make_workload(args, cfg_vocab)
    if args.peer:
        return run_peer(args, spec, bench, prompts, olens)
    engine_setup.setup_jax(args)
    cfg = model_specs.model_config(spec)
    dev = result_files.device_info()
    d = engine_defaults(args, prompts, olens)
    kwargs = engine_setup.engine_kwargs(args, **d)
    ceilings = device_ceilings.measure_ceilings(cfg, mode=args.ceilings, platform=dev["platform"],
                                                gemm_tokens=kwargs["max_num_batched_tokens"] or 8192)
    llm, startup = engine_setup.build_llm(spec, kwargs)
    workloads.warm_generate(llm, prompts)

    before = workloads.stats_snapshot(llm)
    params = [workloads.greedy(o) for o in olens]
    outs, wall = workloads.timed_generate(llm, prompts, params)
    stats = workloads.stats_delta(before, workloads.stats_snapshot(llm))
    got = [len(o.outputs[0].token_ids) for o in outs]
    bad = [(i, g, o) for i, (g, o) in enumerate(zip(got, olens)) if g != o]
    if bad:
        raise RuntimeError(f"{len(bad)} requests produced the wrong token count, e.g. (index, got, want) {bad[:3]}")
    ptoks, otoks = sum(map(len, prompts)), sum(got)
    flops = floors.sum_flops([floors.request_flops(cfg, len(p), o) for p, o in zip(prompts, olens)])
    mm = ceilings["matmul_tflops"] and ceilings["matmul_tflops"] * args.mesh  # the mesh's devices together
    metrics = {"output_tok_s": otoks / wall, "total_tok_s": (ptoks + otoks) / wall, "wall_s": wall,
               "mfu": floors.ratio(flops["total"] / (mm * 1e12), wall) if mm else None,
               "flop_floor_s": flops["total"] / (mm * 1e12) if mm else None,
               "steps": stats["steps"], "preemptions": stats["preemptions"]}
    config = workload_config(args, prompts, olens)
    config.update(engine_setup.engine_config(llm, kwargs, startup))
    config["flops"] = flops
    config["engine_stats"] = stats
    if args.profile:
        prof = profiling.profile_generate(llm, prompts, params, profile_dir=args.profile_dir,
                                          unprofiled_wall_s=wall)
        metrics["device_busy"] = prof.get("device_busy")
        config["profile"] = prof
    result = result_files.make_result(benchmark=bench, model=spec.name, dev=dev, config=config, ceilings=ceilings,
                                      metrics=metrics)
    merged = peers.find_and_merge(result, devtag=dev["devtag"], results_dirs=[args.results_dir])
    path = result_files.write_result(result, devtag=dev["devtag"], results_dir=args.results_dir, out=args.out)
    rows = [("model", spec.name), ("device", dev["device"]), ("requests", args.num_prompts),
            ("prompt / output tokens", f"{ptoks} / {otoks}"), ("wall_s", wall),
            ("output_tok_s", metrics["output_tok_s"]), ("total_tok_s", metrics["total_tok_s"]),
            ("mfu", metrics["mfu"]), ("steps", stats["steps"]), ("preemptions", stats["preemptions"]),
            ("matmul_tflops", mm), ("startup_s (load + compile)", startup)]
    result_files.print_result_table(f"{bench} {spec.name}", rows, result, merged, path)
    return result


def run_peer(args, spec, bench: str, prompts, olens) -> dict:
    """transformers continuous batching (what `generate_batch` runs), on the same requests, greedy, EOS disabled.

    generate_batch's own body: a manager from `continuous_batching_context_manager` (paged cache sized from free
    memory, CUDA-graph warm-up), `add_request` per prompt (each with its own max_new_tokens, so the random workload
    runs as is), then results until every request is done. The timed region starts after the manager's set-up and
    warm-up, as ours starts after our compilation; `setup_s` records what it excluded. If that API is missing, the
    public `generate_batch` call is timed whole instead (fixed workload only) and `method` says so.
    """
    peers.peer_process_setup()
    import torch
    from transformers import GenerationConfig

    model, dev, init_s = peers.torch_model(spec)
    gcfg = GenerationConfig(max_new_tokens=max(olens), do_sample=False, pad_token_id=0)
    gcfg.eos_token_id = -1  # disabled: ignore_eos
    n = len(prompts)
    results, setup_s, method = {}, None, "continuous_batching_context_manager + add_request"
    try:
        try:
            from transformers.generation.continuous_batching.utils import WorkloadHints

            hints = WorkloadHints(max_prompt_length=max(map(len, prompts)), max_generated_length=max(olens),
                                  num_requests=n)
        except ImportError:
            hints = None
        t0 = time.perf_counter()
        kw = {"workload_hints": hints} if hints is not None else {}
        with model.continuous_batching_context_manager(generation_config=gcfg, block=True, timeout=5, warmup=True,
                                                       **kw) as manager:
            setup_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            for i, (p, o) in enumerate(zip(prompts, olens)):
                manager.add_request(input_ids=p, request_id=f"r{i}", max_new_tokens=int(o), eos_token_id=-1)
            while len(results) < n:
                r = manager.get_result(timeout=1)
                if r is None:
                    if not manager.is_running():
                        raise RuntimeError("transformers' generation thread stopped")
                    continue
                if r.is_finished():
                    results[r.request_id] = r
            wall = time.perf_counter() - t1
    except (AttributeError, TypeError) as e:
        if args.workload != "fixed":
            raise
        print(f"continuous_batching_context_manager failed ({e}); timing generate_batch whole", flush=True)
        method = f"generate_batch, timed whole (set-up and warm-up included): {type(e).__name__}: {e}"
        if dev == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        results = model.generate_batch(inputs=prompts, generation_config=gcfg)
        wall = time.perf_counter() - t1
    errors = [r.error for r in results.values() if getattr(r, "error", None)]
    if errors or len(results) != n:
        raise RuntimeError(f"transformers finished {len(results)} of {n} requests; errors: {errors[:3]}")
    otoks = sum(len(r.generated_tokens) for r in results.values())
    ptoks = sum(map(len, prompts))
    setup = peers.peer_setup_info(model, dev, init_s)
    setup.update({"setup_s": round(setup_s, 2) if setup_s is not None else None, "method": method,
                  "expected_output_tokens": sum(olens)})
    peers.free_torch(model)
    engine_setup.setup_jax(args)
    cfg = model_specs.model_config(spec)
    devinfo = result_files.device_info()
    ceilings = device_ceilings.measure_ceilings(cfg, mode=args.ceilings, platform=devinfo["platform"])
    config = workload_config(args, prompts, olens)
    config.update({"peer": "transformers", "peer_key": "transformers_generate_batch",
                   "compare_metric": "output_tok_s", "speedup_key": "speedup_vs_transformers", "peer_setup": setup})
    metrics = {"output_tok_s": otoks / wall, "total_tok_s": (ptoks + otoks) / wall, "wall_s": wall}
    peer = result_files.make_result(benchmark=bench, model=spec.name, dev=devinfo, config=config, ceilings=ceilings,
                                    metrics=metrics)
    path = peers.write_peer(peer, devtag=devinfo["devtag"], results_dir=args.results_dir, out=args.out)
    result_files.print_table(f"{bench} {spec.name}: transformers continuous batching (peer)",
                             [("wall_s", wall), ("output_tok_s", metrics["output_tok_s"]),
                              ("total_tok_s", metrics["total_tok_s"]), ("output tokens", otoks),
                              ("setup_s (excluded)", setup_s), ("peer file", str(path))])
    return peer


if __name__ == "__main__":
    main()
