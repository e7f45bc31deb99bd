"""Which tensor-core instructions our Pallas kernels compile to for Hopper (sm_90): the warpgroup MMA (`wgmma`, the
instruction Hopper's peak needs) or the warp-level `mma.sync` (the Ampere path), read from the PTX.

XLA compiles a Pallas kernel's Triton IR inside its own GPU compiler and writes no PTX for it. So the kernels are
lowered here for CUDA (this works on any host: JAX lowers for a platform it does not run), their Triton IR (without
debug locations) and launch settings (num_warps, num_stages) are taken from the lowering, and the IR is compiled for
sm_90 by the standalone Triton compiler (`triton.compile`, the same compiler family XLA bundles; no GPU needed).
Counts of instructions in the PTX and the MMA layout version in the TTGIR say what limits a compute-bound kernel
(issue 3: the paged prefill kernel at ~0.55x cuDNN). For the low-bit decode kernels (issue 30: `QUANT`, the skinny
kernel's modes and the old GEMV at Qwen2-7B's fused gate/up shape) what matters is how the packed words are loaded
(ld.global.v4 = 128-bit), whether the loop's loads are pipelined (cp.async), and any shared-memory round trip or
barrier between loads and arithmetic; where Triton ships ptxas, its register and spill counts too (the PTX's
.version lowered to what that ptxas reads), and where it ships cuobjdump, the main loop's SASS instruction mix
(`sass_loop_mix`: issue slots a warp spends per 128-bit load, against what the bytes allow).

    python3 benchmarks/kernel_isa.py [--triton-python PY] [--out DIR] [--kernels prefill,decode,skinny-fma-m1,...]

--triton-python: an interpreter that can `import triton` (default: this one), for hosts whose JAX environment has
no Triton (e.g. the CPU machines: `pip install triton` into a separate virtual environment).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
N, K, H, S = 28, 4, 128, 16  # Qwen2-7B's attention shape, page 16

COMPILE = r"""
import json, os, re, subprocess, sys, tempfile, triton
from pathlib import Path
from triton.backends.compiler import GPUTarget
rows = []
for item in json.loads(sys.argv[1]):
    try:
        k = triton.compile(item["ttir"], target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": item["num_warps"], "num_stages": item["num_stages"]})
        ptx, ttgir = k.asm["ptx"], k.asm["ttgir"]
        item.update(wgmma=len(re.findall(r"wgmma\.mma_async", ptx)), mma_sync=len(re.findall(r"\bmma\.sync", ptx)),
                    mma_layout_versions=sorted(set(re.findall(r"versionMajor = (\d)", ttgir))),
                    cp_async=len(re.findall(r"\bcp\.async\.(?:ca|cg)", ptx)),
                    tma=len(re.findall(r"cp\.async\.bulk\.tensor", ptx)), triton=triton.__version__,
                    ld_global_v4=len(re.findall(r"ld\.global(?:\.\w+)*\.v4", ptx)),
                    ld_global_b16=len(re.findall(r"ld\.global(?:\.\w+)*\.b16", ptx)),
                    shared_ld_st=len(re.findall(r"(?:ld|st)\.shared", ptx)),
                    bar_sync=len(re.findall(r"bar\.sync", ptx)))
        ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
        if os.path.exists(ptxas):  # registers and spills (its PTX ISA may be older than the one Triton writes)
            with tempfile.TemporaryDirectory() as d:
                Path(d, "k.ptx").write_text(re.sub(r"^\.version [\d.]+", ".version 8.0", ptx, flags=re.M))
                out = subprocess.run([ptxas, "-arch=sm_90a", "-v", "k.ptx", "-o", "k.cubin"], cwd=d,
                                     capture_output=True, text=True).stderr
            regs, spills = re.search(r"Used (\d+) registers", out), re.search(r"(\d+) bytes spill stores", out)
            item.update(registers=int(regs.group(1)) if regs else None,
                        spill_store_bytes=int(spills.group(1)) if spills else None)
        cuobjdump = os.path.join(os.path.dirname(ptxas), "cuobjdump")
        if os.path.exists(cuobjdump) and "cubin" in k.asm:  # the SASS, for sass_loop_mix in the parent
            cubin = item["ttir"][:-len(".ttir")] + ".cubin"
            Path(cubin).write_bytes(k.asm["cubin"])
            item["sass"] = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True).stdout
    except Exception as e:  # noqa: BLE001 - recorded
        item.update(error=f"{type(e).__name__}: {str(e)[:400]}")
    rows.append(item)
