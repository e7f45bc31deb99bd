"""worker/step_options.py: which XLA compiler options a step program gets."""

from __future__ import annotations

import pytest

from qwenjax.worker import step_options


def test_fp8_large_steps_drop_triton_gemm_on_gpu_only(monkeypatch):
    monkeypatch.delenv(step_options.STEP_XLA_OPTIONS_ENV, raising=False)
    assert step_options.step_compiler_options(fp8_large=True) is None  # CPU: nothing to change
    monkeypatch.setattr(step_options, "platform", lambda: "gpu")
    assert step_options.step_compiler_options(fp8_large=True) == {"xla_gpu_enable_triton_gemm": False}
    assert step_options.step_compiler_options(fp8_large=False) is None


def test_env_overrides_and_is_checked(monkeypatch):
    monkeypatch.setattr(step_options, "platform", lambda: "gpu")
    monkeypatch.setenv(step_options.STEP_XLA_OPTIONS_ENV, '{"xla_gpu_autotune_level": 0}')
    assert step_options.step_compiler_options(fp8_large=True) == {"xla_gpu_autotune_level": 0}
    assert step_options.step_compiler_options() == {"xla_gpu_autotune_level": 0}
    monkeypatch.setenv(step_options.STEP_XLA_OPTIONS_ENV, "[1, 2]")
    with pytest.raises(ValueError, match="JSON object of XLA options"):
        step_options.step_compiler_options()
