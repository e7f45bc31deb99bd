"""python -m server [MODEL] [--model PATH_OR_HUB_ID] [--mesh N] ...: the OpenAI-compatible server (vLLM's flags).

`qwenjax serve MODEL [flags]` is the same (vLLM's `vllm serve`); `--config FILE.yaml` reads flags from a file.

Loads and compiles the model before binding the port, then serves until interrupted. With no --model it serves the
built-in default model (random weights, real Qwen2 tokenizer). The engine runs in its own process (the engine core:
JAX, the model, scheduling, detokenization), this one serves HTTP; --disable-frontend-multiprocessing runs the
engine in a thread of this process instead (multi-host runs always do).
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys

from qwenjax.config import EngineArgs
from server.arg_parser import ServerArgumentParser, json_object
from server.data_parallel import (DATA_PARALLEL_ENGINE_FLAGS, add_data_parallel_flags, check_data_parallel,
                                  data_parallel_engine, uses_data_parallel)
from server.http_options import add_cors, add_http_flags, check_http_options, uvicorn_options
from server.limits import DEFAULT_MAX_REQUEST_BODY_BYTES
from server.lora import check_lora_modules
from server.tool_parsers import TOOL_CALL_PARSERS, check_tool_options

# Python's gen-0 collection threshold in the serving process (its default is 700). Streaming makes many short-lived
# objects per token (chunk strings, deltas, events); on the H100 host the default ran ~390 gen-0 collections in a
# 13 s benchmark run. Measured with benchmarks/serve.py (7B, 512 concurrent streams, H100, 5fd4a06, two runs
# each): 0.931 / 0.938 of offline at 700, 0.950 / 0.972 at 50,000.
GC_THRESHOLD0 = 50_000


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 8,64,256, got {text!r}") from None


def make_parser(prog: str = "python -m server") -> argparse.ArgumentParser:
    p = ServerArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help="the model to serve, as --model (vLLM's `vllm serve MODEL`); wins over --model")
    p.add_argument("--config", default=None, metavar="FILE.yaml",
                   help="read flags from a YAML file (keys: long flag names without '--'); the command line "
                        "overrides it")
    s = p.add_argument_group("server")
    s.add_argument("--host", default="localhost", help="address to bind")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--served-model-name", nargs="+", default=None,
                   help="names clients may send as `model` (the first is reported); default: --model")
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer <key>' on every API route")
    s.add_argument("--chat-template", default=None, help="a Jinja chat template, or a file holding one")
    s.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='tool_choice "auto" (the default when a request has tools): the model\'s text is parsed '
                        "into tool calls by --tool-call-parser; without it such requests get a 400")
    s.add_argument("--tool-call-parser", default=None, choices=TOOL_CALL_PARSERS,
                   help="the format of the model's tool calls: hermes (Qwen2.5: <tool_call>{...}</tool_call>)")
    s.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])
    s.add_argument("--disable-log-stats", action="store_true", help="no periodic throughput log line")
    s.add_argument("--stream-interval", type=int, default=1,
                   help="send each stream's new text every N engine steps (first and last at once); >1 lightens "
                        "the server's per-token work under heavy load")
    s.add_argument("--disable-log-requests", action="store_true", help="accepted for vLLM compatibility")
    s.add_argument("--max-request-body-bytes", type=int, default=DEFAULT_MAX_REQUEST_BODY_BYTES,
                   help="a request body larger than this gets 413 before it is read or parsed (16 MiB)")
    s.add_argument("--keep-alive-on-engine-death", action="store_true",
                   help="keep serving (every request 503, /health 503) after the engine dies, instead of exiting "
                        "non-zero within seconds so that a supervisor restarts the server (vLLM's default; vLLM's "
                        "VLLM_KEEP_ALIVE_ON_ENGINE_DEATH)")
    s.add_argument("--disable-frontend-multiprocessing", action="store_true",
                   help="run the engine in a thread of the server's process instead of its own process (the "
                        "engine's host work then shares one GIL with the HTTP event loop: slower under load)")

    e = p.add_argument_group("engine (shared with qwenjax.LLM)")
    e.add_argument("--model", default=None, help="checkpoint directory or Hugging Face id (cached offline); "
                   "default: the built-in tiny random Qwen2")
    e.add_argument("--tokenizer", default=None)
    e.add_argument("--mesh", "--tensor-parallel-size", "-tp", dest="tensor_parallel_size", type=int, default=1,
                   help="devices to shard the model over (tensor parallelism)")
    e.add_argument("--max-model-len", type=int, default=None)
    e.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    e.add_argument("--quantization", "-q", default=None)
    e.add_argument("--kv-cache-dtype", default="auto")
    e.add_argument("--dtype", default="auto")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--block-size", type=int, default=16)
    e.add_argument("--max-num-seqs", type=int, default=None,
                   help="most sequences running at once (default, as in vLLM's server: 1024 on a GPU of at least "
                        "70 GiB other than an A100, else 256)")
    e.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="most tokens one step carries (default, as in vLLM's server: 8192 on such a GPU, else "
                        "max(2048, min(8192, max model len)))")
    e.add_argument("--generation-config", default="auto",
                   help="'auto': the model's generation_config.json; 'vllm': none; or a directory holding one")
    e.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"])
    e.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="automatic prefix caching (on by default, as in vLLM)")
    e.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=None,
                   help="prompt chunks (at most 512 tokens) ride along with running decodes (on by default, as in "
                        "vLLM); off gives every prefill a step of its own")
    e.add_argument("--enable-expert-parallel", action="store_true",
                   help="MoE models: split the experts over the mesh (whole experts per device) instead of "
                        "splitting every expert's width")
    e.add_argument("--scheduling-policy", default="fcfs", help="fcfs, priority, spf (shortest prompt first), fair")
    e.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                   help="overlap host scheduling with the device: step N+1 is dispatched before step N's tokens "
                        "are read (on by default); off runs steps one at a time")
    e.add_argument("--num-scheduler-steps", type=int, default=1,
                   help="decode steps one dispatch runs on the device (multi-step decode): fewer host round trips "
                        "a token, tokens stream in groups of this many; 1 (the default) runs one step a dispatch")
    e.add_argument("--num-kv-pages", type=int, default=None, help="KV pages (default: sized from free memory)")
    e.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    e.add_argument("--trust-remote-code", action="store_true")
    e.add_argument("--skip-warmup", action="store_true", default=None,
                   help="compile each bucket on first use instead of at start-up (the default on a CPU)")
    e.add_argument("--compilation-cache-dir", default="auto",
                   help="JAX's persistent compilation cache, so a restart loads its compiled buckets: 'auto' "
                        "(~/.cache/qwenjax/jax-compilation-cache), a directory, or 'none'")
    e.add_argument("--distributed-coordinator", default=None,
                   help="host:port of process 0 when one model spans several hosts (jax.distributed)")
    e.add_argument("--num-processes", type=int, default=1, help="processes (hosts) in a multi-host run")
    e.add_argument("--process-id", type=int, default=0,
                   help="this process's index; process 0 serves HTTP, the others replay its steps")
    e.add_argument("--max-logprobs", type=int, default=20,
                   help="most logprobs / prompt_logprobs (and top_logprobs) a request may ask, as in vLLM; -1: the "
                        "vocabulary size")
    e.add_argument("--max-n", type=int, default=128,
                   help="most completions (n) one request may ask (OpenAI's limit for n); a larger n is a 400")
    e.add_argument("--decode-buckets", type=_int_tuple, default=None, help="e.g. 8,64,256")
    e.add_argument("--prefill-token-buckets", type=_int_tuple, default=None, help="e.g. 128,512,2048")
    add_vllm_engine_flags(e)
    add_lora_flags(p.add_argument_group("LoRA adapters (server/lora.py)"))
    add_data_parallel_flags(e)
    add_http_flags(s)
    return p


def add_lora_flags(lo) -> None:
    """Multi-LoRA serving, vLLM's flags (server/lora.py)."""
    lo.add_argument("--enable-lora", action="store_true", help="serve LoRA adapters over the base model")
    lo.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=PATH",
                    help="adapters to serve, each chosen by its name as a request's model (also vLLM's JSON form "
                         "'{\"name\": ..., \"path\": ...}')")
    lo.add_argument("--max-loras", type=int, default=1, help="adapters on the device at once (its slots)")
    lo.add_argument("--max-lora-rank", type=int, default=16, help="largest adapter rank (slots are padded to it)")
    lo.add_argument("--max-cpu-loras", type=int, default=None, help="adapters kept on the host (default max-loras)")
    lo.add_argument("--allow-runtime-lora-updating", action="store_true",
                    help="POST /v1/load_lora_adapter and /v1/unload_lora_adapter (or the environment's "
                         "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, vLLM's switch)")


