"""Frozen, validated configuration: the model's shape (from HF config.json) and the engine's settings.

Both are hashable so they can be static arguments of jitted functions.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import ml_dtypes
import numpy as np

from qwenjax.rope_scaling import RopeScaling, rope_parameters
from qwenjax.speculative_config import SpeculativeConfig, canonical_speculative_config

_DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "half": "float16", "fp16": "float16",
           "float32": "float32", "float": "float32", "fp32": "float32"}
# The names of qwenjax.core.policies.POLICIES (config sits below core, so it keeps the names, not the classes).
SCHEDULING_POLICIES = ("fcfs", "priority", "spf", "fair")
# vLLM's --distributed-executor-backend: "mp" (engine processes on this host) or "ray" (Ray actors); None: "mp".
DISTRIBUTED_EXECUTOR_BACKENDS = ("mp", "ray")
KV_CACHE_DTYPES = ("auto", "bfloat16", "float16", "float32", "fp8", "fp8_e4m3", "fp8_e5m2")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The Qwen2 shape. Field names follow HF's Qwen2Config."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None  # None: plain RoPE (qwenjax/rope_scaling.py reads config.json's forms)
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    torch_dtype: str = "bfloat16"
    architecture: str = "Qwen2ForCausalLM"
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    # Qwen2-MoE (Qwen2MoeForCausalLM); num_experts == 0 is a dense model and the rest are then unused.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0   # 0: no shared expert
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    # Not from config.json: the engine's placement of the stacked experts on a mesh (EngineArgs.enable_expert_parallel),
    # kept here because the model and sharding.param_spec both receive this config.
    expert_parallel: bool = False

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok must be in [1, num_experts={self.num_experts}], got "
                             f"{self.num_experts_per_tok}")
        if self.num_experts and self.decoder_sparse_step < 1:
            raise ValueError(f"decoder_sparse_step must be at least 1, got {self.decoder_sparse_step}")

    def is_moe_layer(self, i: int) -> bool:
        """HF's rule: layer i is sparse unless listed in mlp_only_layers or off the decoder_sparse_step grid."""
        return self.num_experts > 0 and i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0

    @property
    def derived_max_model_len(self) -> int:
        """The longest max_model_len the model allows, as vLLM derives it: max_position_embeddings, or what RoPE
        scaling extends it to (yarn: factor x original_max_position_embeddings, e.g. 4 x 32768 = 131072)."""
        return self.rope_scaling.max_model_len if self.rope_scaling is not None else self.max_position_embeddings

    @property
    def q_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        arch = (d.get("architectures") or ["Qwen2ForCausalLM"])[0]
        if arch not in ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM"):
            raise NotImplementedError(f"architecture {arch!r} is not supported yet; qwenjax serves Qwen2ForCausalLM "
                                      f"and Qwen2MoeForCausalLM")
        if d.get("use_sliding_window"):
            raise NotImplementedError("use_sliding_window=true is not supported yet")
        heads = d["num_attention_heads"]
        eos = d.get("eos_token_id")
        rope_theta, rope_scaling = rope_parameters(d)  # legacy rope_scaling or transformers 5's rope_parameters
        moe = {}
        if arch == "Qwen2MoeForCausalLM":
            moe = dict(num_experts=int(d["num_experts"]), num_experts_per_tok=int(d["num_experts_per_tok"]),
                       moe_intermediate_size=int(d["moe_intermediate_size"]),
                       shared_expert_intermediate_size=int(d.get("shared_expert_intermediate_size") or 0),
                       norm_topk_prob=bool(d.get("norm_topk_prob", False)),
                       decoder_sparse_step=int(d.get("decoder_sparse_step", 1)),
                       mlp_only_layers=tuple(int(i) for i in d.get("mlp_only_layers") or ()))
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            max_position_embeddings=d.get("max_position_embeddings", 32768),
            rope_theta=rope_theta, rope_scaling=rope_scaling, rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            torch_dtype=str(d.get("torch_dtype") or d.get("dtype") or "bfloat16"), architecture=arch,
            bos_token_id=d.get("bos_token_id"), eos_token_id=eos[0] if isinstance(eos, list) else eos, **moe)

    @classmethod
    def from_file(cls, path: str) -> "ModelConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def num_params(self, *, include_embedding: bool = True) -> int:
        D, F, L = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        qkv = D * (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim
        bias = (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim
        o = self.num_attention_heads * self.head_dim * D
        layer = qkv + bias + o + 2 * D
        mlps = 0
        for i in range(L):
            if self.is_moe_layer(i):  # router, stacked experts, shared expert and its gate
                Fs = self.shared_expert_intermediate_size
                mlps += D * self.num_experts + 3 * D * self.moe_intermediate_size * self.num_experts
                mlps += (3 * D * Fs + D) if Fs else 0
            else:
                mlps += 3 * D * F
        emb = self.vocab_size * D
        head = 0 if self.tie_word_embeddings else emb
        total = L * layer + mlps + D + head + (emb if include_embedding else 0)
        if not include_embedding and self.tie_word_embeddings:
            total += emb  # the tied lm_head still multiplies by the whole table
        return total


def resolve_dtype(name: str, model: ModelConfig) -> np.dtype:
    """The engine's parameter dtype for `dtype` ("auto": the checkpoint's torch_dtype). numpy dtypes (bfloat16 from
    ml_dtypes, as JAX's own is), so config stays free of JAX and the host side can import it."""
    if name == "auto":
        name = model.torch_dtype
        if name == "float32":
            name = "float32"
    key = _DTYPES.get(str(name).lower())
    if key is None:
        raise ValueError(f"dtype must be one of 'auto', 'bfloat16', 'float16', 'float32', got {name!r}")
    return np.dtype(ml_dtypes.bfloat16 if key == "bfloat16" else key)


def compilation_cache_path(value: str) -> str:
    """EngineArgs.compilation_cache_dir as a directory: "auto" is under the user's cache directory, beside the
    built-in model ($XDG_CACHE_HOME/qwenjax/jax-compilation-cache, ~/.cache when unset)."""
    if value != "auto":
        return os.path.expanduser(value)
    root = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(root, "qwenjax", "jax-compilation-cache")


MAX_SCHEDULER_STEPS = 64  # most decode steps one dispatch runs (num_scheduler_steps)

USAGE_CONTEXTS = ("llm", "server")  # the offline LLM class, the OpenAI server (vLLM's UsageContext)
LARGE_DEVICE_BYTES = 70 << 30  # devices at least this large (H100, H200; not the A100) batch more by default


def batch_defaults(usage_context: str, device_bytes: int | None, device_kind: str = "") -> tuple[int, int | None]:
    """(max_num_seqs, max_num_batched_tokens) when the user leaves them unset, as vLLM chooses them
    (EngineArgs.get_batch_defaults): on a device of at least 70 GiB other than an A100, 1024 sequences and a step
    budget of 16,384 tokens offline or 8,192 in the server; elsewhere 256 sequences and, for the budget, None
    (SchedulerConfig.build's max(2048, min(8192, max_model_len))). `device_bytes` None (CPU): elsewhere."""
    if device_bytes is not None and device_bytes >= LARGE_DEVICE_BYTES and "a100" not in device_kind.lower():
        return 1024, (16384 if usage_context == "llm" else 8192)
    return 256, None


def canonical_hf_overrides(value: Any) -> str | None:
    """hf_overrides (a dict or its JSON text) -> sorted-key JSON text, None when empty; ValueError otherwise."""
    if callable(value):
        raise ValueError("hf_overrides as a function (vLLM accepts one) is not supported: give a dict of config.json "
                         "keys, e.g. {'rope_scaling': {'type': 'yarn', 'factor': 4.0, "
                         "'original_max_position_embeddings': 32768}}")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"hf_overrides must be a JSON object, got {value!r} ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"hf_overrides must be a dict (a JSON object) of config.json keys, got {value!r}")
    try:
        return json.dumps(value, sort_keys=True) if value else None
    except TypeError as e:
        raise ValueError(f"hf_overrides must hold JSON values only: {e}") from None


# vLLM's allowed max_lora_rank values (LoRAConfig.max_lora_rank).
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Multi-LoRA serving (vLLM's LoRAConfig): `max_loras` adapters on the device at once (its slots), each of rank
    at most `max_lora_rank` (slots are padded to it), and `max_cpu_loras` host copies (None: max_loras)."""

    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None

    def __post_init__(self):
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be at least 1, got {self.max_loras}")
        if self.max_lora_rank not in LORA_RANKS:
            raise ValueError(f"max_lora_rank must be one of {', '.join(map(str, LORA_RANKS))}, got "
                             f"{self.max_lora_rank}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be at least max_loras ({self.max_loras})")

    @property
    def host_capacity(self) -> int:
        return self.max_cpu_loras if self.max_cpu_loras is not None else self.max_loras


@dataclasses.dataclass(frozen=True)
class EngineArgs:
    """User-facing engine arguments, shared by `LLM(...)` and `python -m server` (vLLM's names)."""

    model: str | None = None
    tokenizer: str | None = None
    dtype: str = "auto"
    seed: int = 0
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int | None = None           # None: batch_defaults for the device and usage_context
    max_num_batched_tokens: int | None = None  # None: batch_defaults, else max(2048, min(8192, max_model_len))
    block_size: int = 16
    tensor_parallel_size: int = 1
    enable_expert_parallel: bool = False     # MoE: split the experts over the mesh (E) instead of their width (F)
    quantization: str | None = None
    kv_cache_dtype: str = "auto"              # KV_CACHE_DTYPES; fp8 ones: see qwenjax/layers/fp8_kv.py
    enable_prefix_caching: bool = True        # automatic prefix caching, on by default as in vLLM v1
    enable_chunked_prefill: bool | None = None  # None / True: prompt chunks join decode steps; False: never
    scheduling_policy: str = "fcfs"           # SCHEDULING_POLICIES (qwenjax.core.policies.POLICIES' names)
    async_scheduling: bool = True             # dispatch step N+1 before reading step N's tokens (engine/llm_engine.py)
    num_scheduler_steps: int = 1              # decode steps one dispatch runs on the device (vLLM's multi-step)
    num_kv_pages: int | None = None          # override the page count computed from free memory
    kv_cache_memory_bytes: int | None = None  # budget for pages when the device reports no memory (CPU)
    generation_config: str = "auto"          # "auto": the model's generation_config.json; "vllm": none; or a dir
    chat_template: str | None = None
    served_model_name: tuple[str, ...] | None = None
    trust_remote_code: bool = False
    load_format: str = "auto"                # "auto": safetensors; "dummy": random weights in config.json's shapes
    distributed_coordinator: str | None = None  # "host:port" of process 0 for multi-host runs (jax.distributed)
    num_processes: int = 1
    process_id: int = 0
    # None: warm up (compile every bucket at start-up) on accelerators, and on a CPU compile each bucket on first use
    # (a CPU start-up would otherwise compile dozens of programs a request never needs); True / False force it.
    skip_warmup: bool | None = None
    # JAX's persistent compilation cache, so a second start loads its compiled buckets instead of compiling them:
    # "auto" = $XDG_CACHE_HOME/qwenjax/jax-compilation-cache (~/.cache/...), a directory, or None (off). A cache
    # directory JAX was already given (jax.config, JAX_COMPILATION_CACHE_DIR) is kept.
    compilation_cache_dir: str | None = "auto"
    # vLLM's enforce_eager (no CUDA graphs); here: no start-up compile of every bucket, as skip_warmup=True (XLA always
    # compiles, there is no eager mode): each bucket compiles the first time a step needs it.
    enforce_eager: bool = False
    revision: str | None = None               # a hub id's revision (branch, tag, commit) in the Hugging Face cache
    download_dir: str | None = None           # the Hugging Face cache to find a hub id in (nothing is downloaded)
    pipeline_parallel_size: int = 1           # only 1: pipeline parallelism is not implemented (unsupported())
    decode_buckets: tuple[int, ...] | None = None
    prefill_token_buckets: tuple[int, ...] | None = None
    usage_context: str = "llm"               # USAGE_CONTEXTS: who runs the engine; picks the batch_defaults
    max_logprobs: int = 20                   # most logprobs / prompt_logprobs a request may ask (vLLM's; -1: vocab)
    max_n: int = 128                          # most completions (n) one request may ask (OpenAI's limit for n)
    # vLLM's hf_overrides: config.json keys replaced before the model config is read, e.g. {"rope_scaling": {"type":
    # "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}. Given as a dict or its JSON text; kept as
    # canonical JSON text (sorted keys) so that the arguments stay hashable. Top-level keys replace whole values.
    hf_overrides: str | None = None
    # vLLM's speculative_config (qwenjax/speculative_config.py), kept as canonical JSON text like hf_overrides.
    # n-gram speculation keeps async_scheduling (engine/spec_step.py drains before a verify step); draft-model
    # speculation runs its steps one at a time (async_scheduling off). Both refuse num_scheduler_steps > 1.
    speculative_config: str | None = None
    # Multi-LoRA serving (qwenjax/lora/, vLLM's names): LoRAConfig's fields, used when enable_lora is True.
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    # Data parallelism (qwenjax/engine/data_parallel.py): this many engine replicas behind one server, each with its
    # own devices and its own tensor_parallel_size; placed as processes of this host ("mp") or as Ray actors ("ray").
    data_parallel_size: int = 1
    distributed_executor_backend: str | None = None  # DISTRIBUTED_EXECUTOR_BACKENDS; None: "mp"

    def __post_init__(self):
        if self.hf_overrides is not None:
            object.__setattr__(self, "hf_overrides", canonical_hf_overrides(self.hf_overrides))
        if self.speculative_config is not None:
            object.__setattr__(self, "speculative_config", canonical_speculative_config(self.speculative_config))
        if self.speculative_config is not None:
            if self.speculative().method == "draft_model":  # the draft's cache follows each step's known tokens
                object.__setattr__(self, "async_scheduling", False)
            if self.num_scheduler_steps != 1:
                raise ValueError(f"speculative_config needs num_scheduler_steps=1 (got {self.num_scheduler_steps}): "
                                 f"each verify step already yields up to k + 1 tokens a row")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.usage_context not in USAGE_CONTEXTS:
            raise ValueError(f"usage_context must be one of {', '.join(map(repr, USAGE_CONTEXTS))}, "
                             f"got {self.usage_context!r}")
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be one of 8, 16, 32, 64, 128, got {self.block_size}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be at least 1, got {self.max_model_len}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be at least 1, got {self.tensor_parallel_size}")
        if self.pipeline_parallel_size < 1:
            raise ValueError(f"pipeline_parallel_size must be at least 1, got {self.pipeline_parallel_size}")
        if self.load_format not in ("auto", "safetensors", "dummy"):
            raise ValueError(f"load_format must be 'auto', 'safetensors' or 'dummy', got {self.load_format!r}")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy must be one of {', '.join(map(repr, SCHEDULING_POLICIES))}, "
                             f"got {self.scheduling_policy!r}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}")
        if self.max_logprobs < -1:
            raise ValueError(f"max_logprobs must be -1 (the vocabulary size) or at least 0, got {self.max_logprobs}")
        if self.max_n < 1:
            raise ValueError(f"max_n must be at least 1, got {self.max_n}")
        if self.data_parallel_size < 1:
            raise ValueError(f"data_parallel_size must be at least 1, got {self.data_parallel_size}")
        if self.distributed_executor_backend not in (None, *DISTRIBUTED_EXECUTOR_BACKENDS):
            raise ValueError(f"distributed_executor_backend must be one of "
                             f"{', '.join(map(repr, DISTRIBUTED_EXECUTOR_BACKENDS))}, got "
                             f"{self.distributed_executor_backend!r}")
        if not 1 <= self.num_scheduler_steps <= MAX_SCHEDULER_STEPS:
            raise ValueError(f"num_scheduler_steps must be in [1, {MAX_SCHEDULER_STEPS}], got "
                             f"{self.num_scheduler_steps}")

        if self.enable_lora:
            self.lora_config  # validates max_loras / max_lora_rank / max_cpu_loras

    @property
    def lora_config(self) -> LoRAConfig | None:
        if not self.enable_lora:
            return None
        return LoRAConfig(max_loras=self.max_loras, max_lora_rank=self.max_lora_rank,
                          max_cpu_loras=self.max_cpu_loras)

    def speculative(self) -> SpeculativeConfig | None:
        """The parsed speculative_config (None: speculation off)."""
        return None if self.speculative_config is None else \
            SpeculativeConfig.from_dict(json.loads(self.speculative_config))

    def hf_overrides_dict(self) -> dict[str, Any]:
        """The overrides as a dict ({} when none)."""
        return json.loads(self.hf_overrides) if self.hf_overrides else {}

    def unsupported(self) -> list[str]:
        """Arguments whose feature is not built yet: each is refused by name rather than silently ignored."""
        missing = []
        if self.quantization not in (None, "none", "awq", "gptq", "fp8"):
            missing.append(f"quantization={self.quantization!r} (supported: 'awq', 'gptq', 'fp8', or None to read it "
                           f"from the checkpoint's config.json)")
        if self.trust_remote_code:
            missing.append("trust_remote_code=True")
        if self.pipeline_parallel_size > 1:
            missing.append(f"pipeline_parallel_size={self.pipeline_parallel_size} (pipeline parallelism; shard the "
                           f"model over {self.pipeline_parallel_size} devices with tensor parallelism instead: "
                           f"tensor_parallel_size, --tensor-parallel-size / --mesh)")
        if self.num_scheduler_steps > 1 and self.num_processes > 1:
            missing.append(f"num_scheduler_steps={self.num_scheduler_steps} with num_processes={self.num_processes} "
                           f"(multi-step decode is not replayed on follower hosts yet; use 1 there)")
        if self.speculative_config is not None and self.num_processes > 1:
            missing.append(f"speculative_config with num_processes={self.num_processes} (verify steps are not "
                           f"replayed on follower hosts yet)")
        if self.enable_lora and self.num_processes > 1:
            missing.append(f"enable_lora with num_processes={self.num_processes} (adapter slots are not replayed on "
                           f"follower hosts yet)")
        if self.data_parallel_size > 1 and self.num_processes > 1 and self.distributed_executor_backend != "ray":
            missing.append(f"data_parallel_size={self.data_parallel_size} with num_processes={self.num_processes} "
                           f"on this host's processes (replicas that span hosts are placed by Ray: "
                           f"distributed_executor_backend='ray')")
        return missing
