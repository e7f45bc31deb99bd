"""XLA compiler options of the model's step programs (jax.jit `compiler_options`): none by default; the large steps
of an FP8-weight model on a GPU compile without XLA's Triton GEMM; QWENJAX_STEP_XLA_OPTIONS overrides both."""

from __future__ import annotations

import json
import os

from qwenjax.compat import platform

# QWENJAX_STEP_XLA_OPTIONS: a JSON object of XLA debug options (e.g. {"xla_gpu_enable_triton_gemm": false}) given
# to the model's step programs (the step, multi-step decode, verify) as jax.jit compiler_options. For measurements.
STEP_XLA_OPTIONS_ENV = "QWENJAX_STEP_XLA_OPTIONS"
# Steps of an FP8-weight model (float8 parameters) with at least this many tokens compile without XLA's Triton GEMM
# on a GPU. XLA autotunes Triton tilings of every FP8 dot against cuBLASLt's FP8 GEMM, and at these row counts
# cuBLASLt won at every 7B shape (qkv from 16 rows, o from 256); the autotuning alone made an H100 spend 90 s on the
# 4,096-token bucket and 290 s on the 16,384 one (7-minute start) at f0fe535, 72 s for the whole start without it
# (NOTES 51). Fewer rows keep it: there XLA has no cuBLASLt FP8 GEMM for every shape and, without Triton, fell to a
# dot emitter 5x slower at one row (21.3 ms a token).
FP8_LARGE_STEP_TOKENS = 256
FP8_LARGE_STEP_OPTIONS = {"xla_gpu_enable_triton_gemm": False}


def step_compiler_options(fp8_large: bool = False) -> dict | None:
    """jax.jit compiler_options of a step program: STEP_XLA_OPTIONS_ENV when set, else FP8_LARGE_STEP_OPTIONS for
    the large steps of an FP8-weight model on a GPU (`fp8_large`), else none."""
    raw = os.environ.get(STEP_XLA_OPTIONS_ENV)
    if raw:
        opts = json.loads(raw)
        if not isinstance(opts, dict):
            raise ValueError(f"{STEP_XLA_OPTIONS_ENV} must be a JSON object of XLA options, got {raw!r}")
        return opts
    return dict(FP8_LARGE_STEP_OPTIONS) if fp8_large and platform() == "gpu" else None