def add_vllm_engine_flags(e) -> None:
    """Engine flags of vLLM's that vLLM command lines carry; what each does here is in its help."""
    e.add_argument("--enforce-eager", action="store_true",
                   help="vLLM: no CUDA graphs. Here: no start-up compile of every step shape (as --skip-warmup); "
                        "each shape compiles the first time a step needs it (start-up is faster, the first "
                        "requests of each shape wait for the compile). XLA always compiles: there is no eager mode")
    e.add_argument("--revision", default=None,
                   help="the revision (branch, tag or commit) of a hub id to take from the Hugging Face cache; "
                        "refused for a local directory")
    e.add_argument("--download-dir", default=None,
                   help="the Hugging Face cache directory to find a hub id in (default: HF_HOME's); nothing is "
                        "downloaded")
    e.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1,
                   help="only 1: pipeline parallelism is not implemented (use --tensor-parallel-size / --mesh)")
    e.add_argument("--hf-overrides", type=json_object, default=None, metavar="JSON",
                   help="config.json keys to replace, as a JSON object, e.g. YaRN to 128k tokens: "
                        "'{\"rope_scaling\": {\"type\": \"yarn\", \"factor\": 4.0, "
                        "\"original_max_position_embeddings\": 32768}}'")
    e.add_argument("--speculative-config", type=json_object, default=None, metavar="JSON",
                   help="speculative decoding, as vLLM's: '{\"method\": \"ngram\", \"num_speculative_tokens\": 4, "
                        "\"prompt_lookup_max\": 4, \"prompt_lookup_min\": 2}' (n-gram prompt lookup; k in 1..8). "
                        "Or a draft model: '{\"model\": DIR, \"num_speculative_tokens\": 4}'. Turns async "
                        "scheduling off")



