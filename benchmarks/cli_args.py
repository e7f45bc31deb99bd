"""The benchmark scripts' shared command line (base_parser: model and output, engine, measurement) and the helpers of
their workload-size flags (comma-separated integers, --scale, rounding to the block size)."""

from __future__ import annotations

import argparse
import os

from repo_paths import RESULTS_DIR


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model and output")
    g.add_argument("--model", default="qwen2-7b-instruct",
                   help="a config stem from qwenjax/assets/configs, 'tiny' (the built-in default model's shape), "
                        "or a path to a config.json / a directory holding one; weights are random")
    g.add_argument("--dtype", default="bfloat16")
    g.add_argument("--quantization", choices=("fp8",), default=None,
                   help="fp8: the random weights quantized as quantization='fp8' does (float8_e4m3fn, one scale "
                        "per output channel; activations per token); the result's model name gains -fp8. AWQ / "
                        "GPTQ come from --model NAME-awq / NAME-gptq-int4")
    g.add_argument("--seed", type=int, default=0, help="seed of the prompts and of the random weights")
    g.add_argument("--results-dir", default=str(RESULTS_DIR), help="where the result JSON is written")
    g.add_argument("--out", default=None, help="also copy the result JSON into this directory (e.g. $OUT)")
    g.add_argument("--scale", type=float, default=1.0,
                   help="multiply the workload's request counts and lengths (e.g. 0.01 for a CPU smoke run); "
                        "explicit size flags win")
    e = p.add_argument_group("engine (defaults are sized to the workload: minimal buckets, pages that fit it)")
    e.add_argument("--max-model-len", type=int, default=None)
    e.add_argument("--max-num-seqs", type=int, default=None)
    e.add_argument("--max-num-batched-tokens", type=int, default=None)
    e.add_argument("--block-size", type=int, default=16)
    e.add_argument("--num-kv-pages", type=int, default=None,
                   help="KV pages; default: exactly what the workload needs at full concurrency; 0: let the "
                        "engine size the cache from free device memory (its activation estimate then includes the "
                        "peak of the ceilings, measured first: about 4 GiB fewer pages)")
    e.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    e.add_argument("--mesh", type=int, default=1,
                   help="tensor-parallel size (python -m server --mesh N): the model over N devices; ceilings are "
                        "then N x one device's, and result files get a -meshN suffix")
    e.add_argument("--decode-buckets", type=_int_list, default=None, help="comma-separated decode batch sizes")
    e.add_argument("--prefill-buckets", type=_int_list, default=None,
                   help="comma-separated prefill Q lengths (prefill_token_buckets)")
    e.add_argument("--kv-cache-dtype", default="auto",
                   help="auto (the model dtype), fp8_e5m2, fp8 / fp8_e4m3: result files get a -kv<dtype> suffix")
    e.add_argument("--attention-backend", choices=("auto", "reference"), default="auto",
                   help="reference: the jnp paged attention even on GPU (the kernels' end-to-end effect); result "
                        "files get an -attnref suffix")
    e.add_argument("--prefill-kernel", choices=("auto", "triton", "routed"), default="auto",
                   help="triton: every prefill shape through the Triton kernel, also where the Hopper kernel would "
                        "run (sm90, 16-bit pages): the path before it; routed: a packed step's long rows through the "
                        "Hopper kernel too (QWENJAX_PREFILL_KERNEL); result files get a -triton / -routed suffix")
    e.add_argument("--num-scheduler-steps", type=int, default=1,
                   help="decode steps one dispatch runs (multi-step decode); result files get a -steps<K> suffix")
    e.add_argument("--skip-warmup", action="store_true",
                   help="skip the engine's start-up compilation (buckets then compile in the untimed warm-up "
                        "generate, or, if it does not reach them, inside the timed region: for smoke runs only)")
    m = p.add_argument_group("measurement")
    m.add_argument("--compilation-cache-dir", default=os.environ.get("QWENJAX_COMPILATION_CACHE"),
                   help="JAX persistent compilation cache (default: $QWENJAX_COMPILATION_CACHE)")
    m.add_argument("--ceilings", choices=("auto", "full", "small", "none"), default="auto",
                   help="ceiling sizes: full (2 GiB copy, 8192^3 and the model's GEMMs), small (CPU), auto: "
                        "full on GPU/TPU, small on CPU")
    m.add_argument("--profile", action="store_true",
                   help="after the timed run, repeat it under jax.profiler and report device_busy")
    m.add_argument("--profile-dir", default=None, help="trace directory (default: a fresh temp directory)")
    m.add_argument("--tag", default=None,
                   help="a variant's name (e.g. of an XLA_FLAGS setting): kept in the result's config and appended "
                        "to its file name")
    return p


def _int_list(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def scaled(value: int, scale: float, lo: int = 1) -> int:
    return max(lo, int(round(value * scale)))


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m
