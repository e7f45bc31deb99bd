"""Paged prefill attention on one GPU: our Pallas kernel (a chunk over its pages, causal) against cuDNN's and jax's
Mosaic GPU flash attention on the same tokens held contiguously.

Workload (BENCHMARKS.md `attention-prefill`): one prompt of 2048, 4096 and 8192 tokens prefilled over pages (no
cached prefix, causal), Qwen2-7B's attention shape (28 q / 4 kv heads, dim 128), bf16, page 16; plus, for the record,
a 512-token chunk after 7680 cached tokens (the engine's mixed-step shape). Peers on the contiguous tokens:
`jax.nn.dot_product_attention(implementation="cudnn", is_causal=True)` (bf16) and
`jax.experimental.pallas.ops.gpu.attention_mgpu` (fp16: it rejects bf16 on jax 0.11.2), each timed in the same run.
TFLOP/s counts the causal work: 4 * H * N * (T^2 / 2) for T tokens (2 * H * N * T * C for a chunk of T over C).

    python3 benchmarks/attention_prefill.py [--sweep] [--out DIR]
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
from pallas_kernels.paged_prefill import default_settings, paged_prefill_attention  # noqa: E402
from pallas_kernels.paged_prefill_hopper import HopperPrefillConfig, hopper_ragged_prefill_attention  # noqa: E402

LENGTHS = (2048, 4096, 8192)


def make_case(key, chunk: int, cached: int, *, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, page=PAGE,
              dtype=jnp.bfloat16):
    """q [1, chunk, N, H] and pages holding cached + chunk tokens (random order), plus the contiguous K/V."""
    total = cached + chunk
    pages = -(-total // page)
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (1, chunk, heads, head_dim), dtype)
    k = jax.random.normal(kk, (1, total, kv_heads, head_dim), dtype)
    v = jax.random.normal(kv, (1, total, kv_heads, head_dim), dtype)
    perm = np.random.default_rng(0).permutation(pages + 1).astype(np.int32)
    table = perm[:pages]

    def to_pages(x):  # [1, total, K, H] -> [K, P + 1, page, H] with the row's pages at `table`
        x = jnp.pad(x[0], ((0, pages * page - total), (0, 0), (0, 0))).reshape(pages, page, kv_heads, head_dim)
        out = jnp.zeros((pages + 1, page, kv_heads, head_dim), x.dtype).at[table].set(x)
        return out.transpose(2, 0, 1, 3)

    return (q, to_pages(k), to_pages(v), jnp.asarray(table[None]), jnp.asarray([total], jnp.int32),
            jnp.asarray([chunk], jnp.int32)), (k, v)


def flops(chunk: int, cached: int) -> float:
    # q . k and p . v over the visible tokens: chunk token i sees cached + i + 1.
    visible = chunk * cached + chunk * (chunk + 1) / 2
    return 4.0 * HEADS * HEAD_DIM * visible


def cudnn_fn():
    return jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"))


def mgpu_fn():
    from jax.experimental.pallas.ops.gpu import attention_mgpu

    cfg = attention_mgpu.TuningConfig(block_q=64, block_kv=64, max_concurrent_steps=2, causal=True)
    return jax.jit(lambda q, k, v: attention_mgpu.attention(q, k, v, cfg))


def time_hopper(args, f):
    """The Hopper (Mosaic GPU) kernel on the same pages, q packed [T, N, H], over its configs: the best, and each;
    its output checked against the Triton kernel's."""
    q, k, v, tables, seq_lens, query_lens = args
    packed = (q[0], k, v, tables, seq_lens, query_lens, jnp.zeros((1,), jnp.int32))
    want = np.asarray(paged_prefill_attention(*args), np.float32)[0]
    rows = []
    for block_kv, stages in ((128, 2), (64, 2), (128, 3), (64, 3)):
        cfg = HopperPrefillConfig(block_kv=block_kv, num_stages=stages)
        fn = jax.jit(lambda *a, cfg=cfg: hopper_ragged_prefill_attention(*a, config=cfg))
        try:
            err = float(np.max(np.abs(np.asarray(fn(*packed), np.float32) - want)))
            t = time_us(fn, *packed, iters=10, reps=5)
        except Exception as e:  # noqa: BLE001 - a config that fails is recorded, not fatal
            rows.append(dict(block_kv=block_kv, num_stages=stages, error=f"{type(e).__name__}: {str(e)[:300]}"))
            log(f"  hopper block_kv={block_kv} stages={stages}: failed: {str(e)[:300]}")
            continue
        rows.append(dict(block_kv=block_kv, num_stages=stages, us=t, tflops=f / t / 1e6,
                         max_abs_diff_vs_triton_kernel=err))
        log(f"  hopper block_kv={block_kv} stages={stages}: {t:.1f} us, {f / t / 1e6:.1f} TFLOP/s, "
            f"max |diff| vs the Triton kernel {err:.3g}")
    ok = [r for r in rows if "us" in r]
    best = dict(min(ok, key=lambda r: r["us"])) if ok else {}
    return dict(best, configs=rows)