ENGINE_FLAGS = ("model", "tokenizer", "tensor_parallel_size", "max_model_len", "gpu_memory_utilization",
                "quantization", "kv_cache_dtype", "dtype", "seed", "block_size", "max_num_seqs",
                "max_num_batched_tokens", "generation_config", "load_format", "enable_prefix_caching",
                "enable_chunked_prefill", "num_kv_pages", "kv_cache_memory_bytes", "trust_remote_code", "skip_warmup",
                "decode_buckets", "prefill_token_buckets", "chat_template", "distributed_coordinator",
                "num_processes", "process_id", "scheduling_policy", "async_scheduling", "enable_expert_parallel",
                "num_scheduler_steps", "compilation_cache_dir", "max_logprobs", "max_n", "enable_lora", "max_loras",
                "max_lora_rank", "max_cpu_loras")


VLLM_ENGINE_FLAGS = ("enforce_eager", "revision", "download_dir", "pipeline_parallel_size", "hf_overrides",
                     "speculative_config")


def engine_args(ns: argparse.Namespace) -> EngineArgs:
    """The engine's arguments; ValueError for a bad value or a feature not built yet (named), before any loading."""
    kwargs = {k: getattr(ns, k) for k in ENGINE_FLAGS + VLLM_ENGINE_FLAGS + DATA_PARALLEL_ENGINE_FLAGS}
    kwargs["served_model_name"] = tuple(ns.served_model_name) if ns.served_model_name else None
    if str(kwargs["compilation_cache_dir"]).lower() in ("none", "off", ""):
        kwargs["compilation_cache_dir"] = None
    args = EngineArgs(**kwargs, usage_context="server")
    missing = args.unsupported()
    if missing:
        raise ValueError(f"not implemented yet in qwenjax: {', '.join(missing)}")
    return args


