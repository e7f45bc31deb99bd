"""Shared machinery of the benchmark scripts: engine flags, ceilings, floors, profiles, peers and result files.

Every figure comes from `LLM.generate` (scheduler, block manager, sampler, detokenizer), timed on the host around the
call, with the engine's warm-up (bucket compilation) and one small untimed generate before the timed region.
Ceilings (copy bandwidth, bf16 matmul rate) are measured in the same process, so every ratio (MBU, MFU) is against
this machine as it is now. ../shared/BENCHMARKS.md defines the workloads, metric names and the result format.

Run `python benchmarks/common.py merge RESULT.json PEER.json` to fold a peer file (written by `--peer transformers`
in its own call) into a result file after the fact, e.g. on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import glob
import json
import math
import os
import platform as _platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/x.py` puts benchmarks/ on the path, not the repo root
    sys.path.insert(0, str(REPO))

RESULTS_DIR = REPO / "benchmarks" / "results"
CONFIG_DIR = REPO / "qwenjax" / "assets" / "configs"
# Regular (non-special) Qwen2 token ids: random prompts are drawn below this so the detokenizer sees real tokens.
NUM_REGULAR_TOKENS = 151643


# ----------------------------------------------------------------------------------------------- command line


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model and output")
    g.add_argument("--model", default="qwen2-7b-instruct",
                   help="a config stem from qwenjax/assets/configs, 'tiny' (the built-in default model's shape), "
                        "or a path to a config.json / a directory holding one; weights are random")
    g.add_argument("--dtype", default="bfloat16")
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


# ----------------------------------------------------------------------------------------------- JAX set-up


RUN_TAG: str | None = None  # --tag of this process's benchmark (setup_jax sets it; make_result records it)


def setup_jax(args) -> None:
    """Process settings that must precede JAX's device initialisation."""
    from qwenjax import compat

    # The engine sets the pool from gpu_memory_utilization when it starts first; the ceilings run before it, so the
    # same setting is made here (the engine then finds it in place).
    compat.set_gpu_memory_fraction(args.gpu_memory_utilization)
    from qwenjax.layers import attention

    os.environ[attention.BACKEND_ENV] = getattr(args, "attention_backend", "auto")  # engine processes inherit it
    global RUN_TAG
    RUN_TAG = getattr(args, "tag", None)
    import jax

    if args.compilation_cache_dir:
        os.makedirs(args.compilation_cache_dir, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", os.path.abspath(args.compilation_cache_dir))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# ----------------------------------------------------------------------------------------------- model


@dataclasses.dataclass
class ModelSpec:
    name: str        # short name used in result files (config stem)
    config: dict     # HF config.json contents
    dir: str         # a directory holding config.json (weights are random: load_format="dummy")


def resolve_model(name: str) -> ModelSpec:
    name, cfg = model_config_dict(name)
    d = tempfile.mkdtemp(prefix=f"qwenjax-bench-{name}-")
    (Path(d) / "config.json").write_text(json.dumps(cfg))
    return ModelSpec(name=re.sub(r"[^A-Za-z0-9._-]", "_", name), config=cfg, dir=d)


def model_config_dict(name: str) -> tuple[str, dict]:
    """--model's (result name, HF config dict): 'tiny', a config stem, or a path to a config.json / its directory."""
    if name == "tiny":
        from qwenjax.models.default_model import CONFIG

        return name, dict(CONFIG)
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        path = CONFIG_DIR / f"{name}.json"
    if not path.is_file() and quantized_suffix(name):
        suffix = quantized_suffix(name)
        base, cfg = model_config_dict(name[:-len(suffix)])
        return name, with_quantization(cfg, suffix)
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise SystemExit(f"--model {name!r}: no such config; known: tiny, {', '.join(known)}, or a path; any of "
                         f"them with {', '.join(QUANTIZED_SUFFIXES)} appended for quantized weights")
    return (path.stem if path.name != "config.json" else path.parent.name), json.loads(path.read_text())


# --model NAME-awq / NAME-gptq-int4 / NAME-gptq-int8: NAME's config plus the quantization_config that Qwen's published
# checkpoints of that kind carry (AWQ: AutoAWQ GEMM 4-bit, group 128, zero point; GPTQ: AutoGPTQ v1, group 128,
# desc_act false, sym true). The weights are random packed words (QuantLinear's init), created on the device.
QUANTIZED_SUFFIXES = {
    "-awq": {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm",
             "modules_to_not_convert": None},
    "-gptq-int4": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True,
                   "static_groups": False, "true_sequential": True, "damp_percent": 0.01},
    "-gptq-int8": {"quant_method": "gptq", "bits": 8, "group_size": 128, "desc_act": False, "sym": True,
                   "static_groups": False, "true_sequential": True, "damp_percent": 0.01},
}


