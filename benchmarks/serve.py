"""serve: the OpenAI-compatible server under load, in the style of vLLM's serving benchmark (BENCHMARKS.md `serve`).

Workload: `fixed` (throughput-fixed's requests: 512 x (512 -> 256)) or `random` (prompt / output lengths uniform in
ranges, seed 0); seeded random prompt token ids sent as `prompt` token lists to /v1/completions (so lengths are
exact), greedy, `ignore_eos`, streamed with `stream_options.include_usage`. Requests go out at `--request-rate`
(Poisson, or gamma with `--burstiness`; default: all at once) with at most `--max-concurrency` in flight (default
512).

Per request: TTFT = send to first text chunk; ITL = gaps between text chunks; TPOT = (latency - TTFT) / (tokens - 1)
with tokens from the server's usage; each request must return exactly its output length. Figures: ttft_ms_*, tpot_ms_*,
itl_ms_* (mean, p50, p99), req_s, output_tok_s (generated tokens / duration of the run), total_tok_s, and with an
offline figure for the same workload and engine, speedup_vs_offline = output_tok_s / offline output_tok_s.

By default the script builds the engine itself (random weights in `--model`'s shape, like the other benchmarks),
optionally runs the same workload offline through LLM.generate first (`--compare-offline`), then serves it with
uvicorn on loopback as `python -m server` does, the engine in an engine core process of its own, and drives it from
client subprocesses (so the clients' Python does not compete with the server's for one interpreter). The device
belongs to one process at a time: the ceilings and the offline run happen in a child process that exits before the
served engine starts (same engine arguments, so the same engine). `--disable-frontend-multiprocessing` serves from a
thread of this process instead, on the very engine of the offline run. With `--base-url` it only drives a server that
is already running. The load generator is serve_client.py, the server's thread serve_server.py, and what is measured
in the serving process (GC time, stack samples, CPU seconds) serve_probes.py.

  python benchmarks/serve.py --model qwen2-7b-instruct --compare-offline --out $OUT      # the issue's bar
  python benchmarks/serve.py --model tiny --scale 0.02 --compare-offline                 # CPU smoke run
  python benchmarks/serve.py --base-url http://localhost:8000 --model qwen2-7b-instruct --request-rate 8
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cli_args  # noqa: E402
import device_ceilings  # noqa: E402
import engine_setup  # noqa: E402
import model_specs  # noqa: E402
import result_files  # noqa: E402
import workloads  # noqa: E402
from serve_client import client_main, run_clients  # noqa: E402
from serve_probes import _GCTimer, _proc_cpu, _StackSampler, _thread_cpu  # noqa: E402
from serve_server import _server_info, _Uvicorn, gc_threshold, server_gc_threshold  # noqa: E402


def parse(argv=None):
    p = cli_args.base_parser(__doc__.splitlines()[0])
    w = p.add_argument_group("workload")
    w.add_argument("--dataset", choices=("fixed", "random"), default="fixed")
    w.add_argument("--num-prompts", type=int, default=None, help="default 512 (fixed) / 500 (random), x --scale")
    w.add_argument("--prompt-len", type=int, default=None, help="fixed: default 512 (x --scale)")
    w.add_argument("--output-len", type=int, default=None, help="fixed: default 256 (x --scale)")
    w.add_argument("--prompt-range", type=cli_args._int_list, default=None, help="random: lo,hi (default 128,1024)")
    w.add_argument("--output-range", type=cli_args._int_list, default=None, help="random: lo,hi (default 64,512)")
    w.add_argument("--request-rate", type=float, default=math.inf, help="requests/s; inf sends all at once")
    w.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrivals; 1 = Poisson")
    w.add_argument("--max-concurrency", type=int, default=512, help="requests in flight at most")
    s = p.add_argument_group("server")
    s.add_argument("--base-url", default=None, help="drive this running server instead of starting one")
    s.add_argument("--served-model-name", default=None, help="`model` to send (default: the server's first)")
    s.add_argument("--compare-offline", action="store_true",
                   help="first run the same workload through LLM.generate on the same engine (speedup_vs_offline)")
    s.add_argument("--offline-output-tok-s", type=float, default=None,
                   help="an offline output_tok_s measured elsewhere on this workload, for speedup_vs_offline")
    s.add_argument("--http", default="auto", choices=("auto", "h11", "httptools"),
                   help="uvicorn's HTTP implementation (auto: httptools when installed)")
    s.add_argument("--stream-interval", type=int, default=1, help="the server's --stream-interval")
    s.add_argument("--gc-freeze", action=argparse.BooleanOptionalAction, default=True,
                   help="gc.collect() + gc.freeze() before each timed run (offline and served alike), as python -m "
                        "server does after start-up")
    s.add_argument("--frontend-gc-threshold", type=int, default=None,
                   help="gc.set_threshold(N) in the serving process for the served run; default: python -m server's "
                        "(server/__main__.py GC_THRESHOLD0); another value gives the result file a -gcN suffix")
    s.add_argument("--disable-frontend-multiprocessing", action="store_true",
                   help="the server's flag: its engine runs in a thread of the server's process (and the offline "
                        "run on that same engine) instead of an engine process of its own")
    s.add_argument("--sample-stacks", action="store_true",
                   help="sample the event-loop thread's Python stacks during the served run, and the engine "
                        "thread's (thread mode) or the engine reader thread's (process mode)")
    s.add_argument("--client-procs", type=int, default=max(1, min(4, (os.cpu_count() or 2) // 4)),
                   help="client processes sharing the requests")
    s.add_argument("--client-only", default=None, help=argparse.SUPPRESS)  # internal: workload JSON path
    s.add_argument("--client-json", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.workload = args.dataset  # throughput.py's name, for its helpers
    import throughput

    return throughput.fill_workload_defaults(args, random_prompts=500)


def _device_phase(args, spec, prompts, olens, keep_llm: bool = False) -> dict:
    """Everything that needs the device before serving: device info, the engine's arguments (sized against the
    device's memory), ceilings, the engine's start-up and the offline run (--compare-offline). Runs in a child process
    unless the server's engine runs in a thread (then `llm` is kept for it)."""
    import throughput

    engine_setup.setup_jax(args)
    cfg = model_specs.model_config(spec)
    dev = result_files.device_info()
    kwargs = engine_setup.engine_kwargs(args, **throughput.engine_defaults(args, prompts, olens))
    ceilings = device_ceilings.measure_ceilings(cfg, mode=args.ceilings, platform=dev["platform"],
                                                gemm_tokens=kwargs["max_num_batched_tokens"] or 8192)
    llm, startup = engine_setup.build_llm(spec, kwargs)
    gct = _GCTimer()
    workloads.warm_generate(llm, prompts)
    out = {"dev": dev, "kwargs": kwargs, "ceilings": ceilings,
           "config": engine_setup.engine_config(llm, kwargs, startup), "metrics": {}, "offline": None}
    if args.compare_offline:
        params = [workloads.greedy(o) for o in olens]
        before = workloads.stats_snapshot(llm)
        if args.gc_freeze:
            gc.collect()
            gc.freeze()
        gct.active = True
        cpu0 = time.thread_time()
        outs, wall = workloads.timed_generate(llm, prompts, params)
        out["config"]["offline_thread_cpu_s"] = round(time.thread_time() - cpu0, 3)
        gct.active = False
        out["config"]["offline_gc"] = gct.report()
        off_stats = workloads.stats_delta(before, workloads.stats_snapshot(llm))
        got = sum(len(o.outputs[0].token_ids) for o in outs)
        if got != sum(olens):
            raise RuntimeError(f"offline run generated {got} tokens, wanted {sum(olens)}")
        out["offline"] = got / wall
        out["metrics"].update(offline_wall_s=wall, offline_step_ms=1e3 * wall / max(off_stats["steps"], 1),
                              offline_steps=off_stats["steps"])
        out["config"]["offline_engine_stats"] = off_stats
    if keep_llm:
        out["llm"] = llm
    return out


