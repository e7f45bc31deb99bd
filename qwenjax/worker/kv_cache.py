"""Sizing and allocating the paged KV cache.

pages = (gpu_memory_utilization x device memory - weights - peak activations) / bytes per page, where JAX's pool is
already gpu_memory_utilization x device memory (the engine sets XLA_PYTHON_CLIENT_MEM_FRACTION before JAX starts).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import jax
import jax.numpy as jnp

from qwenjax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class MemoryInfo:
    """What a device reports: the pool JAX may use, what is in use, and the peak so far (bytes)."""

    limit: int
    in_use: int
    peak: int


def device_memory(device=None) -> MemoryInfo | None:
    """Memory stats of a JAX device, or None where the backend reports none (CPU)."""
    device = device or jax.local_devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or "bytes_limit" not in stats:
        return None
    return MemoryInfo(limit=int(stats["bytes_limit"]), in_use=int(stats.get("bytes_in_use", 0)),
                      peak=int(stats.get("peak_bytes_in_use", stats.get("bytes_in_use", 0))))


def device_total_bytes(mem: MemoryInfo | None) -> int | None:
    """The whole device's memory from its pool's limit: JAX's pool is XLA_PYTHON_CLIENT_MEM_FRACTION of the device
    (the engine sets it from gpu_memory_utilization; 0.75, JAX's default, where unset). None where `mem` is."""
    if mem is None:
        return None
    return int(mem.limit / float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75")))


MemorySource = Callable[[], "MemoryInfo | None"]


def kv_dtype(name: str, model_dtype) -> jnp.dtype:
    """The page dtype of a `kv_cache_dtype` (config.KV_CACHE_DTYPES). fp8 pages are one byte per value, so the same
    memory holds twice the tokens of bf16 pages; layers/fp8_kv.py says what they store."""
    return {"auto": jnp.dtype(model_dtype), "bfloat16": jnp.dtype(jnp.bfloat16), "float16": jnp.dtype(jnp.float16),
            "float32": jnp.dtype(jnp.float32), "fp8_e5m2": jnp.dtype(jnp.float8_e5m2),
            "fp8": jnp.dtype(jnp.float8_e4m3fn), "fp8_e4m3": jnp.dtype(jnp.float8_e4m3fn)}[name]


def page_bytes(cfg: ModelConfig, page_size: int, dtype) -> int:
    """Bytes of one page across all layers, K and V."""
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * page_size * cfg.head_dim * jnp.dtype(dtype).itemsize


class KVCacheTooSmallError(RuntimeError):
    pass


def plan_num_pages(*, cfg: ModelConfig, page_size: int, dtype, max_model_len: int, free_bytes: int,
                   detail: str) -> int:
    """Pages that fit in `free_bytes`; raises with the numbers and the two fixes when one max-length sequence won't."""
    per_page = page_bytes(cfg, page_size, dtype)
    pages = max(0, free_bytes // per_page)
    need = -(-max_model_len // page_size)
    if pages < need:
        gib, itemsize = 1 << 30, jnp.dtype(dtype).itemsize
        fp8 = (f" One-byte pages (--kv-cache-dtype fp8, kv_cache_dtype='fp8') need {itemsize}x less: "
               f"{need * per_page / itemsize / gib:.2f} GiB for that sequence.") if itemsize > 1 else ""
        raise KVCacheTooSmallError(
            f"The KV cache has room for {pages * page_size} tokens ({pages} pages of {page_size} tokens, "
            f"{free_bytes / gib:.2f} GiB free for it; {detail}), but one sequence of max_model_len={max_model_len} "
            f"tokens needs {need} pages ({need * per_page / gib:.2f} GiB: {per_page / page_size / 1024:g} KiB a "
            f"token in {jnp.dtype(dtype).name}). Lower --max-model-len (max_model_len=) to at most "
            f"{pages * page_size}, or raise --gpu-memory-utilization (gpu_memory_utilization=).{fp8}")
    return int(pages)


def allocate(cfg: ModelConfig, num_pages: int, page_size: int, dtype, sharding=None) -> list:
    """One (k, v) pair of [K, P, S, H] arrays per layer, zero-filled on the device."""
    shape = (cfg.num_key_value_heads, num_pages, page_size, cfg.head_dim)
    make = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
    return [(make(), make()) for _ in range(cfg.num_hidden_layers)]
