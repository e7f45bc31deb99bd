"""benchmarks/kernel_isa.py's first half runs anywhere: the Pallas kernels lowered for CUDA on this CPU give Triton
IR with the dots and launch settings the GPU compiles (the second half, compiling that IR for sm_90, needs Triton).
Under jax >= 0.11 the lowering itself needs a GPU: without one, the script must say so clearly."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import kernel_isa  # noqa: E402


def _needs_a_gpu_to_lower() -> bool:
    """jax >= 0.11 reads the GPU's compute capability while lowering a Pallas Triton kernel (0.10 does not)."""
    import jax

    return tuple(int(x) for x in jax.__version__.split(".")[:2]) >= (0, 11) and jax.default_backend() == "cpu"


def test_kernels_lower_to_triton_ir_for_cuda_on_any_host(tmp_path):
    if _needs_a_gpu_to_lower():  # measured on the GPU host under JAX_PLATFORMS=cpu, jax 0.11.2
        with pytest.raises(RuntimeError, match=r"lowers Pallas Triton kernels for CUDA only with a GPU visible"):
            kernel_isa.lower("prefill", str(tmp_path))
        return
    prefill = kernel_isa.lower("prefill", str(tmp_path))
    # block_q 16 x GQA group 7 padded to 8 = 128 query rows against 64 keys (4 pages of 16) a block.
    assert prefill["dots"] == ["tensor<128x128xbf16> * tensor<128x64xbf16>",
                               "tensor<128x64xbf16> * tensor<64x128xbf16>"], prefill["dots"]
    assert (prefill["num_warps"], prefill["num_stages"]) == (4, 2)
    text = Path(prefill["ttir"]).read_text()
    assert "tt.func" in text and text.count("tt.dot") == 2 and "loc(" not in text  # parseable: no debug locations
    decode = kernel_isa.lower("decode", str(tmp_path))
    assert decode["dots"] and all(d.startswith("tensor<16x") for d in decode["dots"]), decode["dots"]