def quantized_suffix(name: str) -> str | None:
    return next((s for s in QUANTIZED_SUFFIXES if name.endswith(s) and len(name) > len(s)), None)


def with_quantization(cfg: dict, suffix: str) -> dict:
    """`cfg` with the suffix's quantization_config. Group 128 where it divides every projection's inputs, else the
    largest power of two (>= 16) that does: only the tiny CPU configs need that (hidden 64), and the result records
    it."""
    qc = dict(QUANTIZED_SUFFIXES[suffix])
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    ins = math.gcd(cfg["hidden_size"], cfg["intermediate_size"], heads * head_dim)
    while qc["group_size"] > 16 and ins % qc["group_size"]:
        qc["group_size"] //= 2
    return dict(cfg, quantization_config=qc)


def model_config(spec: ModelSpec):
    from qwenjax.config import ModelConfig

    return ModelConfig.from_dict(spec.config)


def batch_limits() -> tuple[int, int | None]:
    """The engine's default (max_num_seqs, max_num_batched_tokens) for offline use on this device
    (config.batch_defaults; None: the engine's budget from max_model_len). Call after setup_jax."""
    import jax

    from qwenjax.config import batch_defaults
    from qwenjax.worker.kv_cache import device_memory, device_total_bytes

    return batch_defaults("llm", device_total_bytes(device_memory()), jax.local_devices()[0].device_kind)


def engine_kwargs(args, *, max_model_len: int, max_num_seqs: int, max_num_batched_tokens: int | None,
                  decode_buckets: tuple[int, ...], prefill_buckets: tuple[int, ...]) -> dict:
    """LLM(...) keyword arguments: explicit flags win over the workload-sized defaults given here."""
    from qwenjax.core.block_manager import pages_to_admit

    mml = args.max_model_len or max_model_len
    seqs = args.max_num_seqs or max_num_seqs
    pages_per_seq = -(-mml // args.block_size)
    if args.num_kv_pages is None:
        # Every sequence at full length, admissible all at once (above the admission watermark): a cache sized to
        # the page admitted 7 of prefill's 8 x 2,048 prompts in its first step (5fd4a06).
        pages = pages_to_admit(seqs * pages_per_seq + 1)
        if not kv_pages_fit(args, pages):
            print(f"KV cache: {pages} pages (every sequence at full length) do not fit beside the weights; the engine "
                  f"sizes the cache from free memory and the scheduler caps concurrency (as --num-kv-pages 0)",
                  flush=True)
            pages = None
    else:
        pages = args.num_kv_pages or None  # 0: the engine sizes the cache from free memory
    return dict(dtype=args.dtype, seed=args.seed, max_model_len=mml, max_num_seqs=seqs,
                max_num_batched_tokens=args.max_num_batched_tokens or max_num_batched_tokens,
                block_size=args.block_size, gpu_memory_utilization=args.gpu_memory_utilization,
                num_kv_pages=pages, decode_buckets=tuple(args.decode_buckets or decode_buckets),
                prefill_token_buckets=tuple(args.prefill_buckets or prefill_buckets), skip_warmup=args.skip_warmup,
                kv_cache_dtype=args.kv_cache_dtype, num_scheduler_steps=args.num_scheduler_steps,
                tensor_parallel_size=args.mesh)


KV_FIT_RESERVE = 8 << 30  # activations of the largest step and what the ceilings leave behind, kept free


def kv_pages_fit(args, pages: int) -> bool:
    """Whether `pages` KV pages fit in the device's pool beside the model's weights and KV_FIT_RESERVE. True where
    the device reports no memory (CPU) or JAX has not started yet (asking would fix its pool too early). Qwen2-57B-A14B
    on one 141 GB H200 is the case that fails: 107 GiB of bf16 weights leave no room for throughput-fixed's 512 x 768
    tokens (22.5 GB)."""
    from qwenjax import compat

    if not compat.backends_initialized():
        return True
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" not in stats:
        return True
    from qwenjax.config import ModelConfig

    cfg = ModelConfig.from_dict(model_config_dict(args.model)[1])
    itemsize = 2 if args.dtype in ("bfloat16", "float16", "bf16", "fp16", "half") else 4
    kv_itemsize = 1 if args.kv_cache_dtype.startswith("fp8") else itemsize
    need = cfg.num_params() * itemsize + pages * kv_bytes_per_token(cfg, kv_itemsize) * args.block_size
    return need / args.mesh + KV_FIT_RESERVE <= int(stats["bytes_limit"])  # weights and pages split over the mesh


def build_llm(spec: ModelSpec, kwargs: dict):
    from qwenjax import LLM

    t0 = time.perf_counter()
    llm = LLM(model=spec.dir, load_format="dummy", **kwargs)
    return llm, time.perf_counter() - t0


def engine_config(llm, kwargs: dict, startup_s: float) -> dict:
    """The engine's resolved configuration, for the result file."""
    eng = llm.llm_engine
    sc = eng.scheduler_config
    m = eng.model
    return {
        "engine_args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()},
        "max_model_len": sc.max_model_len, "max_num_seqs": sc.max_num_seqs,
        "max_num_batched_tokens": sc.max_num_batched_tokens, "block_size": sc.block_size,
        "decode_buckets": list(sc.decode_buckets), "prefill_buckets": [list(b) for b in sc.prefill_buckets],
        "packed_buckets": [list(b) for b in sc.packed_buckets], "max_prefill_chunk": sc.max_prefill_chunk, "num_kv_pages": m.num_pages,
        "load_seconds": round(m.load_seconds, 3), "warmup_seconds": round(m.warmup_seconds, 3),
        "startup_seconds": round(startup_s, 3), "quantization": _quantization_config(m.path),
        "device_memory_gib": device_memory_gib(),
    }


def device_memory_gib() -> dict | None:
    """The first device's pool, bytes in use and peak so far (GiB), or None where it reports none (CPU)."""
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" not in stats:
        return None
    return {k: round(int(stats[key]) / 2**30, 3) for k, key in
            (("limit", "bytes_limit"), ("in_use", "bytes_in_use"), ("peak", "peak_bytes_in_use")) if key in stats}


def _quantization_config(path) -> dict | None:
    """The quantization_config of the engine's model directory (a quantized --model), else None."""
    f = Path(path) / "config.json" if path is not None else None
    return json.loads(f.read_text()).get("quantization_config") if f is not None and f.is_file() else None


def random_prompts(n: int, lengths, *, seed: int, vocab_size: int) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = [lengths] * n if isinstance(lengths, int) else list(lengths)
    hi = min(vocab_size, NUM_REGULAR_TOKENS)
    return [rng.integers(0, hi, size=int(k)).tolist() for k in lengths]


def greedy(max_tokens: int):
    from qwenjax import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=int(max_tokens), ignore_eos=True)


