"""Which tensor-core instructions our Pallas kernels compile to on this GPU: Hopper's warpgroup MMA (`wgmma`) or the
older warp-level `mma.sync` (the Ampere path, which tops out well below Hopper's peak).

Each kernel is compiled and run once in a child process with XLA's dump directory set; every text file of the dump
(HLO, LLVM IR, PTX, Triton's MLIR where XLA writes it) is then searched for the instruction names. The counts say
what limits a compute-bound kernel (issue 3: the paged prefill kernel at ~0.55x cuDNN), without a profiler that
reads hardware counters.

    python3 benchmarks/kernel_isa.py [--out DIR]     # GPU only
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
PATTERNS = {"wgmma": r"wgmma\.mma_async", "mma_sync": r"\bmma\.sync", "mma_v3_layout": r"versionMajor\s*=\s*3",
            "mma_v2_layout": r"versionMajor\s*=\s*2", "cp_async_bulk_tma": r"cp\.async\.bulk\.tensor",
            "cp_async": r"\bcp\.async\.(ca|cg)"}

# One small run of each kernel at the 7B attention shape (28 q / 4 kv heads, dim 128, page 16).
CHILD = r"""
import sys
import jax, jax.numpy as jnp
sys.path.insert(0, sys.argv[2])
which = sys.argv[1]
N, K, H, S = 28, 4, 128, 16
key = jax.random.key(0)
if which == "prefill":
    from pallas_kernels.paged_prefill import paged_prefill_attention
    T = 2048; P = T // S + 1
    q = jax.random.normal(key, (1, T, N, H), jnp.bfloat16)
    kp = jax.random.normal(key, (K, P, S, H), jnp.bfloat16)
    out = jax.jit(paged_prefill_attention)(q, kp, kp, jnp.arange(P - 1, dtype=jnp.int32)[None],
                                           jnp.asarray([T], jnp.int32), jnp.asarray([T], jnp.int32))
else:
    from pallas_kernels.paged_attention import paged_attention
    B, C = 8, 1024; P = B * C // S + 1
    q = jax.random.normal(key, (B, N, H), jnp.bfloat16)
    kp = jax.random.normal(key, (K, P, S, H), jnp.bfloat16)
    tables = jnp.arange(B * C // S, dtype=jnp.int32).reshape(B, C // S)
    out = jax.jit(paged_attention)(q, kp, kp, tables, jnp.full((B,), C, jnp.int32))
jax.block_until_ready(out)
print("ran", which, out.shape)
"""


def inspect(which: str) -> dict:
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={d}".strip(),
                   TRITON_KERNEL_DUMP="1", TRITON_DUMP_DIR=d, MLIR_ENABLE_DUMP="0")
        run = subprocess.run([sys.executable, "-c", CHILD, which, str(HERE.parent)], env=env, capture_output=True,
                             text=True, timeout=300)
        files = [p for p in Path(d).rglob("*") if p.is_file()]
        counts = {k: 0 for k in PATTERNS}
        hits: dict[str, dict[str, int]] = {}
        for p in files:
            try:
                text = p.read_text(errors="ignore")
            except OSError:
                continue
            for k, pat in PATTERNS.items():
                n = len(re.findall(pat, text))
                if n:
                    counts[k] += n
                    hits.setdefault(p.name, {})[k] = n
        return dict(kernel=which, rc=run.returncode, stdout_tail=run.stdout[-300:], stderr_tail=run.stderr[-600:],
                    dump_files=len(files), suffixes=sorted({p.suffix for p in files}), counts=counts,
                    files_with_hits=dict(sorted(hits.items())[:20]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT") or str(HERE / "results"))
    a = ap.parse_args()
    rows = [inspect(w) for w in ("prefill", "decode")]
    os.makedirs(a.out, exist_ok=True)
    Path(a.out, "kernel-isa.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("== kernel-isa")
    for r in rows:
        print(f"  {r['kernel']:8s} rc={r['rc']} files={r['dump_files']} {r['suffixes']}")
        print(f"           {r['counts']}")
        for name, c in list(r["files_with_hits"].items())[:6]:
            print(f"           {name}: {c}")
        if r["rc"]:
            print("  stderr:", r["stderr_tail"])


if __name__ == "__main__":
    main()
