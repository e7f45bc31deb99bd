"""lora: multi-LoRA serving against the base model in the same run (issue 28).

throughput-fixed (512 requests, prompt 512, 256 new tokens, greedy, ignore_eos) twice: on the base model (an engine
without LoRA), then with 8 rank-16 adapters on all seven projections of every layer (random weights in PEFT's format,
written into a temporary directory), the requests spread evenly over them (request i uses adapter i mod 8); and
batch-1 latency (prompt 128, 256 new tokens, the median time per output token of --repeats requests) on the base
model and with one adapter. The base engine is built, measured and released first, then the LoRA engine
(enable_lora, max_loras 8, max_lora_rank 16), so each has the device to itself. The LoRA engine also runs the
throughput workload with no adapter (what enabling LoRA costs rows that use none).

Figures: throughput_ratio = LoRA output tok/s / base output tok/s (issue 28's target: >= 0.85); latency_ratio =
time per output token with one adapter / base (target: <= 1.1); the tok/s and ms behind them. --profile repeats the
base and the spread-over-adapters throughput runs under jax.profiler (config profile_base / profile_lora: device_busy
and the top kernels; metrics device_busy_base / device_busy_lora), and one batch-1 request of each kind (config
profile_b1_base / profile_b1_lora: the kernels of a one-row decode, device_us_per_token from their device time).

--latency-only measures the batch-1 figures alone (engines sized for one request: decode bucket 1, prefill bucket
--latency-prompt-len): for comparing LoRA kernel variants (QWENJAX_LORA_* in layers/lora.py) in one call, each
with --tag.

  python benchmarks/lora.py --model qwen2-7b-instruct [--out $OUT]
  python benchmarks/lora.py --model qwen2-7b-instruct --latency-only --profile --tag fuse   # one variant
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cli_args  # noqa: E402
import device_ceilings  # noqa: E402
import engine_setup  # noqa: E402
import profiling  # noqa: E402
import result_files  # noqa: E402
import workloads  # noqa: E402

BENCHMARK = "lora"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse(argv=None):
    p = cli_args.base_parser(__doc__.splitlines()[0])
    w = p.add_argument_group("workload")
    w.add_argument("--num-prompts", type=int, default=None, help="throughput requests, default 512 (x --scale)")
    w.add_argument("--prompt-len", type=int, default=None, help="throughput prompt, default 512 (x --scale)")
    w.add_argument("--output-len", type=int, default=None, help="new tokens, default 256 (x --scale)")
    w.add_argument("--latency-prompt-len", type=int, default=None, help="batch-1 prompt, default 128 (x --scale)")
    w.add_argument("--num-loras", type=int, default=8, help="adapters the throughput requests spread over")
    w.add_argument("--lora-rank", type=int, default=16)
    w.add_argument("--repeats", type=int, default=3, help="batch-1 requests of each kind (median reported)")
    w.add_argument("--latency-only", action="store_true", help="the batch-1 figures alone (no throughput runs)")
    args = p.parse_args(argv)
    args.num_prompts = args.num_prompts or cli_args.scaled(512, args.scale, 2)
    args.prompt_len = args.prompt_len or cli_args.scaled(512, args.scale, 4)
    args.output_len = args.output_len or cli_args.scaled(256, args.scale, 2)
    args.latency_prompt_len = args.latency_prompt_len or cli_args.scaled(128, args.scale, 4)
    if args.latency_only:  # engines sized for the one batch-1 request (its buckets alone compile)
        args.num_prompts, args.prompt_len = 1, args.latency_prompt_len
    return args


def write_adapters(root: Path, cfg, n: int, rank: int, seed: int) -> list[Path]:
    """`n` PEFT-format adapters (adapter_config.json + adapter_model.safetensors) of rank `rank` on all seven
    projections of every layer, random A and B (std 0.02: deltas of the size of a trained adapter's)."""
    from safetensors.numpy import save_file

    from qwenjax.lora.peft import OWNER, projection_shapes

    shapes = projection_shapes(cfg)
    rng = np.random.default_rng(seed)
    paths = []
    for k in range(n):
        d = root / f"adapter{k}"
        d.mkdir(parents=True)
        tensors = {}
        for layer in range(cfg.num_hidden_layers):
            for name in TARGETS:
                din, dout = shapes[name]
                pre = f"base_model.model.model.layers.{layer}.{OWNER[name]}.{name}"
                tensors[f"{pre}.lora_A.weight"] = rng.normal(0, 0.02, (rank, din)).astype(np.float32)
                tensors[f"{pre}.lora_B.weight"] = rng.normal(0, 0.02, (dout, rank)).astype(np.float32)
        save_file(tensors, str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS),
            "bias": "none", "use_rslora": False, "use_dora": False, "modules_to_save": None}))
        paths.append(d)
    return paths