def warm_generate(llm, prompts: list[list[int]], max_tokens: int = 4) -> None:
    """One small untimed generate through the whole host path (the engine compiled its buckets at start-up)."""
    llm.generate(prompt_token_ids=prompts[:2], sampling_params=greedy(max_tokens), use_tqdm=False)


def timed_generate(llm, prompts, params) -> tuple[list, float]:
    """A generate timed from a cold prefix cache: hits within the run count, leftovers of earlier runs (warm-up,
    repeats of the same prompt) do not."""
    llm.reset_prefix_cache()
    gc.collect()
    t0 = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    return outs, time.perf_counter() - t0


def stats_snapshot(llm) -> dict:
    return dict(vars(llm.llm_engine.stats))


def stats_delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before.get(k, 0) if k != "max_decode_batch" else after[k] for k in after}


# ----------------------------------------------------------------------------------------------- device, commit


def device_info() -> dict:
    import jax

    devs = jax.devices()
    kind = devs[0].device_kind
    n = len(devs)
    low = kind.lower()
    m = re.search(r"\b([abhl]\d{2,3}|gh\d{3}|gb\d{3}|b\d{3})\b", low)
    if devs[0].platform == "cpu":
        tag = "cpu"
    elif m:
        tag = m.group(1)
    else:
        tag = re.sub(r"[^a-z0-9]+", "", low)[:16] or devs[0].platform
    if n > 1:
        tag += f"x{n}"
    return {"device": f"{kind} x{n}", "devtag": tag, "platform": devs[0].platform, "count": n}


def git_commit() -> tuple[str, bool | None]:
    """(commit, dirty). QWENJAX_COMMIT wins (the GPU machine's copy of the tree has no git)."""
    env = os.environ.get("QWENJAX_COMMIT")
    if env:
        return env, None
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip() != ""
        return sha, dirty
    except (OSError, subprocess.SubprocessError):
        return "unknown", None


# ----------------------------------------------------------------------------------------------- ceilings


def _time_fn(fn: Callable, *args, reps: int, inner: int) -> list[float]:
    """Seconds per call: `reps` groups of `inner` back-to-back calls, each group ended by a device sync."""
    import jax

    jax.block_until_ready(fn(*args))  # compile + first run
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            y = fn(*args)
        jax.block_until_ready(y)
        out.append((time.perf_counter() - t0) / inner)
        del y
    return out


