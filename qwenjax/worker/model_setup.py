"""Start-up: resolve the checkpoint, load weights, size the KV cache from free memory, compile every bucket."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import jax

from qwenjax.config import EngineArgs, ModelConfig, batch_defaults, resolve_dtype
from qwenjax.layers.attention import decode_backend
from qwenjax.layers.fp8_kv import describe_scales, uses_scale
from qwenjax.models.convert import is_orbax_checkpoint, restore_params
from qwenjax.models.loader import load_model_config, load_params, resolve_model_path
from qwenjax.models.random_weights import random_params
from qwenjax.models.mesh_padding import describe as describe_padding
from qwenjax.models.mesh_padding import pad_for_mesh
from qwenjax.models.sharding import check_divisible, kv_sharding, make_mesh
from qwenjax.quantization.config import resolve_quant_config
from qwenjax.scheduler_config import SchedulerConfig
from qwenjax.tokenizer import default_tokenizer_dir, load_generation_defaults, load_tokenizer, resolve_tokenizer_dir
from qwenjax.worker.kv_cache import (
    MemoryInfo,
    allocate,
    device_memory,
    device_total_bytes,
    kv_dtype,
    page_bytes,
    plan_num_pages,
)
from qwenjax.worker.lora_fold import LoRAFold
from qwenjax.worker.lora_stacks import LoRAStacks, slot_rank
from qwenjax.worker.model_runner import ModelRunner
from qwenjax.worker.sampler import WARMUP_MODES

logger = logging.getLogger("qwenjax")

CPU_KV_CACHE_BYTES = 1 << 30  # pages budget where the device reports no memory (CPU), unless overridden


@dataclasses.dataclass
class LoadedModel:
    path: Path | None
    config: ModelConfig
    dtype: object
    tokenizer: object
    eos_token_ids: tuple[int, ...]
    sampling_defaults: dict
    scheduler_config: SchedulerConfig
    runner: ModelRunner
    num_pages: int
    load_seconds: float
    warmup_seconds: float


def load_model(args: EngineArgs, *, memory_source=None, random_weights: ModelConfig | None = None) -> LoadedModel:
    """Everything the engine needs on the device. `random_weights` skips the checkpoint (benchmarks)."""
    from qwenjax.models.default_model import DEFAULT_MODEL_NAME, default_model_dir

    t0 = time.perf_counter()
    if random_weights is not None:
        path, cfg = None, random_weights
    else:
        model = args.model or DEFAULT_MODEL_NAME
        if model == DEFAULT_MODEL_NAME and args.revision is not None:
            raise ValueError(f"revision={args.revision!r} picks a revision of a hub id in the Hugging Face cache; "
                             f"the built-in model {DEFAULT_MODEL_NAME} has none: give a hub id as the model")
        path = default_model_dir() if model == DEFAULT_MODEL_NAME else \
            resolve_model_path(model, revision=args.revision, download_dir=args.download_dir)
        cfg = load_model_config(path, args.hf_overrides_dict())
    if args.enable_lora and cfg.num_experts:
        raise NotImplementedError("enable_lora with a Qwen2-MoE model (LoRA on routed experts) is not "
                                  "implemented; adapters run on dense Qwen2 / Qwen2.5 models")
    dtype = resolve_dtype(args.dtype, cfg)
    tok_dir = resolve_tokenizer_dir(path, args.tokenizer) if path is not None else \
        (args.tokenizer or default_tokenizer_dir())
    tokenizer = load_tokenizer(tok_dir)
    defaults = _generation_defaults(args, path)
    eos = tuple(defaults.eos_token_ids) or tuple(x for x in (cfg.eos_token_id, tokenizer.eos_token_id) if x is not None)
    max_model_len = check_max_model_len(args.max_model_len, cfg)
    seqs, budget = batch_defaults(args.usage_context, device_total_bytes((memory_source or device_memory)()),
                                  jax.local_devices()[0].device_kind)
    sc = SchedulerConfig.build(max_model_len=max_model_len, max_num_seqs=args.max_num_seqs or seqs,
                               max_num_batched_tokens=args.max_num_batched_tokens or budget,
                               block_size=args.block_size,
                               decode_buckets=args.decode_buckets, prefill_token_buckets=args.prefill_token_buckets,
                               enable_chunked_prefill=args.enable_chunked_prefill,
                               num_scheduler_steps=args.num_scheduler_steps)
    if args.enable_expert_parallel and cfg.num_experts:  # the model and the param specs read it from cfg
        if cfg.num_experts % args.tensor_parallel_size == 0:
            cfg = dataclasses.replace(cfg, expert_parallel=True)
        else:  # same results either way; splitting each expert's width works on any mesh (models/mesh_padding.py)
            logger.warning("enable_expert_parallel: %d experts do not split over %d devices; the experts split on "
                           "their width instead (tensor parallel, the same results)", cfg.num_experts,
                           args.tensor_parallel_size)
    mesh = make_mesh(args.tensor_parallel_size)
    dummy = path is None or args.load_format == "dummy"
    quant = resolve_quant_config(args.quantization, path)  # `quantization=` omitted: read from the checkpoint
    # The loaders take the checkpoint's config and build the model padded for the mesh (models/mesh_padding.py);
    # the KV cache and its sizing take the padded one, whose kv heads are the ones stored.
    model_cfg = pad_for_mesh(cfg, args.tensor_parallel_size, quant)
    check_divisible(model_cfg, args.tensor_parallel_size)
    padding = describe_padding(cfg, model_cfg, args.tensor_parallel_size, jax.numpy.dtype(dtype).itemsize)
    if padding:
        logger.info("%s", padding)
    if dummy:
        graphdef, params = random_params(cfg, dtype, args.seed, mesh=mesh, quant=quant)
    elif is_orbax_checkpoint(path):
        if quant is not None:
            raise NotImplementedError("orbax checkpoints of quantized models are not supported yet")
        graphdef, params = restore_params(path, cfg, dtype, mesh=mesh)
    else:
        graphdef, params = load_params(path, cfg, dtype, mesh=mesh, quant=quant)
    jax.block_until_ready(params)
    load_s = time.perf_counter() - t0
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    logger.info("loaded %s: %.2f GiB of weights, %s in %.1f s", "random weights" if dummy else path,
                weight_bytes / 2**30, quant.describe() + f", the rest {dtype.name}" if quant else dtype.name, load_s)

    cache_dtype = kv_dtype(args.kv_cache_dtype, dtype)
    if uses_scale(cache_dtype):  # fp8_e4m3 pages: say where their scales come from, as vLLM does
        found, scales = describe_scales(params)
        if found:
            logger.info("KV cache %s: per-layer scales from the checkpoint (%s)", args.kv_cache_dtype, scales)
        else:
            logger.warning("KV cache %s: the checkpoint has no k/v scales, using 1.0; K/V values beyond +-448 "
                           "saturate (fp8_e5m2 needs no scales)", args.kv_cache_dtype)
    # (B, Q, has_context, D): decode steps, packed prefill steps ((R, T, False, 0)), one-row context prefill, and
    # mixed steps (D decode rows + one context-prefill row of Q tokens) when chunked prefill is on.
    buckets = [(b, 1, False, 0) for b in sc.decode_buckets] + [(r, t, False, 0) for r, t in sc.packed_buckets] + \
              [(1, q, True, 0) for _, q in sc.prefill_buckets] + \
              [(b, q, True, d) for d, b, q in sc.mixed_buckets]
    lora = None
    if args.enable_lora:  # the adapter slots take their memory before the KV cache is sized
        lora, params = lora_slots(model_cfg, args.lora_config, dtype, mesh, params, args.tensor_parallel_size,
                                  quant is not None)
    num_pages = _size_cache(args, model_cfg, sc, cache_dtype, graphdef, params, buckets, memory_source, mesh, lora)
    kv = allocate(model_cfg, num_pages, sc.block_size, cache_dtype, kv_sharding(mesh, model_cfg))
    runner = ModelRunner(graphdef, params, kv, vocab_size=cfg.vocab_size, max_num_seqs=sc.max_num_seqs,
                         block_table_width=sc.max_pages_per_seq, mesh=mesh, lora=lora)
    logger.info("decode attention: %s (head_dim %d, %s)", decode_backend(cfg.head_dim), cfg.head_dim,
                jax.default_backend())
    padded_gib = num_pages * (page_bytes(model_cfg, sc.block_size, cache_dtype) -
                              page_bytes(cfg, sc.block_size, cache_dtype)) / 2**30
    logger.info("KV cache: %d pages of %d tokens (%d tokens, %.2f GiB, %s)%s", num_pages, sc.block_size,
                num_pages * sc.block_size, num_pages * page_bytes(model_cfg, sc.block_size, cache_dtype) / 2**30,
                cache_dtype.name, f"; {padded_gib:.3f} GiB of it for padded kv heads" if padded_gib else "")
    warm = 0.0
    skip = args.skip_warmup if args.skip_warmup is not None else jax.default_backend() == "cpu"
    if args.enforce_eager:
        skip = True
        logger.info("enforce_eager: no start-up warm-up; each of the %d step buckets compiles the first time a step "
                    "needs it (XLA always compiles: there is no eager mode, and no CUDA graphs to leave out)",
                    len(buckets))
    elif skip and args.skip_warmup is None:
        logger.info("warm-up skipped on CPU: each step bucket compiles on first use (skip_warmup=False compiles "
                    "all %d at start-up)", len(buckets))
    if not skip:
        logger.info("warm-up: compiling %d step buckets%s and %d sampler modes", len(buckets),
                    " (each twice: with the LoRA stacks and, for steps without an adapter, without)"
                    if runner.lora is not None else "", len(WARMUP_MODES))
        try:
            warm = runner.warmup(buckets, list(WARMUP_MODES), num_steps=sc.num_scheduler_steps)
            spec = args.speculative()
            if spec is not None:  # the verify step of every bucket that speculates, in the unpenalised modes
                t0 = time.perf_counter()
                runner.warmup_verify(spec.verify_batches(sc.decode_buckets), spec.num_speculative_tokens + 1,
                                     [dataclasses.replace(m, penalties=False) for m in WARMUP_MODES])
                warm += time.perf_counter() - t0
        except Exception as e:
            if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
                raise RuntimeError(
                    f"warm-up ran out of device memory with {num_pages} KV pages; lower --max-model-len "
                    f"(now {max_model_len}) or --gpu-memory-utilization (now {args.gpu_memory_utilization}), or "
                    f"--max-num-seqs / --max-num-batched-tokens") from e
            raise
        logger.info("warm-up done: %d buckets compiled in %.1f s", len(buckets), warm)
    return LoadedModel(path=path, config=cfg, dtype=dtype, tokenizer=tokenizer, eos_token_ids=eos,
                       sampling_defaults=defaults.sampling_overrides(), scheduler_config=sc, runner=runner,
                       num_pages=num_pages, load_seconds=load_s, warmup_seconds=warm)


YARN_EXAMPLE = '{"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}'


def check_max_model_len(max_model_len: int | None, cfg: ModelConfig) -> int:
    """max_model_len (None: the model's longest, as vLLM) after checking it against what the model's positions
    allow: max_position_embeddings, or what its RoPE scaling extends that to (ModelConfig.derived_max_model_len)."""
    limit = cfg.derived_max_model_len
    if max_model_len is None:
        max_model_len = limit
    if max_model_len > limit and cfg.rope_scaling is None:
        raise ValueError(f"max_model_len={max_model_len} is larger than the model's longest context, {limit} "
                         f"(max_position_embeddings, no rope_scaling); RoPE scaling extends it: e.g. YaRN factor 4 "
                         f"over a 32768-token original context reaches 131072, with hf_overrides={YARN_EXAMPLE} "
                         f"(server: --hf-overrides '{YARN_EXAMPLE}')")
    if max_model_len > limit:
        raise ValueError(f"max_model_len={max_model_len} is larger than the model's longest context, {limit} "
                         f"({cfg.rope_scaling.describe()})")
    if cfg.rope_scaling is not None:
        logger.info("RoPE scaling: %s; max_model_len %d", cfg.rope_scaling.describe(), max_model_len)
    return max_model_len


def _generation_defaults(args: EngineArgs, path: Path | None):
    from qwenjax.tokenizer import GenerationDefaults

    if args.generation_config == "vllm":
        return GenerationDefaults()
    src = path if args.generation_config == "auto" else Path(args.generation_config)
    return load_generation_defaults(src) if src is not None else GenerationDefaults()


def lora_slots(model_cfg, lora_config, dtype, mesh, params, tp: int, quantized: bool):
    """(LoRAStacks, params): the adapters' device slots; where the fold applies (worker/lora_fold.py: one device,
    float weights) the slots' A become extra columns of the base projections, so params come back widened."""
    fold = None
    if LoRAFold.applies(params, model_cfg.num_hidden_layers, tp, quantized):
        fold = LoRAFold(params, model_cfg.num_hidden_layers, LoRAFold.rank_columns(slot_rank(lora_config)),
                        lora_config.max_loras + 1)
        params = fold.extend(params)
    stacks = LoRAStacks(model_cfg, lora_config, dtype, mesh, fold=fold)
    logger.info("LoRA: %d slots of rank %d on every projection (%.3f GiB%s)", lora_config.max_loras, stacks.rank,
                (stacks.nbytes + (fold.nbytes if fold else 0)) / 2**30,
                "; A as extra columns of the base projections" if fold else "")
    return stacks, params