def _greedy(n):
    return workloads.greedy(n)


def _tok_s(llm, prompts, olen, loras=None) -> tuple[float, int]:
    llm.reset_prefix_cache()
    gc.collect()
    import time

    t0 = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=_greedy(olen), lora_request=loras, use_tqdm=False)
    wall = time.perf_counter() - t0
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    if n != olen * len(prompts):
        raise RuntimeError(f"{n} tokens generated, expected {olen * len(prompts)}")
    return n / wall, n


def _profile(llm, prompts, olen, loras, args, name: str, wall_s: float) -> dict:
    """The throughput run again under jax.profiler (profiling.profile_generate), traced into <profile-dir>/<name>."""
    d = args.profile_dir and str(Path(args.profile_dir) / name)
    return profiling.profile_generate(llm, prompts, _greedy(olen), profile_dir=d, unprofiled_wall_s=wall_s,
                                      lora_request=loras)


def _profile_b1(llm, prompt, olen, lora, args, name: str, tpot_ms: list[float]) -> dict:
    """One batch-1 request again under jax.profiler: its kernels (top 40) and their device time a token."""
    d = args.profile_dir and str(Path(args.profile_dir) / name)
    wall = statistics.median(tpot_ms) * (olen - 1) / 1e3
    info = profiling.profile_generate(llm, [prompt], _greedy(olen), profile_dir=d, unprofiled_wall_s=wall,
                                      lora_request=lora, top=40)
    if info.get("device_active_s") is not None:
        info["device_us_per_token"] = round(info["device_active_s"] / olen * 1e6, 2)
    return info


def _tpot_ms(llm, prompt, olen, lora, repeats: int) -> list[float]:
    out = []
    for r in range(repeats + 1):  # the first is untimed (compiles the batch-1 buckets' remaining programs)
        o = llm.generate(prompt_token_ids=[prompt], sampling_params=_greedy(olen), lora_request=lora,
                         use_tqdm=False)[0]
        m = o.metrics
        if r:
            out.append((m.finished_time - m.first_token_time) / (olen - 1) * 1e3)
    return out


