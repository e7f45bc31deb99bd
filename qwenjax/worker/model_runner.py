"""The device side: parameters, the paged KV cache, and the jitted fixed-shape step.

`step` is pure, `(params, kv_cache, penalties, last_tokens, inputs) -> (kv_cache, penalties, logits)`, with the
cache donated so XLA updates the pages in place; the sampler is a second small jitted call on the logits, dispatched
without a host sync between. Compiled variants are keyed by the bucket shape (B, Q), `has_context`, and the
sampler's static mode; with LoRA enabled also by whether the step passes the adapters' stacks: a step in which no
row has an adapter passes none and runs the base model's program (decided on the host from the step's lora_ids, so
no device conditional and no cost), and warmup compiles both variants of every bucket.

`execute_steps` runs K decode steps in one jitted call (multi-step decode, `num_scheduler_steps`): a `lax.fori_loop`
whose body is the model, the penalty update and the sampler, each step feeding the token the one before drew. One
dispatch, one host-to-device copy and one token read then serve K tokens a row, so the host's per-dispatch cost
(JAX's dispatch and the launch of the program's few hundred kernels: ~2.5 ms a step for Qwen2-0.5B on an H100,
benchmarks/NOTES.md) is paid once per K steps. Step k of the loop is step 0's input with positions and context
lengths advanced by k; its KV slots come from the rows' block tables (the scheduler reserved the pages), and its
sampling keys fold in the row's output index + k, so every token equals the one K single steps would draw.

`last_tokens[slot]` is the token the sampler last drew for the sequence in penalty-state row `slot`. An input id < 0
(a placeholder, see sequence.PENDING) is replaced by it inside the step, so step N+1 can be dispatched before the host
has read step N's tokens (async scheduling). The device runs calls in dispatch order, so step N's sampler has
written the row before step N+1 reads it.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from qwenjax.core.scheduler_output import SchedulerOutput
from qwenjax.layers.attention_metadata import AttentionMetadata, PackedMetadata, segments
from qwenjax.layers.lora import LoRAInputs
from qwenjax.models.sharding import replicated, vocab_sharding
from qwenjax.worker import packing, penalty_state, sampler, spec_verify
from qwenjax.worker.step_input import StepInput, build_step_input
from qwenjax.worker.step_options import FP8_LARGE_STEP_TOKENS, step_compiler_options
from qwenjax.worker.vocab_split import over_vocab

logger = logging.getLogger("qwenjax")
WARMUP_SLOW_S = 5.0  # a warm-up bucket that compiles (and runs once) for longer than this is logged by name

# Multi-step decode's loop: 1 keeps it an XLA while loop (one body, compiled once); an integer k > 1 unrolls k bodies
# per iteration (a longer program, and more kernels between the loop's host-driven iterations). For measurements.
MULTI_STEP_UNROLL = int(os.environ.get("QWENJAX_MULTI_STEP_UNROLL", "1"))


class ModelRunner:
    def __init__(self, graphdef: nnx.GraphDef, params: nnx.State, kv_cache: list, *, vocab_size: int,
                 max_num_seqs: int, block_table_width: int, mesh, lora=None):
        self.graphdef = graphdef
        self.lora = lora  # worker/lora_stacks.LoRAStacks (multi-LoRA) or None
        self._force_lora = False  # warmup: compile the LoRA program of a bucket although its dummy rows use none
        # Flattened once: an NNX State flattens through Python on every call, a list of arrays in JAX's C++ path.
        self._param_leaves, param_tree = jax.tree.flatten(params)
        self._param_tree = param_tree
        self.kv_cache = kv_cache
        self.vocab_size = vocab_size
        self.block_table_width = block_table_width  # pages per row in every step's block tables
        self.mesh = mesh
        self.scratch_slot = max_num_seqs  # penalty-state row written by padding rows
        rep, by_vocab = replicated(mesh), vocab_sharding(mesh, vocab_size)
        self.logits_sharding = by_vocab
        # The penalty state and the logits stay split on V over a mesh (sharding.vocab_sharding): no step gathers
        # them; the sampled tokens come out replicated.
        self.penalties = penalty_state.empty(max_num_seqs + 1, vocab_size, by_vocab)
        self.last_tokens = jax.jit(lambda: jnp.zeros((max_num_seqs + 1,), jnp.int32), out_shardings=rep)()
        # Outputs keep their input layouts (the cache its kv-head split), so step N+1 never sees a new sharding.
        kv_out = [tuple(a.sharding for a in layer) for layer in kv_cache]
        pen_out = jax.tree.map(lambda a: a.sharding, self.penalties)
        # The step programs, each a pair: (fewer than FP8_LARGE_STEP_TOKENS tokens, the rest), which differ only
        # in an FP8-weight model's XLA options (worker/step_options.py); one jit where the options are the same.
        fp8 = any(leaf.dtype == jnp.float8_e4m3fn for leaf in self._param_leaves)
        small_opts, large_opts = step_compiler_options(), step_compiler_options(fp8_large=fp8)

        def jit_pair(fn, **kw):
            small = jax.jit(fn, compiler_options=small_opts, **kw)
            return small, small if large_opts == small_opts else jax.jit(fn, compiler_options=large_opts, **kw)

        self._step, self._step_large = jit_pair(functools.partial(_forward, graphdef, param_tree),
                                                static_argnames=("has_context", "layout"), donate_argnums=(1, 2),
                                                out_shardings=(kv_out, pen_out, by_vocab))
        self._sample = jax.jit(functools.partial(_sample, mesh=mesh), static_argnames=("mode", "layout"),
                               donate_argnums=(2,), out_shardings=rep)
        self._decode_steps, self._decode_steps_large = jit_pair(
            functools.partial(_decode_steps, graphdef, param_tree, mesh),
            static_argnames=("layout", "mode", "num_steps"), donate_argnums=(1, 2, 3),
            out_shardings=(kv_out, pen_out, rep, rep))
        # Speculative decoding's verify step (worker/spec_verify.py): one program per (B, k + 1, sampler mode).
        self._verify, self._verify_large = jit_pair(
            functools.partial(spec_verify.verify, graphdef, param_tree, mesh), static_argnames=("layout", "mode"),
            donate_argnums=(1, 2, 3), out_shardings=(kv_out, pen_out, rep, rep))
        self._prompt_lp = None  # compiled on the first request with prompt_logprobs
        self._fork = jax.jit(_fork, donate_argnums=(0, 1), out_shardings=(kv_out, pen_out))

    @property
    def num_pages(self) -> int:
        return self.kv_cache[0][0].shape[1]

    @property
    def page_size(self) -> int:
        return self.kv_cache[0][0].shape[2]

    def execute(self, inp: StepInput, has_context: bool, tensors: sampler.SamplingTensors,
                mode: sampler.SamplerMode) -> tuple[sampler.SamplerOutput, jax.Array | None]:
        """Dispatches one step and its sampling; returns device arrays (reading them is the only sync): the sampler's
        output and, when the mode returns logprobs, the sampled tokens' ranks."""
        return self.sample(self.forward(inp, has_context), inp, tensors, mode)

    def forward(self, inp: StepInput, has_context: bool) -> jax.Array:
        """Dispatches the model half of `execute`: the step's logits [R, V] (device, split on V over a mesh)."""
        return self._run_step(inp, has_context)

    def sample(self, logits: jax.Array, inp: StepInput, tensors: sampler.SamplingTensors,
               mode: sampler.SamplerMode) -> tuple[sampler.SamplerOutput, jax.Array | None]:
        """Dispatches the sampling half of `execute` on `forward`'s logits (the engine may build `tensors` in
        between: a late sampler, see core/constraints.py)."""
        i_buf, f_buf, layout = packing.pack((tensors, inp.slots))
        out, ranks, self.last_tokens = self._sample(logits, self.penalties, self.last_tokens, i_buf, f_buf,
                                                    mode=mode, layout=layout)
        return out, ranks

    def execute_steps(self, inp: StepInput, tensors: sampler.SamplingTensors, mode: sampler.SamplerMode,
                      num_steps: int) -> sampler.SamplerOutput:
        """Dispatches `num_steps` decode steps of a decode-bucket input as one call (see the module docstring);
        returns the sampler's output with a leading [num_steps] axis (logprobs: the sampled tokens' only)."""
        i_buf, f_buf, layout = packing.pack((inp, tensors))
        run = _by_size(self._decode_steps, self._decode_steps_large, inp)
        with jax.set_mesh(self.mesh):
            self.kv_cache, self.penalties, self.last_tokens, out = run(
                self._param_leaves, self.kv_cache, self.penalties, self.last_tokens, i_buf, f_buf,
                self._lora_stacks_for(inp), layout=layout, mode=mode, num_steps=num_steps)
        return out

    def verify(self, inp: StepInput, drafts: np.ndarray, num_drafts: np.ndarray, tensors: sampler.SamplingTensors,
               mode: sampler.SamplerMode):
        """Dispatches a verify step (spec_verify.build_verify_input's arrays; `tensors` over its B * Q flattened
        rows); returns its rejection_sampler.VerifyOutput (device arrays)."""
        i_buf, f_buf, layout = packing.pack((inp, tensors, drafts, num_drafts))
        with jax.set_mesh(self.mesh):
            self.kv_cache, self.penalties, self.last_tokens, out = _by_size(self._verify, self._verify_large, inp)(
                self._param_leaves, self.kv_cache, self.penalties, self.last_tokens, i_buf, f_buf,
                self._lora_stacks_for(inp), layout=layout, mode=mode)
        return out

    def warmup_verify(self, decode_buckets, num_positions: int, modes) -> None:
        """Compiles the verify step of every decode bucket with `num_positions` = k + 1, in each sampler mode."""
        for b, self._force_lora in itertools.product(decode_buckets, self._lora_variants()):
            inp, drafts, num = spec_verify.build_verify_input([], [], rows=b, num_positions=num_positions,
                                                              page_size=self.page_size, num_pages=self.num_pages,
                                                              max_pages_per_seq=self.block_table_width,
                                                              scratch_slot=self.scratch_slot)
            tensors = sampler.build_tensors([], num_rows=b * num_positions, vocab_size=self.vocab_size,
                                            with_history=False)
            for mode in modes:
                self.verify(inp, drafts, num, tensors, mode).token_ids.block_until_ready()
        self._force_lora = False

    def fork(self, forks) -> None:
        """Starts copies of n > 1 requests (core/scheduler_output.Fork): copies page src to dst where src is set, and
        rebuilds each copy's penalty row from its prompt (mask) with no outputs (counts 0). Dispatched before the step
        that first reads them; shapes are padded to powers of two (one small program per size class)."""
        m = max(8, 1 << (len(forks) - 1).bit_length())
        width = max(16, 1 << (max(len(f.prompt) for f in forks) - 1).bit_length())
        src = np.zeros((m,), np.int32)
        dst = np.full((m,), self.num_pages, np.int32)  # padding: out of range, dropped
        slots = np.full((m,), self.scratch_slot + 1, np.int32)  # padding: past the last row, dropped
        tokens = np.full((m, width), self.vocab_size, np.int32)  # padding: past the vocabulary, dropped
        copies = [f for f in forks if f.src is not None]
        src[:len(copies)] = [f.src for f in copies]
        dst[:len(copies)] = [f.dst for f in copies]
        for i, f in enumerate(forks):
            slots[i] = f.slot
            tokens[i, :len(f.prompt)] = f.prompt
        with jax.set_mesh(self.mesh):
            self.kv_cache, self.penalties = self._fork(self.kv_cache, self.penalties, src, dst, slots, tokens)

    @property
    def _lora_stacks(self):
        return None if self.lora is None else self.lora.stacks

    def _lora_stacks_for(self, inp: StepInput):
        """The step's `lora_stacks` argument: None where no row of `inp` has an adapter, so that such a step runs the
        base model's program (its own compiled variant of the bucket) and LoRA costs it nothing; the stacks else."""
        if self.lora is None or not (self._force_lora or np.any(np.asarray(inp.lora_ids) > 0)):
            return None
        return self.lora.stacks

    def _lora_variants(self) -> tuple[bool, ...]:
        """Warmup compiles every bucket without LoRA and, where adapters are enabled, with it (`_force_lora`)."""
        return (False,) if self.lora is None else (False, True)

    @property
    def params(self) -> nnx.State:
        """The model's parameters as they are now (a LoRA fold writes adapters into them: worker/lora_fold.py)."""
        return jax.tree.unflatten(self._param_tree, self._param_leaves)

    def load_lora(self, slot: int, weights) -> None:
        """Writes an adapter (qwenjax/lora/peft.LoRAWeights) into device slot `slot`; dispatched in order, so steps
        dispatched before it read the slot's previous adapter and steps after it this one."""
        with jax.set_mesh(self.mesh):  # with a fold (worker/lora_fold.py) A goes into the parameters themselves
            self._param_leaves = self.lora.load(slot, weights, self._param_leaves)

    def _run_step(self, inp: StepInput, has_context: bool) -> jax.Array:
        i_buf, f_buf, layout = packing.pack(inp)
        run = _by_size(self._step, self._step_large, inp)
        with jax.set_mesh(self.mesh):  # traced under the mesh: kernels find it and run under shard_map
            self.kv_cache, self.penalties, logits = run(self._param_leaves, self.kv_cache, self.penalties,
                                                        self.last_tokens, i_buf, f_buf, self._lora_stacks_for(inp),
                                                        has_context=has_context, layout=layout)
        return logits

    def warmup(self, buckets: list[tuple[int, int, bool, int]], modes: list[sampler.SamplerMode],
               num_steps: int = 1) -> float:
        """Compiles every (B, Q, has_context, D) bucket (D > 0: a mixed step of D decode rows and a (B, Q) prefill
        segment) and each sampler mode per row count, running each once on dummy rows; with `num_steps` > 1 also
        the multi-step decode of every decode bucket in each mode."""
        t0 = time.perf_counter()
        if num_steps > 1:
            decode = sorted({b for b, q, ctx, d in buckets if q == 1 and not ctx and not d})
            for b, self._force_lora in itertools.product(decode, self._lora_variants()):
                inp = dummy_input(b, 1, self.num_pages, self.page_size, self.block_table_width, self.scratch_slot)
                tensors = sampler.build_tensors([], num_rows=b, vocab_size=self.vocab_size, with_history=False)
                for mode in modes:
                    self.execute_steps(inp, tensors, mode, num_steps).token_ids.block_until_ready()
        sampler_rows = sorted({d + b for b, _, _, d in buckets})
        # A progress bar on a terminal (tqdm hides itself elsewhere): a first start on a CPU compiles for a while.
        for (b, q, ctx, d), self._force_lora in tqdm(list(itertools.product(buckets, self._lora_variants())),
                                                     desc="Compiling step buckets", unit="bucket", disable=None,
                                                     leave=False):
            inp = dummy_input(b, q, self.num_pages, self.page_size, self.block_table_width, self.scratch_slot,
                              has_context=ctx, decode_rows=d)
            t1 = time.perf_counter()
            jax.block_until_ready(self._run_step(inp, ctx))
            if time.perf_counter() - t1 >= WARMUP_SLOW_S:  # what a start that runs long spends its time on
                logger.info("warm-up: bucket (rows %d, tokens %d%s%s%s) took %.1f s", b, q, ", cached" if ctx else "",
                            f", {d} decode rows" if d else "", ", LoRA" if self._force_lora else "",
                            time.perf_counter() - t1)
        self._force_lora = False
        for b in sampler_rows:
            # Same layout as a real step's logits (split on V over a mesh), or the executable would not be reused.
            logits = jax.device_put(jnp.zeros((b, self.vocab_size), jnp.float32), self.logits_sharding)
            slots = np.full((b,), self.scratch_slot, np.int32)
            for mode in modes:
                tensors = sampler.build_tensors([], num_rows=b, vocab_size=self.vocab_size, with_history=False)
                i_buf, f_buf, layout = packing.pack((tensors, slots))
                out, _, self.last_tokens = self._sample(logits, self.penalties, self.last_tokens, i_buf, f_buf,
                                                        mode=mode, layout=layout)
                out.token_ids.block_until_ready()
        jax.block_until_ready(self.kv_cache)
        return time.perf_counter() - t0

    def prompt_logprobs(self, token_ids: list[int], k: int) -> tuple[np.ndarray, ...]:
        """Log-probabilities the model gives each prompt token after the ones before it, plus the top `k`.

        One extra forward over the prompt (dense causal attention, a one-page scratch cache whose writes are all
        dropped), compiled once per power-of-two prompt length and power-of-two k on first use. Returns logprobs
        [n-1], their ranks in the whole vocabulary [n-1], and the top-k ids and logprobs [n-1, k].
        """
        n = len(token_ids)
        q = max(16, 1 << (n - 1).bit_length())
        if self._prompt_lp is None:
            self._prompt_lp = jax.jit(functools.partial(_prompt_logprobs, self.graphdef, self._param_tree),
                                      static_argnames=("k",))
            layer = self.kv_cache[0][0]
            scratch = jnp.zeros((layer.shape[0], 1, layer.shape[2], layer.shape[3]), layer.dtype)
            self._scratch_kv = [(scratch, scratch)] * len(self.kv_cache)
        ids = np.zeros((1, q), np.int32)
        ids[0, :n] = token_ids
        meta = AttentionMetadata(positions=np.arange(q, dtype=np.int32)[None],
                                 slot_mapping=(self.page_size + np.arange(q, dtype=np.int32))[None],
                                 block_tables=np.zeros((1, 1), np.int32), seq_lens=np.array([n], np.int32),
                                 query_lens=np.array([n], np.int32))
        kk = 1 << max(k - 1, 0).bit_length()  # k to a power of two: few programs whatever k requests ask
        with jax.set_mesh(self.mesh):
            outs = self._prompt_lp(self._param_leaves, self._scratch_kv, ids, meta, k=kk)
        chosen, ranks, top_ids, top_lps = (np.asarray(x)[:n - 1] for x in outs)
        return chosen, ranks, top_ids[:, :k], top_lps[:, :k]



