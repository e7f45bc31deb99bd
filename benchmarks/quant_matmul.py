"""quant-matmul: every low-bit matmul path at Qwen2-7B layer shapes, timed on one GPU, best configuration per shape.

For each row count M (default 1, 4, 16, 64, 512), layer shape (q/o 3584->3584, k/v 3584->512, qkv 3584->4608,
gate/up 3584->18944, gate_up2 3584->37888, down 18944->3584; qkv and gate_up2 are the fused projections the model
runs on one device, models/fusion.py) and format (gptq = GPTQ 4-bit, awq = AWQ 4-bit, gptq8 on request), group 128:
  bf16     jnp.dot with a bf16 weight: the float model's product (once per shape and M)
  xla      QuantLinear's XLA path: unpack, subtract zeros, scale, dot (what prefill takes)
  auto     QuantLinear.quant_matmul as the model calls it (kernel_path's choice)
  mma      the tensor-core Pallas kernel (pallas_kernels/quant_matmul.py), its default tiles, checkpoint layouts
  gemv     the GEMV kernel (pallas_kernels/quant_gemv.py), M <= 16: its default settings; then, once every path has
           run at every M, a greedy search (M = 1 first) over xload, num_splits, block_n, block_kw (--grid greedy;
           `full` adds num_warps and num_stages; `small`: xload and num_splits; `none`: the defaults only)
  xla_s4   informative: a native int4 [K, N] weight (jnp.int4) dequantized in the dot's producer by XLA
Method: per variant one jitted program runs the product on 48 distinct weight copies (far more than the 50 MB L2;
distinct so that XLA can share nothing between products, e.g. a dequantized weight) and returns one scalar (the outputs pass an optimization barrier, so
nothing is simplified away, and no output buffer costs host time); it is timed as `common._time_fn` does (median of
groups of back-to-back calls, device-synced), divided by 48: `us`, launch gaps inside the program included, as in a
model step. On a GPU each variant is also profiled: `device_us` = its kernels' time per product (gaps excluded) and
the top kernels by name (e.g. the Pallas kernel and the fusion that sums split-K partials). Each variant's output on copy 0 is
checked against a float32 dequantize-then-dot of the same arrays (rel_err = |out - ref| / |ref|, Frobenius; above
2e-2 the variant is marked wrong and never chosen). A variant that fails to compile or run is recorded with its error
and the sweep goes on; `--budget-s` stops starting new variants in time to write the result. `packed_gbps` = the
quantized weight's bytes (int32 words + zeros + bf16 scales) over the time; `bf16_gbps` the bf16 weight's.

Output: a table, then `CONFIGS` entries for pallas_kernels/quant_gemv.py, then one JSON (benchmark `quant-matmul`):
metrics `<fmt>_<layer>_m<M>_{us,packed_gbps,speedup_vs_bf16,speedup_vs_xla,best}` and, per format and M, the sum
over a layer's seven projections (q, k, v, o, gate, up, down): `<fmt>_layer_m<M>_{us,speedup_vs_bf16}`.

  python benchmarks/quant_matmul.py --budget-s 480 --out $OUT          # H100: about 8-10 minutes without a budget
  python benchmarks/quant_matmul.py --rows 1 --formats gptq --grid small  # a quick look
  JAX_PLATFORMS=cpu python benchmarks/quant_matmul.py --interpret         # CPU dry run: tiny shapes, interpret mode
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

BENCHMARK = "quant-matmul"
# Qwen2-7B: hidden 3584, 28 q heads and 4 kv heads of 128, ffn 18944. (K, N) per layer name.
SHAPES_7B = {"q_o": (3584, 3584), "kv": (3584, 512), "gate_up": (3584, 18944), "down": (18944, 3584),
             "qkv": (3584, 4608), "gate_up2": (3584, 37888)}
LAYER_SUM = {"q_o": 2, "kv": 2, "gate_up": 2, "down": 1}  # a decoder layer's seven projections
SHAPES_TINY = {"q_o": (256, 256), "kv": (256, 64), "down": (512, 256)}
FORMATS = {"gptq": ("gptq", 4), "awq": ("awq", 4), "gptq8": ("gptq", 8)}
GROUP = 128
CALLS = 48            # products per timed XLA program (copies repeat, interleaved)
MAX_REL_ERR = 2e-2
# The GEMV search's settings in the order searched (indices into (block_n, block_kw, num_splits, num_warps,
# num_stages, xload)): how x is loaded first (the suspected bottleneck), the split, the tile, the split again.
GRIDS = {"greedy": (5, 2, 0, 1, 2), "full": (5, 2, 0, 1, 2, 3, 4), "small": (5, 2), "none": ()}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="qwen2-7b-instruct", help="names the result file; shapes are Qwen2-7B's")
    p.add_argument("--rows", type=common._int_list, default=(1, 4, 16, 64, 512))
    p.add_argument("--layers", default="q_o,kv,gate_up,down",
                   help="comma-separated subset of " + ",".join(SHAPES_7B) + " (qkv: q, k and v fused; gate_up2: "
                        "gate and up fused: the model's projections, models/fusion.py; the LAYER sum counts the "
                        "separate ones)")
    p.add_argument("--formats", default="gptq,awq", help="comma-separated subset of " + ",".join(FORMATS))
    p.add_argument("--grid", choices=tuple(GRIDS), default="greedy",
                   help="the GEMV search, run after every path's defaults at every M (M = 1 first)")
    p.add_argument("--budget-s", type=float, default=520.0, help="start no new variant after this many seconds")
    p.add_argument("--device-time", choices=("auto", "on", "off"), default="auto",
                   help="also profile each variant for its kernels' device time (auto: on a GPU)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--inner", type=int, default=2)
    p.add_argument("--interpret", action="store_true", help="Pallas interpret mode, tiny shapes (CPU dry run)")
    p.add_argument("--results-dir", default=str(common.RESULTS_DIR))
    p.add_argument("--out", default=None)
    p.add_argument("--ceilings", choices=("auto", "full", "small", "none"), default="auto")
    a = p.parse_args(argv)
    shapes = SHAPES_TINY if a.interpret else SHAPES_7B
    a.shapes = {k: v for k, v in shapes.items() if k in a.layers.split(",")}
    a.formats = [f for f in a.formats.split(",") if f]
    bad = [f for f in a.formats if f not in FORMATS]
    if bad:
        p.error(f"unknown formats {bad}; known: {sorted(FORMATS)}")
    if a.interpret:
        a.rows = tuple(r for r in a.rows if r <= 16)[:2] or (1,)
    return a


# ----------------------------------------------------------------------------------------------- weights


def make_weights(key, k, n, fmt, bits, copies, scale_dtype):
    """`copies` random layers in the format's arrays: (qweight, qzeros, scales). Random bits are valid words in any
    layout, so one set serves the checkpoint layouts (mma) and the repacked one (gemv, xla)."""
    import jax
    import jax.numpy as jnp

    pf = 32 // bits
    qshape = (k, n // 8) if fmt == "awq" else (k // pf, n)
    out = []
    for c in range(copies):
        k1, k2, k3 = jax.random.split(jax.random.fold_in(key, c), 3)
        qw = jax.lax.bitcast_convert_type(jax.random.bits(k1, qshape, jnp.uint32), jnp.int32)
        qz = jax.lax.bitcast_convert_type(jax.random.bits(k2, (k // GROUP, n // pf), jnp.uint32), jnp.int32)
        s = (jax.random.uniform(k3, (k // GROUP, n), jnp.float32, 0.5, 1.5) * 0.02 / (1 << bits)).astype(scale_dtype)
        out.append((qw, qz, s))
    return out


def packed_bytes(k, n, bits):
    return k * n * bits // 8 + (k // GROUP) * n * bits // 8 + (k // GROUP) * n * 2


def n_copies(nbytes, interpret):
    """Distinct weight copies: one per product of a timed program, so that nothing can be shared between products
    (XLA would compute a copy's dequantized weight once for all its repeats); together far more than the L2."""
    return 2 if interpret else CALLS


# ----------------------------------------------------------------------------------------------- variants


def variants(fmt, bits, m, k, n, interpret):
    """(name, settings, fn(x, qw, qz, s), reference fn) of the quantized paths for one case (gemv grid excluded)."""
    import jax.numpy as jnp

    from pallas_kernels import quant_matmul as qmm
    from qwenjax.layers import quant_linear
    from qwenjax.quantization import QuantConfig

    q = QuantConfig("awq", 4, GROUP, checkpoint_format="gemm") if fmt == "awq" else \
        QuantConfig("gptq", bits, GROUP, checkpoint_format="gptq")
    gfmt = quant_linear.kernel_format(q)
    ref_xla = lambda x, qw, qz, s: jnp.dot(x.astype(jnp.float32), quant_linear.dequantize_weight(
        qw, qz, s, None, quant=q, dtype=jnp.float32), precision="highest")
    out = [("xla", {}, lambda x, qw, qz, s: jnp.dot(x, quant_linear.dequantize_weight(qw, qz, s, None, quant=q,
                                                                                       dtype=x.dtype)), ref_xla)]
    if not interpret:
        out.append(("auto", {"path": None}, lambda x, qw, qz, s: quant_linear.quant_matmul(x, qw, qz, s, None,
                                                                                           quant=q), ref_xla))
    mfmt = "awq" if fmt == "awq" else "gptq"
    if qmm.supported(m, k, n, fmt=mfmt, bits=bits, group_size=GROUP, dtype=jnp.bfloat16):
        out.append(("mma", {}, lambda x, qw, qz, s: qmm.quant_matmul(x, qw, qz, s.astype(x.dtype), fmt=mfmt,
                                                                     bits=bits, group_size=GROUP,
                                                                     interpret=interpret),
                    lambda x, qw, qz, s: qmm.quant_matmul_reference(x, qw, qz, s, fmt=mfmt, bits=bits,
                                                                    group_size=GROUP).astype(jnp.float32)))
    return out, gfmt


def gemv_fn(gfmt, bits, cfg, interpret):
    from pallas_kernels import quant_gemv

    bn, bkw, s, w, st, xl = cfg
    return lambda x, qw, qz, sc: quant_gemv.quant_gemv(x, qw, qz, sc, fmt=gfmt, bits=bits, group_size=GROUP,
                                                       block_n=bn, block_kw=bkw, num_splits=s, num_warps=w,
                                                       num_stages=st, xload=xl, interpret=interpret)


def gemv_ref(gfmt, bits):
    import jax.numpy as jnp

    from pallas_kernels import quant_gemv

    return lambda x, qw, qz, s: quant_gemv.quant_gemv_reference(x, qw, qz, s, fmt=gfmt, bits=bits,
                                                                group_size=GROUP).astype(jnp.float32)


def gemv_neighbours(cfg, param, m, k, n, bits, gfmt):
    """Values of one setting to try around `cfg` (the greedy search)."""
    from pallas_kernels import quant_gemv

    bn, bkw, s, w, st, xl = cfg
    if param == 5:
        vals = [v for v in quant_gemv.XLOADS if v != xl]
    elif param == 0:
        vals = [v for v in (64, 128, 256, 512, 1024) if v != bn]
    elif param == 1:
        vals = [v for v in (1, 2, 4, 8, 16) if v != bkw]
    elif param == 2:
        vals = sorted({max(1, s // 4), max(1, s // 2), s * 2, s * 4} - {s})
    elif param == 3:
        vals = [v for v in (2, 4, 8) if v != w]
    else:
        vals = [v for v in (1, 2, 3, 4) if v != st]
    outs = []
    for v in vals:
        c = list(cfg)
        c[param] = v
        if quant_gemv._valid(k, n, gfmt, bits, GROUP, c[0], c[1]) is None:
            outs.append(tuple(c))
    return outs


# ----------------------------------------------------------------------------------------------- measurement


class Sweep:
    def __init__(self, args):
        self.args = args
        self.t0 = time.perf_counter()
        self.runs: list[dict] = []
        self.device_time = args.device_time == "on" or (args.device_time == "auto" and not args.interpret)

    def over_budget(self) -> bool:
        return time.perf_counter() - self.t0 > self.args.budget_s

    def measure(self, rec: dict, fn, weights, x, ref) -> dict:
        """Times fn over the weight copies and checks copy 0 against `ref`; never raises."""
        import jax
        import jax.numpy as jnp

        rec = dict(rec)
        if self.over_budget():
            rec.update(status="skipped", error="budget")
            self.runs.append(rec)
            return rec
        t = time.perf_counter()
        try:
            c = len(weights)
            calls = c if self.args.interpret else max(c, CALLS)
            # Each repeat over the copies gets its own x: XLA would otherwise merge identical products (CSE).
            xs = [x * (1 + 2.0 ** -6 * r) for r in range(-(-calls // c))]

            def many(xs, ws):  # calls interleaved over the copies; one scalar out, so outputs cost no host time
                ys = jax.lax.optimization_barrier([fn(xs[i // c], *ws[i % c]) for i in range(calls)])
                return sum(y[0, 0].astype(jnp.float32) for y in ys)

            many = jax.jit(many)
            jax.block_until_ready(many(xs, weights))
            rec["compile_s"] = round(time.perf_counter() - t, 2)
            rec["calls"] = calls
            if ref is not None:
                want = np.asarray(jax.jit(ref)(x, *weights[0]), np.float64)
                got = np.asarray(jax.jit(fn)(x, *weights[0]).astype(jnp.float32), np.float64)
                rel = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
                rec["rel_err"] = rel
                if not np.isfinite(rel) or rel > MAX_REL_ERR:
                    rec.update(status="wrong")
            times = common._time_fn(many, xs, weights, reps=self.args.reps, inner=self.args.inner)
            rec["us"] = statistics.median(times) / calls * 1e6
            if self.device_time:
                rec.update(device_kernels(many, xs, weights, calls))
            rec.setdefault("status", "ok")
        except Exception as e:  # a variant that does not compile or run is a finding, not the end of the sweep
            rec.update(status="failed", error=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
            rec["trace_tail"] = traceback.format_exc().splitlines()[-3:]
        self.runs.append(rec)
        us = f"{rec['us']:9.2f} us" if "us" in rec else " " * 12
        dev = f" (device {rec['device_us']:8.2f})" if rec.get("device_us") else ""
        print(f"  {rec['fmt']:6s} {rec['layer']:8s} m={rec['m']:<4d} {rec['variant']:6s} "
              f"{str(rec.get('cfg', '')):28s}{us}{dev}  {rec['status']}"
              f"{'  ' + rec.get('error', '') if rec['status'] != 'ok' else ''}", flush=True)
        return rec


def device_kernels(many, xs, weights, calls: int, runs: int = 1) -> dict:
    """Device time per call from a profile of `runs` calls of `many`: the kernels on the GPU's stream lines, summed
    per name (launch gaps excluded). {} where the trace has no GPU plane."""
    import glob
    import os
    import tempfile

    import jax
    from jax.profiler import ProfileData

    d = tempfile.mkdtemp(prefix="qwenjax-qmm-")
    with common.quiet_trace(d):
        for _ in range(runs):
            jax.block_until_ready(many(xs, weights))
    files = sorted(glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    per: dict[str, float] = {}
    for plane in ProfileData.from_file(files[-1]).planes if files else []:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if line.name.startswith("Stream"):
                for ev in line.events:
                    per[ev.name] = per.get(ev.name, 0.0) + ev.duration_ns / 1e3 / runs / calls
    if not per:
        return {}
    top = sorted(per.items(), key=lambda kv: -kv[1])[:3]
    return {"device_us": sum(per.values()), "kernels": {n[:80]: round(v, 3) for n, v in top}}


def run_case(sw: Sweep, fmt_name, layer, m, k, n, key, phase: str):
    """One (format, layer, M). phase "base": every path at its default settings; "search": the GEMV's greedy search
    from the best settings measured so far (coordinate descent over GRIDS[--grid] in order)."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels import quant_gemv

    a = sw.args
    fmt, bits = FORMATS[fmt_name]
    vs, gfmt = variants(fmt, bits, m, k, n, a.interpret)
    gemv_ok = m <= quant_gemv.MAX_ROWS and quant_gemv.supported(m, k, n, fmt=gfmt, bits=bits, group_size=GROUP,
                                                                dtype=jnp.bfloat16)
    if phase == "search" and (not gemv_ok or not GRIDS[a.grid] or sw.over_budget()):
        return
    x = jax.random.normal(jax.random.fold_in(key, 7), (m, k), jnp.float32).astype(jnp.bfloat16)
    nb = packed_bytes(k, n, bits)
    weights = make_weights(jax.random.fold_in(key, 1), k, n, fmt, bits, n_copies(nb, a.interpret), jnp.bfloat16)
    base = {"fmt": fmt_name, "layer": layer, "m": m, "k": k, "n": n, "bits": bits, "packed_bytes": nb,
            "copies": len(weights)}
    if phase == "base":
        for name, extra, fn, ref in vs:
            sw.measure(dict(base, variant=name, **extra), fn, weights, x, ref)
    if gemv_ok:
        ref = gemv_ref(gfmt, bits)
        mine = [r for r in sw.runs if r.get("variant") == "gemv" and (r["fmt"], r["layer"], r["m"]) ==
                (fmt_name, layer, m)]
        seen = {tuple(r["cfg"]): (r.get("us") if r["status"] == "ok" else None) for r in mine}

        def trial(c):
            if c not in seen:
                r = sw.measure(dict(base, variant="gemv", cfg=list(c)), gemv_fn(gfmt, bits, c, a.interpret),
                               weights, x, ref)
                seen[c] = r.get("us") if r["status"] == "ok" else None
            return seen[c]

        if phase == "base":
            trial(tuple(quant_gemv.settings(m, k, n, fmt=gfmt, bits=bits, group_size=GROUP)))
        else:
            best, cfg = min(((t, c) for c, t in seen.items() if t is not None), default=(None, None))
            if cfg is None:
                cfg = tuple(quant_gemv.settings(m, k, n, fmt=gfmt, bits=bits, group_size=GROUP))
            for p in GRIDS[a.grid]:
                for c in gemv_neighbours(cfg, p, m, k, n, bits, gfmt):
                    t = trial(c)
                    if t is not None and (best is None or t < best):
                        best, cfg = t, c
    del weights


def run_bf16(sw: Sweep, layer, m, k, n, key):
    import jax
    import jax.numpy as jnp

    x = jax.random.normal(jax.random.fold_in(key, 7), (m, k), jnp.float32).astype(jnp.bfloat16)
    c = n_copies(2 * k * n, sw.args.interpret)
    ws = [(jax.random.normal(jax.random.fold_in(key, 100 + i), (k, n), jnp.bfloat16) * 0.02,) for i in range(c)]
    sw.measure({"fmt": "bf16", "layer": layer, "m": m, "k": k, "n": n, "bits": 16, "packed_bytes": 2 * k * n,
                "copies": c, "variant": "bf16"}, lambda x, w: jnp.dot(x, w), ws, x, None)
    if not sw.args.interpret:  # XLA with a native int4 weight: does it fuse the conversion into the dot?
        G = k // GROUP
        ws = [(jax.random.randint(jax.random.fold_in(key, 200 + i), (k, n), -8, 8).astype(jnp.int4),
               jnp.full((G, n), 0.5, jnp.bfloat16), jnp.full((G, n), 0.002, jnp.bfloat16)) for i in range(
            n_copies(packed_bytes(k, n, 4), False))]
        fn = lambda x, w, z, s: jnp.dot(x, ((w.astype(x.dtype).reshape(G, GROUP, n) - z[:, None]) *
                                            s[:, None]).reshape(k, n))
        sw.measure({"fmt": "s4", "layer": layer, "m": m, "k": k, "n": n, "bits": 4,
                    "packed_bytes": packed_bytes(k, n, 4), "copies": len(ws), "variant": "xla_s4"}, fn, ws, x, None)


# ----------------------------------------------------------------------------------------------- summary


def summarize(runs: list[dict], formats, rows, shapes) -> tuple[dict, list[str], dict]:
    metrics, lines, configs = {}, [], {}
    ok = [r for r in runs if r["status"] == "ok" and "us" in r]
    bf16 = {(r["layer"], r["m"]): r["us"] for r in ok if r["variant"] == "bf16"}
    hdr = f"{'fmt':6s} {'layer':8s} {'M':>4s} {'bf16 us':>9s} {'xla us':>9s} {'mma us':>9s} {'auto us':>9s} " \
          f"{'best us':>9s} {'dev us':>8s} {'GB/s':>7s} {'x bf16':>7s}  best"
    lines.append(hdr)
    for f in formats:
        for m in rows:
            layer_sum = {"best": 0.0, "bf16": 0.0, "auto": 0.0, "complete": all(x in shapes for x in LAYER_SUM)}
            for layer, (k, n) in shapes.items():
                mine = [r for r in ok if r["fmt"] == f and r["layer"] == layer and r["m"] == m]
                if not mine:
                    layer_sum["complete"] &= layer not in LAYER_SUM
                    continue
                by = {}
                for r in mine:
                    by.setdefault(r["variant"], []).append(r)
                best = min(mine, key=lambda r: r["us"])
                xla = min((r["us"] for r in by.get("xla", [])), default=None)
                mma = min((r["us"] for r in by.get("mma", [])), default=None)
                auto = min((r["us"] for r in by.get("auto", [])), default=None)
                b16 = bf16.get((layer, m))
                name = best["variant"] + (str(best["cfg"]) if "cfg" in best else "")
                gbps = best["packed_bytes"] / best["us"] / 1e3
                p = f"{f}_{layer}_m{m}"
                metrics.update({f"{p}_us": best["us"], f"{p}_packed_gbps": gbps, f"{p}_best": name,
                                f"{p}_speedup_vs_bf16": common.ratio(b16, best["us"]),
                                f"{p}_speedup_vs_xla": common.ratio(xla, best["us"]),
                                f"{p}_auto_us": auto, f"{p}_device_us": best.get("device_us")})
                if best["variant"] == "gemv":
                    configs[(m, best["k"], best["n"], f)] = tuple(best["cfg"])
                fmt_us = lambda v: f"{v:9.2f}" if v is not None else f"{'-':>9s}"
                sp = common.ratio(b16, best["us"])
                lines.append(f"{f:6s} {layer:8s} {m:4d} {fmt_us(b16)} {fmt_us(xla)} {fmt_us(mma)} {fmt_us(auto)} "
                             f"{best['us']:9.2f} {best.get('device_us') or 0:8.2f} {gbps:7.0f} "
                             f"{sp if sp is None else round(sp, 2)!s:>7s}  {name}")
                if layer in LAYER_SUM:
                    c = LAYER_SUM[layer]
                    layer_sum["best"] += c * best["us"]
                    layer_sum["bf16"] += c * (b16 or math.nan)
                    layer_sum["auto"] += c * (auto if auto is not None else math.nan)
            if layer_sum["best"] and layer_sum["complete"]:
                p = f"{f}_layer_m{m}"
                metrics.update({f"{p}_us": layer_sum["best"], f"{p}_bf16_us": layer_sum["bf16"],
                                f"{p}_auto_us": layer_sum["auto"],
                                f"{p}_speedup_vs_bf16": common.ratio(layer_sum["bf16"], layer_sum["best"]),
                                f"{p}_auto_speedup_vs_bf16": common.ratio(layer_sum["bf16"], layer_sum["auto"])})
                lines.append(f"{f:6s} {'LAYER':8s} {m:4d} {layer_sum['bf16']:9.2f} {'':9s} {'':9s} "
                             f"{layer_sum['auto']:9.2f} {layer_sum['best']:9.2f} {'':8s} {'':7s} "
                             f"{round(layer_sum['bf16'] / layer_sum['best'], 2)!s:>7s}  (q, k, v, o, gate, up, down)")
    return metrics, lines, configs


def config_lines(configs: dict) -> list[str]:
    """CONFIGS entries for quant_gemv.py: (max rows, K, N) -> settings, from the format measured first (gptq)."""
    out, seen = [], set()
    for (m, k, n, f), cfg in sorted(configs.items(), key=lambda kv: (kv[0][3] != "gptq", kv[0][:3])):
        if (m, k, n) in seen:
            continue
        seen.add((m, k, n))
        out.append(f"    ({m}, {k}, {n}): {tuple(cfg)!r},   # {f}")
    return out


# ----------------------------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    args = parse(argv)
    import jax

    if args.interpret:
        jax.config.update("jax_platforms", "cpu")
    dev = common.device_info()
    cfg = common.model_config(common.resolve_model(args.model)) if not args.interpret else None
    ceilings = common.measure_ceilings(cfg, mode=args.ceilings, platform=dev["platform"], gemm_tokens=512) \
        if cfg is not None else common.measure_ceilings(_TinyCfg(), mode="small", platform=dev["platform"])
    sw = Sweep(args)
    key = jax.random.key(0)
    print(f"== {BENCHMARK}: rows {args.rows}, layers {list(args.shapes)}, formats {args.formats}, grid {args.grid}")
    for phase in ("base", "search"):  # defaults everywhere first, so a short budget still gives the whole table
        for m in args.rows:
            for li, (layer, (k, n)) in enumerate(args.shapes.items()):
                lkey = jax.random.fold_in(key, li * 1000 + m)
                if phase == "base":
                    run_bf16(sw, layer, m, k, n, lkey)
                for f in args.formats:
                    run_case(sw, f, layer, m, k, n, lkey, phase)
    metrics, lines, configs = summarize(sw.runs, args.formats, args.rows, args.shapes)
    failed = [r for r in sw.runs if r["status"] in ("failed", "wrong")]
    metrics.update({"variants_ok": sum(r["status"] == "ok" for r in sw.runs), "variants_failed": len(failed),
                    "variants_skipped": sum(r["status"] == "skipped" for r in sw.runs),
                    "sweep_s": time.perf_counter() - sw.t0})
    config = {"rows": list(args.rows), "shapes": {k: list(v) for k, v in args.shapes.items()}, "formats": args.formats,
              "group_size": GROUP, "grid": args.grid, "dtype": "bfloat16", "interpret": args.interpret,
              "method": "median of groups of back-to-back calls over C weight copies (>= 256 MB), divided by C",
              "gemv_configs": config_lines(configs), "runs": [{k: common._round(v) for k, v in r.items()}
                                                              for r in sw.runs]}
    result = common.make_result(benchmark=BENCHMARK, model=args.model, dev=dev, config=config, ceilings=ceilings,
                                metrics=metrics)
    path = common.write_result(result, devtag=dev["devtag"], results_dir=args.results_dir, out=args.out)
    print("\n" + "\n".join(lines))
    if failed:
        print(f"\n{len(failed)} variants failed or were wrong, e.g.:")
        for r in failed[:6]:
            print(f"  {r['fmt']} {r['layer']} m={r['m']} {r['variant']} {r.get('cfg', '')}: {r['status']} "
                  f"{r.get('error', '')} rel_err={r.get('rel_err')}")
    print("\nCONFIGS entries for pallas_kernels/quant_gemv.py:\n" + "\n".join(config["gemv_configs"]))
    print(f"\ncopy {ceilings.get('copy_tbps')} TB/s; result {path}")
    return result


class _TinyCfg:  # ceilings' "small" GEMM shapes for the interpret dry run
    hidden_size, intermediate_size = 256, 512


if __name__ == "__main__":
    main()
