"""Packed prefill attention on one GPU (issue 29): the engine's packed path on sm90 (long rows through the Hopper
kernel on an aligned copy of q, the others through the Triton kernel: qwenjax/layers/packed_routing.py) against the
Triton ragged kernel alone (the path before), the Hopper kernel alone on an already aligned layout (no copies: what the
routing's gathers cost), and cuDNN's causal attention on the same rows held contiguously.

Cases (Qwen2-7B's attention shape: 28 q / 4 kv heads, dim 128, bf16 q and pages, page 16; fresh rows, causal):
8 x 2,048 packed; one row of 4k, 8k and 32k; a mix of long and short rows (some take the Triton kernel); 32 x 256
(no row is long: the routed path's overhead when the Hopper kernel has nothing to do). TFLOP/s counts the causal work,
4 * N * H * n(n+1)/2 a row. `--sweep` times the routed path over the Hopper kernel's configs (block_kv, num_stages, with
and without the ping-pong schedule barrier; block_q is 64: one wgmma M tile a warpgroup).

    python3 benchmarks/attention_packed.py [--sweep] [--out DIR]
    python3 benchmarks/attention_packed.py --reference --cases tiny   # CPU: jnp stand-ins, checks the plumbing only
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from attention_decode import HEAD_DIM, HEADS, KV_HEADS, MODEL, PAGE, commit, device_name, log, time_us, write  # noqa: E402
from pallas_kernels.paged_prefill import ragged_paged_prefill_attention, ragged_paged_prefill_reference  # noqa: E402
from pallas_kernels.paged_prefill_hopper import (HopperPrefillConfig, hopper_ragged_prefill_attention,  # noqa: E402
                                                 hopper_ragged_prefill_reference)
from qwenjax.layers.packed_routing import (HOPPER_TILE, aligned_slots, route_rows,  # noqa: E402
                                           routed_ragged_attention, slot_maps)
from qwenjax.scheduler_config import PACKED_ROW_ALIGN, packed_len  # noqa: E402

CASES = {
    "8x2048": (2048,) * 8,
    "4096": (4096,),
    "8192": (8192,),
    "32768": (32768,),
    "mixed": (1500, 300, 2048, 700, 100, 1024, 513, 40, 3000, 129),
    "32x256": (256,) * 32,
}
TINY = {"tiny-mixed": (600, 40, 530, 1), "tiny-short": (64, 30)}  # --reference on CPU
# (block_kv, num_stages, schedule_barrier); the first is the kernel's default
CONFIGS = ((128, 3, True), (128, 2, True), (64, 2, True), (64, 3, True), (128, 3, False), (128, 2, False))


def make_case(key, lens, *, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, page=PAGE, dtype=jnp.bfloat16):
    """Packed q [T, N, H] (rows at PACKED_ROW_ALIGN starts, T = their packed slots rounded to the tile), pages of
    random K/V in a random order, block tables, lengths, row starts."""
    R = len(lens)
    per = [-(-n // page) for n in lens]
    perm = np.random.default_rng(0).permutation(sum(per)).astype(np.int32)
    tables = np.zeros((R, max(per)), np.int32)
    starts, o, used = [], 0, 0
    for r, n in enumerate(lens):
        tables[r, :per[r]] = perm[used:used + per[r]]
        used += per[r]
        starts.append(o)
        o += packed_len(n)
    T = -(-o // HOPPER_TILE) * HOPPER_TILE
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (T, heads, head_dim), dtype)
    k_pages = jax.random.normal(kk, (kv_heads, sum(per), page, head_dim), dtype)
    v_pages = jax.random.normal(kv, (kv_heads, sum(per), page, head_dim), dtype)
    lens_ = jnp.asarray(lens, jnp.int32)
    return q, k_pages, v_pages, jnp.asarray(tables), lens_, lens_, jnp.asarray(starts, jnp.int32)


def dense_rows(case):
    """The same rows contiguous for cuDNN: q [R, L, N, H], k / v [R, L, K, H] (L the longest row), row lengths."""
    q, k_pages, v_pages, tables, seq_lens, _, starts = case
    lens = np.asarray(seq_lens)
    L = int(lens.max())
    idx = np.minimum(np.asarray(starts)[:, None] + np.arange(L)[None, :], q.shape[0] - 1)
    qd = q[jnp.asarray(idx)]

    def rows(pages):  # [K, P, S, H] -> [R, L, K, H]
        x = pages[:, tables]  # [K, R, M, S, H]
        K, R, M, S, H = x.shape
        return x.reshape(K, R, M * S, H)[:, :, :L].transpose(1, 2, 0, 3)

    return qd, rows(k_pages), rows(v_pages), seq_lens


def flops(lens, heads=HEADS, head_dim=HEAD_DIM) -> float:
    return sum(4.0 * heads * head_dim * n * (n + 1) / 2 for n in lens)


def kernels(reference: bool, config: HopperPrefillConfig, sm_scale: float):
    """(hopper, triton) in the routing's signature: the engine's kernels, or their jnp stand-ins (CPU)."""
    if reference:
        return (lambda q, k, v, s, t, sl, ql, rs: hopper_ragged_prefill_reference(q, k, v, t, sl, ql, rs,
                                                                                  sm_scale=sm_scale, config=config),
                lambda q, k, v, s, t, sl, ql, rs: ragged_paged_prefill_reference(q, k, v, t, sl, ql, rs,
                                                                                 sm_scale=sm_scale, piece=128))
    return (lambda q, k, v, s, t, sl, ql, rs: hopper_ragged_prefill_attention(
                q, k, v, t, sl, ql, rs, sm_scale=sm_scale, row_align=HOPPER_TILE, config=config),
            lambda q, k, v, s, t, sl, ql, rs: ragged_paged_prefill_attention(
                q, k, v, t, sl, ql, rs, sm_scale=sm_scale, row_align=PACKED_ROW_ALIGN))


def run_case(name, lens, *, reference=False, sweep=False, iters=10, reps=5, shape=(HEADS, KV_HEADS, HEAD_DIM)):
    heads, kv_heads, head_dim = shape
    case = make_case(jax.random.key(sum(lens)), lens, heads=heads, kv_heads=kv_heads, head_dim=head_dim)
    q, k, v, tables, seq_lens, query_lens, starts = case
    T, f = q.shape[0], flops(lens, heads, head_dim)
    aligned = aligned_slots(T)
    routed_rows = int(np.asarray(route_rows(query_lens, aligned)[0]).sum()) if aligned else 0
    sm_scale = head_dim ** -0.5
    scales = jnp.ones((2,), jnp.float32)
    row = dict(name=name, rows=len(lens), tokens=int(sum(lens)), slots=T, aligned_slots=aligned,
               hopper_rows=routed_rows, tflop=f / 1e12)

    def timed(label, fn, *args):
        us = time_us(jax.jit(fn), *args, iters=iters, reps=reps)
        row[label] = dict(us=us, tflops=f / us / 1e6)
        log(f"{name}: {label} {us:.1f} us, {f / us / 1e6:.1f} TFLOP/s")
        return us

    hopper, triton = kernels(reference, HopperPrefillConfig(), sm_scale)
    triton_out = jax.jit(triton)(q, k, v, scales, tables, seq_lens, query_lens, starts)
    timed("triton", triton, q, k, v, scales, tables, seq_lens, query_lens, starts)
    if aligned:
        def routed(*a, hopper=hopper):
            return routed_ragged_attention(*a, hopper_fn=hopper, triton_fn=triton, aligned=aligned)

        out = jax.jit(routed)(q, k, v, scales, tables, seq_lens, query_lens, starts)
        row["routed_max_abs_diff_vs_triton"] = float(jnp.max(jnp.abs(out.astype(jnp.float32)
                                                                     - triton_out.astype(jnp.float32))))
        timed("routed", routed, q, k, v, scales, tables, seq_lens, query_lens, starts)
        # The Hopper kernel alone on the rows it takes, already aligned (what the routing's copies add).
        if routed_rows:
            hop, astarts = route_rows(query_lens, aligned)
            _, from_packed = slot_maps(query_lens, starts, hop, astarts, tokens=T, aligned=aligned)
            qa = q.at[from_packed].get(mode="fill", fill_value=0)  # the aligned copy, made once outside the timing
            timed("hopper_aligned", hopper, qa, k, v, scales, tables, jnp.where(hop, seq_lens, 0),
                  jnp.where(hop, query_lens, 0), astarts)
        if sweep:
            row["sweep"] = []
            for block_kv, stages, ping_pong in CONFIGS[:2] if reference else CONFIGS:  # stand-ins: plumbing only
                cfg = HopperPrefillConfig(block_kv=block_kv, num_stages=stages, schedule_barrier=ping_pong)
                label = dict(block_kv=block_kv, num_stages=stages, schedule_barrier=ping_pong)
                h, _ = kernels(reference, cfg, sm_scale)
                try:
                    us = time_us(jax.jit(lambda *a, h=h: routed_ragged_attention(
                        *a, hopper_fn=h, triton_fn=triton, aligned=aligned)), q, k, v, scales, tables, seq_lens,
                        query_lens, starts, iters=iters, reps=reps)
                    row["sweep"].append(dict(label, us=us, tflops=f / us / 1e6))
                    log(f"  sweep {label}: {us:.1f} us")
                except Exception as e:  # noqa: BLE001 - a config that fails is recorded, not fatal
                    row["sweep"].append(dict(label, error=str(e)[:300]))
    qd, kd, vd, lens_ = dense_rows(case)
    impl = "cudnn" if jax.default_backend() == "gpu" else "xla"
    uniform = len(set(lens)) == 1

    def dense(q, k, v, n):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl, scale=sm_scale,
                                            **({} if uniform else dict(query_seq_lengths=n, key_value_seq_lengths=n)))

    try:
        peer = timed("cudnn", dense, qd, kd, vd, lens_)
        row["cudnn"]["padded_to_longest"] = not uniform
        for label in ("triton", "routed", "hopper_aligned"):
            if label in row:
                row[label]["speedup_vs_cudnn"] = peer / row[label]["us"]
    except Exception as e:  # noqa: BLE001 - a peer that fails is recorded, not fatal
        row["cudnn"] = dict(error=str(e)[:300])
        log(f"{name}: cudnn failed: {str(e)[:200]}")
    if "routed" in row:
        row["routed"]["speedup_vs_triton"] = row["triton"]["us"] / row["routed"]["us"]
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", action="store_true", help="the routed path over the Hopper kernel's configs")
    ap.add_argument("--cases", default="all", help="comma-separated case names, 'all' or 'tiny' (CPU smoke)")
    ap.add_argument("--reference", action="store_true", help="jnp stand-ins for both kernels (CPU: plumbing only)")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results"))
    a = ap.parse_args(argv)
    table = TINY if a.cases == "tiny" else CASES
    names = list(table) if a.cases in ("all", "tiny") else a.cases.split(",")
    log(f"device {device_name()}, jax {jax.__version__}, commit {commit()}")
    # --reference: one call a timing and a small attention shape (4 / 2 heads, dim 64): the stand-ins are slow on CPU
    small = dict(iters=1, reps=1, shape=(4, 2, 64)) if a.reference else {}
    rows = [run_case(n, table[n], reference=a.reference, sweep=a.sweep, **small) for n in names]
    by = {r["name"]: r for r in rows}

    def speed(case, label, key="speedup_vs_cudnn"):
        return by.get(case, {}).get(label, {}).get(key)

    metrics = {f"{label}_{key}_{c}": speed(c, label, key) for c in by for label, key in
               (("routed", "speedup_vs_cudnn"), ("triton", "speedup_vs_cudnn"), ("routed", "speedup_vs_triton"))}
    # Issue 29's figures (BENCHMARKS.md long-context names): the kernel a long fresh row now takes, against cuDNN.
    for case, key in (("8192", "attention_speedup_vs_cudnn_8k"), ("32768", "attention_speedup_vs_cudnn_32k"),
                      ("8x2048", "attention_speedup_vs_cudnn_packed_8x2048")):
        if case in by:
            metrics[key] = speed(case, "routed")
    result = dict(benchmark="attention-packed", model=MODEL, device=device_name(), mesh=1, commit=commit(),
                  jax=jax.__version__, config=dict(cases={n: list(table[n]) for n in names}, q_heads=HEADS,
                                                   kv_heads=KV_HEADS, head_dim=HEAD_DIM, page_size=PAGE,
                                                   dtype="bfloat16", causal=True, reference=a.reference,
                                                   hopper_config=dataclasses.asdict(HopperPrefillConfig())),
                  ceilings={}, metrics=metrics, peers={}, cases=rows)
    write(a.out, "attention-packed", result)
    print("== attention-packed (speedups against cuDNN on the same rows)")
    for r in rows:
        cells = [f"{lab} {r[lab]['us']:9.1f} us {r[lab]['tflops']:6.1f} TF {r[lab].get('speedup_vs_cudnn', 0):.2f}x"
                 for lab in ("routed", "triton", "hopper_aligned") if "us" in r.get(lab, {})]
        cells.append(f"cudnn {r['cudnn']['us']:9.1f} us" if "us" in r["cudnn"] else "cudnn failed")
        print(f"  {r['name']:8s} ({r['hopper_rows']}/{r['rows']} rows Hopper) " + " | ".join(cells))
    return result


if __name__ == "__main__":
    main()
