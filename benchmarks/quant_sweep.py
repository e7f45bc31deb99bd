"""quant_matmul.py's sweep machinery: the formats, group size and the skinny / GEMV search grids; the random packed
weights; the variants of the low-bit product (XLA's dequantize-then-dot, QuantLinear's own choice, the MMA, GEMV and
skinny Pallas kernels) with their references; timing and checking one variant (Sweep.measure) and its kernels'
device time from a profile; one case's run at default settings or its kernels' searches, and the bf16 / native-int4
baselines."""

from __future__ import annotations

import dataclasses
import statistics
import time
import traceback

import device_ceilings
import numpy as np
import profiling

FORMATS = {"gptq": ("gptq", 4), "awq": ("awq", 4), "gptq8": ("gptq", 8)}
GROUP = 128
CALLS = 48            # products per timed XLA program (copies repeat, interleaved)
MAX_REL_ERR = 2e-2
# The GEMV search's settings in the order searched (indices into (block_n, block_kw, num_splits, num_warps,
# num_stages, xload)): how x is loaded first (the suspected bottleneck), the split, the tile, the split again.
GRIDS = {"greedy": (5, 2, 0, 1, 2), "full": (5, 2, 0, 1, 2, 3, 4), "small": (5, 2), "none": ()}
# The skinny kernel's (indices into (mode, block_n, block_kw, num_splits, num_warps, num_stages)): the mode first,
# then the split (bytes in flight per program), the tile, the warps, the pipeline depth (dot modes).
SKINNY_GRIDS = {"greedy": (0, 3, 1, 2, 4, 3), "full": (0, 3, 1, 2, 4, 5, 3), "small": (0, 3), "none": ()}
# The lop3 modes' (their mode kept): the pipeline depth first (bytes in flight per program), then the tile and split.
LOP3_GRIDS = {"greedy": (5, 2, 3, 1, 4), "full": (5, 2, 3, 1, 4, 5), "small": (5, 3), "none": ()}
SEARCHES = ("skinny", "lop3", "gemv")  # the kernels whose settings --search explores (lop3: a skinny mode)


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
    if fmt == "gptq":  # act-order as loaded (rows sorted into group order, quantization/act_order.py): `auto` plus
        # the gather of x's columns through perm (a fixed random permutation; on CPU the XLA path)
        qa = dataclasses.replace(q, desc_act=True)
        perm = jnp.asarray(np.random.default_rng(k).permutation(k).astype(np.int32))
        out.append(("auto_act_order", {"path": None}, lambda x, qw, qz, s: quant_linear.quant_matmul(
            x, qw, qz, s, None, quant=qa, perm=perm), lambda x, *a: ref_xla(jnp.take(x, perm, axis=-1), *a)))
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


def skinny_fn(gfmt, bits, cfg, interpret):
    from pallas_kernels import quant_skinny

    mode, bn, bkw, s, w, st = cfg
    return lambda x, qw, qz, sc: quant_skinny.quant_skinny(x, qw, qz, sc, fmt=gfmt, bits=bits, group_size=GROUP,
                                                           mode=mode, block_n=bn, block_kw=bkw, num_splits=s,
                                                           num_warps=w, num_stages=st, interpret=interpret)


