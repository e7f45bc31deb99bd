"""Several hosts, one model: process 0 schedules, every process runs the same jitted step on its shards.

jax.distributed joins the processes into one global mesh (no home-made communication layer). Each step, process 0
broadcasts a fixed-size header (the static bucket and sampler mode) and then the step's arrays with
`multihost_utils.broadcast_one_to_all`; the other processes ("followers") rebuild the same call and dispatch it, so
every process enqueues identical programs in identical order, which SPMD execution requires.
"""

from __future__ import annotations

import logging

import jax
import numpy as np

from qwenjax.compat import distributed_initialized
from qwenjax.layers.attention_metadata import AttentionMetadata, MixedMetadata, PackedMetadata, segments
from qwenjax.worker.sampler import SamplerMode, SamplingTensors
from qwenjax.worker.step_input import StepInput

logger = logging.getLogger("qwenjax")

_FILTERS = ("none", "topk", "sort")
_STOP, _STEP = 0, 1
_HEADER = 21


def initialize(coordinator: str, num_processes: int, process_id: int) -> None:
    """Joins this process to the others (call before any other JAX work). On CPU, collectives go through gloo."""
    if distributed_initialized():
        return
    if jax.config.jax_platforms in (None, "", "cpu") or str(jax.config.jax_platforms).startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    logger.info("process %d of %d joined %s: %d local / %d global devices", process_id, num_processes, coordinator,
                jax.local_device_count(), jax.device_count())


def to_host(x: jax.Array) -> np.ndarray:
    """A replicated array's value on this host (a global array over several processes is not fully addressable)."""
    return np.asarray(x) if x.is_fully_addressable else np.asarray(x.addressable_data(0))


def _header(cmd: int, inp: StepInput | None = None, tensors: SamplingTensors | None = None,
            mode: SamplerMode | None = None, has_context: bool = False) -> np.ndarray:
    h = np.zeros((_HEADER,), np.int32)
    h[0] = cmd
    if cmd == _STEP:
        seg = segments(inp.meta)[-1]  # a mixed step: its prefill segment; D decode rows go in h[15]
        packed = isinstance(seg, PackedMetadata)
        B, Q = (seg.seq_lens.shape[0], seg.positions.shape[0]) if packed else seg.positions.shape
        h[1:13] = [B, Q, has_context, mode.all_greedy, _FILTERS.index(mode.filter), mode.topk_cap, mode.penalties,
                   mode.num_logprobs, mode.has_banned, tensors.prompt_tokens.shape[1], tensors.output_tokens.shape[1],
                   tensors.banned.shape[1]]
        h[13] = seg.block_tables.shape[1]
        h[14] = inp.history.shape[1]
        h[15] = inp.slots.shape[0] - B
        h[16] = packed
        h[17:21] = [mode.has_mask, mode.has_bias, tensors.bitmask.shape[1], tensors.bias_ids.shape[1]]
    return h


def _template(h: np.ndarray) -> tuple[StepInput, SamplingTensors, SamplerMode, bool]:
    B, Q, ctx, greedy, filt, cap, pen, nlp, banned, hp, ho, kb, width, hist, D, packed = (int(x) for x in h[1:17])
    masked, biased, w_mask, kl = (int(x) for x in h[17:21])
    i32 = lambda *s: np.zeros(s, np.int32)  # noqa: E731
    f32 = lambda *s: np.zeros(s, np.float32)  # noqa: E731
    seg = lambda b, q: AttentionMetadata(positions=i32(b, q), slot_mapping=i32(b, q),  # noqa: E731
                                         block_tables=i32(b, width), seq_lens=i32(b), query_lens=i32(b))
    if packed:  # B rows on Q token slots
        meta = PackedMetadata(positions=i32(Q), slot_mapping=i32(Q), block_tables=i32(B, width), seq_lens=i32(B),
                              query_lens=i32(B), row_starts=i32(B))
    else:
        meta = MixedMetadata(seg(D, 1), seg(B, Q)) if D else seg(B, Q)
    ids = i32(D + B * Q) if D else (i32(Q) if packed else i32(B, Q))
    R = D + B
    inp = StepInput(input_ids=ids, meta=meta, logits_index=i32(R), slots=i32(R), prompt_lens=i32(R),
                    reset=np.zeros((R,), np.bool_), history=i32(B, hist), lora_ids=i32(ids.size))
    t = SamplingTensors(temperature=f32(R), top_p=f32(R), top_k=i32(R), min_p=f32(R), repetition_penalty=f32(R),
                        presence_penalty=f32(R), frequency_penalty=f32(R), seeds=np.zeros((R,), np.uint32),
                        steps=i32(R), prompt_tokens=i32(R, hp), output_tokens=i32(R, ho), banned=i32(R, kb),
                        bitmask=i32(R, w_mask), bias_ids=i32(R, kl), bias_values=f32(R, kl))
    mode = SamplerMode(all_greedy=bool(greedy), filter=_FILTERS[filt], topk_cap=cap, penalties=bool(pen),
                       num_logprobs=nlp, has_banned=bool(banned), has_mask=bool(masked), has_bias=bool(biased))
    return inp, t, mode, bool(ctx)


class Leader:
    """Process 0's side: announces each step before dispatching it locally."""

    def send_step(self, inp: StepInput, tensors: SamplingTensors, mode: SamplerMode, has_context: bool) -> None:
        from jax.experimental import multihost_utils

        multihost_utils.broadcast_one_to_all(_header(_STEP, inp, tensors, mode, has_context))
        multihost_utils.broadcast_one_to_all((inp, tensors))

    def stop(self) -> None:
        from jax.experimental import multihost_utils

        multihost_utils.broadcast_one_to_all(_header(_STOP))


def follow(runner) -> int:
    """A follower's loop: replays process 0's steps until it stops. Returns the number of steps run."""
    from jax.experimental import multihost_utils

    steps = 0
    while True:
        h = np.asarray(multihost_utils.broadcast_one_to_all(np.zeros((_HEADER,), np.int32)))
        if h[0] == _STOP:
            return steps
        inp, tensors, mode, ctx = _template(h)
        inp, tensors = jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all((inp, tensors)))
        res, _ = runner.execute(inp, ctx, tensors, mode)
        jax.block_until_ready(res.token_ids)
        steps += 1