def _size_cache(args, cfg, sc, cache_dtype, graphdef, params, buckets, memory_source, mesh, lora=None) -> int:
    if args.num_kv_pages is not None:
        need = sc.max_pages_per_seq
        if args.num_kv_pages < need:
            raise ValueError(f"num_kv_pages={args.num_kv_pages} cannot hold one sequence of max_model_len="
                             f"{sc.max_model_len} tokens ({need} pages of {sc.block_size}); lower max_model_len")
        return args.num_kv_pages
    mem = (memory_source or device_memory)()
    if mem is None:
        free = args.kv_cache_memory_bytes or CPU_KV_CACHE_BYTES
        pages = plan_num_pages(cfg=cfg, page_size=sc.block_size, dtype=cache_dtype, max_model_len=sc.max_model_len,
                               free_bytes=free,
                               detail="budget from kv_cache_memory_bytes; the device reports no memory")
        if args.kv_cache_memory_bytes is None:
            # CPU: no more pages than every sequence at full length can use; a larger cache only costs time
            # (the CPU backend copies what GPUs update in place).
            pages = min(pages, sc.max_num_seqs * sc.max_pages_per_seq)
        return pages
    activation = _profile_activations(args, cfg, sc, cache_dtype, graphdef, params, buckets, mem, memory_source,
                                      mesh, lora)
    free = mem.limit - mem.in_use - activation
    if args.kv_cache_memory_bytes is not None:
        free = min(free, args.kv_cache_memory_bytes)
    detail = (f"pool {mem.limit / 2**30:.2f} GiB = gpu_memory_utilization {args.gpu_memory_utilization} of the "
              f"device, weights {mem.in_use / 2**30:.2f} GiB, peak activations {activation / 2**30:.2f} GiB")
    logger.info("memory: %s", detail)
    return plan_num_pages(cfg=cfg, page_size=sc.block_size, dtype=cache_dtype, max_model_len=sc.max_model_len,
                          free_bytes=free, detail=detail)


