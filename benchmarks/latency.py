"""latency: batch 1, prompt 128, 256 new tokens, greedy, ignore_eos (BENCHMARKS.md).

Figures, from the decode steps alone: ms_per_token = (finished_time - first_token_time) / (n - 1) of the request's
own metrics, the median over --repeats requests run one after another; tok_s = 1000 / ms_per_token; mbu = the
bandwidth floor of those decode steps (weights except the embedding table, plus the KV read at each step's context,
over the copy bandwidth measured in this run) / their measured time. ttft_ms and e2e_tok_s (n / wall of the whole
generate) are reported beside them.

  python benchmarks/latency.py --model qwen2-7b-instruct [--profile] [--out $OUT]
  python benchmarks/latency.py --model qwen2-7b-instruct --peer transformers   # transformers generate, own call
  python benchmarks/latency.py --model qwen2-7b-instruct --speculative-config '{"method": "ngram",
      "num_speculative_tokens": 4}'                                            # n-gram speculation (-spec tag)
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
import floors  # noqa: E402
import model_specs  # noqa: E402
import peers  # noqa: E402
import profiling  # noqa: E402
import result_files  # noqa: E402
import workloads  # noqa: E402

BENCHMARK = "latency"


def parse(argv=None):
    p = cli_args.base_parser(__doc__.splitlines()[0])
    w = p.add_argument_group("workload")
    w.add_argument("--prompt-len", type=int, default=None, help="default 128 (x --scale)")
    w.add_argument("--output-len", type=int, default=None, help="default 256 (x --scale)")
    w.add_argument("--repeats", type=int, default=3, help="timed requests; the median is reported")
    w.add_argument("--speculative-config", type=json.loads, default=None, metavar="JSON",
                   help="speculative decoding, as the server's flag: '{\"method\": \"ngram\", "
                        "\"num_speculative_tokens\": 4}'; the result gets the acceptance rate and a -spec tag")
    w.add_argument("--peer", choices=("transformers",), default=None,
                   help="run the peer (transformers generate, bf16, random init) instead of qwenjax, in its own "
                        "process, and write its figure where the qwenjax run merges it")
    args = p.parse_args(argv)
    if args.speculative_config is not None:
        args.tag = (args.tag + "-" if args.tag else "") + "spec"
    args.prompt_len = args.prompt_len or cli_args.scaled(128, args.scale, 2)
    args.output_len = args.output_len or cli_args.scaled(256, args.scale, 2)
    return args


def workload_config(args) -> dict:
    return {"batch": 1, "prompt_len": args.prompt_len, "output_len": args.output_len, "dtype": args.dtype,
            "kv_cache_dtype": args.kv_cache_dtype, "seed": args.seed, "repeats": args.repeats, "greedy": True,
            "ignore_eos": True, "standard": (args.prompt_len, args.output_len) == (128, 256),
            "speculative_config": getattr(args, "speculative_config", None)}


def main(argv=None) -> dict:
    args = parse(argv)
    spec = engine_setup.model_spec(args)
    if args.peer:
        return run_peer(args, spec)
    engine_setup.setup_jax(args)
    cfg = model_specs.model_config(spec)
    dev = result_files.device_info()
    ceilings = device_ceilings.measure_ceilings(cfg, mode=args.ceilings, platform=dev["platform"])
    P, O = args.prompt_len, args.output_len
    kwargs = engine_setup.engine_kwargs(args, max_model_len=cli_args.round_up(P + O, args.block_size), max_num_seqs=1,
                                        max_num_batched_tokens=None, decode_buckets=(1,), prefill_buckets=(P,))
    llm, startup = engine_setup.build_llm(spec, kwargs)
    prompts = workloads.random_prompts(args.repeats + 1, P, seed=args.seed, vocab_size=cfg.vocab_size)
    workloads.warm_generate(llm, prompts[-1:])

    runs = []
    for i in range(args.repeats):
        before = workloads.stats_snapshot(llm)
        outs, wall = workloads.timed_generate(llm, [prompts[i]], workloads.greedy(O))
        st = workloads.stats_delta(before, workloads.stats_snapshot(llm))
        out = outs[0]
        n = len(out.outputs[0].token_ids)
        if n != O:
            raise RuntimeError(f"expected {O} tokens, got {n} (finish_reason {out.outputs[0].finish_reason})")
        m = out.metrics
        decode_s = m.finished_time - m.first_token_time
        steps = max(st["steps"], 1)
        # The host's share of a step: dispatching it (JAX + XLA's kernel launches) and waiting for its token.
        runs.append({"ms_per_token": decode_s / max(n - 1, 1) * 1e3, "ttft_ms": (m.first_token_time - m.arrival_time)
                     * 1e3, "wall_s": wall, "dispatch_ms_per_step": st["host_dispatch_s"] / steps * 1e3,
                     "wait_ms_per_step": st["host_wait_s"] / steps * 1e3})
    ms = statistics.median(r["ms_per_token"] for r in runs)
    wall = statistics.median(r["wall_s"] for r in runs)
    # Decode step i (1 <= i < O) feeds token P + i - 1 and attends over P + i tokens.
    # packed / float8 weights: the floor counts their bytes
    quant = spec.config.get("quantization_config") or floors.load_time_quantization(args.quantization)
    # Each of the mesh's devices reads its shard: the floor is at `mesh` times one device's bandwidth.
    floor_s = floors.decode_floor_seconds(cfg, [P + i for i in range(1, O)], ceilings["copy_tbps"] * args.mesh,
                                          quant=quant) if ceilings["copy_tbps"] else None
    floor_ms = floor_s / max(O - 1, 1) * 1e3 if floor_s else None
    metrics = {"tok_s": 1e3 / ms, "ms_per_token": ms, "mbu": floors.ratio(floor_ms, ms),
               "ttft_ms": statistics.median(r["ttft_ms"] for r in runs), "e2e_tok_s": O / wall,
               "floor_ms_per_token": floor_ms,
               "dispatch_ms_per_step": statistics.median(r["dispatch_ms_per_step"] for r in runs),
               "wait_ms_per_step": statistics.median(r["wait_ms_per_step"] for r in runs)}
    if args.speculative_config is not None:  # over every timed run (greedy: the same tokens, steps and proposals)
        st = llm.llm_engine.stats
        metrics["spec_acceptance_rate"] = st.spec_decode_acceptance_rate
        metrics["spec_verify_steps"] = st.spec_decode_verify_steps
    config = workload_config(args)
    config.update(engine_setup.engine_config(llm, kwargs, startup))
    config["floor"] = {"decode_weight_bytes": floors.decode_weight_bytes(cfg, quant=quant),
                       "kv_bytes_per_token": floors.kv_bytes_per_token(cfg), "method": "BENCHMARKS.md decode floor"}
    config["runs"] = [{k: round(v, 4) for k, v in r.items()} for r in runs]
    if args.profile:
        prof = profiling.profile_generate(llm, [prompts[0]], workloads.greedy(O), profile_dir=args.profile_dir,
                                          unprofiled_wall_s=runs[0]["wall_s"])
        metrics["device_busy"] = prof.get("device_busy")
        config["profile"] = prof
    result = result_files.make_result(benchmark=BENCHMARK, model=spec.name, dev=dev, config=config, ceilings=ceilings,
                                      metrics=metrics)
    merged = peers.find_and_merge(result, devtag=dev["devtag"], results_dirs=[args.results_dir])
    path = result_files.write_result(result, devtag=dev["devtag"], results_dir=args.results_dir, out=args.out)
    rows = [("model", spec.name), ("device", dev["device"]), ("prompt -> new tokens", f"{P} -> {O}"),
            ("ms_per_token", ms), ("tok_s", metrics["tok_s"]), ("mbu", metrics["mbu"]),
            ("ttft_ms", metrics["ttft_ms"]), ("copy_tbps", ceilings["copy_tbps"]),
            ("dispatch / wait ms a step", f"{metrics['dispatch_ms_per_step']:.3f} / {metrics['wait_ms_per_step']:.3f}"),
            ("startup_s (load + compile)", startup)]
    result_files.print_result_table(f"{BENCHMARK} {spec.name}", rows, result, merged, path)
    return result


def run_peer(args, spec) -> dict:
    """transformers `generate` (default cache), batch 1, same prompt length, same number of new tokens, greedy.

    Its decode-only rate is (t(O tokens) - t(1 token)) / (O - 1), each the median of --repeats timed calls after one
    warm-up call, so prefill drops out as it does on the qwenjax side.
    """
    peers.peer_process_setup()
    import torch

    P, O = args.prompt_len, args.output_len
    model, dev, init_s = peers.torch_model(spec)
    prompt = workloads.random_prompts(1, P, seed=args.seed, vocab_size=spec.config["vocab_size"])[0]
    ids = torch.tensor([prompt], device=dev)
    mask = torch.ones_like(ids)

    def gen(n: int) -> float:
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False)
        if dev == "cuda":
            torch.cuda.synchronize()
        if out.shape[1] - P != n:
            raise RuntimeError(f"transformers generated {out.shape[1] - P} tokens, expected {n}")
        return time.perf_counter() - t0

    gen(O)
    t1 = statistics.median(gen(1) for _ in range(args.repeats))
    tn = statistics.median(gen(O) for _ in range(args.repeats))
    ms = (tn - t1) / max(O - 1, 1) * 1e3
    setup = peers.peer_setup_info(model, dev, init_s)
    peers.free_torch(model)
    engine_setup.setup_jax(args)
    cfg = model_specs.model_config(spec)
    devinfo = result_files.device_info()
    ceilings = device_ceilings.measure_ceilings(cfg, mode=args.ceilings, platform=devinfo["platform"])
    config = workload_config(args)
    config.update({"peer": "transformers", "peer_key": "transformers_generate", "compare_metric": "tok_s",
                   "speedup_key": "speedup_vs_transformers", "peer_setup": setup,
                   "method": "decode-only: (t(O) - t(1)) / (O - 1), medians of repeats"})
    metrics = {"tok_s": 1e3 / ms, "ms_per_token": ms, "e2e_tok_s": O / tn}
    peer = result_files.make_result(benchmark=BENCHMARK, model=spec.name, dev=devinfo, config=config, ceilings=ceilings,
                                    metrics=metrics)
    path = peers.write_peer(peer, devtag=devinfo["devtag"], results_dir=args.results_dir, out=args.out)
    result_files.print_table(f"{BENCHMARK} {spec.name}: transformers generate (peer)",
                             [("ms_per_token", ms), ("tok_s", metrics["tok_s"]), ("e2e_tok_s", metrics["e2e_tok_s"]),
                              ("peer file", str(path))])
    return peer


if __name__ == "__main__":
    main()