def main(argv=None) -> dict:
    from qwenjax import LoRARequest

    args = parse(argv)
    spec, cfg, dev = engine_setup.prepare(args)
    ceilings = device_ceilings.measure_ceilings(cfg, mode=args.ceilings, platform=dev["platform"])
    N, P, O, PL = args.num_prompts, args.prompt_len, args.output_len, args.latency_prompt_len
    seqs = min(N, engine_setup.batch_limits()[0])
    kwargs = engine_setup.engine_kwargs(args, max_model_len=cli_args.round_up(max(P, PL) + O, args.block_size),
                                        max_num_seqs=seqs, max_num_batched_tokens=None,
                                        decode_buckets=tuple(sorted({1, seqs})), prefill_buckets=tuple(sorted({PL, P})))
    prompts = workloads.random_prompts(N, P, seed=args.seed, vocab_size=cfg.vocab_size)
    short = workloads.random_prompts(1, PL, seed=args.seed + 1, vocab_size=cfg.vocab_size)[0]

    thr = not args.latency_only
    tok_s = {}  # run -> output tok/s of the throughput workload
    llm, base_startup = engine_setup.build_llm(spec, kwargs)
    profiles = {}
    if thr:
        workloads.warm_generate(llm, prompts)
        _tok_s(llm, prompts, O)  # untimed: every bucket of the run once
        tok_s["base"], tokens = _tok_s(llm, prompts, O)
        if args.profile:
            profiles["base"] = _profile(llm, prompts, O, None, args, "base", tokens / tok_s["base"])
    base_tpot = _tpot_ms(llm, short, O, None, args.repeats)
    if args.profile:
        profiles["b1_base"] = _profile_b1(llm, short, O, None, args, "b1_base", base_tpot)
    base_config = engine_setup.engine_config(llm, kwargs, base_startup)
    del llm
    gc.unfreeze()  # the engine froze the heap (engine/in_flight.freeze_gc_heap): its cycles must be collectable
    gc.collect()  # the base engine's weights and pages go before the LoRA engine allocates its own

    with tempfile.TemporaryDirectory(prefix="qwenjax-lora-bench-") as tmp:
        paths = write_adapters(Path(tmp), cfg, args.num_loras, args.lora_rank, args.seed)
        loras = [LoRARequest(f"adapter{k}", k + 1, str(p)) for k, p in enumerate(paths)]
        lkw = dict(kwargs, enable_lora=True, max_loras=args.num_loras, max_lora_rank=args.lora_rank)
        llm, lora_startup = engine_setup.build_llm(spec, lkw)
        if thr:
            spread = [loras[i % len(loras)] for i in range(N)]
            workloads.warm_generate(llm, prompts)
            _tok_s(llm, prompts, O, spread)  # untimed: loads the adapters into their slots, every bucket once
            tok_s["lora"], _ = _tok_s(llm, prompts, O, spread)
            if args.profile:
                profiles["lora"] = _profile(llm, prompts, O, spread, args, "lora", tokens / tok_s["lora"])
            tok_s["none"], _ = _tok_s(llm, prompts, O)
        lora_tpot = _tpot_ms(llm, short, O, loras[0], args.repeats)
        if args.profile:
            profiles["b1_lora"] = _profile_b1(llm, short, O, loras[0], args, "b1_lora", lora_tpot)
        lora_config = engine_setup.engine_config(llm, lkw, lora_startup)
        swaps = llm.llm_engine.lora.slots.num_swaps

    tb, tl = statistics.median(base_tpot), statistics.median(lora_tpot)
    base_tok_s, lora_tok_s, none_tok_s = tok_s.get("base"), tok_s.get("lora"), tok_s.get("none")
    metrics = {"throughput_ratio": lora_tok_s / base_tok_s if thr else None, "latency_ratio": tl / tb,
               "base_output_tok_s": base_tok_s, "lora_output_tok_s": lora_tok_s,
               "lora_engine_no_adapter_tok_s": none_tok_s, "base_tpot_ms": tb, "lora_tpot_ms": tl}
    # BENCHMARKS.md's names for the two figures
    metrics.update(speedup_vs_base=metrics["throughput_ratio"], latency_ratio_vs_base=metrics["latency_ratio"])
    metrics.update({f"device_busy_{name}": prof.get("device_busy") for name, prof in profiles.items()})
    metrics.update({f"device_us_per_token_{name}": prof.get("device_us_per_token") for name, prof in profiles.items()
                    if name.startswith("b1_")})
    config = {"num_prompts": N, "prompt_len": P, "output_len": O, "latency_prompt_len": PL, "num_loras": args.num_loras,
              "lora_rank": args.lora_rank, "targets": list(TARGETS), "seed": args.seed, "repeats": args.repeats,
              "dtype": args.dtype, "tokens_per_run": N * O, "latency_only": args.latency_only, "slot_swaps": swaps,
              "base_tpot_ms": base_tpot, "lora_tpot_ms": lora_tpot, "base_engine": base_config, **lora_config,
              **{f"profile_{name}": prof for name, prof in profiles.items()}}
    result = result_files.make_result(benchmark=BENCHMARK, model=spec.name, dev=dev, config=config, ceilings=ceilings,
                                      metrics=metrics)
    path = result_files.write_result(result, devtag=dev["devtag"], results_dir=args.results_dir, out=args.out)
    rows = [("model", spec.name), ("device", dev["device"]), ("requests / prompt / output", f"{N} / {P} / {O}"),
            ("adapters (rank, targets)", f"{args.num_loras} (r={args.lora_rank}, all seven)"),
            ("base output tok/s", base_tok_s), ("LoRA output tok/s", lora_tok_s),
            ("LoRA engine, no adapter, tok/s", none_tok_s), ("throughput_ratio (>= 0.85)", metrics["throughput_ratio"]),
            ("batch-1 ms/token base / one adapter", f"{tb:.3f} / {tl:.3f}"),
            ("latency_ratio (<= 1.1)", metrics["latency_ratio"])]
    if "b1_lora" in profiles:
        rows.append(("batch-1 device us/token base / one adapter (profiled)",
                     f"{metrics['device_us_per_token_b1_base']} / {metrics['device_us_per_token_b1_lora']}"))
    result_files.print_result_table(f"{BENCHMARK} {spec.name}", rows, result, False, path)
    return result


if __name__ == "__main__":
    main()