def _profile_activations(args, cfg, sc, cache_dtype, graphdef, params, buckets, before: MemoryInfo,
                         memory_source, mesh, lora=None) -> int:
    """Runs the largest prefill and decode buckets once on a minimal cache; returns the peak extra bytes."""
    pages = sc.max_pages_per_seq + 1
    kv = allocate(cfg, pages, sc.block_size, cache_dtype, kv_sharding(mesh, cfg))
    kv_bytes = pages * page_bytes(cfg, sc.block_size, cache_dtype)
    runner = ModelRunner(graphdef, params, kv, vocab_size=cfg.vocab_size, max_num_seqs=sc.max_num_seqs,
                         block_table_width=sc.max_pages_per_seq, mesh=mesh, lora=lora)  # its steps only read lora
    def slots(b):  # token slots of a bucket: a packed one (Q > 1, no context, no decode rows) has Q
        return b[1] if b[1] > 1 and not b[2] and not b[3] else b[0] * b[1] + b[3]

    largest = sorted(buckets, key=slots)[-1:] + [max(b for b in buckets if b[1] == 1)]

    # The sampler's programs too: at 512 rows its [B, V] float32 work is several hundred MB, and once the pages
    # have taken every free byte a warm-up that meets it for the first time runs out of memory.
    runner.warmup(largest, list(WARMUP_MODES))
    spec = args.speculative()
    verify = spec.verify_batches(sc.decode_buckets) if spec is not None else ()
    if verify:  # the largest verify step: B * (k + 1) rows of logits and sampler work, penalties included
        runner.warmup_verify(verify[-1:], spec.num_speculative_tokens + 1, list(WARMUP_MODES))
    after = (memory_source or device_memory)()
    del runner, kv
    return max(0, after.peak - before.in_use - kv_bytes)
