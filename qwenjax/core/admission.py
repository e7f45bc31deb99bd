"""A validated request's sequences: one per sample of `n`, each with its seed, stop checker, logprobs list and token
constraint; with n > 1 the copies fork from the first one's computed prompt (Scheduler._fork_waiting)."""

from __future__ import annotations

from qwenjax.core.constraints import Constraints, RequestConstraint
from qwenjax.core.sequence import Sequence
from qwenjax.core.stop_checker import StopChecker
from qwenjax.sampling_params import SamplingParams


def new_sequences(request_id: str, prompt_token_ids: list[int], params: SamplingParams, *, rng, arrival: float,
                  priority: int, client: str | None, max_output_tokens: int, constraints: Constraints,
                  constraint: RequestConstraint | None, forkable: bool) -> list[Sequence]:
    """`rng` draws the seeds of a request without one; copy i of a seeded request gets seed + i * 0x9E3779B9
    (mod 2**32). `forkable` False (several processes, which do not replay forks yet): every copy prefills itself."""
    seqs = []
    for i in range(params.n):
        seed = (params.seed + 0x9E3779B9 * i) & 0xFFFFFFFF if params.seed is not None \
            else int(rng.integers(0, 2**32))
        seq = Sequence(request_id=request_id, index=i, prompt_token_ids=prompt_token_ids, params=params, seed=seed,
                       arrival_time=arrival, priority=priority, client=client, max_output_tokens=max_output_tokens)
        if params.stop:
            seq.stop_checker = StopChecker(params.stop, params.include_stop_str_in_output)
        if params.logprobs is not None:
            seq.logprobs = []
        if constraint is not None:
            seq.constraint = constraints.start(constraint)
        seqs.append(seq)
    if len(seqs) > 1 and forkable:
        for seq in seqs[1:]:
            seq.parent, seq.copy_pending = seqs[0], True
        seqs[0].num_unforked = len(seqs) - 1
    return seqs
