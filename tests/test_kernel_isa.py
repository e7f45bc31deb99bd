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


def test_quant_kernels_lower_with_the_loop_structure_their_design_needs(tmp_path):
    """Issue 30's finding, kept true: Triton pipelines a loop's loads only when they feed a tt.dot (a Pallas
    fori_loop carries no tt.num_stages). The old GEMV loops without a dot; the skinny kernel's fma mode loops with
    the next block's packed words in its carry (prefetched by hand: 7 blocks of 8 word rows x 512 columns a program
    at M = 1, of 4 word rows at M = 4); its dot modes loop over dots."""
    with pytest.raises(ValueError, match="unknown kernel 'skinny'; known: prefill, decode, skinny-fma-m1"):
        kernel_isa.lower("skinny", str(tmp_path))
    if _needs_a_gpu_to_lower():
        with pytest.raises(RuntimeError, match=r"lowers Pallas Triton kernels for CUDA only with a GPU visible"):
            kernel_isa.lower("skinny-fma-m1", str(tmp_path))
        return
    text = {w: Path(kernel_isa.lower(w, str(tmp_path))["ttir"]).read_text()
            for w in ("gemv-m1", "skinny-fma-m1", "skinny-fma-m4", "skinny-dot-m16")}
    assert "scf.for" in text["gemv-m1"] and "tt.dot" not in text["gemv-m1"]
    for w, words in (("skinny-fma-m1", "tensor<8x1x512xi32>"), ("skinny-fma-m4", "tensor<4x1x512xi32>")):
        loops = [line for line in text[w].splitlines() if "scf.for" in line]
        assert len(loops) == 1 and f"-> ({words}, " in loops[0] and "tt.dot" not in text[w], (w, loops)
    dot = text["skinny-dot-m16"]
    assert "scf.for" in dot and dot.count("tt.dot") == 8  # one per 4-bit field of a block


SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;                               /* 0x00000a00ff017b82 */
        /*0010*/                   LDG.E.128 R8, desc[UR4][R2.64] ;                     /* 0x0000000402087981 */
        /*0020*/               @P1 BRA 0x90 ;                                           /* 0x0000003000bc1947 */
        /*0030*/                   LDG.E.128 R12, desc[UR4][R4.64] ;                    /* 0x0000000404047981 */
        /*0040*/                   LOP3.LUT R6, R12, 0xf, RZ, 0xc0, !PT ;               /* 0x0000000f0c067812 */
        /*0050*/                   FADD R7, R6, -8388608 ;                              /* 0x4b00000006077421 */
        /*0060*/                   FFMA R20, R7, R9, R20 ;                              /* 0x0000000907147223 */
        /*0070*/                   LDG.E.U16 R9, desc[UR4][R10.64] ;                    /* 0x000000040a097981 */
        /*0080*/              @!P0 BRA 0x30 ;                                           /* 0xffffffd0002c1947 */
        /*0090*/                   BRA 0x90;                                            /* 0xfffffffc00fc7947 */
"""


def test_sass_loop_mix_reads_the_main_loop():
    """The main loop is the longest backward branch's body (0x30..0x80 above: the forward branch and the final
    self-branch are not loops); 128-bit loads counted apart from the other loads."""
    mix = kernel_isa.sass_loop_mix(SASS)
    assert mix["loop_instructions"] == 6 and mix["loop_ldg128"] == 1 and mix["loop_instructions_per_ldg128"] == 6
    assert mix["loop_mix"] == {"LDG.128": 1, "LOP3": 1, "FADD": 1, "FFMA": 1, "LDG": 1, "BRA": 1}
    # only forward branches and a self-branch: no loop
    assert kernel_isa.sass_loop_mix(SASS.replace("BRA 0x30", "BRA 0xa0")) == {}


def test_fp8_skinny_dots_allow_the_fp8_wgmma(tmp_path):
    """The skinny FP8 kernel's float8 dots carry maxNumImpreciseAcc (compat.enable_pallas_fp8_wgmma, which
    kernel_isa calls as layers/fp8_matmul.py does): without it Triton refuses Hopper's FP8 wgmma and upcasts to
    float16 mma.sync (NOTES 51). Below 64 rows the weight tile is the dot's left operand (wgmma's M side)."""
    if _needs_a_gpu_to_lower():
        with pytest.raises(RuntimeError, match=r"lowers Pallas Triton kernels for CUDA only with a GPU visible"):
            kernel_isa.lower("fp8-skinny-m1", str(tmp_path))
        return
    from qwenjax.compat import FP8_MAX_IMPRECISE_ACC

    one = kernel_isa.lower("fp8-skinny-m1", str(tmp_path))
    assert one["dots"] == ["tensor<128x128xf8E4M3FN> * tensor<128x16xf8E4M3FN>"], one["dots"]
    many = kernel_isa.lower("fp8-skinny-m256", str(tmp_path))
    assert many["dots"] == ["tensor<128x128xf8E4M3FN> * tensor<128x128xf8E4M3FN>"], many["dots"]
    for r in (one, many):
        dots = [line for line in Path(r["ttir"]).read_text().splitlines() if "tt.dot" in line]
        assert len(dots) == 1 and f"maxNumImpreciseAcc = {FP8_MAX_IMPRECISE_ACC}" in dots[0], dots