def skinny_neighbours(cfg, param, m, k, n, bits, gfmt):
    """Values of one skinny setting to try around `cfg` (the greedy search); a new mode starts from its defaults'
    split and tile (a dot mode's heuristic settings where the current ones do not fit it)."""
    from pallas_kernels import quant_skinny as qs

    mode, bn, bkw, s, w, st = cfg
    if param == 0:
        h = qs.heuristic(max(m, 5), k, n, fmt=gfmt, bits=bits, group_size=GROUP)  # the dot modes' defaults
        outs = [(v, *cfg[1:]) for v in qs.MODES if v != mode] + [(v, *h[1:]) for v in ("dot", "dot_t")]
    elif param == 5 and mode == "fma":  # num_stages: only the dot modes' loop is pipelined by Triton
        outs = []
    else:
        vals = {1: (64, 128, 256, 512, 1024), 2: (1, 2, 4, 8, 16, 32),
                3: sorted({max(1, s // 4), max(1, s // 2), s * 2, s * 4}), 4: (2, 4, 8), 5: (1, 2, 3, 4, 5, 6)}[param]
        outs = [tuple(v if i == param else c for i, c in enumerate(cfg)) for v in vals if v != cfg[param]]
        if param == 1 and mode == "fma":  # and the warps that keep block_n = 128 * num_warps (heuristic's docstring)
            outs += [(mode, v, bkw, s, v // 128, st) for v in (128, 256, 512, 1024) if v != bn]
    return [c for c in dict.fromkeys(outs) if c != tuple(cfg) and qs._valid(m, k, n, gfmt, bits, GROUP,
                                                                             *c[:4]) is None]


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


def add_sweep_args(p, *, budget_s: float) -> None:
    """The options Sweep reads (budget, device time, timing repeats, interpret mode) and where results go."""
    import repo_paths

    p.add_argument("--budget-s", type=float, default=budget_s, help="start no new variant after this many seconds")
    p.add_argument("--device-time", choices=("auto", "on", "off"), default="auto",
                   help="also profile each variant for its kernels' device time (auto: on a GPU)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--inner", type=int, default=2)
    p.add_argument("--interpret", action="store_true", help="Pallas interpret mode, tiny shapes (CPU dry run)")
    p.add_argument("--results-dir", default=str(repo_paths.RESULTS_DIR))
    p.add_argument("--out", default=None)


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
            times = device_ceilings._time_fn(many, xs, weights, reps=self.args.reps, inner=self.args.inner)
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
    with profiling.quiet_trace(d):
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

    from pallas_kernels import quant_gemv, quant_skinny

    a = sw.args
    fmt, bits = FORMATS[fmt_name]
    vs, gfmt = variants(fmt, bits, m, k, n, a.interpret)
    kw = dict(fmt=gfmt, bits=bits, group_size=GROUP)
    kernels = {}  # name -> (default settings, fn of settings, neighbours, grid)
    if m <= quant_skinny.MAX_ROWS and quant_skinny.supported(m, k, n, dtype=jnp.bfloat16, **kw):
        kernels["skinny"] = (quant_skinny.settings(m, k, n, **kw), skinny_fn, skinny_neighbours,
                             SKINNY_GRIDS[a.grid])
        # its lop3 modes (pallas_kernels/quant_lop3.py) at their own defaults
        if quant_skinny.supported(m, k, n, dtype=jnp.bfloat16, mode="lop3_t", **kw):
            kernels["lop3"] = (quant_skinny.settings(m, k, n, mode="lop3_t", **kw), skinny_fn, skinny_neighbours,
                               LOP3_GRIDS[a.grid])
    if m <= quant_gemv.MAX_ROWS and quant_gemv.supported(m, k, n, dtype=jnp.bfloat16, **kw):
        kernels["gemv"] = (quant_gemv.settings(m, k, n, **kw), gemv_fn, gemv_neighbours, GRIDS[a.grid])
    if phase == "search":
        kernels = {name: v for name, v in kernels.items() if name in a.search and v[3]}
        if not kernels or sw.over_budget():
            return
    x = jax.random.normal(jax.random.fold_in(key, 7), (m, k), jnp.float32).astype(jnp.bfloat16)
    nb = packed_bytes(k, n, bits)
    weights = make_weights(jax.random.fold_in(key, 1), k, n, fmt, bits, n_copies(nb, a.interpret), jnp.bfloat16)
    base = {"fmt": fmt_name, "layer": layer, "m": m, "k": k, "n": n, "bits": bits, "packed_bytes": nb,
            "copies": len(weights)}
    if phase == "base":
        for name, extra, fn, ref in vs:
            sw.measure(dict(base, variant=name, **extra), fn, weights, x, ref)
    ref = gemv_ref(gfmt, bits)
    for name, (default, make_fn, neighbours, grid) in kernels.items():
        mine = [r for r in sw.runs if r.get("variant") == name and (r["fmt"], r["layer"], r["m"]) ==
                (fmt_name, layer, m)]
        seen = {tuple(r["cfg"]): (r.get("us") if r["status"] == "ok" else None) for r in mine}

        def trial(c, name=name, make_fn=make_fn, seen=seen):
            if c not in seen:
                r = sw.measure(dict(base, variant=name, cfg=list(c)), make_fn(gfmt, bits, c, a.interpret),
                               weights, x, ref)
                seen[c] = r.get("us") if r["status"] == "ok" else None
            return seen[c]

        if phase == "base":
            trial(tuple(default))
            continue
        best, cfg = min(((t, c) for c, t in seen.items() if t is not None), default=(None, tuple(default)))
        for p in grid:
            for c in neighbours(cfg, p, m, k, n, bits, gfmt):
                t = trial(c)
                if t is not None and (best is None or t < best):
                    best, cfg = t, c


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
