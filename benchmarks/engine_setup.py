"""A benchmark's engine: the process settings that precede JAX (setup_jax), the device's default batch limits,
LLM(...) arguments sized to the workload (KV pages that fit beside the weights), building the LLM, and its resolved
configuration for the result file."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import result_files
from floors import kv_bytes_per_token
from model_specs import ModelSpec, model_config_dict


def prepare(args):
    """A benchmark's start: (the model spec of --model, its ModelConfig, this device's info), JAX set up first."""
    import model_specs

    spec = model_spec(args)
    setup_jax(args)
    return spec, model_specs.model_config(spec), result_files.device_info()


def model_spec(args) -> ModelSpec:
    """--model's spec; with --quantization (weights quantized at load) its result name gains -<method>."""
    import model_specs

    spec = model_specs.resolve_model(args.model)
    if getattr(args, "quantization", None):
        spec = dataclasses.replace(spec, name=f"{spec.name}-{args.quantization}")
    return spec


def setup_jax(args) -> None:
    """Process settings that must precede JAX's device initialisation."""
    from qwenjax import compat

    # The engine sets the pool from gpu_memory_utilization when it starts first; the ceilings run before it, so the
    # same setting is made here (the engine then finds it in place).
    compat.set_gpu_memory_fraction(args.gpu_memory_utilization)
    from qwenjax.layers import attention

    os.environ[attention.BACKEND_ENV] = getattr(args, "attention_backend", "auto")  # engine processes inherit it
    os.environ[attention.PREFILL_KERNEL_ENV] = getattr(args, "prefill_kernel", "auto")
    result_files.RUN_TAG = getattr(args, "tag", None)
    import jax

    if args.compilation_cache_dir:
        os.makedirs(args.compilation_cache_dir, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", os.path.abspath(args.compilation_cache_dir))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


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
                tensor_parallel_size=args.mesh, speculative_config=getattr(args, "speculative_config", None),
                quantization=getattr(args, "quantization", None))


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
        "packed_buckets": [list(b) for b in sc.packed_buckets], "max_prefill_chunk": sc.max_prefill_chunk,
        "num_kv_pages": m.num_pages,
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
    """The quantization_config of the engine's model directory (a quantized --model), else None (also with
    --quantization fp8, which engine_args records)."""
    f = Path(path) / "config.json" if path is not None else None
    return json.loads(f.read_text()).get("quantization_config") if f is not None and f.is_file() else None