class _Exp2AsMultiply:
    """Stands in for jax.numpy inside the Hopper kernel's module during an ablation: exp2 becomes a multiply (an FMA
    pipe op instead of the special-function unit), everything else is jax.numpy. Timing only: the output is wrong."""

    def __getattr__(self, name):
        return getattr(jnp, name)

    @staticmethod
    def exp2(x):
        return x * 0.5


def ablate_exp(chunk: int) -> dict:
    """Where the Hopper kernel's time goes at one causal prefill of `chunk` tokens: the kernel as is, then with its
    exponentials replaced by multiplies (the softmax's special-function work gone, its matmuls and data movement
    unchanged). The difference is the time the exponentials are not hidden behind the tensor cores."""
    from pallas_kernels import paged_prefill_hopper as hop

    args, _ = make_case(jax.random.key(chunk), chunk, 0)
    q, k, v, tables, seq_lens, query_lens = args
    packed = (q[0], k, v, tables, seq_lens, query_lens, jnp.zeros((1,), jnp.int32))
    f = flops(chunk, 0)
    row = {"chunk": chunk, "config": dataclasses.asdict(HopperPrefillConfig())}
    for name in ("kernel", "exp2_as_multiply"):
        saved = hop.jnp
        if name != "kernel":
            hop.jnp = _Exp2AsMultiply()
        try:
            # A new function object: a fresh trace (the jit caches of the kernel's jitted API key on the function).
            fn = jax.jit(lambda *a: hop.hopper_ragged_prefill_attention.__wrapped__(*a))
            us = time_us(fn, *packed, iters=10, reps=5)
        finally:
            hop.jnp = saved
        row[name] = {"us": us, "tflops": f / us / 1e6}
        log(f"ablation {chunk}: {name} {us:.1f} us, {f / us / 1e6:.1f} TFLOP/s")
    row["exp_share"] = 1.0 - row["exp2_as_multiply"]["us"] / row["kernel"]["us"]
    return row


