"""quant-matmul: every low-bit matmul path at Qwen2-7B layer shapes, timed on one GPU, best configuration per shape.

For each row count M (default 1, 4, 16, 64, 512), layer shape (q/o 3584->3584, k/v 3584->512, qkv 3584->4608,
gate/up 3584->18944, gate_up2 3584->37888, down 18944->3584; qkv and gate_up2 are the fused projections the model
runs on one device, models/fusion.py) and format (gptq = GPTQ 4-bit, awq = AWQ 4-bit, gptq8 on request), group 128:
  bf16     jnp.dot with a bf16 weight: the float model's product (once per shape and M)
  xla      QuantLinear's XLA path: unpack, subtract zeros, scale, dot (what prefill takes)
  auto     QuantLinear.quant_matmul as the model calls it (kernel_path's choice)
  auto_act_order  (gptq formats) the same for an act-order layer as loaded: x's columns gathered through perm first
  mma      the tensor-core Pallas kernel (pallas_kernels/quant_matmul.py), its default tiles, checkpoint layouts
  skinny   the skinny kernel (pallas_kernels/quant_skinny.py), M <= 64 (`auto` with QWENJAX_QUANT_SKINNY=1): its
           default settings; then, once every path has run at every M, a greedy search (M = 1 first) over mode
           (fma / dot / dot_t), num_splits, block_n, block_kw, num_warps, num_stages (--grid greedy; `full` repeats
           the split at the end; `small`: mode and num_splits; `none`: the defaults only)
  lop3     the skinny kernel's lop3_t mode (pallas_kernels/quant_lop3.py: Marlin's dequantization by PTX lop3),
           4 bits, M <= 64 (`auto` with QWENJAX_QUANT_SKINNY=lop3): its defaults; searched where --search names it
  gemv     the GEMV kernel before it (pallas_kernels/quant_gemv.py), M <= 16, kept for comparison: its defaults;
           searched (xload, num_splits, block_n, block_kw; `full` adds num_warps and num_stages) where --search
           names it
  xla_s4   informative: a native int4 [K, N] weight (jnp.int4) dequantized in the dot's producer by XLA
Method: per variant one jitted program runs the product on 48 distinct weight copies (far more than the 50 MB L2;
distinct so that XLA can share nothing between products, e.g. a dequantized weight) and returns one scalar (the
outputs pass an optimization barrier, so nothing is simplified away, and no output buffer costs host time); it is
timed as `device_ceilings._time_fn` does (median of groups of back-to-back calls, device-synced), divided by 48:
`us`, launch gaps inside the program included, as in a model step. On a GPU each variant is also profiled:
`device_us` = its kernels' time per product (gaps excluded) and the top kernels by name (e.g. the Pallas kernel and
the fusion that sums split-K partials). Each variant's output on copy 0 is checked against a float32
dequantize-then-dot of the same arrays (rel_err = |out - ref| / |ref|, Frobenius; above 2e-2 the variant is marked
wrong and never chosen). A variant that fails to compile or run is recorded with its error
and the sweep goes on; `--budget-s` stops starting new variants in time to write the result. `packed_gbps` = the
quantized weight's bytes (int32 words + zeros + bf16 scales) over the time; `bf16_gbps` the bf16 weight's.

Output: a table, then `CONFIGS` entries for pallas_kernels/quant_skinny.py and quant_gemv.py, then one JSON
(benchmark `quant-matmul`):
metrics `<fmt>_<layer>_m<M>_{us,packed_gbps,copy_frac,speedup_vs_bf16,speedup_vs_xla,best}`, each kernel's own best
`<fmt>_<layer>_m<M>_{skinny,gemv}_{us,device_us,packed_gbps,copy_frac}` (copy_frac: of the copy bandwidth measured
in the same run) and, per format and M, the sums over a layer's seven projections (q, k, v, o, gate, up, down):
`<fmt>_layer_m<M>_{us,speedup_vs_bf16}`, and over the model's four fused products (qkv, o, gate_up2, down):
`<fmt>_fused_layer_m<M>_...`.
The formats, the variants, the weights and the measurement of one variant are in quant_sweep.py.

  python benchmarks/quant_matmul.py --budget-s 480 --out $OUT          # H100: about 8-10 minutes without a budget
  python benchmarks/quant_matmul.py --rows 1 --formats gptq --grid small  # a quick look
  python benchmarks/quant_matmul.py --rows 1,4,16,64 --layers qkv,q_o,gate_up2,down --budget-s 420  # issue 30
  JAX_PLATFORMS=cpu python benchmarks/quant_matmul.py --interpret         # CPU dry run: tiny shapes, interpret mode
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cli_args  # noqa: E402
import device_ceilings  # noqa: E402
import floors  # noqa: E402
import model_specs  # noqa: E402
import result_files  # noqa: E402
from quant_sweep import FORMATS, GRIDS, GROUP, SEARCHES, Sweep, add_sweep_args, run_bf16, run_case  # noqa: E402

BENCHMARK = "quant-matmul"
# Qwen2-7B: hidden 3584, 28 q heads and 4 kv heads of 128, ffn 18944. (K, N) per layer name.
SHAPES_7B = {"q_o": (3584, 3584), "kv": (3584, 512), "gate_up": (3584, 18944), "down": (18944, 3584),
             "qkv": (3584, 4608), "gate_up2": (3584, 37888)}
# Sums over a decoder layer's products: name -> (layer -> count, label). "layer": the seven projections apart;
# "fused_layer": the four products the model runs on one device (models/fusion.py).
LAYER_SUMS = {"layer": ({"q_o": 2, "kv": 2, "gate_up": 2, "down": 1}, "(q, k, v, o, gate, up, down)"),
              "fused_layer": ({"qkv": 1, "q_o": 1, "gate_up2": 1, "down": 1}, "(qkv, o, gate_up fused, down)")}
SHAPES_TINY = {"q_o": (256, 256), "kv": (256, 64), "down": (512, 256)}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="qwen2-7b-instruct", help="names the result file; shapes are Qwen2-7B's")
    p.add_argument("--rows", type=cli_args._int_list, default=(1, 4, 16, 64, 512))
    p.add_argument("--layers", default="q_o,kv,gate_up,down",
                   help="comma-separated subset of " + ",".join(SHAPES_7B) + " (qkv: q, k and v fused; gate_up2: "
                        "gate and up fused: the model's projections, models/fusion.py; the LAYER sum counts the "
                        "separate ones)")
    p.add_argument("--formats", default="gptq,awq", help="comma-separated subset of " + ",".join(FORMATS))
    p.add_argument("--grid", choices=tuple(GRIDS), default="greedy",
                   help="the kernels' searches, run after every path's defaults at every M (M = 1 first)")
    p.add_argument("--search", default="skinny", help="comma-separated kernels to search: " + ",".join(SEARCHES))
    add_sweep_args(p, budget_s=520.0)
    p.add_argument("--ceilings", choices=("auto", "full", "small", "none"), default="auto")
    a = p.parse_args(argv)
    shapes = SHAPES_TINY if a.interpret else SHAPES_7B
    a.shapes = {k: v for k, v in shapes.items() if k in a.layers.split(",")}
    a.formats = [f for f in a.formats.split(",") if f]
    a.search = [k for k in a.search.split(",") if k]
    if set(a.search) - set(SEARCHES):
        p.error(f"unknown --search kernels {sorted(set(a.search) - set(SEARCHES))}; known: {list(SEARCHES)}")
    bad = [f for f in a.formats if f not in FORMATS]
    if bad:
        p.error(f"unknown formats {bad}; known: {sorted(FORMATS)}")
    if a.interpret:
        a.rows = tuple(r for r in a.rows if r <= 16)[:2] or (1,)
    return a


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
            sums = {name: {"best": 0.0, "bf16": 0.0, "auto": 0.0, "complete": all(x in shapes for x in counts)}
                    for name, (counts, _) in LAYER_SUMS.items()}
            for layer, (k, n) in shapes.items():
                mine = [r for r in ok if r["fmt"] == f and r["layer"] == layer and r["m"] == m]
                if not mine:
                    for name, (counts, _) in LAYER_SUMS.items():
                        sums[name]["complete"] &= layer not in counts
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
                                f"{p}_speedup_vs_bf16": floors.ratio(b16, best["us"]),
                                f"{p}_speedup_vs_xla": floors.ratio(xla, best["us"]),
                                f"{p}_auto_us": auto, f"{p}_device_us": best.get("device_us")})
                for kern in ("skinny", "lop3", "gemv"):  # each kernel's best settings where they beat its defaults
                    kbest = min(by.get(kern, []), key=lambda r: r["us"], default=None)
                    if kbest is not None:
                        metrics.update({f"{p}_{kern}_us": kbest["us"], f"{p}_{kern}_device_us": kbest.get("device_us"),
                                        f"{p}_{kern}_packed_gbps": kbest["packed_bytes"] / kbest["us"] / 1e3})
                    if kbest is not None and kbest is not by[kern][0]:
                        configs.setdefault(kern, {})[(m, kbest["k"], kbest["n"], f)] = tuple(kbest["cfg"])
                fmt_us = lambda v: f"{v:9.2f}" if v is not None else f"{'-':>9s}"
                sp = floors.ratio(b16, best["us"])
                lines.append(f"{f:6s} {layer:8s} {m:4d} {fmt_us(b16)} {fmt_us(xla)} {fmt_us(mma)} {fmt_us(auto)} "
                             f"{best['us']:9.2f} {best.get('device_us') or 0:8.2f} {gbps:7.0f} "
                             f"{sp if sp is None else round(sp, 2)!s:>7s}  {name}")
                for name, (counts, _) in LAYER_SUMS.items():
                    c = counts.get(layer, 0)
                    sums[name]["best"] += c * best["us"]
                    sums[name]["bf16"] += c * (b16 or math.nan) if c else 0.0
                    sums[name]["auto"] += c * (auto if auto is not None else math.nan) if c else 0.0
            for name, (_, label) in LAYER_SUMS.items():
                ls = sums[name]
                if not (ls["best"] and ls["complete"]):
                    continue
                p = f"{f}_{name}_m{m}"
                metrics.update({f"{p}_us": ls["best"], f"{p}_bf16_us": ls["bf16"], f"{p}_auto_us": ls["auto"],
                                f"{p}_speedup_vs_bf16": floors.ratio(ls["bf16"], ls["best"]),
                                f"{p}_auto_speedup_vs_bf16": floors.ratio(ls["bf16"], ls["auto"])})
                tag = "LAYER" if name == "layer" else "FUSED"
                lines.append(f"{f:6s} {tag:8s} {m:4d} {ls['bf16']:9.2f} {'':9s} {'':9s} "
                             f"{ls['auto']:9.2f} {ls['best']:9.2f} {'':8s} {'':7s} "
                             f"{round(ls['bf16'] / ls['best'], 2)!s:>7s}  {label}")
    return metrics, lines, configs


def config_lines(configs: dict) -> list[str]:
    """CONFIGS entries for one kernel: (max rows, K, N) -> settings, from the format measured first (gptq)."""
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
    dev = result_files.device_info()
    cfg = model_specs.model_config(model_specs.resolve_model(args.model)) if not args.interpret else None
    ceilings = device_ceilings.measure_ceilings(cfg, mode=args.ceilings, platform=dev["platform"], gemm_tokens=512) \
        if cfg is not None else device_ceilings.measure_ceilings(_TinyCfg(), mode="small", platform=dev["platform"])
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
    if ceilings.get("copy_tbps"):  # issue 30's measure: packed bytes per second against the copy bandwidth
        metrics.update({key[:-len("packed_gbps")] + "copy_frac": v / (ceilings["copy_tbps"] * 1e3)
                        for key, v in list(metrics.items()) if key.endswith("packed_gbps") and v})
    failed = [r for r in sw.runs if r["status"] in ("failed", "wrong")]
    metrics.update({"variants_ok": sum(r["status"] == "ok" for r in sw.runs), "variants_failed": len(failed),
                    "variants_skipped": sum(r["status"] == "skipped" for r in sw.runs),
                    "sweep_s": time.perf_counter() - sw.t0})
    config = {"rows": list(args.rows), "shapes": {k: list(v) for k, v in args.shapes.items()}, "formats": args.formats,
              "group_size": GROUP, "grid": args.grid, "dtype": "bfloat16", "interpret": args.interpret,
              "method": "median of groups of back-to-back calls over C weight copies (>= 256 MB), divided by C",
              "gemv_configs": config_lines(configs.get("gemv", {})),
              "skinny_configs": config_lines(configs.get("skinny", {})), "search": args.search,
              "runs": [{k: result_files._round(v) for k, v in r.items()} for r in sw.runs]}
    result = result_files.make_result(benchmark=BENCHMARK, model=args.model, dev=dev, config=config, ceilings=ceilings,
                                      metrics=metrics)
    path = result_files.write_result(result, devtag=dev["devtag"], results_dir=args.results_dir, out=args.out)
    print("\n" + "\n".join(lines))
    if failed:
        print(f"\n{len(failed)} variants failed or were wrong, e.g.:")
        for r in failed[:6]:
            print(f"  {r['fmt']} {r['layer']} m={r['m']} {r['variant']} {r.get('cfg', '')}: {r['status']} "
                  f"{r.get('error', '')} rel_err={r.get('rel_err')}")
    for kern in ("skinny", "gemv"):
        print(f"\nCONFIGS entries for pallas_kernels/quant_{kern}.py:\n" + "\n".join(config[f"{kern}_configs"]))
    print(f"\ncopy {ceilings.get('copy_tbps')} TB/s; result {path}")
    return result


class _TinyCfg:  # ceilings' "small" GEMM shapes for the interpret dry run
    hidden_size, intermediate_size = 256, 512


if __name__ == "__main__":
    main()
