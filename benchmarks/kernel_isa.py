"""Which tensor-core instructions our Pallas kernels compile to for Hopper (sm_90): the warpgroup MMA (`wgmma`, the
instruction Hopper's peak needs) or the warp-level `mma.sync` (the Ampere path), read from the PTX.

XLA compiles a Pallas kernel's Triton IR inside its own GPU compiler and writes no PTX for it. So the kernels are
lowered here for CUDA (this works on any host: JAX lowers for a platform it does not run), their Triton IR (without
debug locations) and launch settings (num_warps, num_stages) are taken from the lowering, and the IR is compiled for
sm_90 by the standalone Triton compiler (`triton.compile`, the same compiler family XLA bundles; no GPU needed).
Counts of instructions in the PTX and the MMA layout version in the TTGIR say what limits a compute-bound kernel
(issue 3: the paged prefill kernel at ~0.55x cuDNN).

    python3 benchmarks/kernel_isa.py [--triton-python PY] [--out DIR]

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
import json, re, sys, triton
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
                    tma=len(re.findall(r"cp\.async\.bulk\.tensor", ptx)), triton=triton.__version__)
    except Exception as e:  # noqa: BLE001 - recorded
        item.update(error=f"{type(e).__name__}: {str(e)[:400]}")
    rows.append(item)
print(json.dumps(rows))
"""


def lower(which: str, out_dir: str) -> dict:
    """Lowers one kernel for CUDA; returns its Triton IR file, dots and launch settings."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels.paged_attention import paged_attention
    from pallas_kernels.paged_prefill import paged_prefill_attention
    from qwenjax.compat import pallas_triton_registration

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
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        items = [lower(w, d) for w in ("prefill", "decode")]
        run = subprocess.run([a.triton_python, "-c", COMPILE, json.dumps(items)], capture_output=True, text=True,
                             timeout=600)
        if run.returncode:
            sys.exit(f"triton compile failed: {run.stderr[-2000:]}")
        rows = json.loads(run.stdout.strip().splitlines()[-1])
    for r in rows:
        r.pop("ttir")
    import attention_decode

    result = dict(benchmark="kernel-isa", target="sm_90", commit=attention_decode.commit(), rows=rows,
                  note="Triton IR lowered by jax for CUDA, compiled by the standalone Triton compiler for sm_90")
    os.makedirs(a.out, exist_ok=True)
    Path(a.out, "kernel-isa.json").write_text(json.dumps(result, indent=2) + "\n")
    print("== kernel-isa (sm_90)")
    for r in rows:
        print(f"  {r['kernel']:8s} warps={r['num_warps']} stages={r['num_stages']} dots={r['dots']}")
        print(f"           wgmma={r.get('wgmma')} mma.sync={r.get('mma_sync')} mma layout v{r.get('mma_layout_versions')}"
              f" cp.async={r.get('cp_async')} tma={r.get('tma')} {r.get('error', '')}")


if __name__ == "__main__":
    main()
