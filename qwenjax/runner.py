"""The device side: parameters, the paged KV cache, and the jitted fixed-shape step.

`step` is pure, `(params, kv_cache, penalties, last_tokens, inputs) -> (kv_cache, penalties, logits)`, with the
cache donated so XLA updates the pages in place; the sampler is a second small jitted call on the logits, dispatched
without a host sync between. Compiled variants are keyed by the bucket shape (B, Q), `has_context`, and the
sampler's static mode.

`last_tokens[slot]` is the token the sampler last drew for the sequence in penalty-state row `slot`. An input id < 0
(a placeholder, see sequence.PENDING) is replaced by it inside the step, so step N+1 can be dispatched before the host
has read step N's tokens (async scheduling). The device runs calls in dispatch order, so step N's sampler has
written the row before step N+1 reads it.
"""

from __future__ import annotations

import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenjax import packing, penalty_state, sampler
from qwenjax.batch import StepInput
from qwenjax.layers.attention import AttentionMetadata
from qwenjax.sharding import replicated

logger = logging.getLogger("qwenjax")


class ModelRunner:
    def __init__(self, graphdef: nnx.GraphDef, params: nnx.State, kv_cache: list, *, vocab_size: int,
                 max_num_seqs: int, block_table_width: int, mesh):
        self.graphdef = graphdef
        self.params = params
        # Flattened once: an NNX State flattens through Python on every call, a list of arrays in JAX's C++ path.
        self._param_leaves, param_tree = jax.tree.flatten(params)
        self._param_tree = param_tree
        self.kv_cache = kv_cache
        self.vocab_size = vocab_size
        self.block_table_width = block_table_width  # pages per row in every step's block tables
        self.mesh = mesh
        self.scratch_slot = max_num_seqs  # penalty-state row written by padding rows
        rep = replicated(mesh)
        self.penalties = penalty_state.empty(max_num_seqs + 1, vocab_size, rep)
        self.last_tokens = jax.jit(lambda: jnp.zeros((max_num_seqs + 1,), jnp.int32), out_shardings=rep)()
        # Outputs keep their input layouts (the cache its kv-head split), so step N+1 never sees a new sharding.
        kv_out = [tuple(a.sharding for a in layer) for layer in kv_cache]
        pen_out = jax.tree.map(lambda a: a.sharding, self.penalties)
        self._step = jax.jit(functools.partial(_forward, graphdef, param_tree),
                             static_argnames=("has_context", "layout"), donate_argnums=(1, 2),
                             out_shardings=(kv_out, pen_out, rep))
        self._sample = jax.jit(_sample, static_argnames=("mode", "layout"), donate_argnums=(2,), out_shardings=rep)
        self._prompt_lp = None  # compiled on the first request with prompt_logprobs

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
        logits = self._run_step(inp, has_context)
        i_buf, f_buf, layout = packing.pack((tensors, inp.slots))
        out, ranks, self.last_tokens = self._sample(logits, self.penalties, self.last_tokens, i_buf, f_buf,
                                                    mode=mode, layout=layout)
        return out, ranks

    def _run_step(self, inp: StepInput, has_context: bool) -> jax.Array:
        i_buf, f_buf, layout = packing.pack(inp)
        with jax.set_mesh(self.mesh):  # traced under the mesh: kernels find it and run under shard_map
            self.kv_cache, self.penalties, logits = self._step(self._param_leaves, self.kv_cache, self.penalties,
                                                               self.last_tokens, i_buf, f_buf,
                                                               has_context=has_context, layout=layout)
        return logits

    def warmup(self, buckets: list[tuple[int, int, bool]], modes: list[sampler.SamplerMode]) -> float:
        """Compiles every (B, Q, has_context) bucket and each sampler mode per B, running each once on dummy rows."""
        t0 = time.perf_counter()
        decode_rows = sorted({b for b, _, _ in buckets})
        for b, q, ctx in buckets:
            inp = dummy_input(b, q, self.num_pages, self.page_size, self.block_table_width, self.scratch_slot,
                              has_context=ctx)
            self._run_step(inp, ctx)
        for b in decode_rows:
            # Same layout as a real step's logits (replicated on the mesh), or the executable would not be reused.
            logits = jax.device_put(jnp.zeros((b, self.vocab_size), jnp.float32), replicated(self.mesh))
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
        dropped), compiled once per power-of-two prompt length on first use. Returns logprobs [n-1], their ranks
        in the whole vocabulary [n-1], and the top-k ids and logprobs [n-1, k].
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
        with jax.set_mesh(self.mesh):
            outs = self._prompt_lp(self._param_leaves, self._scratch_kv, ids, meta, k=k)
        return tuple(np.asarray(x)[:n - 1] for x in outs)



