"""ncu-probe: run each decode kernel of issue 30 a few times at Qwen2-7B's widest shapes, for Nsight Compute.

The sweeps (quant_matmul.py, fp8_matmul.py) time the kernels; this says why a kernel is slow: run under `ncu` with a
`qwenjax_` kernel filter, it gives the kernels' hardware counters (DRAM throughput, occupancy, warp stall reasons,
SASS with per-instruction stall samples). Kernels (--kernels): `gemv` (pallas_kernels/quant_gemv.py, GPTQ 4-bit,
its defaults), `lop3` (quant_skinny's lop3_t mode, its defaults), `fp8` (pallas_kernels/fp8_skinny.py); shapes
(--layers) gate_up2 (3,584 -> 37,888, gate and up fused) and down (18,944 -> 3,584); rows (--rows) 1 and 16.
Each (kernel, layer, rows) is compiled and run --calls times with fresh inputs; nothing is timed here.

  ncu --clock-control none --kernel-name regex:qwenjax_ --set full -o $OUT/probe \\
      python benchmarks/ncu_probe.py                                  # H100 (benchmarks/gpu_campaign.sh ncu-probe)
  JAX_PLATFORMS=cpu python benchmarks/ncu_probe.py --interpret        # CPU dry run: tiny shapes, interpret mode
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {"gate_up2": (3584, 37888), "down": (18944, 3584)}   # (K, N), Qwen2-7B
TINY = {"gate_up2": (256, 512), "down": (512, 256)}
GROUP = 128


def _kernel_fn(kernel: str, interpret: bool):
    """(make inputs, run) for one kernel: make(key, m, k, n) -> args; run(*args) -> [m, n]."""
    import jax
    import jax.numpy as jnp

    import quant_sweep
    from pallas_kernels import quant_gemv, quant_skinny

    def int4_inputs(key, m, k, n):
        (qw, qz, s), = quant_sweep.make_weights(key, k, n, "gptq", 4, 1, jnp.bfloat16)
        return jax.random.normal(key, (m, k), jnp.bfloat16), qw, qz, s

    if kernel == "gemv":
        return int4_inputs, lambda x, qw, qz, s: quant_gemv.quant_gemv(
            x, qw, qz, s, fmt="gptq", bits=4, group_size=GROUP, interpret=interpret)
    if kernel == "lop3":
        return int4_inputs, lambda x, qw, qz, s: quant_skinny.quant_skinny(
            x, qw, qz, s, fmt="gptq", bits=4, group_size=GROUP, mode="lop3_t", interpret=interpret)
    if kernel == "fp8":
        from pallas_kernels.fp8_skinny import fp8_skinny
        from qwenjax.layers import fp8_matmul  # noqa: F401  (its import turns on the float8 wgmma: compat)

        def fp8_inputs(key, m, k, n):
            kx, kw = jax.random.split(key)
            xq = jax.random.normal(kx, (m, k), jnp.float32).astype(jnp.float8_e4m3fn)
            wq = jax.random.normal(kw, (n, k), jnp.float32).astype(jnp.float8_e4m3fn)
            return xq, jnp.ones((m, 1), jnp.float32), wq, jnp.full((1, n), 0.01, jnp.float32)
        return fp8_inputs, lambda *a: fp8_skinny(*a, out_dtype=jnp.bfloat16, interpret=interpret)
    raise ValueError(f"--kernels takes gemv, lop3, fp8; got {kernel!r}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernels", default="gemv,lop3,fp8")
    p.add_argument("--layers", default="gate_up2,down")
    p.add_argument("--rows", default="1,16")
    p.add_argument("--calls", type=int, default=2)
    p.add_argument("--interpret", action="store_true", help="Pallas interpret mode, tiny shapes (CPU dry run)")
    a = p.parse_args(argv)
    import jax

    shapes = TINY if a.interpret else SHAPES
    for kernel in a.kernels.split(","):
        make, run = _kernel_fn(kernel, a.interpret)
        fn = jax.jit(run)
        for layer in a.layers.split(","):
            k, n = shapes[layer]
            for m in (int(r) for r in a.rows.split(",")):
                for c in range(a.calls):
                    out = fn(*make(jax.random.PRNGKey(c), m, k, n))
                out.block_until_ready()
                print(f"ncu-probe: {kernel} {layer} (K {k}, N {n}) rows {m}: {a.calls} calls, out {out.shape}",
                      flush=True)


if __name__ == "__main__":
    main()