def measure_ceilings(cfg, *, mode: str, platform: str, gemm_tokens: int = 8192) -> dict:
    """Copy bandwidth (x * c on bf16, bytes read + written) and the bf16 matmul rate, measured now.

    The matmul ceiling is the best (highest) median rate over 8192^3 and the model's largest GEMMs at `gemm_tokens`
    rows (gate/up: [M, D] x [D, F]; down: [M, F] x [F, D]); BENCHMARKS.md explains why the model's own shapes are
    among them. `mode` "small" uses sizes that finish in a second on a CPU.
    """
    if mode == "none":
        return {"copy_tbps": None, "matmul_tflops": None, "detail": {"skipped": True}}
    import jax
    import jax.numpy as jnp

    if mode == "auto":
        mode = "small" if platform == "cpu" else "full"
    full = mode == "full"
    key = jax.random.key(0)
    copy_elems = (1 << 30) if full else (1 << 22)  # 2 GiB / 8 MiB of bf16
    x = jax.random.normal(key, (copy_elems,), jnp.bfloat16)
    c = jnp.asarray(1.0009765625, jnp.bfloat16)  # exact in bf16; not 1, so nothing folds away
    scale = jax.jit(lambda x, c: x * c)
    times = _time_fn(scale, x, c, reps=7 if full else 3, inner=5 if full else 2)
    t_copy = statistics.median(times)
    copy_tbps = 2 * x.nbytes / t_copy / 1e12
    del x

    D, F = cfg.hidden_size, cfg.intermediate_size
    if full:
        shapes = {"8192^3": (8192, 8192, 8192), "gate_up": (gemm_tokens, D, F), "down": (gemm_tokens, F, D)}
    else:
        shapes = {"512^3": (512, 512, 512), "gate_up": (min(gemm_tokens, 256), D, F),
                  "down": (min(gemm_tokens, 256), F, D)}
    mm = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.bfloat16))
    rates = {}
    for name, (m, k, n) in shapes.items():
        k1, k2 = jax.random.split(jax.random.fold_in(key, m * 31 + n))
        a = jax.random.normal(k1, (m, k), jnp.bfloat16)
        b = jax.random.normal(k2, (k, n), jnp.bfloat16)
        t = statistics.median(_time_fn(mm, a, b, reps=5 if full else 3, inner=10 if full else 2))
        rates[name] = {"shape": [m, k, n], "ms": round(t * 1e3, 4), "tflops": round(2 * m * k * n / t / 1e12, 2)}
        del a, b
    best = max(rates.values(), key=lambda r: r["tflops"])
    return {"copy_tbps": round(copy_tbps, 4), "matmul_tflops": best["tflops"],
            "detail": {"mode": mode, "copy_bytes": 2 * copy_elems * 2, "copy_ms": round(t_copy * 1e3, 4),
                       "matmul": rates}}


# ----------------------------------------------------------------------------------------------- floors


def kv_bytes_per_token(cfg, itemsize: int = 2) -> int:
    """K and V of one token across all layers."""
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * itemsize


def experts_read(cfg, batch: int = 1) -> float:
    """Routed experts per MoE layer that a step of `batch` tokens reads: k for one token; for more, the expected
    number of distinct experts when each token picks k of E uniformly, E x (1 - (1 - k/E)^batch). 0 for dense."""
    E, k = cfg.num_experts, cfg.num_experts_per_tok
    if not E:
        return 0
    return k if batch <= 1 else E * (1.0 - (1.0 - k / E) ** batch)


def active_params(cfg, experts: float | None = None) -> float:
    """Parameters other than the embedding table that one token's forward uses (lm_head in full; for tied
    embeddings the table IS the lm_head, counted once): all of them for a dense model; for a MoE model every layer's
    attention, norms, router and shared expert but only `experts` (default k, the token's own) of its E routed
    experts. Qwen2-57B-A14B: about 13.7B of its 57.4B (14.3B with the embedding table: the "A14B")."""
    total = cfg.num_params(include_embedding=False)
    if not cfg.num_experts:
        return total
    used = cfg.num_experts_per_tok if experts is None else experts
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    return total - (cfg.num_experts - used) * per_expert * moe_layers


def decode_weight_bytes(cfg, itemsize: int = 2, batch: int = 1, quant: dict | None = None) -> int:
    """Bytes a decode step of `batch` rows must read: every weight except the embedding table, lm_head in full (for
    tied embeddings the table IS the lm_head, counted once); of a MoE layer's routed experts only those the step's
    tokens picked (k at batch 1, `experts_read` beyond). Dense: ModelConfig.num_params(include_embedding=False).

    With `quant` (a checkpoint's quantization_config; dense models), each layer's seven projections count their
    packed bytes instead (`quantized_projection_bytes`)."""
    total = int(round(active_params(cfg, experts_read(cfg, batch) if cfg.num_experts else None) * itemsize))
    return total + (quantized_projection_bytes(cfg, quant, itemsize) if quant else 0)


