"""Sampled tokens -> a sequence's outputs: append them, detokenize incrementally, check stop ids, stop strings,
min_tokens and the length limit, and finish the sequence (its pages go back through the scheduler).

Plain Python on the host (vLLM's output processor). The engine reads a dispatched step's token ids and hands each
row's tokens here; a token that arrives after its sequence ended is never reported.
"""

from __future__ import annotations

import time

from qwenjax.core.detokenizer import IncrementalDetokenizer
from qwenjax.core.scheduler import Scheduler
from qwenjax.core.sequence import Request, SeqStatus, Sequence
from qwenjax.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput


class OutputProcessor:
    """`stats` is the engine's counters (generation_tokens is counted here)."""

    def __init__(self, tokenizer, eos_token_ids, scheduler: Scheduler, stats):
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.scheduler = scheduler
        self.stats = stats

    def append_tokens(self, seq: Sequence, tokens: list[int], index: int) -> None:
        """`append_token` for outputs index, index + 1, ... of a sequence that needs no logprobs and no text as it
        grows, in one pass: it ends at the first stop id at or past min_tokens, or at its length limit."""
        p = seq.params
        end = min(len(tokens), seq.max_output_tokens - index)  # outputs past the length limit are never reported
        reason = "length" if index + end >= seq.max_output_tokens else None
        stops = p.stop_token_id_set(self.eos_token_ids)
        if stops:
            for j in range(max(0, p.min_tokens - index - 1), end):
                if tokens[j] in stops:
                    end, reason = j + 1, "stop"
                    seq.stop_reason = tokens[j] if tokens[j] in p.stop_token_ids else None
                    break
        seq.output_token_ids[index:index + end] = tokens[:end]
        seq.num_pending -= end
        self.stats.generation_tokens += end
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
        if reason is not None:
            self.finish(seq, reason)

    def append_token(self, seq: Sequence, token: int, index: int, lp, *, text: bool) -> None:
        """Output `index` of `seq` is now known to be `token` (outputs before it are known too)."""
        p = seq.params
        self.stats.generation_tokens += 1
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
        if lp is not None:
            chosen, rank, top_ids, top_lps = lp
            seq.cumulative_logprob += chosen
            if seq.logprobs is not None:
                entry = {token: Logprob(chosen, rank)}
                for r, (tid, val) in enumerate(zip(top_ids[:p.logprobs], top_lps[:p.logprobs]), 1):
                    entry.setdefault(int(tid), Logprob(float(val), r))
                if p.detokenize:
                    for tid, l in entry.items():
                        l.decoded_token = self.tokenizer.decode([tid])  # its text, not its byte-level symbols
                seq.logprobs.append(entry)
        delta = ""
        if text:  # else the text is decoded once at the end: the deltas concatenate to it
            if seq.detokenizer is None:
                seq.detokenizer = IncrementalDetokenizer(
                    self.tokenizer, seq.prompt_token_ids, skip_special_tokens=p.skip_special_tokens,
                    spaces_between_special_tokens=p.spaces_between_special_tokens)
                delta = seq.detokenizer.add_tokens(seq.output_token_ids[:index + 1])
            else:
                delta = seq.detokenizer.add_tokens([token])
        seq.output_text += delta
        n_out = index + 1
        if n_out >= p.min_tokens:
            if token in p.stop_token_id_set(self.eos_token_ids):
                seq.stop_reason = token if token in p.stop_token_ids else None
                return self.finish(seq, "stop")
            if seq.stop_checker is not None and delta:
                match = seq.stop_checker.check(seq.output_text, len(delta))
                if match is not None:
                    seq.output_text, seq.stop_reason = match.text, match.stop
                    return self.finish(seq, "stop", flush=False)
        if n_out >= seq.max_output_tokens:
            self.finish(seq, "length")

    def finish(self, seq: Sequence, reason: str, *, flush: bool = True, text: bool = True) -> None:
        """Ends `seq` and frees its pages. `text` False (a request that failed in the engine): no text is made, so
        nothing that could raise again runs."""
        seq.finish_reason = reason
        if seq.num_pending:  # tokens a step in flight samples after the end: never reported
            del seq.output_token_ids[-seq.num_pending:]
            seq.num_pending = 0
        if text:
            self._final_text(seq, flush)
        self.scheduler.remove(seq)
        if seq.constraint is not None:
            seq.constraint.release()
        seq.status = SeqStatus.FINISHED

    def _final_text(self, seq: Sequence, flush: bool) -> None:
        """The text's last piece: the detokenizer's held-back bytes, or (offline, no text as it grew) all of it."""
        if flush and seq.detokenizer is not None:
            seq.output_text += seq.detokenizer.flush()
        elif seq.detokenizer is None and seq.params.detokenize and seq.output_token_ids:
            seq.output_text = self.tokenizer.decode(
                seq.output_token_ids, skip_special_tokens=seq.params.skip_special_tokens,
                spaces_between_special_tokens=seq.params.spaces_between_special_tokens)

    def prompt_logprobs(self, ids: list[int], k: int, chosen, ranks, top_ids, top_lps) -> list:
        """vLLM's shape from the runner's arrays: None for the first token, then {token: Logprob} with the token
        itself and the top k."""
        out: list = [None]
        for i, tok in enumerate(ids[1:]):
            entry = {tok: Logprob(float(chosen[i]), rank=int(ranks[i]))}
            for rank, (t, lp) in enumerate(zip(top_ids[i][:k], top_lps[i][:k]), 1):
                entry.setdefault(int(t), Logprob(float(lp), rank))
            for t, lp in entry.items():
                lp.decoded_token = self.tokenizer.decode([t])  # the text (' Perry'), as the server shows
            out.append(entry)
        return out


def request_output(req: Request) -> RequestOutput:
    """The RequestOutput of a request as it stands (its sequences' known outputs)."""
    comps = [CompletionOutput(index=s.index, text=s.output_text, token_ids=s.output_token_ids[:s.num_known_outputs],
                              cumulative_logprob=s.cumulative_logprob if s.logprobs is not None else None,
                              logprobs=s.logprobs, finish_reason=s.finish_reason, stop_reason=s.stop_reason)
             for s in req.seqs]
    first = min((s.first_token_time for s in req.seqs if s.first_token_time), default=None)
    metrics = RequestMetrics(arrival_time=req.arrival_time, first_scheduled_time=req.first_scheduled_time,
                             first_token_time=first, finished_time=req.finished_time,
                             num_preemptions=sum(s.num_preemptions for s in req.seqs))
    return RequestOutput(request_id=req.request_id, prompt=req.prompt, prompt_token_ids=req.prompt_token_ids,
                         prompt_logprobs=req.prompt_logprobs, outputs=comps, finished=req.finished, metrics=metrics,
                         lora_request=req.lora_request)
