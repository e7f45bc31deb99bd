"""Version-specific imports and JAX process settings, kept in one place.

qwenjax supports jax 0.10.x (CPU CI, Python 3.11) and jax 0.11.x (the CUDA 13 GPU image, Python 3.12). Everything
that differs between them, or that reaches into JAX internals, lives here so the rest of the code imports one name.
"""

from __future__ import annotations

import os

import jax


def backends_initialized() -> bool:
    """True once JAX has created its device clients (after which memory settings no longer apply)."""
    try:
        from jax._src import xla_bridge

        fn = getattr(xla_bridge, "backends_are_initialized", None)
        if fn is not None:
            return bool(fn())
        return bool(getattr(xla_bridge, "_backends", {}))
    except ImportError:  # pragma: no cover - layout changed; assume the worst so the caller warns
        return True


def enable_compilation_cache(directory: str) -> str:
    """Turns on JAX's persistent compilation cache in `directory` (created), unless JAX already has one; returns
    the directory in use. Every compiled program is kept (no minimum compile time or size): a CPU start-up compiles
    dozens of sub-second programs, and those add up."""
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory


def set_gpu_memory_fraction(fraction: float) -> bool:
    """Sets JAX's GPU memory pool to `fraction` of the device before JAX initialises it.

    JAX preallocates 75% of each GPU by default; the engine sizes everything from `gpu_memory_utilization` instead.
    Returns False when JAX's backends already exist, in which case the setting cannot take effect any more.
    """
    if backends_initialized():
        current = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
        return current is not None and abs(float(current) - fraction) < 1e-6
    os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{fraction:.4f}"
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "true")
    return True


def register_dataclass(cls):
    """Registers a (frozen) dataclass as a pytree whose fields are all data (array) leaves."""
    import dataclasses

    names = [f.name for f in dataclasses.fields(cls)]
    return jax.tree_util.register_dataclass(cls, data_fields=names, meta_fields=[])


def pallas_triton_params(**kwargs):
    """Compiler params for Pallas' Triton (GPU) lowering; the class was renamed across jax versions."""
    from jax.experimental.pallas import triton as pl_triton

    cls = getattr(pl_triton, "CompilerParams", None) or getattr(pl_triton, "TritonCompilerParams")
    return cls(**kwargs)


def platform() -> str:
    """'gpu' for CUDA devices, else the default backend's platform name ('cpu', 'tpu')."""
    name = jax.default_backend()
    return "gpu" if name in ("cuda", "rocm", "gpu") else name


def distributed_initialized() -> bool:
    """True once jax.distributed.initialize() has run in this process."""
    from jax._src import distributed

    return distributed.global_state.client is not None


def pallas_triton_registration():
    """JAX's internal module that lowers a Pallas kernel to Triton IR (its `lowering.lower_jaxpr_to_triton_module`),
    for benchmarks/kernel_isa.py, which reads the Triton IR of our kernels. An internal path: it moves between
    versions, so a missing one is an error that says which JAX was found."""
    try:
        from jax._src.pallas.triton import pallas_call_registration
    except ImportError as e:
        raise RuntimeError(f"jax {jax.__version__} has no jax._src.pallas.triton.pallas_call_registration: "
                           f"kernel_isa.py needs the Pallas Triton lowering ({e})") from None
    return pallas_call_registration


FP8_MAX_IMPRECISE_ACC = 128  # K terms the tensor core sums in its own precision before a float32 add


def enable_pallas_fp8_wgmma() -> bool:
    """Lets Pallas' Triton lowering put float8 x float8 dots on Hopper's FP8 warpgroup MMA. The lowering emits
    `tt.dot` without `maxNumImpreciseAcc` (0: every partial sum in float32 inside the MMA), and Triton then refuses
    wgmma for float8 operands and upcasts them to float16 for mma.sync (half the FP8 rate, and conversions:
    benchmarks/kernel_isa.py, fp8-skinny-m256, NOTES 51). Triton's own frontend sets 2^30 for float8 dots; here
    FP8_MAX_IMPRECISE_ACC, so at most that many terms are summed before a float32 add. Only dots whose two operands
    are float8 change. Wraps the lowering module's `tt_dialect.dot` once; returns False (nothing changed, kernels
    stay correct, only slower) where this JAX's lowering is laid out differently."""
    try:
        from jax._src.pallas.triton import lowering
    except ImportError:
        return False
    tt = getattr(lowering, "tt_dialect", None)
    if tt is None or not hasattr(tt, "dot"):
        return False
    if getattr(tt, "_qwenjax_fp8_wgmma", False):
        return True

    class _Dialect:
        _qwenjax_fp8_wgmma = True

        def __getattr__(self, name):
            return getattr(tt, name)

        @staticmethod
        def dot(a, b, c, **kwargs):
            if kwargs.get("max_num_imprecise_acc") is None and all("f8E" in str(v.type) for v in (a, b)):
                kwargs["max_num_imprecise_acc"] = FP8_MAX_IMPRECISE_ACC
            return tt.dot(a, b, c, **kwargs)

    lowering.tt_dialect = _Dialect()
    return True


def shard_map(f, *, mesh, in_specs, out_specs):
    """jax.shard_map without the varying-manual-axes check (its keyword was check_rep before jax 0.7; the function
    lived in jax.experimental.shard_map before it was public). Our bodies make replicated outputs from collectives."""
    fn = getattr(jax, "shard_map", None)
    if fn is not None:
        return fn(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map as legacy

    return legacy(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)
