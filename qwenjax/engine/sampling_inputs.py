"""A scheduled step's sampler inputs: one SamplingRow per sampler row (padding included), the static SamplerMode and
the numpy SamplingTensors, with the rows' constraints (core/constraints.py) folded into banned ids and the bitmask.

Rows are in the sampler's order (SchedulerOutput.row_index): a mixed step's D decode rows (padded with greedy rows),
then its prefill segment.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from qwenjax.core.constraints import Constraints
from qwenjax.core.scheduler_output import ScheduledSeq, SchedulerOutput
from qwenjax.sampling_params import SamplingParams
from qwenjax.worker.sampler import SamplerMode, SamplingRow, build_tensors, choose_mode

GREEDY_ROW = SamplingRow(params=SamplingParams(temperature=0.0), seed=0)


def sampling_row(r: ScheduledSeq, eos_token_ids, num_outputs: int | None = None) -> SamplingRow:
    """The row of one scheduled sequence; `num_outputs` (default: all) is how many of its outputs precede the token
    this step samples (a late sampler runs after the step appended its PENDING output)."""
    if not r.samples:
        return GREEDY_ROW
    s = r.seq
    outputs = s.output_token_ids if num_outputs is None else s.output_token_ids[:num_outputs]
    banned = s.params.banned_token_ids(len(outputs), eos_token_ids)
    if s.constraint is not None:
        extra = s.constraint.banned(outputs)
        if extra:
            banned = tuple(sorted(set(banned) | set(extra)))
    return SamplingRow(params=s.params, seed=s.seed, output_ids=outputs, banned_ids=banned)


def needs_known_outputs(out: SchedulerOutput) -> bool:
    """Some sampling row's mask or bans depend on an output not read yet (see core/constraints.py)."""
    return any(r.samples and r.seq.num_pending and r.seq.constraint is not None and r.seq.constraint.late
               for r in out.rows)


def step_rows(out: SchedulerOutput, row: Callable[[ScheduledSeq], SamplingRow]) -> list[SamplingRow]:
    """The step's rows in sampler order, `row` making each scheduled sequence's."""
    rows = [row(r) for r in out.rows]
    if out.decode_bucket > out.num_decode:  # a mixed step: its prefill row follows the D decode rows
        rows[out.num_decode:out.num_decode] = [GREEDY_ROW] * (out.decode_bucket - out.num_decode)
    return rows


def row_constraints(out: SchedulerOutput) -> list:
    """Each sampler row's SeqConstraint (None: padding, a row that does not sample, or none)."""
    by_row = [None] * out.num_rows
    for i, r in enumerate(out.rows):
        if r.samples:
            by_row[out.row_index(i)] = r.seq.constraint
    return by_row


def sampler_inputs(out: SchedulerOutput, rows: list[SamplingRow], constraints: Constraints, vocab_size: int,
                   bitmask=None) -> tuple[SamplerMode, object, bool]:
    """(mode, numpy SamplingTensors, wants_lp) of a step. Penalties are always on (see WARMUP_MODES); a row asking
    for logprobs, even 0 top ones, gets ranks too (wants_lp). `bitmask`: the rows' masks when already built
    (constraints.bitmask(row_constraints(out))), else they are built here if the mode needs them."""
    mode = choose_mode(rows)
    if not mode.has_mask:
        bitmask = None
    elif bitmask is None:
        bitmask = constraints.bitmask(row_constraints(out))
    tensors = build_tensors(rows, num_rows=out.num_rows, vocab_size=vocab_size, with_history=False, bitmask=bitmask)
    wants_lp = any(r.samples and r.seq.params.logprobs is not None for r in out.rows)
    mode = dataclasses.replace(mode, penalties=True, num_logprobs=max(mode.num_logprobs, 5 if wants_lp else 0))
    return mode, tensors, wants_lp