def served_names(ns: argparse.Namespace) -> list[str]:
    from qwenjax.models.default_model import DEFAULT_MODEL_NAME

    return list(ns.served_model_name or [ns.model or DEFAULT_MODEL_NAME])


def main(argv: list[str] | None = None, prog: str = "python -m server") -> None:
    ns = make_parser(prog).parse_args(argv)
    try:
        args = engine_args(ns)
        check_http_options(ns)
        check_data_parallel(ns)
        check_tool_options(ns.enable_auto_tool_choice, ns.tool_call_parser)
        check_lora_modules(ns.lora_modules, ns.enable_lora)
    except ValueError as e:
        sys.exit(f"error: {e}")

    import uvicorn

    from qwenjax.engine.async_llm import AsyncLLMEngine
    from qwenjax.engine.llm_engine import LLMEngine
    from server.app import create_app

    if args.num_processes > 1 and args.process_id != 0:
        # Several hosts: this process holds its shards and replays process 0's steps until process 0 stops.
        steps = LLMEngine(args).follow()
        logging.getLogger("qwenjax.server").info("process %d: process 0 stopped after %d steps", args.process_id,
                                                 steps)
        return
    log_interval_s = float("inf") if ns.disable_log_stats else 5.0
    try:
        if uses_data_parallel(args):
            engine = data_parallel_engine(args, ns, log_interval_s=log_interval_s, stream_interval=ns.stream_interval)
        else:
            engine = AsyncLLMEngine.from_engine_args(args, multiprocess=not ns.disable_frontend_multiprocessing,
                                                     log_interval_s=log_interval_s, stream_interval=ns.stream_interval)
    except (ValueError, NotImplementedError, FileNotFoundError, RuntimeError) as e:
        # Start-up errors a user can fix (bad flags, missing model, out of memory) get one line, not a traceback.
        sys.exit(f"error: {e}")
    server = None

    def stop_server() -> None:  # the engine died: exit so that a supervisor restarts us (vLLM's behaviour)
        server.should_exit = True

    try:
        app = create_app(engine, served_model_names=served_names(ns), api_key=ns.api_key, shutdown_engine=True,
                         max_request_body_bytes=ns.max_request_body_bytes,
                         on_engine_death=None if ns.keep_alive_on_engine_death else stop_server,
                         enable_auto_tool_choice=ns.enable_auto_tool_choice, tool_call_parser=ns.tool_call_parser,
                         lora_modules=ns.lora_modules or (),
                         allow_runtime_lora_updating=ns.allow_runtime_lora_updating)
    except ValueError as e:  # a bad --lora-modules adapter
        engine.shutdown()
        sys.exit(f"error: {e}")
    add_cors(app, ns)
    # Everything built so far (JAX, the model, the tokenizer) lives as long as the process: keep it out of the
    # garbage collector's full passes, which otherwise stall every request while they walk it.
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD0, *gc.get_threshold()[1:])
    logging.getLogger("qwenjax.server").info("serving %s on %s://%s:%d/v1", ", ".join(served_names(ns)),
                                             "https" if ns.ssl_certfile else "http", ns.host, ns.port)
    server = uvicorn.Server(uvicorn.Config(app, **uvicorn_options(ns)))
    server.run()
    if app.state.engine_died:
        sys.exit(f"error: the engine died ({engine.error}); the server stopped so that it can be restarted "
                 f"(--keep-alive-on-engine-death keeps it serving 503s instead)")


if __name__ == "__main__":
    main()
