"""fp8-matmul: does XLA take the FP8 tensor-core path? FP8 product forms against bf16 at Qwen2-7B layer shapes.

For each layer shape (qkv 3584->4608, o 3584->3584, gate_up 3584->37888, down 18944->3584: the fused projections
the model runs on one device) and row count M (default 1, 16, 64, 256, 1024, 4096, 8192), one jitted program per
form, timed as device_ceilings._time_fn does (median of groups of back-to-back calls, device-synced):
  bf16        jnp.dot of bf16 operands, bf16 out: the float model's product
  fp8_plain   jnp.dot of float8_e4m3fn operands with a float32 result, no scales (the issue's first probe)
  fp8_dot     dot_general on float8 operands with the weight [K, N], preferred_element_type float32, then the
              outer product of per-token and per-channel scales (the model's GEMM before NOTES 48)
  fp8_layer   quantize the bf16 activations per token (quantization/fp8_quant.py) + layers/fp8_matmul.fp8_matmul on
              the weight [N, K]: Fp8Linear's whole work
  fp8_xla     XLA's documented FP8 pattern: float8 operands converted to bf16 and multiplied by SCALAR scales,
              then a dot (gemm_rewriter matches it to cuBLASLt's scaled FP8 GEMM); per-tensor scales only, so it
              shows what XLA can do rather than a form the per-channel model can use as is
  fp8_tn      layers/fp8_matmul.fp8_matmul: the weight stored [N, K] (the checkpoint's [O, I], the model's since
              NOTES 48) and contracted on its last axis: the "TN" operand order cuBLASLt's FP8 GEMM takes; in
              fp8_dot's [K, N] order XLA transposes the weight first (NOTES 47, 48)
  fp8_tn_f32acc  fp8_tn with QWENJAX_FP8_ACCUM=f32: float32 accumulation without cuBLASLt's fast FP8 accumulation
              (DotAlgorithmPreset.ANY_F8_ANY_F8_F32; on CPU the same as fp8_tn)
  fp8_tn_bf16out  fp8_tn with QWENJAX_FP8_GEMM_OUT=bf16: the GEMM's result in bf16, the scales after (half the
              bytes of the float32 result written and read back; on CPU the same as fp8_tn)
  fp8_up      the same values as fp8_dot, multiplied as bf16: both float8 operands converted to bf16 inside the
              program (exact: every float8 value is a bf16 value, every product of two is exact in float32), a bf16
              dot with a float32 result, the scales after. XLA can fuse the converts into its GEMM's operand loads
              (reading 1-byte weights), so at few rows, where the weight read is the time, it may beat both
  fp8_up_tn   fp8_up with the weight stored [N, K]
  fp8_gemv    pallas_kernels/fp8_gemv.py (QWENJAX_FP8_GEMV=1 in the model): the same values, the weight read once at
              1 byte a value by a Pallas GEMV; up to its MAX_ROWS rows (more: not run)
  fp8_skinny  pallas_kernels/fp8_skinny.py (the model's default up to its MAX_ROWS rows): the same values on the
              tensor cores, split over K where the output is narrow; up to its MAX_ROWS rows
fp8_layer and the fp8_tn forms run with QWENJAX_FP8_SKINNY=0 (unless set otherwise): XLA's dot, as they are named.
Each form's compiled HLO (jit(f).lower(...).compile().as_text()) is searched for `__cublas$lt$matmul$f8`, the custom
call of XLA's FP8 GEMM: `<form>_<layer>_m<M>_cublaslt_f8` says whether XLA took the FP8 tensor-core path, and the
config lists every custom-call target per form and shape. Metrics also: `_us`, `_tflops` (2 M K N / time) and
`_speedup_vs_bf16`. Each form's output is checked against a float32 product of the same values (rel_err, Frobenius;
above 2e-2 the form is marked wrong) and `_max_err` (the largest elementwise error over the reference's largest
magnitude: tests/gpu/test_fp8_gpu.py allows 2^-7) and `_compile_s` (lowering and compiling, XLA's autotuning
included: the first call of each form, no persistent cache).

  python benchmarks/fp8_matmul.py --out $OUT                            # H100: a few minutes
  python benchmarks/fp8_matmul.py --rows 1,8192 --layers gate_up        # a quick look
  JAX_PLATFORMS=cpu python benchmarks/fp8_matmul.py --tiny --rows 1,16  # CPU dry run: tiny shapes
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cli_args  # noqa: E402
import device_ceilings  # noqa: E402
import repo_paths  # noqa: E402
import result_files  # noqa: E402

BENCHMARK = "fp8-matmul"
SHAPES_7B = {"qkv": (3584, 4608), "o": (3584, 3584), "gate_up": (3584, 37888), "down": (18944, 3584)}
SHAPES_TINY = {"qkv": (128, 192), "down": (256, 128)}
FORMS = ("bf16", "fp8_plain", "fp8_dot", "fp8_layer", "fp8_xla", "fp8_tn", "fp8_tn_f32acc", "fp8_up", "fp8_up_tn",
         "fp8_gemv", "fp8_skinny", "fp8_tn_bf16out")
F8_CALL = "__cublas$lt$matmul$f8"


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="qwen2-7b-instruct", help="names the result file; shapes are Qwen2-7B's")
    p.add_argument("--rows", type=cli_args._int_list, default=(1, 16, 64, 256, 1024, 4096, 8192))
    p.add_argument("--layers", default=",".join(SHAPES_7B), help="comma-separated subset of " + ",".join(SHAPES_7B))
    p.add_argument("--forms", default=",".join(FORMS), help="comma-separated subset of " + ",".join(FORMS))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--inner", type=int, default=10)
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU dry run)")
    p.add_argument("--results-dir", default=str(repo_paths.RESULTS_DIR))
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    shapes = SHAPES_TINY if args.tiny else SHAPES_7B
    args.shapes = {k: shapes[k] for k in args.layers.split(",") if k in shapes} or dict(shapes)
    args.forms = [f for f in args.forms.split(",") if f in FORMS]
    if "bf16" not in args.forms:
        args.forms.insert(0, "bf16")  # every speedup is against it
    return args


def forms():
    """form -> (jitted function, how to build its arguments from (x bf16, w bf16))."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels.fp8_gemv import fp8_gemv
    from pallas_kernels.fp8_skinny import fp8_skinny
    from qwenjax.layers.fp8_matmul import SKINNY_ENV, fp8_matmul
    from qwenjax.quantization.fp8_quant import quantize_activations, quantize_weight_per_channel

    os.environ.setdefault(SKINNY_ENV, "0")  # the model's forms on XLA's dot (module docstring); read when traced
    bf16 = jnp.bfloat16

    def per_channel(x, w):
        xq, xs = quantize_activations(x)
        wq, ws = quantize_weight_per_channel(w)
        return xq, xs, wq, ws

    def per_tensor(x, w):
        xs = jnp.max(jnp.abs(x.astype(jnp.float32))) / 448
        ws = jnp.max(jnp.abs(w.astype(jnp.float32))) / 448
        return ((x.astype(jnp.float32) / xs).astype(jnp.float8_e4m3fn), xs,
                (w.astype(jnp.float32) / ws).astype(jnp.float8_e4m3fn), ws)

    def xla_pattern(xq, xs, wq, ws):
        return jnp.dot(xq.astype(bf16) * xs.astype(bf16), wq.astype(bf16) * ws.astype(bf16),
                       preferred_element_type=jnp.float32).astype(bf16)

    def kn(xq, xs, wq, ws):  # the weight stored [K, N]
        acc = jax.lax.dot_general(xq, wq, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        return (acc * xs * ws).astype(bf16)

    def up(xq, xs, wq, ws, contract=0):
        acc = jax.lax.dot_general(xq.astype(bf16), wq.astype(bf16), (((1,), (contract,)), ((), ())),
                                  preferred_element_type=jnp.float32)
        return (acc * xs * ws).astype(bf16)

    def per_channel_tn(x, w):
        xq, xs, wq, ws = per_channel(x, w)
        return xq, xs, jnp.asarray(wq.T), ws

    def layer(x, wqt, ws):
        xq, xs = quantize_activations(x)
        return fp8_matmul(xq, xs, wqt, ws, out_dtype=bf16)

    return {
        "bf16": (jax.jit(lambda x, w: jnp.dot(x, w)), lambda x, w: (x, w)),
        "fp8_plain": (jax.jit(lambda xq, xs, wq, ws: jnp.dot(xq, wq, preferred_element_type=jnp.float32)),
                      per_channel),
        "fp8_dot": (jax.jit(kn), per_channel),
        "fp8_layer": (jax.jit(layer), lambda x, w: (x,) + per_channel_tn(x, w)[2:]),
        "fp8_xla": (jax.jit(xla_pattern), per_tensor),
        "fp8_tn": (jax.jit(lambda xq, xs, wqt, ws: fp8_matmul(xq, xs, wqt, ws, out_dtype=bf16)), per_channel_tn),
        "fp8_tn_f32acc": (jax.jit(lambda xq, xs, wqt, ws: fp8_matmul(xq, xs, wqt, ws, out_dtype=bf16, accum="f32")),
                          per_channel_tn),
        "fp8_tn_bf16out": (jax.jit(lambda xq, xs, wqt, ws: fp8_matmul(xq, xs, wqt, ws, out_dtype=bf16,
                                                                      gemm_out="bf16")), per_channel_tn),
        "fp8_up": (jax.jit(up), per_channel),
        "fp8_up_tn": (jax.jit(lambda *a: up(*a, contract=1)), per_channel_tn),
        "fp8_gemv": (jax.jit(lambda *a: fp8_gemv(*a, out_dtype=bf16, interpret=jax.default_backend() == "cpu")),
                     per_channel_tn),
        "fp8_skinny": (jax.jit(lambda *a: fp8_skinny(*a, out_dtype=bf16, interpret=jax.default_backend() == "cpu")),
                       per_channel_tn),
    }


def reference(form: str, args):
    """float32 product of the same values the form multiplies (scales included, except fp8_plain's none)."""
    import numpy as np

    f = lambda a: np.asarray(a, np.float32)  # noqa: E731
    if form == "bf16":
        return f(args[0]) @ f(args[1])
    if form == "fp8_layer":
        from qwenjax.quantization.fp8_quant import quantize_activations

        xq, xs = quantize_activations(args[0])
        return (f(xq) * f(xs)) @ (f(args[1]).T * f(args[2]))
    xq, xs, wq, ws = args
    if form == "fp8_plain":
        return f(xq) @ f(wq)
    if form in ("fp8_tn", "fp8_tn_f32acc", "fp8_tn_bf16out", "fp8_up_tn", "fp8_gemv", "fp8_skinny"):
        return (f(xq) * f(xs)) @ (f(wq).T * f(ws))
    return (f(xq) * f(xs)) @ (f(wq) * f(ws))


def custom_calls(hlo: str) -> list[str]:
    return sorted(set(re.findall(r'custom_call_target="([^"]+)"', hlo)))


def main(argv=None):
    args = parse(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels.fp8_gemv import MAX_ROWS as GEMV_MAX_ROWS
    from pallas_kernels.fp8_skinny import MAX_ROWS as SKINNY_MAX_ROWS

    dev = result_files.device_info()
    table = forms()
    metrics, calls, errors = {}, {}, {}
    print(f"== {BENCHMARK}: rows {list(args.rows)}, layers {list(args.shapes)}, forms {args.forms}", flush=True)
    for layer, (K, N) in args.shapes.items():
        w = (jax.random.normal(jax.random.key(1), (K, N), jnp.float32) * 0.02).astype(jnp.bfloat16)
        for m in args.rows:
            x = jax.random.normal(jax.random.key(m), (m, K), jnp.float32).astype(jnp.bfloat16)
            flops = 2 * m * K * N
            for form in args.forms:
                if (form == "fp8_gemv" and m > GEMV_MAX_ROWS) or (form == "fp8_skinny" and m > SKINNY_MAX_ROWS):
                    continue
                fn, make = table[form]
                key = f"{form}_{layer}_m{m}"
                try:
                    fargs = jax.block_until_ready(make(x, w))
                    t0 = time.perf_counter()
                    hlo = fn.lower(*fargs).compile().as_text()
                    compile_s = time.perf_counter() - t0
                    secs = statistics.median(device_ceilings._time_fn(fn, *fargs, reps=args.reps, inner=args.inner))
                    out = np.asarray(fn(*fargs), np.float32)
                    ref = reference(form, fargs)
                    rel = float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))
                    worst = float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30))
                except Exception as e:  # a form that fails to compile or run is recorded, the probe goes on
                    errors[key] = f"{type(e).__name__}: {str(e)[:300]}"
                    print(f"{key}: {errors[key]}", flush=True)
                    continue
                calls[key] = custom_calls(hlo)
                metrics.update({f"{key}_us": secs * 1e6, f"{key}_tflops": flops / secs / 1e12,
                                f"{key}_cublaslt_f8": F8_CALL in hlo, f"{key}_rel_err": rel,
                                f"{key}_max_err": worst, f"{key}_compile_s": compile_s})
                if rel > 2e-2:
                    errors[key] = f"wrong: rel_err {rel:.3g}"
                base = metrics.get(f"bf16_{layer}_m{m}_us")
                metrics[f"{key}_speedup_vs_bf16"] = base / (secs * 1e6) if base else None
                print(f"{layer:8s} m={m:5d} {form:10s} {secs * 1e6:10.1f} us {flops / secs / 1e12:8.2f} TFLOP/s "
                      f"x{metrics[f'{key}_speedup_vs_bf16'] or 0:5.2f} vs bf16  f8 GEMM: {F8_CALL in hlo}  "
                      f"rel_err {rel:.2e}  max_err {worst:.2e}  compile {compile_s:.1f} s", flush=True)
    config = {"rows": list(args.rows), "shapes": {k: list(v) for k, v in args.shapes.items()}, "forms": args.forms,
              "reps": args.reps, "inner": args.inner, "custom_calls": calls, "errors": errors,
              "method": "benchmarks/fp8_matmul.py docstring"}
    result = result_files.make_result(benchmark=BENCHMARK, model=args.model + ("-tiny" if args.tiny else ""),
                                      dev=dev, config=config, ceilings={}, metrics=metrics)
    path = result_files.write_result(result, devtag=dev["devtag"], results_dir=args.results_dir, out=args.out)
    print(f"result {path}")
    return result


if __name__ == "__main__":
    main()