def quantized_projection_bytes(cfg, quant: dict, itemsize: int = 2) -> int:
    """What packing changes in a decode step's bytes: per projection of every layer, minus its float weight, plus
    bits / 8 bytes per weight and, per group of input rows and output column, one scale (`itemsize`) and one packed
    zero (bits / 8). GPTQ's g_idx is not read by a step without act-order and is not counted; biases stay float."""
    if cfg.num_experts:
        raise NotImplementedError("packed-byte floors of quantized MoE models are not defined")
    bits, group = int(quant["bits"]), int(quant.get("group_size") or quant.get("q_group_size") or -1)
    D, F, H = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    Nq, Nkv = cfg.num_attention_heads * H, cfg.num_key_value_heads * H
    delta = 0
    for i, o in [(D, Nq), (D, Nkv), (D, Nkv), (Nq, D), (D, F), (D, F), (F, D)]:  # q k v o gate up down: (in, out)
        groups = 1 if group == -1 else -(-i // group)
        delta += i * o * bits // 8 + groups * o * itemsize + groups * o * bits // 8 - i * o * itemsize
    return cfg.num_hidden_layers * delta


def decode_floor_seconds(cfg, context_lens, copy_tbps: float, *, batch_contexts=None, itemsize: int = 2,
                         quant: dict | None = None) -> float:
    """Floor of a sequence of decode steps: step i reads the weights once plus the KV of its rows' contexts.

    context_lens: for batch 1, the context length (tokens attended) of each decode step. batch_contexts: for larger
    batches, a list per step of its rows' context lengths (the weights are still read once per step; for a MoE model
    the routed experts that step's rows pick, `experts_read`).
    """
    kv = kv_bytes_per_token(cfg, itemsize)
    steps = [[c] for c in context_lens] if batch_contexts is None else batch_contexts
    total = sum(decode_weight_bytes(cfg, itemsize, batch=len(rows), quant=quant) + kv * sum(rows) for rows in steps)
    return total / (copy_tbps * 1e12)


def linear_flops_per_token(cfg) -> int:
    """2 x (parameters other than the embedding table) one token's forward multiplies, lm_head included
    (BENCHMARKS.md's rule); for a MoE model its k routed experts, not all E (`active_params`)."""
    return int(2 * active_params(cfg))


def lm_head_params(cfg) -> int:
    return cfg.vocab_size * cfg.hidden_size


def attention_flops(cfg, prompt_len: int, output_len: int) -> int:
    """Attention FLOPs of one request: a causal prefill of the prompt (2 x N x P^2 x H per layer) and each decode
    step attending over its context (4 x N x C x H per layer), the last output token never fed back."""
    n, h, layers = cfg.num_attention_heads, cfg.head_dim, cfg.num_hidden_layers
    prefill = 2 * n * prompt_len * prompt_len * h
    ctx = sum(prompt_len + i for i in range(1, output_len))  # decode step i attends P + i tokens
    return layers * (prefill + 4 * n * h * ctx)


def request_flops(cfg, prompt_len: int, output_len: int) -> dict:
    """FLOPs of one request under BENCHMARKS.md's rule: 2 x non-embedding params per token (P + O tokens), plus
    attention. `lm_head_on_prompt` is the part of it spent by lm_head on prompt positions, which the engine does not
    compute (only sampled positions get logits): the rule is generous by that much on prefill-heavy work."""
    tokens = prompt_len + output_len
    return {"linear": linear_flops_per_token(cfg) * tokens, "attention": attention_flops(cfg, prompt_len, output_len),
            "lm_head_on_prompt": 2 * lm_head_params(cfg) * max(prompt_len - 1, 0)}


def sum_flops(parts: list[dict]) -> dict:
    out = {k: sum(p[k] for p in parts) for k in ("linear", "attention", "lm_head_on_prompt")}
    out["total"] = out["linear"] + out["attention"]
    return out


def ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


# ----------------------------------------------------------------------------------------------- profile


@contextlib.contextmanager
def quiet_trace(logdir: str, host_tracer_level: int = 0):
    """jax.profiler's trace into `logdir` with the Python tracer off (it slows the host's launches most) and the
    host's TraceMe spans at `host_tracer_level` (0: none, 1: JAX's and XLA's own)."""
    import jax

    opts = jax.profiler.ProfileOptions()
    opts.python_tracer_level = 0
    opts.host_tracer_level = host_tracer_level
    jax.profiler.start_trace(logdir, profiler_options=opts)
    try:
        yield logdir
    finally:
        jax.profiler.stop_trace()


def profile_generate(llm, prompts, params, *, profile_dir: str | None,
                     unprofiled_wall_s: float | None = None) -> dict:
    """Repeats a generate under jax.profiler.trace and reports device_busy = device-active time / wall time.

    Method: the trace spans only this generate call (started right before it, stopped right after), so no clock
    alignment between host and device timestamps is needed. Device-active time is the union of the intervals of
    every event on the GPU planes' stream lines ("/device:GPU:N", lines named "Stream #..."; kernels, memcpys and
    memsets as CUPTI records them), merged across streams so overlapping work counts once; wall time is the host's
    perf_counter around the call. Beside it: `kernel_busy` (kernels alone, no memcpy/memset), `module_busy` (the
    union of the "XLA Modules" line, one span per executable run, gaps between its kernels included) and
    `device_busy_unprofiled` (the same device-active time over the unprofiled run's wall: CUPTI slows the host's
    launches a little, so the profiled wall is longer). The Python tracer is off. On CPU the trace has no device
    plane (XLA runs on host threads): device_busy is then None and `note` says why.
    """
    import jax

    logdir = profile_dir or tempfile.mkdtemp(prefix="qwenjax-profile-")
    os.makedirs(logdir, exist_ok=True)
    # From a cold prefix cache, as timed_generate: otherwise the repeat finds every prompt cached and runs another
    # workload (each prompt a one-row context step), as the profiles of sessions 1-8 did (benchmarks/NOTES.md).
    llm.reset_prefix_cache()
    gc.collect()
    before = stats_snapshot(llm)
    with quiet_trace(logdir, host_tracer_level=1):
        t0 = time.perf_counter()
        llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
        wall = time.perf_counter() - t0
    steps = stats_delta(before, stats_snapshot(llm))  # the profiled run's steps: the timed run's, if it repeats it
    info: dict[str, Any] = {"trace_dir": logdir, "wall_s": round(wall, 4), "device_busy": None,
                            "engine_stats": {k: steps[k] for k in ("steps", "prefill_steps", "decode_steps",
                                                                   "mixed_steps", "multi_steps", "prefix_cache_hits")}}
    if jax.default_backend() == "cpu":  # a GPU machine's trace shows its idle GPU even when JAX runs on the CPU
        info["note"] = "JAX runs on the CPU (XLA on host threads): device_busy not computed"
        return info
    try:
        info.update(device_busy_from_trace(logdir, wall))
        if info.get("device_active_s") is not None and unprofiled_wall_s:
            info["device_busy_unprofiled"] = round(info["device_active_s"] / unprofiled_wall_s, 4)
    except Exception as e:  # a profile that cannot be read must not lose the benchmark's figures
        info["note"] = f"could not read the trace: {type(e).__name__}: {e}"
    return info


_DERIVED_LINES = ("XLA Modules", "XLA Ops", "XLA TraceMe", "Steps", "TensorFlow Name Scope", "TensorFlow Ops",
                  "Framework Name Scope", "Framework Ops", "Source code", "Launch Stats", "Host Threads")


def device_busy_from_trace(logdir: str, wall_s: float, top: int = 20) -> dict:
    from jax.profiler import ProfileData

    files = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    if not files:
        return {"note": "the trace wrote no .xplane.pb file"}
    pd = ProfileData.from_file(files[-1])
    planes = [p for p in pd.planes if re.match(r"/device:(GPU|TPU)", p.name)]
    if not planes:
        return {"note": "no device plane in the trace (on CPU XLA runs on host threads): device_busy not computed",
                "planes": [p.name for p in pd.planes], "top_host_events": top_host_events(pd)}
    busy_ns = kernel_ns = module_ns = 0.0
    n_events, used_lines = 0, []
    by_name: dict[str, list[float]] = {}  # kernel name -> [total ns, count]: where the device time goes
    for plane in planes:
        lines = list(plane.lines)
        streams = [ln for ln in lines if ln.name.startswith("Stream")]
        if not streams:
            streams = [ln for ln in lines if ln.name not in _DERIVED_LINES]
        every, kernels = [], []
        for ln in streams:
            used_lines.append(f"{plane.name}:{ln.name}")
            for ev in ln.events:
                iv = (ev.start_ns, ev.start_ns + ev.duration_ns)
                every.append(iv)
                if not ev.name.lower().startswith(("memcpy", "memset")):
                    kernels.append(iv)
                acc = by_name.setdefault(ev.name, [0.0, 0])
                acc[0] += ev.duration_ns
                acc[1] += 1
        n_events += len(every)
        busy_ns += _union_ns(every)
        kernel_ns += _union_ns(kernels)
        mods = [ln for ln in lines if ln.name == "XLA Modules"]
        module_ns += _union_ns([(ev.start_ns, ev.start_ns + ev.duration_ns) for ln in mods for ev in ln.events])
    n = len(planes)  # several devices: the mean over them
    wall_ns = wall_s * 1e9
    return {"device_busy": round(busy_ns / n / wall_ns, 4), "kernel_busy": round(kernel_ns / n / wall_ns, 4),
            "module_busy": round(module_ns / n / wall_ns, 4) if module_ns else None,
            "device_active_s": round(busy_ns / n / 1e9, 6), "events": n_events, "lines": used_lines[:32],
            "top_kernels": [{"name": name[:160], "ms": round(ns / 1e6, 3), "count": c,
                             "share": round(ns / max(busy_ns, 1.0), 4)}
                            for name, (ns, c) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]],
            "top_host_events": top_host_events(pd),
            "xplane": files[-1]}