def _forward(graphdef, param_tree, param_leaves, kv_cache, penalties, last_tokens, i_buf, f_buf, *,
             has_context: bool, layout):
    inp: StepInput = packing.unpack(i_buf, f_buf, layout)
    ids = jnp.where(inp.input_ids < 0, last_tokens[inp.slots][:, None], inp.input_ids)  # placeholders: from device
    model = nnx.merge(graphdef, jax.tree.unflatten(param_tree, param_leaves))
    hidden, kv_cache = model(ids, inp.meta, kv_cache, has_context=has_context)
    last = hidden[jnp.arange(hidden.shape[0]), inp.logits_index]  # [B, D]: only sampled positions get logits
    penalties = penalty_state.update(penalties, ids, inp.meta.positions, inp.meta.query_lens,
                                     inp.prompt_lens, inp.slots, inp.reset, inp.history)
    return kv_cache, penalties, model.logits(last)


def _prompt_logprobs(graphdef, param_tree, param_leaves, kv_cache, input_ids, meta, *, k: int):
    model = nnx.merge(graphdef, jax.tree.unflatten(param_tree, param_leaves))
    hidden, _ = model(input_ids, meta, kv_cache, has_context=False)
    logprobs = jax.nn.log_softmax(model.logits(hidden[0]), axis=-1)          # [Q, V]: position i predicts i + 1
    targets = jnp.concatenate([input_ids[0, 1:], input_ids[0, :1]])           # last entry is discarded
    chosen = jnp.take_along_axis(logprobs, targets[:, None], axis=-1)[:, 0]
    ranks = 1 + jnp.sum(logprobs > chosen[:, None], axis=-1)
    top_lps, top_ids = jax.lax.top_k(logprobs, max(k, 1))
    return chosen, ranks, top_ids, top_lps


def _sample(logits, penalties, last_tokens, i_buf, f_buf, *, mode, layout):
    """Returns the SamplerOutput, each sampled token's rank in the vocabulary when logprobs are asked for (else
    None), and last_tokens with the sampled ids written to the rows' slots (padding rows write the scratch row)."""
    tensors, slots = packing.unpack(i_buf, f_buf, layout)
    history = penalty_state.rows_of(penalties, slots) if mode.penalties else None
    out = sampler.sample(logits, tensors, mode, history=history)
    last_tokens = last_tokens.at[slots].set(out.token_ids.astype(jnp.int32))
    if mode.num_logprobs == 0:
        return out, None, last_tokens
    lse = jax.nn.logsumexp(logits, axis=-1)  # rank = 1 + tokens with a higher logprob, as vLLM reports it
    return out, 1 + jnp.sum(logits > (out.logprobs + lse)[:, None], axis=-1).astype(jnp.int32), last_tokens


def dummy_input(b: int, q: int, num_pages: int, page_size: int, width: int, scratch_slot: int, *,
                has_context: bool = False) -> StepInput:
    """A step whose every write is dropped (slots out of range) and whose rows read page 0: for compiling."""
    meta = AttentionMetadata(positions=np.zeros((b, q), np.int32),
                             slot_mapping=(num_pages * page_size + np.arange(b * q, dtype=np.int32)).reshape(b, q),
                             block_tables=np.zeros((b, width), np.int32), seq_lens=np.ones((b,), np.int32),
                             query_lens=np.ones((b,), np.int32))
    return StepInput(input_ids=np.zeros((b, q), np.int32), meta=meta, logits_index=np.zeros((b,), np.int32),
                     slots=np.full((b,), scratch_slot, np.int32), prompt_lens=np.zeros((b,), np.int32),
                     reset=np.zeros((b,), np.bool_),
                     history=np.full((b, width * page_size if has_context else 0), -1, np.int32))
