"""Paged decode attention on one GPU: our Pallas kernel against jax's Pallas paged_attention and the copy ceiling.

Workloads (BENCHMARKS.md): `attention-decode` (batch 64, context 4096, 28 q / 4 kv heads, dim 128, bf16 KV, page 16;
plus mixed contexts 512..8192) and `attention-decode-fp8` (the same at context 8192, fp8_e5m2 KV against bf16 KV).

    JAX_PLATFORMS=cuda python3 benchmarks/attention_decode.py [--check] [--sweep] [--out DIR]

`--check` also runs the kernel against the jnp reference over a grid of GQA ratios, head dims, page sizes and dtypes,
with contexts up to 32k and NaN in every slot the kernel must not read. Results go to `--out`, else $OUT, else
benchmarks/results/.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pallas_kernels.paged_attention import (  # noqa: E402
    default_num_stages,
    default_settings,
    paged_attention,
    paged_attention_reference,
)

MODEL = "qwen2-7b-instruct"  # its attention shape: 28 q heads, 4 kv heads, head dim 128
HEADS, KV_HEADS, HEAD_DIM, PAGE = 28, 4, 128, 16
T0 = time.perf_counter()


def log(*a):
    print(f"[{time.perf_counter() - T0:6.1f}s]", *a, flush=True)


def device_name():
    devs = jax.devices()
    return f"{devs[0].device_kind} x{len(devs)}"


def device_tag():
    kind = jax.devices()[0].device_kind.lower()
    tag = next((t for t in ("h100", "h200", "b200", "a100", "l4") if t in kind), kind.split()[0])
    return tag if len(jax.devices()) == 1 else f"{tag}x{len(jax.devices())}"


def commit():
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        sha = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=root, stderr=subprocess.DEVNULL,
                                      text=True).strip()
        if len(sha) == 40 and all(c in "0123456789abcdef" for c in sha):
            return sha
    except (OSError, subprocess.CalledProcessError):
        pass
    return os.environ.get("QWENJAX_COMMIT", "unknown")


def time_us(fn, *args, iters=50, reps=7):
    """Median over `reps` of the mean time of `iters` back-to-back calls, blocking only after each loop."""
    jax.block_until_ready(fn(*args))  # compile and warm
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t) / iters * 1e6)
    return statistics.median(times)


def copy_tbps():
    x = jnp.ones((1 << 30,), jnp.bfloat16)  # 2 GiB
    f = jax.jit(lambda x: x * jnp.bfloat16(1.5))
    us = time_us(f, x, iters=20, reps=5)
    del x
    return 2 * 2 * (1 << 30) / (us * 1e-6) / 1e12


# ---------------------------------------------------------------------------------------------------------------------
# Inputs


def make_inputs(key, lengths, *, kv_dtype=jnp.bfloat16, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                page=PAGE, max_pages=None):
    """Random q and pages on device; each sequence owns distinct pages in a random order."""
    lengths = np.asarray(lengths, np.int32)
    need = -(-lengths // page)
    max_pages = max_pages or int(need.max())
    total = int(need.sum()) + 1
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (len(lengths), heads, head_dim), jnp.bfloat16)
    shape = (kv_heads, total, page, head_dim)
    k = jax.random.normal(kk, shape, jnp.bfloat16).astype(kv_dtype)
    v = jax.random.normal(kv, shape, jnp.bfloat16).astype(kv_dtype)
    perm = np.random.default_rng(0).permutation(total).astype(np.int32)
    tables = np.zeros((len(lengths), max_pages), np.int32)
    at = 0
    for s, n in enumerate(need):
        tables[s, :n] = perm[at:at + n]
        at += n
    return q, k, v, jnp.asarray(tables), jnp.asarray(lengths)


def kv_bytes(lengths, kv_dtype, kv_heads=KV_HEADS, head_dim=HEAD_DIM):
    return 2 * int(np.sum(lengths)) * kv_heads * head_dim * jnp.dtype(kv_dtype).itemsize


# ---------------------------------------------------------------------------------------------------------------------
# Correctness grid


def make_check_case(rng, lengths, *, group, head_dim, page, q_dtype, kv_dtype, kv_heads=2, scale=1.0):
    """Host-built case with NaN in unused pages, in slots past each length, and behind table entries past it."""
    need = [-(-n // page) for n in lengths]
    max_pages = max(need) + 1
    total = sum(need) + 2
    perm = rng.permutation(total).astype(np.int32)
    poison = int(perm[-1])
    k = rng.standard_normal((kv_heads, total, page, head_dim), np.float32) * scale
    v = rng.standard_normal((kv_heads, total, page, head_dim), np.float32) * scale
    used = np.zeros(total, bool)
    tables = np.full((len(lengths), max_pages), poison, np.int32)
    at = 0
    for s, (n, m) in enumerate(zip(lengths, need)):
        pages = perm[at:at + m]
        at += m
        tables[s, :m] = pages
        used[pages] = True
        if n % page:
            k[:, pages[-1], n % page:] = np.nan
            v[:, pages[-1], n % page:] = np.nan
    k[:, ~used] = np.nan
    v[:, ~used] = np.nan
    q = rng.standard_normal((len(lengths), kv_heads * group, head_dim), np.float32)
    return (jnp.asarray(q, q_dtype), jnp.asarray(k, kv_dtype), jnp.asarray(v, kv_dtype), jnp.asarray(tables),
            jnp.asarray(np.asarray(lengths, np.int32)))


def check_grid(short=(1, 15, 16, 17, 129, 1000, 4097), longest=(32768, 8191, 20000), deadline_s=240.0):
    """Kernel vs reference; returns rows of the pass/fail table (cases past `deadline_s` are skipped)."""
    bf16, f16, e5m2, e4m3 = jnp.bfloat16, jnp.float16, jnp.float8_e5m2, jnp.float8_e4m3fn
    longest = itertools.cycle(longest)
    groups = itertools.cycle((1, 2, 4, 7, 8))
    q_dtypes = itertools.cycle((bf16, f16))
    cases = [(next(groups), head_dim, page, next(q_dtypes), kv_dtype)
             for page, kv_dtype, head_dim in itertools.product((16, 32, 64, 128), (bf16, e5m2, e4m3), (64, 128))]
    cases += [(g, 128, 16, bf16, bf16) for g in (1, 2, 4, 7, 8)]
    rows = []
    for i, (group, head_dim, page, q_dtype, kv_dtype) in enumerate(cases):
        if time.perf_counter() - T0 > deadline_s:
            log(f"check: deadline reached, {len(cases) - i} cases skipped")
            break
        rng = np.random.default_rng(1000 + i)
        lengths = [*short, next(longest)]
        k_scale, v_scale = (0.25, 4.0) if kv_dtype == e4m3 else (1.0, 1.0)
        q, k, v, tables, lens = make_check_case(rng, lengths, group=group, head_dim=head_dim, page=page,
                                                q_dtype=q_dtype, kv_dtype=kv_dtype,
                                                scale=4.0 if kv_dtype == e4m3 else 1.0)
        ref = paged_attention_reference(q, k.astype(jnp.float32) * k_scale, v.astype(jnp.float32) * v_scale,
                                        tables, lens)
        ref = np.asarray(ref, np.float32)
        for splits in (1, None):
            name = (f"gqa{group} d{head_dim} p{page} q={jnp.dtype(q_dtype).name} kv={jnp.dtype(kv_dtype).name} "
                    f"splits={'auto' if splits is None else splits}")
            try:
                out = paged_attention(q, k, v, tables, lens, k_scale=k_scale, v_scale=v_scale, num_splits=splits)
                out = np.asarray(out, np.float32)
                err = float(np.max(np.abs(out - ref))) if np.isfinite(out).all() else float("nan")
                tol = 1.5e-2 * (v_scale if kv_dtype == e4m3 else 1.0) + 1e-2 * float(np.max(np.abs(ref)))
                ok = err <= tol
                rows.append(dict(case=name, max_err=err, tol=tol, ok=bool(ok)))
            except Exception as e:  # noqa: BLE001 - report every failing config, keep going
                rows.append(dict(case=name, max_err=None, tol=None, ok=False, error=f"{type(e).__name__}: {e}"[:400]))
            if not rows[-1]["ok"]:
                log(f"FAIL {name}: {rows[-1]}")
        log(f"check case {i + 1}/{len(cases)} done")
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# Timing


def ours(**cfg):
    return functools.partial(paged_attention, **cfg)


def peer_fn():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from jax.experimental.pallas.ops.gpu import paged_attention as peer
    return peer.paged_attention


def time_peer(args, max_pages):
    """Best of jax's paged_attention over its pages_per_compute_block and k_splits."""
    fn = peer_fn()
    best = None
    for ppcb, splits in itertools.product((4, 8, 16), (1, 4, 8, 16)):
        if max_pages % splits or (max_pages // splits) % min(ppcb, max_pages // splits):
            continue
        try:
            us = time_us(jax.jit(functools.partial(fn, pages_per_compute_block=ppcb, k_splits=splits)), *args)
        except Exception as e:  # noqa: BLE001
            log(f"peer ppcb={ppcb} k_splits={splits} failed: {type(e).__name__}: {str(e)[:200]}")
            continue
        log(f"peer ppcb={ppcb:2d} k_splits={splits:2d}: {us:8.1f} us")
        if best is None or us < best["us"]:
            best = dict(us=us, pages_per_compute_block=ppcb, k_splits=splits)
    return best


def sweep(args, budget_s, blocks=(4, 8, 16), splits=(1, 2, 4, 8), launch=True):
    """Our kernel over block / split (then launch) settings; returns rows sorted by time."""
    rows = []

    def run(**cfg):
        if time.perf_counter() - T0 > budget_s:
            return
        try:
            us = time_us(ours(**cfg), *args)
        except Exception as e:  # noqa: BLE001 - e.g. out of shared memory
            log(f"ours {cfg} failed: {type(e).__name__}: {str(e)[:200]}")
            return
        rows.append(dict(us=us, **cfg))
        log(f"ours {cfg}: {us:8.1f} us")

    for ppcb, c in itertools.product(blocks, splits):
        run(pages_per_compute_block=ppcb, num_splits=c, num_warps=4, num_stages=2)
    if rows and launch:
        b = min(rows, key=lambda r: r["us"])
        for warps, stages in itertools.product((4, 8), (1, 2, 3, 4)):
            if (warps, stages) != (4, 2):
                run(pages_per_compute_block=b["pages_per_compute_block"], num_splits=b["num_splits"],
                    num_warps=warps, num_stages=stages)
    return sorted(rows, key=lambda r: r["us"])


def bf16_compute_us(args):
    """Ablation for fp8 pages: the kernel with bf16 dot inputs (fp8 -> bf16) instead of the default f16."""
    from pallas_kernels import paged_attention as module

    q, k = args[0], args[1]
    ppcb, splits = default_settings(q.shape[0], KV_HEADS, args[3].shape[1], PAGE, HEAD_DIM, k.dtype)
    fn = jax.jit(lambda *a: module._paged_attention_kernel_call(
        *a, jnp.ones((2,), jnp.float32), sm_scale=HEAD_DIM ** -0.5, pages_per_block=ppcb, num_splits=splits,
        num_warps=4, num_stages=default_num_stages(k.dtype), interpret=False, compute_dtype=jnp.bfloat16))
    return time_us(fn, *args)


def decode_case(name, key, lengths, copy, *, kv_dtype=jnp.bfloat16, max_pages=None, with_peer=True,
                sweep_grid=None, budget_s=1e9, launch=False):
    args = make_inputs(key, lengths, kv_dtype=kv_dtype, max_pages=max_pages)
    mp = args[3].shape[1]
    us = time_us(ours(), *args)
    nbytes = kv_bytes(lengths, kv_dtype)
    row = dict(case=name, us=us, kv_bytes=nbytes, bw_fraction=nbytes / (us * 1e-6) / (copy * 1e12),
               defaults=dict(zip(("pages_per_compute_block", "num_splits"),
                                 default_settings(len(lengths), KV_HEADS, mp, PAGE, HEAD_DIM, kv_dtype)),
                        num_stages=default_num_stages(kv_dtype)))
    if sweep_grid:
        row["sweep"] = sweep(args, budget_s, *sweep_grid, launch=launch)[:8]
    if jnp.dtype(kv_dtype).itemsize == 1:
        row["us_bf16_compute"] = bf16_compute_us(args)
        log(f"{name}: fp8 -> bf16 dot inputs {row['us_bf16_compute']:.1f} us (default f16: {us:.1f} us)")
    if with_peer:
        ref = np.asarray(paged_attention_reference(*args), np.float32)
        row["max_err_vs_reference"] = float(np.max(np.abs(np.asarray(ours()(*args), np.float32) - ref)))
        best = time_peer(args, mp)
        if best:
            row["peer"] = best
            row["speedup_vs_jax_paged_attention"] = best["us"] / us
    log(f"{name}: ours {us:.1f} us ({row['bw_fraction']:.0%} of copy bw)"
        + (f", peer {row['peer']['us']:.1f} us, speedup {row['speedup_vs_jax_paged_attention']:.2f}x"
           if "peer" in row else ""))
    return row, args


def write(out_dir, benchmark, result):
    os.makedirs(out_dir, exist_ok=True)
    date = datetime.date.today().isoformat()
    path = os.path.join(out_dir, f"{benchmark}-{MODEL}-{device_tag()}-{date}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    log(f"wrote {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="also check the kernel against the reference over a grid")
    ap.add_argument("--sweep", action="store_true", help="time our kernel over block/split/launch settings")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--budget-s", type=float, default=200.0, help="skip sweep configs past this many seconds")
    ap.add_argument("--check-deadline-s", type=float, default=450.0, help="skip check cases past this many seconds")
    ap.add_argument("--fp8-only", action="store_true",
                    help="only the context-8192 bf16 / fp8_e5m2 pair (with --sweep: also over launch settings)")
    a = ap.parse_args()
    log(f"device {device_name()}, jax {jax.__version__}, commit {commit()}")
    base = dict(model=MODEL, device=device_name(), mesh=1, commit=commit(), jax=jax.__version__)

    copy = copy_tbps()
    log(f"copy bandwidth {copy:.2f} TB/s")
    if a.fp8_only:
        b, e = fp8_pair(a, base, copy, launch=a.sweep)
        print_table((b, e), b, e, copy, [])
        return
    key = jax.random.key(0)
    main_row, main_args = decode_case("batch64-ctx4096", key, [4096] * 64, copy)
    sweep_rows = sweep(main_args, a.budget_s) if a.sweep else []
    del main_args
    mixed_lengths = np.random.default_rng(1).integers(512, 8193, size=64)
    mixed_row, _ = decode_case("batch64-mixed-512-8192", jax.random.key(1), mixed_lengths, copy, max_pages=512,
                               sweep_grid=((4, 8), (1, 2, 4, 8, 16)) if a.sweep else None, budget_s=a.budget_s + 60)
    result = dict(
        benchmark="attention-decode", **base,
        config=dict(batch=64, context=4096, q_heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, page_size=PAGE,
                    kv_cache_dtype="bfloat16", q_dtype="bfloat16", settings=main_row["defaults"]),
        ceilings=dict(copy_tbps=copy),
        metrics=dict(us=main_row["us"], bw_fraction=main_row["bw_fraction"],
                     speedup_vs_jax_paged_attention=main_row.get("speedup_vs_jax_paged_attention")),
        peers=dict(jax_paged_attention=main_row.get("peer")),
        cases=[main_row, mixed_row], sweep=sweep_rows)
    write(a.out, "attention-decode", result)
    b, e = fp8_pair(a, base, copy)
    print_table((main_row, mixed_row, b, e), b, e, copy, sweep_rows)
    failed = 0
    if a.check:
        rows = check_grid(deadline_s=a.check_deadline_s)
        failed = sum(not r["ok"] for r in rows)
        print(f"\n{'case':62s} {'max_err':>10s} {'tol':>8s}  result")
        for r in rows:
            err = "-" if r["max_err"] is None else f"{r['max_err']:.2e}"
            tol = "-" if r["tol"] is None else f"{r['tol']:.1e}"
            print(f"{r['case']:62s} {err:>10s} {tol:>8s}  {'pass' if r['ok'] else 'FAIL'}")
        print(f"check: {len(rows) - failed}/{len(rows)} passed\n", flush=True)
        write(a.out, "attention-decode-check", dict(benchmark="attention-decode-check", **base, rows=rows))
    sys.exit(1 if failed else 0)


def fp8_pair(a, base, copy, launch=False):
    """bf16 and fp8_e5m2 KV at context 8192 (the `attention-decode-fp8` row), written as its JSON."""
    fp8 = {}
    for dtype in (jnp.bfloat16, jnp.float8_e5m2):
        name = jnp.dtype(dtype).name
        try:
            fp8[name], _ = decode_case(f"batch64-ctx8192-{name}", jax.random.key(2), [8192] * 64, copy,
                                       kv_dtype=dtype, with_peer=False, budget_s=a.budget_s + 90,
                                       sweep_grid=((4, 8, 16), (1, 2, 4)) if a.sweep else None,
                                       launch=launch)
        except Exception as e:  # noqa: BLE001 - keep the rest of the run
            log(f"ctx8192 {name} failed: {type(e).__name__}: {str(e)[:2000]}")
            fp8[name] = dict(case=f"batch64-ctx8192-{name}", us=float("nan"), bw_fraction=float("nan"))
    b, e = fp8["bfloat16"], fp8["float8_e5m2"]
    write(a.out, "attention-decode-fp8", dict(
        benchmark="attention-decode-fp8", **base,
        config=dict(batch=64, context=8192, q_heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, page_size=PAGE,
                    kv_cache_dtype="float8_e5m2", q_dtype="bfloat16", settings=e.get("defaults")),
        ceilings=dict(copy_tbps=copy),
        metrics=dict(us=e["us"], speedup_vs_bf16_kv=b["us"] / e["us"], bw_fraction=e["bw_fraction"]),
        peers=dict(bf16_kv=dict(us=b["us"], bw_fraction=b["bw_fraction"])), cases=[b, e]))
    return b, e


def print_table(rows, b, e, copy, sweep_rows):
    print(f"\n{'case':34s} {'ours us':>9s} {'bw frac':>8s} {'peer us':>9s} {'speedup':>8s}")
    for r in rows:
        peer = r.get("peer", {}).get("us")
        sp = r.get("speedup_vs_jax_paged_attention")
        print(f"{r['case']:34s} {r['us']:9.1f} {r['bw_fraction']:8.1%} {peer or float('nan'):9.1f} "
              f"{sp or float('nan'):8.2f}")
    print(f"fp8_e5m2 vs bf16 KV at ctx 8192: {b['us'] / e['us']:.2f}x; copy {copy:.2f} TB/s; {device_name()}")
    if sweep_rows:
        print("\nsweep (best first):")
        for r in sweep_rows[:12]:
            print("  ", r)
    for r in rows[1:]:
        for x in r.get("sweep", [])[:3]:
            print(f"   {r['case']}: {x}")


if __name__ == "__main__":
    main()