def top_host_events(pd, n: int = 40) -> list[dict]:
    """The host's side of a trace (where the launches come from): TraceMe spans of JAX, PjRt and XLA's thunks, and
    the CUDA API calls CUPTI records, summed by plane and name; inclusive (a span contains its children)."""
    host: dict[str, list[float]] = {}
    for plane in pd.planes:
        if re.match(r"/device:", plane.name):
            continue
        for ln in plane.lines:
            for ev in ln.events:
                acc = host.setdefault(f"{plane.name}|{ev.name[:100]}", [0.0, 0])
                acc[0] += ev.duration_ns
                acc[1] += 1
    return [{"name": name, "ms": round(ns / 1e6, 3), "count": c}
            for name, (ns, c) in sorted(host.items(), key=lambda kv: -kv[1][0])[:n]]


def _union_ns(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, -math.inf
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


# ----------------------------------------------------------------------------------------------- results


def today() -> str:
    return datetime.date.today().isoformat()


def result_name(benchmark: str, model: str, devtag: str, date: str | None = None) -> str:
    name = f"{benchmark}-{model}-{devtag}-{date or today()}.json"
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def make_result(*, benchmark: str, model: str, dev: dict, config: dict, ceilings: dict, metrics: dict,
                peers: dict | None = None) -> dict:
    commit, dirty = git_commit()
    import jax

    from qwenjax.layers.attention import BACKEND_ENV

    config = dict(config)
    config.setdefault("dtype", "bfloat16")
    config.setdefault("kv_cache_dtype", "auto")
    config.setdefault("attention_backend", os.environ.get(BACKEND_ENV, "auto"))
    if RUN_TAG:
        config.setdefault("tag", RUN_TAG)
    config["env"] = {"jax": jax.__version__, "python": _platform.python_version(), "platform": dev["platform"],
                     "host_cpus": os.cpu_count(), "dirty_tree": dirty, "date": today(),
                     "xla_flags": os.environ.get("XLA_FLAGS", ""),
                     "time_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    mesh = config.get("engine_args", {}).get("tensor_parallel_size", 1)
    return {"benchmark": benchmark, "model": model, "device": dev["device"], "mesh": mesh,
            "commit": commit, "config": config, "ceilings": ceilings,
            "metrics": {k: _round(v) for k, v in metrics.items()}, "peers": peers or {}}


def _round(v):
    if isinstance(v, float):
        return round(v, 6) if abs(v) < 10 else round(v, 3)
    return v


def write_result(result: dict, *, devtag: str, results_dir: str, out: str | None, name: str | None = None) -> Path:
    cfg = result.get("config", {})
    kv, attn = cfg.get("kv_cache_dtype", "auto"), cfg.get("attention_backend", "auto")
    suffix = ("" if kv == "auto" else f"-kv{kv}") + ("" if attn == "auto" else "-attnref") + \
        (f"-{cfg['tag']}" if cfg.get("tag") else "")
    steps = cfg.get("engine_args", {}).get("num_scheduler_steps", 1)
    suffix += f"-steps{steps}" if steps > 1 else ""
    suffix += f"-mesh{result['mesh']}" if result.get("mesh", 1) > 1 else ""
    name = name or result_name(result["benchmark"] + suffix, result["model"], devtag)
    os.makedirs(results_dir, exist_ok=True)
    path = Path(results_dir) / name
    path.write_text(json.dumps(result, indent=2) + "\n")
    if out:
        os.makedirs(out, exist_ok=True)
        if Path(out).resolve() != Path(results_dir).resolve():
            shutil.copy(path, Path(out) / name)
    return path


def print_result_table(title: str, rows: list, result: dict, merged: bool, path) -> None:
    """The workload's rows, then device_busy and the peer ratio when present, then the result file."""
    m = result["metrics"]
    if "device_busy" in m:
        rows.append(("device_busy", m["device_busy"]))
    if merged:
        rows.append(("speedup_vs_transformers", m.get("speedup_vs_transformers")))
    rows.append(("result", str(path)))
    print_table(title, rows)


def paired_rows(metrics: dict, keys, runs: tuple[str, ...]) -> list[tuple[str, str]]:
    """Table rows "key a / b [/ c]" for metrics recorded per run as key_a, key_b, ... (None prints as -)."""
    fmt = lambda v: "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    return [(f"{k} {' / '.join(runs)}", " / ".join(fmt(metrics.get(f"{k}_{r}")) for r in runs)) for k in keys]


def print_table(title: str, rows: list[tuple[str, Any]]) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"\n== {title}")
    for k, v in rows:
        if isinstance(v, float):
            v = f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.1f}"
        print(f"  {k.ljust(width)}  {v}")
    sys.stdout.flush()