def _lora_kwargs(lora_stacks, inp: StepInput) -> dict:
    """The model's `lora` argument: only when adapters are enabled (Qwen2-MoE takes none)."""
    return {} if lora_stacks is None else {"lora": LoRAInputs.build(lora_stacks, inp.lora_ids.reshape(-1))}


def _forward(graphdef, param_tree, param_leaves, kv_cache, penalties, last_tokens, i_buf, f_buf, lora_stacks=None,
             *, has_context: bool, layout):
    inp: StepInput = packing.unpack(i_buf, f_buf, layout)
    if isinstance(inp.meta, PackedMetadata):
        return _forward_packed(graphdef, param_tree, param_leaves, kv_cache, penalties, last_tokens, inp, lora_stacks)
    segs = segments(inp.meta)
    # Placeholders (ids < 0) are the newest tokens of decode rows: read from the device (see the module docstring).
    ids, rows, start = [], 0, 0
    for seg in segs:
        B, Q = seg.positions.shape
        seg_ids = inp.input_ids.reshape(-1)[start:start + B * Q].reshape(B, Q)
        ids.append(jnp.where(seg_ids < 0, last_tokens[inp.slots[rows:rows + B]][:, None], seg_ids))
        rows, start = rows + B, start + B * Q
    flat = jnp.concatenate([x.reshape(-1) for x in ids]) if len(ids) > 1 else ids[0]
    model = nnx.merge(graphdef, jax.tree.unflatten(param_tree, param_leaves))
    hidden, kv_cache = model(flat, inp.meta, kv_cache, has_context=has_context, **_lora_kwargs(lora_stacks, inp))
    last = hidden.reshape(-1, hidden.shape[-1])[inp.logits_index]  # [R, D]: only sampled positions get logits
    rows = 0
    for seg, seg_ids in zip(segs, ids):
        B, Q = seg_ids.shape
        r = slice(rows, rows + B)
        # The history belongs to the prefill segment (the last one); a decode segment has none.
        history = inp.history if Q > 1 or len(segs) == 1 else jnp.zeros((B, 0), jnp.int32)
        penalties = penalty_state.update(penalties, seg_ids, seg.positions, seg.query_lens, inp.prompt_lens[r],
                                         inp.slots[r], inp.reset[r], history)
        rows += B
    return kv_cache, penalties, model.logits(last)