def main(argv=None) -> dict | None:
    args = parse(argv)
    if args.client_only:
        return client_main(args)
    import throughput

    spec = model_specs.resolve_model(args.model)
    prompts, olens = throughput.make_workload(args, spec.config["vocab_size"])
    config = {"dataset": args.dataset, "num_requests": args.num_prompts, "seed": args.seed, "dtype": args.dtype,
              "request_rate": "inf" if math.isinf(args.request_rate) else args.request_rate,
              "burstiness": args.burstiness, "max_concurrency": args.max_concurrency, "endpoint": "/v1/completions",
              "greedy": True, "ignore_eos": True, "stream": True, "prompt_tokens": sum(map(len, prompts)),
              "output_tokens": sum(olens)}
    if args.dataset == "fixed":
        config.update(prompt_len=args.prompt_len, output_len=args.output_len,
                      standard=(args.num_prompts, args.prompt_len, args.output_len, args.max_concurrency) ==
                      (512, 512, 256, 512) and math.isinf(args.request_rate))
    else:
        config.update(prompt_len_range=list(args.prompt_range), output_len_range=list(args.output_range))
    metrics_extra, ceilings = {}, {}
    offline = args.offline_output_tok_s

    if args.base_url:
        dev = {"device": f"remote server at {args.base_url}", "devtag": "remote", "platform": "remote", "count": None}
        client = run_clients(args, args.base_url, prompts, olens)
    else:
        process = not args.disable_frontend_multiprocessing
        if process:
            # One process owns the device at a time: the ceilings and the offline run happen in a child that exits
            # before the served engine's own process starts (this one never initialises JAX, as python -m server).
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                phase = pool.submit(_device_phase, args, spec, prompts, olens).result()
        else:
            phase = _device_phase(args, spec, prompts, olens, keep_llm=True)
        dev, ceilings, kwargs = phase["dev"], phase["ceilings"], phase["kwargs"]
        config.update(phase["config"])
        metrics_extra.update(phase["metrics"])
        offline = phase["offline"] or offline
        from qwenjax.config import EngineArgs
        from qwenjax.engine.async_llm import AsyncLLMEngine
        from server.app import create_app

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        logging.getLogger("qwenjax.server").setLevel(logging.WARNING)
        logging.getLogger("httpx").setLevel(logging.WARNING)
        if process:
            if args.compilation_cache_dir:  # the engine's process finds the programs the device phase compiled
                os.environ.update(JAX_COMPILATION_CACHE_DIR=os.path.abspath(args.compilation_cache_dir),
                                  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
                                  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
            engine = AsyncLLMEngine(EngineArgs(model=spec.dir, load_format="dummy", **kwargs),
                                    stream_interval=args.stream_interval)
        else:
            llm = phase["llm"]
            # Served from a cold prefix cache, like the offline run: the offline run's pages would otherwise turn
            # every served prompt into a prefix hit (one context-prefill step each), which is another workload.
            llm.reset_prefix_cache()
            engine = AsyncLLMEngine(llm.llm_engine, stream_interval=args.stream_interval)
        gct = _GCTimer()
        try:
            with _Uvicorn(create_app(engine, served_model_names=[spec.name]), args.http) as srv:
                # The server's own first requests, on reversed prompts: nothing they cache is a prefix of the run's.
                warm = [p[::-1] for p in prompts[:8]]
                run_clients(args, srv.url, warm, [4] * len(warm))
                mark = {}

                def cpu():
                    eng = _proc_cpu(engine.engine_pid) if process else _thread_cpu(engine._thread.native_id)
                    return {"loop": _thread_cpu(srv.thread.native_id), "engine": eng}

                def at_start():
                    mark.update(wall=time.time(), stats=dict(vars(engine.engine.stats)), steps=engine.num_steps,
                                step_s=engine.step_seconds, idle_s=engine.idle_seconds_now(), cpu=cpu())

                if args.gc_freeze:
                    gc.collect()
                    gc.freeze()
                gc.set_threshold(gc_threshold(args), *gc.get_threshold()[1:])  # as python -m server does
                config["server_gc_threshold"] = list(gc.get_threshold())
                gct.active = True
                threads = {"loop": srv.thread.native_id}
                threads.update({"reader": engine._client._reader.native_id} if process else
                               {"engine": engine._thread.native_id})
                sampler = _StackSampler(threads) if args.sample_stacks else contextlib.nullcontext()
                with sampler:
                    client = run_clients(args, srv.url, prompts, olens, at_start)
                gct.active = False
                config["server_gc"] = gct.report()
                if args.sample_stacks:
                    config["stack_samples"] = sampler.report()
                    for name, rows in config["stack_samples"].items():
                        print(f"-- {name} thread, top stacks")
                        for frac, key in rows:
                            print(f"  {frac:6.3f}  {key}")
                stats = workloads.stats_delta(mark["stats"], dict(vars(engine.engine.stats)))
                steps, step_s = engine.num_steps - mark["steps"], engine.step_seconds - mark["step_s"]
                # Idle within the clients' window only (duration_s): not before their first request left (a
                # client that warmed up late), nor after their last response (idle now, while the clients exit).
                # The engine's last step ended `drain` seconds before the clients' last response: the frontend's
                # backlog of outputs (0 when the engine kept pace).
                idle_s = engine.idle_seconds_now() - mark["idle_s"] - max(0.0, client["t_start"] - mark["wall"])
                drain = 0.0
                if engine.idle_since is not None:
                    idle_now, since_end = time.monotonic() - engine.idle_since, max(0.0, time.time() - client["t_end"])
                    idle_s -= min(idle_now, since_end)
                    drain = max(0.0, idle_now - since_end)
                config["client_start_delay_s"] = round(client["t_start"] - mark["wall"], 4)
                cpu_end = cpu()
        finally:
            engine.shutdown()
        dur = client["metrics"]["duration_s"]
        config["engine_stats"] = stats
        config["server"] = _server_info(srv)
        config["server"]["stream_interval"] = args.stream_interval
        config["server"]["engine"] = "process" if process else "thread"
        # The engine loop's time over the run: in engine.step() (busy), blocked for requests with none unfinished
        # (idle), and the rest (between steps: applying commands, collecting and sending the step's outputs).
        metrics_extra.update(server_step_ms=1e3 * step_s / max(steps, 1), server_engine_busy=step_s / dur,
                             server_steps=steps, server_engine_idle_s=idle_s,
                             server_engine_between_steps_s=max(0.0, dur - step_s - idle_s),
                             server_output_drain_s=drain)
        if cpu_end["loop"] is not None:  # CPU seconds of the server's loop thread and its engine over the timed run
            config["server"]["loop_thread_cpu_s"] = round(cpu_end["loop"] - mark["cpu"]["loop"], 3)
            config["server"]["engine_process_cpu_s" if process else "engine_thread_cpu_s"] = \
                round(cpu_end["engine"] - mark["cpu"]["engine"], 3)
            config["server"]["loop_cpu_us_per_token"] = round(1e6 * config["server"]["loop_thread_cpu_s"] /
                                                              sum(olens), 2)
    metrics = dict(client["metrics"])
    metrics.update(metrics_extra)
    if offline:
        metrics["offline_output_tok_s"] = offline
        metrics["speedup_vs_offline"] = metrics["output_tok_s"] / offline
    config["errors"] = client["errors"]
    result = result_files.make_result(benchmark="serve", model=spec.name, dev=dev, config=config, ceilings=ceilings,
                                      metrics=metrics)
    name = None
    if gc_threshold(args) != server_gc_threshold():
        name = result_files.result_name(f"serve-gc{gc_threshold(args)}", spec.name, dev["devtag"])
    path = result_files.write_result(result, devtag=dev["devtag"], results_dir=args.results_dir, out=args.out,
                                     name=name)
    rows = [("model", spec.name), ("device", dev["device"]), ("requests ok / failed",
                                                              f"{metrics['completed']} / {metrics['failed']}")]
    rows += [(k, metrics[k]) for k in ("duration_s", "req_s", "output_tok_s", "total_tok_s", "ttft_ms_mean",
                                       "ttft_ms_p50", "ttft_ms_p99", "tpot_ms_mean", "tpot_ms_p50", "tpot_ms_p99",
                                       "itl_ms_mean", "itl_ms_p50", "itl_ms_p99", "chunks_per_token",
                                       "server_step_ms", "server_engine_busy", "server_engine_idle_s",
                                       "server_engine_between_steps_s", "server_output_drain_s", "server_steps",
                                       "offline_step_ms",
                                       "offline_steps") if metrics.get(k) is not None]
    if offline:
        rows += [("offline_output_tok_s", offline), ("speedup_vs_offline", metrics["speedup_vs_offline"])]
    rows.append(("result", str(path)))
    result_files.print_table(f"serve {spec.name}", rows)
    if metrics["failed"]:
        raise SystemExit(f"{metrics['failed']} requests failed, e.g. {client['errors'][:2]}")
    return result


if __name__ == "__main__":
    main()