def run_case(name, chunk, cached, *, peers=True, sweep=False, hopper=True):
    args, (k, v) = make_case(jax.random.key(chunk + cached), chunk, cached)
    f = flops(chunk, cached)
    bq, ppb = default_settings(HEADS, KV_HEADS, PAGE, HEAD_DIM)
    ours = jax.jit(lambda *a: paged_prefill_attention(*a))
    us = time_us(ours, *args, iters=10, reps=5)
    row = dict(name=name, chunk=chunk, cached=cached, us=us, tflops=f / us / 1e6,
               settings=dict(block_q=bq, pages_per_block=ppb))
    log(f"{name}: ours {us:.1f} us, {row['tflops']:.1f} TFLOP/s")
    if hopper:
        row["hopper"] = time_hopper(args, f)
    if sweep:
        row["sweep"] = []
        for bq_, ppb_, warps, stages in ((16, 4, 4, 2), (16, 4, 8, 2), (16, 8, 8, 2), (8, 4, 4, 2), (16, 2, 4, 3),
                                         (16, 4, 4, 3), (32, 4, 8, 2), (16, 8, 4, 3)):
            fn = jax.jit(lambda *a, bq_=bq_, ppb_=ppb_, w=warps, s=stages: paged_prefill_attention(
                *a, block_q=bq_, pages_per_block=ppb_, num_warps=w, num_stages=s))
            try:
                t = time_us(fn, *args, iters=10, reps=3)
                row["sweep"].append(dict(block_q=bq_, pages_per_block=ppb_, num_warps=warps, num_stages=stages, us=t))
                log(f"  sweep bq={bq_} ppb={ppb_} warps={warps} stages={stages}: {t:.1f} us")
            except Exception as e:  # noqa: BLE001 - a setting that does not compile is recorded and skipped
                row["sweep"].append(dict(block_q=bq_, pages_per_block=ppb_, num_warps=warps, num_stages=stages,
                                         error=str(e)[:200]))
    if peers and cached == 0:
        qc, kc, vc = args[0], k, v
        for peer, fn, cast in (("cudnn", cudnn_fn, jnp.bfloat16), ("attention_mgpu", mgpu_fn, jnp.float16)):
            try:
                t = time_us(fn(), qc.astype(cast), kc.astype(cast), vc.astype(cast), iters=10, reps=5)
                row[peer] = dict(us=t, tflops=f / t / 1e6, dtype=jnp.dtype(cast).name)
                row[f"speedup_vs_{peer}"] = t / us
                log(f"  {peer}: {t:.1f} us, {f / t / 1e6:.1f} TFLOP/s -> ours {t / us:.2f}x")
                if row.get("hopper", {}).get("us"):
                    row["hopper"][f"speedup_vs_{peer}"] = t / row["hopper"]["us"]
            except Exception as e:  # noqa: BLE001 - a peer that fails is recorded, not fatal
                row[peer] = dict(error=str(e)[:300])
                log(f"  {peer}: failed: {str(e)[:200]}")
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", action="store_true", help="time our kernel over a few tile / launch settings")
    ap.add_argument("--no-hopper", action="store_true", help="skip the Hopper (Mosaic GPU) kernel")
    ap.add_argument("--ablate", action="store_true",
                    help="only the Hopper kernel's exponential ablation at each length (see `ablate_exp`)")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results"))
    a = ap.parse_args()
    log(f"device {device_name()}, jax {jax.__version__}, commit {commit()}")
    if a.ablate:
        rows = [ablate_exp(t) for t in LENGTHS]
        write(a.out, "attention-prefill-ablation", dict(
            benchmark="attention-prefill-ablation", model=MODEL, device=device_name(), mesh=1, commit=commit(),
            jax=jax.__version__, config=dict(lengths=list(LENGTHS), q_heads=HEADS, kv_heads=KV_HEADS,
                                             head_dim=HEAD_DIM, page_size=PAGE, causal=True),
            metrics={f"exp_share_{r['chunk']}": r["exp_share"] for r in rows}, cases=rows))
        print("== attention-prefill-ablation (Hopper kernel, default config)")
        for r in rows:
            print(f"  {r['chunk']:5d} tokens: kernel {r['kernel']['us']:8.1f} us, exp2 as multiply "
                  f"{r['exp2_as_multiply']['us']:8.1f} us: exponentials {r['exp_share']:.0%} of the time")
        return
    rows = [run_case(f"prefill-{t}", t, 0, sweep=a.sweep and t == 4096, hopper=not a.no_hopper) for t in LENGTHS]
    rows.append(run_case("chunk-512-after-7680", 512, 7680, peers=False, hopper=not a.no_hopper))
    main_rows = rows[:len(LENGTHS)]

    def mean(key):
        vals = [r[key] for r in main_rows if isinstance(r.get(key), float)]
        return float(np.mean(vals)) if vals else None

    def hmean(key):
        vals = [r.get("hopper", {}).get(key) for r in main_rows]
        vals = [x for x in vals if isinstance(x, float)]
        return float(np.mean(vals)) if vals else None

    result = dict(benchmark="attention-prefill", model=MODEL, device=device_name(), mesh=1, commit=commit(),
                  jax=jax.__version__,
                  config=dict(lengths=list(LENGTHS), q_heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                              page_size=PAGE, q_dtype="bfloat16", kv_cache_dtype="bfloat16", causal=True),
                  ceilings={}, metrics=dict(tflops=mean("tflops"), speedup_vs_cudnn=mean("speedup_vs_cudnn"),
                                            speedup_vs_attention_mgpu=mean("speedup_vs_attention_mgpu"),
                                            hopper_tflops=hmean("tflops"),
                                            hopper_speedup_vs_cudnn=hmean("speedup_vs_cudnn"),
                                            hopper_speedup_vs_attention_mgpu=hmean("speedup_vs_attention_mgpu")),
                  peers={}, cases=rows)
    write(a.out, "attention-prefill", result)
    print("== attention-prefill")
    for r in rows:
        print(f"  {r['name']:22s} {r['us']:9.1f} us {r['tflops']:6.1f} TFLOP/s  "
              f"cudnn {r.get('speedup_vs_cudnn', float('nan')):.2f}x  "
              f"mgpu {r.get('speedup_vs_attention_mgpu', float('nan')):.2f}x")
        h = r.get("hopper", {})
        if h.get("us"):
            print(f"  {'  hopper kernel':22s} {h['us']:9.1f} us {h['tflops']:6.1f} TFLOP/s  "
                  f"cudnn {h.get('speedup_vs_cudnn', float('nan')):.2f}x  "
                  f"mgpu {h.get('speedup_vs_attention_mgpu', float('nan')):.2f}x  "
                  f"(block_kv {h['block_kv']}, {h['num_stages']} stages)")


if __name__ == "__main__":
    main()