# ----------------------------------------------------------------------------------------------- peers


PEER_SUBDIR = "peers"


def peer_name(benchmark: str, model: str, devtag: str, peer: str, date: str | None = None) -> str:
    return result_name(benchmark, model, devtag, date).replace(".json", f".{peer}.json")


def workload_key(config: dict) -> dict:
    """The part of a config that must match for a peer figure to be merged into a result."""
    return {k: config.get(k) for k in ("num_requests", "batch", "prompt_len", "output_len", "prompt_len_range",
                                        "output_len_range", "seed")}


def merge_peer(result: dict, peer: dict) -> dict:
    """Folds a peer file into a result: peers[<peer key>] and metrics['speedup_vs_<peer>'] (larger is better)."""
    pkey, speed_key = peer["config"]["peer_key"], peer["config"]["speedup_key"]
    entry = dict(peer["metrics"])
    entry.update({"ceilings": peer["ceilings"], "device": peer["device"], "commit": peer["commit"],
                  "setup": peer["config"].get("peer_setup", {})})
    result.setdefault("peers", {})[pkey] = entry
    figure = peer["config"]["compare_metric"]  # e.g. output_tok_s; both sides report it
    ours, theirs = result["metrics"].get(figure), peer["metrics"].get(figure)
    if ours and theirs:
        result["metrics"][speed_key] = round(ours / theirs, 4)
    return result


