"""hopper_alignment: does XLA hand the Hopper (Mosaic GPU) prefill kernel a slice of a packed buffer in place?

The engine packs a step's small inputs into one int32 buffer (qwenjax/worker/packing.py) and slices them back out
inside the step. jax 0.11.2's 7B warm-up failed with `INVALID_ARGUMENT: Input buffer 1 is not 256-byte aligned`
(benchmarks/NOTES.md, entry 32): operand 1 of the Hopper kernel is the block tables. This script isolates that:
block tables [1, W] sliced from an int32 buffer at offset `off` (static) feed hopper_paged_prefill_attention, for
offsets aligned to 256 bytes and not, and for a row of 1024 bytes (W = 256 pages, the startup benchmark's
max_model_len 4096) and of 400 bytes. Each case: compile (is there a dynamic-slice fusion around the custom call in
the optimised HLO?), run (error or not; output against the same kernel with the tables as their own argument), and
run chained into a second jitted call without a sync between (which executable the error names then).

Each XLA_FLAGS variant runs in its own process (the flags are read when the backend starts):
  default      XLA's defaults
  cmdbuf-off   --xla_gpu_enable_command_buffer=          (no CUDA graphs)
  dsf-off      --xla_gpu_enable_dynamic_slice_fusion=false

  python benchmarks/hopper_alignment.py --out DIR           # on a Hopper GPU; a table last, logs in DIR
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VARIANTS = {"default": "", "cmdbuf-off": "--xla_gpu_enable_command_buffer=",
            "dsf-off": "--xla_gpu_enable_dynamic_slice_fusion=false"}
# (name, table width in pages, offset of the tables in the int32 buffer, in elements)
CASES = [("W256-off0", 256, 0), ("W256-off64", 256, 64), ("W256-off645", 256, 645), ("W100-off5", 100, 5)]


def child() -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, str(REPO))
    from pallas_kernels.paged_prefill_hopper import hopper_paged_prefill_attention

    K, N, H, P, page, Q, ctx = 4, 28, 128, 64, 16, 128, 32  # Qwen2-7B's heads; 160 tokens of context
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, Q, N, H)), jnp.bfloat16)
    k_pages = jnp.asarray(rng.standard_normal((K, P, page, H)), jnp.bfloat16)
    v_pages = jnp.asarray(rng.standard_normal((K, P, page, H)), jnp.bfloat16)
    seq_lens = jnp.array([Q + ctx], jnp.int32)
    query_lens = jnp.array([Q], jnp.int32)
    rows, refs = [], {}
    for name, W, off in CASES:
        tables = np.resize(np.random.default_rng(W).permutation(P), (1, W)).astype(np.int32)
        buf = np.full((off + W + 64,), -1, np.int32)
        buf[off:off + W] = tables[0]
        if W not in refs:  # the tables as their own argument (an entry parameter: aligned)
            refs[W] = hopper_paged_prefill_attention(q, k_pages, v_pages, jnp.asarray(tables), seq_lens, query_lens)
        ref = refs[W]

        def f(i_buf, q, k, v, off=off, W=W):
            t = jax.lax.slice(i_buf, (off,), (off + W,)).reshape(1, W)
            return hopper_paged_prefill_attention(q, k, v, t, seq_lens, query_lens)

        row = {"case": name, "bytes_off_mod_256": off * 4 % 256, "row_bytes": W * 4}
        try:
            compiled = jax.jit(f).lower(buf, q, k_pages, v_pages).compile()
            text = compiled.as_text()
            row["dynamic_slice_fusion"] = bool(re.search(r"dynamic[-_]slice[-_]fusion|address[-_]computation", text))
            call = [line.strip()[:300] for line in text.splitlines() if "mosaic_gpu" in line and "custom-call" in line]
            row["custom_call"] = call[0] if call else None
        except Exception as e:  # noqa: BLE001
            row["compile_error"] = str(e).splitlines()[0][:300]
            rows.append(row)
            continue
        try:
            out = compiled(buf, q, k_pages, v_pages)
            out.block_until_ready()
            row["run"] = "ok"
            row["max_abs_diff"] = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
        except Exception as e:  # noqa: BLE001
            row["run"] = str(e).splitlines()[0][:300]
        try:
            out = compiled(buf, q, k_pages, v_pages)
            total = jax.jit(lambda x: jnp.sum(x.astype(jnp.float32)))(out)
            total.block_until_ready()
            row["chained"] = "ok"
        except Exception as e:  # noqa: BLE001
            row["chained"] = str(e).splitlines()[0][:300]
        rows.append(row)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="write hopper_alignment.json and the children's logs here")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--timeout-s", type=int, default=75, help="per variant")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child()), flush=True)
        return
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    results, logs = {}, []
    for v in args.variants.split(","):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["XLA_FLAGS"] = " ".join(x for x in (os.environ.get("XLA_FLAGS", ""), VARIANTS[v]) if x)
        t = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, __file__, "--child"], check=False, env=env, capture_output=True,
                                  text=True, timeout=args.timeout_s)
            text, rc = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:
            text, rc = f"{e.stdout or ''}{e.stderr or ''}\ntimed out", "timeout"
        line = [x for x in text.splitlines() if x.startswith("RESULT ")]
        results[v] = json.loads(line[-1][7:]) if line else {"rc": rc, "tail": text[-1500:]}
        logs.append(f"===== {v} (XLA_FLAGS={env['XLA_FLAGS']!r}, rc {rc}, {time.perf_counter() - t:.0f} s)\n{text}")
    if out:
        (out / "hopper_alignment.json").write_text(json.dumps(results, indent=1))
        (out / "hopper_alignment.log").write_text("\n".join(logs))
    print("== hopper_alignment: block tables sliced from a packed int32 buffer into the Hopper prefill kernel")
    print(f"{'variant':11s} {'case':12s} {'off%256':>7s} {'dsf':>5s} {'run':40s} {'chained':40s} diff")
    for v, rows in results.items():
        if isinstance(rows, dict):
            print(f"{v:11s} child failed (rc {rows['rc']}): {rows['tail'][-300:]!r}")
            continue
        for r in rows:
            print(f"{v:11s} {r['case']:12s} {r['bytes_off_mod_256']:7d} {r.get('dynamic_slice_fusion', '-')!s:>5} "
                  f"{str(r.get('run', r.get('compile_error')))[:40]:40s} {str(r.get('chained', '-'))[-40:]:40s} "
                  f"{r.get('max_abs_diff', '-')}")


if __name__ == "__main__":
    main()
