"""dispatch: where the host's time of a batch-1 decode step goes (issue 11: the latency and 0.5B rows).

With async scheduling the wall time of a decode step is at least the host's own loop: building the inputs, putting
the step and its sampler on the device (JAX dispatch, then XLA launching the program's kernels from the calling
thread), and reading the previous step's token. This measures each part on the engine's own runner, at its batch-1
decode bucket, on rows of padding (the same program and the same kernels as a real decode step; every KV write is
dropped):

  build_us          build_step_input + build_tensors + choose_mode (the engine's host bookkeeping before dispatch)
  pack_us           packing.pack of the step and of the sampler inputs (the two host-to-device buffers)
  enqueue_step_us   the jitted step's call, from call to return, with the device idle before it
  enqueue_sample_us the sampler's call, likewise
  enqueue_noop_us   a jitted function taking the same arguments (parameters, KV cache) that returns one scalar:
                    JAX's argument handling alone, without the model's kernels
  roundtrip_us      step + sampler + reading the token, one after another (no overlap): device time + launch
  pipelined_us      the same with step N+1 dispatched before step N's token is read, as the engine runs
  steps_*           with --num-scheduler-steps K > 1: the K-step decode program's enqueue, and its round trip and
                    pipelined time divided by K (per token a row)

Each figure is the median over --iters calls. The compiled decode step's text gives the number of kernels its entry
computation launches (fusions, custom calls, library calls) and how many of them XLA put into command buffers (CUDA
graphs: one launch for many kernels). Run it under several XLA_FLAGS (gpu_campaign.sh's dispatch-M stage) to see
what command buffers change; --tag names the variant in the result file.

With --kernels N, the device's side too: N round trips of the decode program (the K-step one with
--num-scheduler-steps K) under the profiler, every kernel with its time a call, its calls a token and its time a
token, and where it comes from (the compiled program's metadata: the source line and the op of the fusion's root),
so the per-layer small kernels between the GEMMs show by name (`kernels` in the result; `device_us_per_token`).

  python benchmarks/dispatch.py --model qwen2-0.5b-instruct --out $OUT
  python benchmarks/dispatch.py --model tiny --scale 0.05 --skip-warmup      # CPU smoke run
"""

from __future__ import annotations

import dataclasses
import os
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cli_args  # noqa: E402
import engine_setup  # noqa: E402
import model_specs  # noqa: E402
import profiling  # noqa: E402
import result_files  # noqa: E402

BENCHMARK = "dispatch"


def parse(argv=None):
    p = cli_args.base_parser(__doc__.splitlines()[0])
    w = p.add_argument_group("workload")
    w.add_argument("--iters", type=int, default=200, help="calls timed per figure; the median is reported")
    w.add_argument("--context", type=int, default=256, help="max_model_len of the engine (a latency-sized one)")
    w.add_argument("--kernels", type=int, default=0, metavar="N",
                   help="also profile N round trips of the decode program: each kernel's time and origin")
    return p.parse_args(argv)


def _median_us(fn, iters: int) -> float:
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e6


def hlo_kernels(text: str) -> dict:
    """Counts, in a compiled program's text, the instructions of its entry computation that launch work (fusions,
    custom calls incl. Pallas kernels and cuBLAS GEMMs, copies) and the command-buffer calls that group kernels."""
    entry = text[text.find("ENTRY"):] if "ENTRY" in text else text
    entry = entry[:entry.find("\n}\n")] if "\n}\n" in entry else entry
    counts = {"fusion": len(re.findall(r"= [^=]*\bfusion\(", entry)),
              "custom_call": len(re.findall(r"\bcustom-call\(", entry)),
              "copy": len(re.findall(r"\bcopy(-start)?\(", entry)),
              "command_buffer_calls": len(re.findall(r"command_buffer", entry)),
              "while": len(re.findall(r"\bwhile\(", entry)),
              "conditional": len(re.findall(r"\bconditional\(", entry))}
    counts["command_buffer_computations"] = len(re.findall(r"^%?command_buffer[\w.]*\s", text, re.M))
    counts["triton_calls"] = len(re.findall(r"__gpu\$xla\.gpu\.triton", text))
    counts["gemm_calls"] = len(re.findall(r"__cublas", text))
    return counts