print(json.dumps(rows))
"""


# name -> (kernel, mode, rows): GPTQ 4-bit g128 at Qwen2-7B's fused gate/up, 3584 -> 37888, default settings.
QUANT = {"skinny-fma-m1": ("skinny", "fma", 1), "skinny-fma-m4": ("skinny", "fma", 4),
         "skinny-dot-m16": ("skinny", "dot", 16), "skinny-dot_t-m16": ("skinny", "dot_t", 16),
         "skinny-dot-m64": ("skinny", "dot", 64), "gemv-m1": ("gemv", None, 1),
         "gemv-window-m1": ("gemv", "window", 1), "gemv-window-m4": ("gemv", "window", 4),
         "skinny-lop3-m1": ("skinny", "lop3", 1), "skinny-lop3_t-m1": ("skinny", "lop3_t", 1),
         "skinny-lop3-m16": ("skinny", "lop3", 16), "skinny-lop3_t-m64": ("skinny", "lop3_t", 64)}
# name -> (kernel, rows): the FP8 decode kernels (issue 30) at the same gate/up shape, the weight [N, K] float8
FP8 = {"fp8-gemv-m1": ("gemv", 1), "fp8-skinny-m1": ("skinny", 1), "fp8-skinny-m256": ("skinny", 256),
       "fp8-act-quant-m1": ("act_quant", 1), "fp8-skinny-rows-m1": ("skinny_rows", 1),
       "fp8-skinny-rows-m256": ("skinny_rows", 256), "fp8-skinny-rows-q-m1": ("skinny_rows_q", 1),
       "fp8-skinny-rows-q-down-m1": ("skinny_rows_q_down", 1),
       "fp8-skinny-rows-qs-down-m1": ("skinny_rows_qs_down", 1),
       "fp8-skinny-rows-q-swiglu-m1": ("skinny_rows_q_swiglu", 1),
       "fp8-swiglu-quant-m1": ("swiglu_quant", 1),
       "rms-norm-fp8-m1": ("rms_norm_fp8", 1), "rms-norm-partials-m1": ("rms_norm_partials", 1)}
KERNELS = ("prefill", "decode", *QUANT, *FP8)


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(\.[A-Z0-9_.]*)?")
_BRANCH = re.compile(r"\bBRA\s+(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))")


def sass_loop_mix(sass: str) -> dict:
    """The instruction mix of a kernel's main loop, from `cuobjdump -sass`: the body of the backward branch that
    spans the most instructions (a Pallas fori_loop is one such loop). Counts by opcode (LDG.E.128 kept apart: the
    128-bit loads), the body's total, and `loop_instructions_per_ldg128`: issue slots a warp spends per 16 bytes a
    thread loads, the figure that says whether a low-bit GEMV can issue as fast as its bytes arrive. {} when no
    backward branch is found."""
    lines = []  # (address, opcode, suffix)
    branches = []  # (address of the branch, target)
    for text in sass.splitlines():
        m = _SASS_LINE.search(text)
        if not m:
            continue
        addr = int(m.group(1), 16)
        lines.append((addr, m.group(2), m.group(3) or ""))
        b = _BRANCH.search(text)
        if m.group(2) == "BRA" and b and b.group(1):
            branches.append((addr, int(b.group(1), 16)))
    back = [(src, dst) for src, dst in branches if dst < src]
    if not back:
        return {}
    src, dst = max(back, key=lambda b: b[0] - b[1])
    mix: dict[str, int] = {}
    for addr, op, suffix in lines:
        if dst <= addr <= src:
            key = "LDG.128" if op == "LDG" and suffix.endswith(".128") else op
            mix[key] = mix.get(key, 0) + 1
    total = sum(mix.values())
    ldg128 = mix.get("LDG.128", 0)
    return {"loop_instructions": total, "loop_ldg128": ldg128,
            "loop_instructions_per_ldg128": round(total / ldg128, 2) if ldg128 else None,
            "loop_mix": dict(sorted(mix.items(), key=lambda kv: -kv[1]))}


def _quant_call(which: str):
    import functools

    import jax
    import jax.numpy as jnp

    from pallas_kernels import quant_gemv, quant_skinny

    kernel, mode, m = QUANT[which]
    k, n = 3584, 37888
    sds = jax.ShapeDtypeStruct
    args = (sds((m, k), jnp.bfloat16), sds((k // 8, n), jnp.int32), sds((k // 128, n // 8), jnp.int32),
            sds((k // 128, n), jnp.bfloat16))
    kw = dict(fmt="gptq", bits=4, group_size=128)
    if kernel == "gemv":  # mode: the unpack ("mask" where None)
        return functools.partial(quant_gemv.quant_gemv, unpack=mode or "mask", **kw), args
    return functools.partial(quant_skinny.quant_skinny, mode=mode, **kw), args


def _fp8_call(which: str):
    import functools

    import jax
    import jax.numpy as jnp

    from pallas_kernels import fp8_act_quant, fp8_gemv, fp8_skinny, fp8_skinny_rows
    from qwenjax.compat import enable_pallas_fp8_wgmma

    enable_pallas_fp8_wgmma()  # as layers/fp8_matmul.py does on import
    kernel, m = FP8[which]
    k, n = 3584, 37888
    sds = jax.ShapeDtypeStruct
    if kernel == "act_quant":  # down_proj's input row
        return fp8_act_quant.quantize_rows, (sds((m, 18944), jnp.bfloat16),)
    if kernel == "swiglu_quant":  # gate/up's output row -> down_proj's float8 input
        return fp8_act_quant.swiglu_quantize_rows, (sds((m, 2 * 18944), jnp.bfloat16),)
    if kernel == "rms_norm_fp8":  # the add + RMSNorm kernel writing qkv's / gate/up's float8 rows too
        from pallas_kernels.rms_norm import add_rms_norm

        x = sds((m, k), jnp.bfloat16)
        return functools.partial(add_rms_norm, eps=1e-6, fp8=True), (x, x, sds((k,), jnp.bfloat16))
    if kernel == "rms_norm_partials":  # the same after down_proj: its 7 K-splits' float32 partials added first
        from pallas_kernels.rms_norm import add_rms_norm

        x = sds((m, k), jnp.bfloat16)
        return (functools.partial(add_rms_norm, eps=1e-6, fp8=True),
                (sds((7, m, k), jnp.float32), x, sds((k,), jnp.bfloat16)))
    f8 = jnp.float8_e4m3fn
    if kernel.startswith("skinny_rows"):  # x's rows under a mask, scaled output; _q: x in bf16, quantized inside
        if kernel.endswith("down"):  # down_proj: K split
            k, n = 18944, 3584
        fn = functools.partial(fp8_skinny_rows.fp8_skinny_rows, out_dtype=jnp.bfloat16,
                               swiglu=kernel.endswith("swiglu"))  # swiglu: gate/up -> h, n = 2F
        if "_qs" in kernel:  # bf16 x with its rows' scales given
            return fn, (sds((m, k), jnp.bfloat16), sds((n, k), f8), sds((1, n), jnp.float32),
                        sds((m, 1), jnp.float32))
        if "_q" in kernel:
            return fn, (sds((m, k), jnp.bfloat16), sds((n, k), f8), sds((1, n), jnp.float32))
        return fn, (sds((m, k), f8), sds((n, k), f8), sds((1, n), jnp.float32), sds((m, 1), jnp.float32))
    args = (sds((m, k), f8), sds((m, 1), jnp.float32), sds((n, k), f8), sds((1, n), jnp.float32))
    fn = fp8_gemv.fp8_gemv if kernel == "gemv" else fp8_skinny.fp8_skinny
    return functools.partial(fn, out_dtype=jnp.bfloat16), args


def lower(which: str, out_dir: str) -> dict:
    """Lowers one kernel for CUDA; returns its Triton IR file, dots and launch settings."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels.paged_attention import paged_attention
    from pallas_kernels.paged_prefill import paged_prefill_attention
    from qwenjax.compat import pallas_triton_registration

    if which not in KERNELS:
        raise ValueError(f"unknown kernel {which!r}; known: {', '.join(KERNELS)}")

    reg = pallas_triton_registration()

    mods = []
    orig = reg.lowering.lower_jaxpr_to_triton_module

    def keep(*a, **k):
        r = orig(*a, **k)
        mods.append(r.module.operation.get_asm(enable_debug_info=False))
        return r

    sds = jax.ShapeDtypeStruct
    if which == "prefill":  # one 2048-token prompt over its pages
        T = 2048
        P = T // S + 1
        args = (sds((1, T, N, H), jnp.bfloat16), sds((K, P, S, H), jnp.bfloat16), sds((K, P, S, H), jnp.bfloat16),
                sds((1, P - 1), jnp.int32), sds((1,), jnp.int32), sds((1,), jnp.int32))
        fn = paged_prefill_attention
    elif which in QUANT:
        fn, args = _quant_call(which)
    elif which in FP8:
        fn, args = _fp8_call(which)
    else:  # decode, batch 64, context 4096
        B, C = 64, 4096
        P = B * C // S + 1
        args = (sds((B, N, H), jnp.bfloat16), sds((K, P, S, H), jnp.bfloat16), sds((K, P, S, H), jnp.bfloat16),
                sds((B, C // S), jnp.int32), sds((B,), jnp.int32))
        fn = paged_attention
    reg.lowering.lower_jaxpr_to_triton_module = keep
    try:
        exp = jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[
            jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
    except RuntimeError as e:
        if "No supported GPU devices found" not in str(e):
            raise
        # jax 0.11 reads the GPU's compute capability while lowering (0.10 did not): without a GPU it asks for an
        # abstract device, which this script does not set up.
        raise RuntimeError(f"jax {jax.__version__} lowers Pallas Triton kernels for CUDA only with a GPU visible "
                           f"(it reads the device's compute capability): run kernel_isa.py on the GPU host, or "
                           f"under jax 0.10 on any host") from e
    finally:
        reg.lowering.lower_jaxpr_to_triton_module = orig
    text = exp.mlir_module()
    warps = [int(x) for x in re.findall(r"num_warps = (\d+)", text)]
    stages = [int(x) for x in re.findall(r"num_stages = (\d+)", text)]
    path = os.path.join(out_dir, f"{which}.ttir")
    Path(path).write_text(mods[0])
    dots = re.findall(r"tt\.dot .*?: (tensor<[^>]*>) \* (tensor<[^>]*>)", mods[0])
    return dict(kernel=which, ttir=path, num_warps=warps[0], num_stages=stages[0], dots=[" * ".join(d) for d in dots],
                jax=jax.__version__)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--triton-python", default=sys.executable)
    ap.add_argument("--out", default=os.environ.get("OUT") or str(HERE / "results"))
    ap.add_argument("--kernels", default=",".join(KERNELS), help="comma-separated subset of " + ",".join(KERNELS))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        items = [lower(w, d) for w in a.kernels.split(",") if w]
        run = subprocess.run([a.triton_python, "-c", COMPILE, json.dumps(items)], capture_output=True, text=True,
                             timeout=600)
        if run.returncode:
            sys.exit(f"triton compile failed: {run.stderr[-2000:]}")
        rows = json.loads(run.stdout.strip().splitlines()[-1])
    for r in rows:
        r.pop("ttir")
        r.update(sass_loop_mix(r.pop("sass", "")))
    import attention_decode

    result = dict(benchmark="kernel-isa", target="sm_90", commit=attention_decode.commit(), rows=rows,
                  note="Triton IR lowered by jax for CUDA, compiled by the standalone Triton compiler for sm_90")
    os.makedirs(a.out, exist_ok=True)
    Path(a.out, "kernel-isa.json").write_text(json.dumps(result, indent=2) + "\n")
    print("== kernel-isa (sm_90)")
    for r in rows:
        print(f"  {r['kernel']:8s} warps={r['num_warps']} stages={r['num_stages']} dots={r['dots']}")
        print(f"           wgmma={r.get('wgmma')} mma.sync={r.get('mma_sync')} "
              f"mma layout v{r.get('mma_layout_versions')} cp.async={r.get('cp_async')} tma={r.get('tma')} "
              f"{r.get('error', '')}")
        print(f"           ld.global.v4={r.get('ld_global_v4')} ld.global.b16={r.get('ld_global_b16')} "
              f"shared ld/st={r.get('shared_ld_st')} bar.sync={r.get('bar_sync')} registers={r.get('registers')} "
              f"spill stores={r.get('spill_store_bytes')} B")
        if r.get("loop_instructions"):
            top = ", ".join(f"{op} {n}" for op, n in list(r["loop_mix"].items())[:8])
            print(f"           main loop: {r['loop_instructions']} instructions, {r['loop_ldg128']} LDG.128 "
                  f"({r['loop_instructions_per_ldg128']} a 128-bit load): {top}")


if __name__ == "__main__":
    main()