def find_and_merge(result: dict, *, devtag: str, results_dirs: list[str]) -> str | None:
    """Merges the newest matching peer file from results_dirs/peers into `result`; returns its path or None."""
    cands = []
    for d in results_dirs:
        cands += glob.glob(os.path.join(d, PEER_SUBDIR, f"{result['benchmark']}-{result['model']}-{devtag}-*.json"))
    for path in sorted(set(cands), key=os.path.getmtime, reverse=True):
        try:
            peer = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if workload_key(peer["config"]) == workload_key(result["config"]):
            merge_peer(result, peer)
            return path
    return None


def write_peer(peer: dict, *, devtag: str, results_dir: str, out: str | None) -> Path:
    name = peer_name(peer["benchmark"], peer["model"], devtag, peer["config"]["peer"])
    pdir = Path(results_dir) / PEER_SUBDIR
    pdir.mkdir(parents=True, exist_ok=True)
    path = pdir / name
    path.write_text(json.dumps(peer, indent=2) + "\n")
    if out:
        os.makedirs(out, exist_ok=True)
        shutil.copy(path, Path(out) / name)
    # A main result of the same workload written earlier on this machine gets the peer folded in now.
    main = sorted(glob.glob(os.path.join(results_dir, f"{peer['benchmark']}-{peer['model']}-{devtag}-*.json")),
                  key=os.path.getmtime, reverse=True)
    for mpath in main:
        res = json.loads(Path(mpath).read_text())
        if workload_key(res["config"]) == workload_key(peer["config"]):
            merge_peer(res, peer)
            write_result(res, devtag=devtag, results_dir=results_dir, out=out, name=Path(mpath).name)
            print(f"merged the peer into {mpath}")
            break
    return path


def torch_model(spec: ModelSpec):
    """A random-init transformers Qwen2 of the same config, bf16, on CUDA when there is one. EOS is disabled."""
    import torch
    import transformers

    hf_cfg = transformers.AutoConfig.from_pretrained(spec.dir)
    hf_cfg.eos_token_id = None
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(dev):
        try:
            model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16)
        except TypeError:  # transformers 4.x spelling
            model = transformers.AutoModelForCausalLM.from_config(hf_cfg, torch_dtype=torch.bfloat16)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    if dev == "cuda":
        torch.cuda.synchronize()
    return model, dev, time.perf_counter() - t0


def free_torch(model) -> None:
    import torch

    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peer_setup_info(model, dev: str, init_s: float) -> dict:
    import torch
    import transformers

    return {"transformers": transformers.__version__, "torch": torch.__version__, "device": dev,
            "torch_device_name": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu",
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "init_seconds": round(init_s, 2)}


def peer_process_setup() -> None:
    """The peer process runs torch first and JAX (for its ceilings) after it: JAX must not take the GPU's memory
    up front, or torch has none."""
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"


# ----------------------------------------------------------------------------------------------- CLI: merge


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="benchmark result utilities")
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge", help="fold a peer JSON into a result JSON (in place)")
    m.add_argument("result")
    m.add_argument("peer")
    a = p.parse_args(argv)
    res = json.loads(Path(a.result).read_text())
    peer = json.loads(Path(a.peer).read_text())
    if workload_key(res["config"]) != workload_key(peer["config"]):
        raise SystemExit(f"workloads differ: {workload_key(res['config'])} vs {workload_key(peer['config'])}")
    merge_peer(res, peer)
    Path(a.result).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res["metrics"], indent=2))


if __name__ == "__main__":
    main()