def hlo_sources(text: str) -> dict[str, str]:
    """Kernel name (as the profiler shows it: '.' and '-' as '_') -> "file:line op" of each fusion and custom call in
    a compiled program's text, from the metadata XLA keeps on the instruction (its root op's)."""
    out = {}
    for m in re.finditer(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=[^\n]*?\b(?:fusion|custom-call)\([^\n]*", text, re.M):
        line = m.group(0)
        src = re.search(r'source_file="([^"]*)"\s+source_line=(\d+)', line)
        op = re.search(r'op_name="([^"]*)"', line)
        where = f"{Path(src.group(1)).name}:{src.group(2)}" if src else "?"
        what = "/".join(op.group(1).split("/")[-2:]) if op else ""
        out[re.sub(r"[.\-]", "_", m.group(1))] = f"{where} {what}".strip()
    return out


def kernel_table(profile: dict, sources: dict[str, str], tokens: int) -> list[dict]:
    """The profile's kernels, per token of a row: time a call, calls and time a token, origin."""
    rows = []
    for k in profile.get("top_kernels", []):
        name = k["name"]
        rows.append({"name": name, "us_per_call": round(k["ms"] * 1e3 / max(k["count"], 1), 2),
                     "calls_per_token": round(k["count"] / tokens, 2), "us_per_token": round(k["ms"] * 1e3 / tokens, 2),
                     "source": sources.get(re.sub(r"[.\-]", "_", name), "")})
    return rows


def main(argv=None) -> dict:
    args = parse(argv)
    spec = model_specs.resolve_model(args.model)
    engine_setup.setup_jax(args)
    import jax
    import jax.numpy as jnp

    from qwenjax.engine.llm_engine import WARMUP_MODES
    from qwenjax.worker import packing, sampler
    from qwenjax.worker.lockstep import to_host
    from qwenjax.worker.model_runner import dummy_input

    cfg = model_specs.model_config(spec)
    dev = result_files.device_info()
    kwargs = engine_setup.engine_kwargs(args, max_model_len=cli_args.round_up(args.context, args.block_size),
                                        max_num_seqs=1, max_num_batched_tokens=None, decode_buckets=(1,),
                                        prefill_buckets=(16,))
    llm, startup = engine_setup.build_llm(spec, kwargs)
    eng = llm.llm_engine
    runner = eng.runner
    width = eng.scheduler_config.max_pages_per_seq
    mode = dataclasses.replace(WARMUP_MODES[0], penalties=True)  # greedy, as the latency workload; the engine's mode

    def build():
        inp = dummy_input(1, 1, runner.num_pages, runner.page_size, width, runner.scratch_slot)
        tensors = sampler.build_tensors([], num_rows=1, vocab_size=cfg.vocab_size, with_history=False)
        return inp, tensors

    inp, tensors = build()
    slots = inp.slots

    def enqueue_step():
        return runner._run_step(inp, False)

    def sample(logits):
        i_buf, f_buf, layout = packing.pack((tensors, slots))
        out, _, runner.last_tokens = runner._sample(logits, runner.penalties, runner.last_tokens, i_buf, f_buf,
                                                    mode=mode, layout=layout)
        return out

    def roundtrip():
        to_host(sample(enqueue_step()).token_ids)

    for _ in range(5):  # compiled at start-up unless --skip-warmup; these calls also settle the allocator
        roundtrip()
    it = args.iters

    def timed_enqueue(fn):
        """fn's call time with an idle device before each call (its outputs waited for after the timing)."""
        ts = []
        for _ in range(it):
            jax.block_until_ready(runner.kv_cache)
            t0 = time.perf_counter()
            out = fn()
            ts.append(time.perf_counter() - t0)
            jax.block_until_ready(out)
        return statistics.median(ts) * 1e6

    metrics = {"build_us": _median_us(build, it),
               "pack_us": _median_us(lambda: (packing.pack(inp), packing.pack((tensors, slots))), it),
               "enqueue_step_us": timed_enqueue(enqueue_step)}
    logits = enqueue_step()
    metrics["enqueue_sample_us"] = timed_enqueue(lambda: sample(logits).token_ids)
    noop = jax.jit(lambda leaves, kv, x: x + 1)
    x0 = jnp.zeros((), jnp.int32)
    noop(runner._param_leaves, runner.kv_cache, x0).block_until_ready()
    metrics["enqueue_noop_us"] = timed_enqueue(lambda: noop(runner._param_leaves, runner.kv_cache, x0))
    metrics["roundtrip_us"] = _median_us(roundtrip, it)

    def pipelined(n: int) -> float:
        prev = sample(enqueue_step())
        t0 = time.perf_counter()
        for _ in range(n):
            cur = sample(enqueue_step())
            to_host(prev.token_ids)
            prev = cur
        to_host(prev.token_ids)
        return (time.perf_counter() - t0) / n * 1e6

    pipelined(10)
    metrics["pipelined_us"] = pipelined(it)
    K = eng.scheduler_config.num_scheduler_steps
    if K > 1:  # multi-step decode: one dispatch of K steps, its figures per token (per decode step)
        def steps():
            return runner.execute_steps(inp, tensors, mode, K)

        metrics["enqueue_steps_us"] = timed_enqueue(lambda: steps().token_ids)
        metrics["steps_roundtrip_us_per_token"] = _median_us(lambda: to_host(steps().token_ids), it) / K

        def steps_pipelined(n: int) -> float:
            prev = steps()
            t0 = time.perf_counter()
            for _ in range(n):
                cur = steps()
                to_host(prev.token_ids)
                prev = cur
            to_host(prev.token_ids)
            return (time.perf_counter() - t0) / n / K * 1e6

        steps_pipelined(5)
        metrics["steps_pipelined_us_per_token"] = steps_pipelined(max(it // K, 10))
    metrics["num_args_step"] = len(runner._param_leaves) + sum(len(layer) for layer in runner.kv_cache) + 4

    i_buf, f_buf, layout = packing.pack(inp)
    with jax.set_mesh(runner.mesh):
        text = runner._step.lower(runner._param_leaves, runner.kv_cache, runner.penalties, runner.last_tokens,
                                  i_buf, f_buf, has_context=False, layout=layout).compile().as_text()
    kernels = hlo_kernels(text or "")
    print(f"compiled decode step: {len(text or '')} characters of text; entry: {kernels}", flush=True)

    config = {"batch": 1, "context": args.context, "iters": it, "xla_flags": os.environ.get("XLA_FLAGS", ""),
              "decode_step_hlo": kernels}
    table = []
    if args.kernels:
        table = profile_kernels(runner, inp, tensors, mode, K, roundtrip, args.kernels, text or "", config, metrics)
    config.update(engine_setup.engine_config(llm, kwargs, startup))
    result = result_files.make_result(benchmark=BENCHMARK, model=spec.name, dev=dev, config=config, ceilings={},
                                      metrics=metrics)
    path = result_files.write_result(result, devtag=dev["devtag"], results_dir=args.results_dir, out=args.out)
    rows = [("model", spec.name), ("device", dev["device"]), ("XLA_FLAGS", config["xla_flags"] or "-")]
    rows += [(k, f"{v:.1f}" if isinstance(v, float) else v) for k, v in metrics.items()]
    rows += [("entry kernels / command buffers", f"{kernels['fusion']} fusions, {kernels['custom_call']} custom "
              f"calls, {kernels['command_buffer_calls']} command-buffer calls"), ("result", str(path))]
    rows += [(f"{k['name'][:48]}", f"{k['us_per_call']:.2f} us x {k['calls_per_token']:g} = {k['us_per_token']:.1f} "
              f"us/token  {k['source'][:70]}") for k in table]
    result_files.print_table(f"{BENCHMARK} {spec.name}", rows)
    return result


def profile_kernels(runner, inp, tensors, mode, K: int, roundtrip, n: int, step_text: str, config: dict,
                    metrics: dict) -> list[dict]:
    """--kernels: n round trips of the decode program under the profiler (Python and host tracers off); fills
    config["kernels"] and metrics["device_us_per_token"] (every kernel's time a token, the device's own cost)."""
    import tempfile

    import jax

    from qwenjax.worker import packing
    from qwenjax.worker.lockstep import to_host

    if K > 1:
        def fn():
            to_host(runner.execute_steps(inp, tensors, mode, K).token_ids)

        i_buf, f_buf, layout = packing.pack((inp, tensors))
        with jax.set_mesh(runner.mesh):
            text = runner._decode_steps.lower(runner._param_leaves, runner.kv_cache, runner.penalties,
                                              runner.last_tokens, i_buf, f_buf, layout=layout, mode=mode,
                                              num_steps=K).compile().as_text() or ""
    else:
        fn, text = roundtrip, step_text
    for _ in range(3):
        fn()
    logdir = tempfile.mkdtemp(prefix="qwenjax-kernels-")
    with profiling.quiet_trace(logdir):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        wall = time.perf_counter() - t0
    if jax.default_backend() == "cpu":
        config["kernels_note"] = "JAX runs on the CPU: no device kernels to list"
        return []
    prof = profiling.device_busy_from_trace(logdir, wall, top=80)
    tokens = n * K
    table = kernel_table(prof, hlo_sources(text), tokens)
    config["kernels"] = table
    config["kernels_profile"] = {k: prof.get(k) for k in ("device_busy", "device_active_s", "events")}
    metrics["device_us_per_token"] = round((prof.get("device_active_s") or 0.0) * 1e6 / tokens, 2)
    return table


if __name__ == "__main__":
    main()