def _forward_packed(graphdef, param_tree, param_leaves, kv_cache, penalties, last_tokens, inp: StepInput,
                    lora_stacks=None):
    """`_forward` of a packed prefill step (fresh rows at position 0 on T token slots)."""
    meta: PackedMetadata = inp.meta
    row, real = meta.token_rows()
    ids = jnp.where(inp.input_ids < 0, last_tokens[inp.slots[row]], inp.input_ids)
    model = nnx.merge(graphdef, jax.tree.unflatten(param_tree, param_leaves))
    hidden, kv_cache = model(ids, meta, kv_cache, has_context=False, **_lora_kwargs(lora_stacks, inp))
    last = hidden.reshape(-1, hidden.shape[-1])[inp.logits_index]
    penalties = penalty_state.update_packed(penalties, ids, meta.positions, row, real, inp.prompt_lens, inp.slots,
                                            inp.reset)
    return kv_cache, penalties, model.logits(last)


def _by_size(small, large, inp: StepInput):
    """The program of a jit_pair (ModelRunner.__init__) that a step of inp's tokens runs."""
    return large if inp.input_ids.size >= FP8_LARGE_STEP_TOKENS else small


def _decode_steps(graphdef, param_tree, mesh, param_leaves, kv_cache, penalties, last_tokens, i_buf, f_buf,
                  lora_stacks=None, *, layout, mode, num_steps: int):
    """`num_steps` decode steps in one program (see the module docstring). Returns the cache, the penalty state,
    last_tokens and a SamplerOutput whose token_ids / logprobs are [num_steps, B]."""
    inp, tensors = packing.unpack(i_buf, f_buf, layout)
    meta: AttentionMetadata = inp.meta
    model = nnx.merge(graphdef, jax.tree.unflatten(param_tree, param_leaves))
    page_size = kv_cache[0][0].shape[2]
    live = (meta.query_lens > 0)[:, None]  # padding rows keep their out-of-range slots: their writes stay dropped
    B = meta.positions.shape[0]

    def step(k, carry):
        kv, pen, last, ids, tokens, logprobs = carry
        pos = meta.positions + k
        page = jnp.take_along_axis(meta.block_tables, jnp.where(live, pos // page_size, 0), axis=1)
        m = dataclasses.replace(meta, positions=pos,
                                slot_mapping=jnp.where(live, page * page_size + pos % page_size, meta.slot_mapping),
                                seq_lens=jnp.where(live[:, 0], meta.seq_lens + k, meta.seq_lens))
        hidden, kv = model(ids, m, kv, has_context=False, **_lora_kwargs(lora_stacks, inp))
        logits = model.logits(hidden.reshape(-1, hidden.shape[-1])[inp.logits_index])
        pen = penalty_state.update(pen, ids, pos, meta.query_lens, inp.prompt_lens, inp.slots, inp.reset,
                                   inp.history)
        history = penalty_state.history_of(pen, inp.slots) if mode.penalties else None
        out, _ = sampler.sample_over_mesh(mesh, logits, dataclasses.replace(tensors, steps=tensors.steps + k), mode,
                                          history)
        last = last.at[inp.slots].set(out.token_ids)
        return kv, pen, last, out.token_ids[:, None], tokens.at[k].set(out.token_ids), \
            logprobs.at[k].set(out.logprobs)

    ids = jnp.where(inp.input_ids < 0, last_tokens[inp.slots][:, None], inp.input_ids)  # [B, 1]
    carry = (kv_cache, penalties, last_tokens, ids, jnp.zeros((num_steps, B), jnp.int32),
             jnp.zeros((num_steps, B), jnp.float32))
    kv_cache, penalties, last_tokens, _, tokens, logprobs = jax.lax.fori_loop(0, num_steps, step, carry,
                                                                              unroll=MULTI_STEP_UNROLL)
    empty = jnp.zeros((num_steps, B, 0))
    return kv_cache, penalties, last_tokens, sampler.SamplerOutput(
        token_ids=tokens, logprobs=logprobs, top_ids=empty.astype(jnp.int32), top_logprobs=empty)


def _prompt_logprobs(graphdef, param_tree, param_leaves, kv_cache, input_ids, meta, *, k: int):
    model = nnx.merge(graphdef, jax.tree.unflatten(param_tree, param_leaves))
    hidden, _ = model(input_ids, meta, kv_cache, has_context=False)
    logits = model.logits(hidden[0]).astype(jnp.float32)                      # [Q, V]: position i predicts i + 1
    targets = jnp.concatenate([input_ids[0, 1:], input_ids[0, :1]])           # last entry is discarded

    def body(vs, split, targets):  # on each device's vocabulary columns over the mesh (worker/vocab_split.py)
        logits, = split
        lse = vs.logsumexp(logits)
        chosen = vs.take(logits, targets)
        top_vals, top_ids = vs.top_k(logits, max(k, 1), sampler.chunked_top_k)
        return chosen - lse, 1 + vs.count_greater(logits, chosen), top_ids, top_vals - lse[:, None]

    return over_vocab(body, jax.sharding.get_abstract_mesh(), logits.shape[-1], (logits,), targets)


def _fork(kv_cache, penalties, src, dst, slots, tokens):
    """ModelRunner.fork's device half: pages src -> dst ([M]; dst out of range: none), penalty rows `slots` ([M])
    cleared and given their prompt tokens ([M, L], the vocabulary size: none)."""
    kv_cache = [(k.at[:, dst].set(k[:, src], mode="drop"), v.at[:, dst].set(v[:, src], mode="drop"))
                for k, v in kv_cache]
    return kv_cache, penalty_state.fork_rows(penalties, slots, tokens)


def _sample(logits, penalties, last_tokens, i_buf, f_buf, *, mode, layout, mesh):
    """Returns the SamplerOutput, each sampled token's rank in the vocabulary when logprobs are asked for (else
    None), and last_tokens with the sampled ids written to the rows' slots (padding rows write the scratch row).
    The sampler runs on each device's vocabulary columns over `mesh` (sampler.sample_over_mesh)."""
    tensors, slots = packing.unpack(i_buf, f_buf, layout)
    history = penalty_state.history_of(penalties, slots) if mode.penalties else None
    out, ranks = sampler.sample_over_mesh(mesh, logits, tensors, mode, history, with_ranks=mode.num_logprobs > 0)
    last_tokens = last_tokens.at[slots].set(out.token_ids.astype(jnp.int32))
    return out, ranks, last_tokens


def dummy_input(b: int, q: int, num_pages: int, page_size: int, width: int, scratch_slot: int, *,
                has_context: bool = False, decode_rows: int = 0) -> StepInput:
    """A step of padding rows only (every write dropped, nothing read): for compiling a bucket. `decode_rows` > 0
    makes it a mixed step of that many decode rows plus the (b, q) prefill segment."""
    out = SchedulerOutput("mixed" if decode_rows else ("decode" if q == 1 else "prefill"), [], has_context, (b, q),
                          decode_bucket=decode_rows)  # (b, q) of a prefill step without context: packed (R, T)
    return build_step_input(out, page_size=page_size, num_pages=num_pages, max_pages_per_seq=width,
                            scratch_slot=scratch_slot)
