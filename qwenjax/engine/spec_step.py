"""Speculative decoding in the engine loop: n-gram proposals (core/ngram_proposer.py), one verify step on the device
(worker/spec_verify.py), acceptance on the device (worker/rejection_sampler.py), and the accepted tokens handed to
the output processor like any step's.

Which steps speculate: decode steps (every row feeds its one newest token) of a bucket B with B * (k + 1) <=
MAX_VERIFY_ROWS and at most disable_by_batch_size rows (vLLM's key; no limit by default). Their rows get up to k
proposals each (fewer where the proposer finds less, where fewer outputs are left before the length limit, or none
where the cache cannot spare the pages); when no row got any, the step runs as the plain decode step it was (no
verify cost). Rows with and without proposals share one verify step. Prefill and mixed steps never speculate. A
constrained row (structured outputs, allowed_token_ids, bad_words) never gets proposals, since its mask is known for
its next token only: it verifies its newest token alone, sampled under its mask and bans, and its matcher advances
by that token.

Async scheduling (n-gram; draft-model speculation keeps it off) alternates two modes, with these invariants:
- Async: while no row would get a proposal, decode steps run exactly as without speculation (step N+1 dispatched
  before step N is read). At the start of each step() with a step in flight, `drain` runs the proposer on each of
  its rows' KNOWN tokens (outputs through the last read step; the in-flight step's PENDING tail excluded). Nothing
  it builds is used: it only decides.
- Drain: when some row that could speculate (a decode step in a bucket that may speculate, unconstrained, room
  left) finds a match, that step() call dispatches nothing and only reads the in-flight step. Afterwards nothing is
  in flight and every row's tokens are known.
- Verify: the engine calls `step` only while nothing is in flight, so proposals are always built from all of a
  row's tokens, and a verify step is read before step() returns (one at a time). When it finds no proposal, the
  engine dispatches the plain decode step async and is back in the first mode.
Proposals and acceptance therefore never see a PENDING token, and which steps verify changes how many tokens a step
yields, never which (greedy) nor their distribution.

Host invariants after a verify step, for a row that accepted a of its n proposals: its outputs grew by a + 1
(accepted drafts, then the corrected or bonus token), num_computed by 1 + a (the fed newest token and the accepted
drafts have KV; the new newest token has none yet), and its block table holds just the pages of its tokens (the
pages of rejected proposals go back). Prefix caching names only full pages below num_computed, so only accepted
tokens are ever hashed. Stops, EOS and the length limit are checked token by token
(truncating inside an accepted run); proposals never reach past the length limit.

Draft-model speculation (`{"model": DRAFT, ...}`): the draft must share the target's vocabulary and tokenizer (checked
at start-up); its proposals come from engine/draft_model.py, and its cache follows every step the target runs
(`mirror`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from qwenjax.core.ngram_proposer import may_match, propose_ngram
from qwenjax.core.scheduler_output import SchedulerOutput
from qwenjax.core.sequence import PENDING
from qwenjax.engine.draft_model import DraftModel
from qwenjax.engine.sampling_inputs import GREEDY_ROW, sampling_row
from qwenjax.speculative_config import SpeculativeConfig
from qwenjax.worker.lockstep import to_host
from qwenjax.worker.sampler import SamplingRow, build_tensors, choose_mode
from qwenjax.worker.spec_verify import build_verify_input


def check_draft_model(config: SpeculativeConfig, vocab_size: int, tokenizer) -> str:
    """A draft must propose in the target's token ids: the same tokenizer, and no more ids than the target has (a
    smaller, less padded embedding is fine: Qwen2-0.5B's 151,936 ids under Qwen2-7B's 152,064). ValueError naming
    the difference; returns the draft's checkpoint directory."""
    from qwenjax.models.loader import resolve_model_path
    from qwenjax.tokenizer import load_tokenizer, resolve_tokenizer_dir

    path = Path(resolve_model_path(config.model))
    with open(path / "config.json") as f:
        draft_vocab = json.load(f).get("vocab_size")
    if not isinstance(draft_vocab, int) or draft_vocab > vocab_size:
        raise ValueError(f"speculative_config draft model {config.model!r} has vocab_size {draft_vocab}, more than "
                         f"the target's {vocab_size}: it could propose ids the target does not have; a draft must "
                         f"share the target's vocabulary (e.g. Qwen2-0.5B-Instruct for the Qwen2 family)")
    draft_tok = load_tokenizer(resolve_tokenizer_dir(path))
    if draft_tok.get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"speculative_config draft model {config.model!r} has another tokenizer than the target "
                         f"(their token -> id maps differ): a draft must share the target's tokenizer")
    return str(path)


class SpecDecoder:
    """The engine's speculative steps (see the module docstring); `engine` is the LLMEngine it serves."""

    def __init__(self, engine, config: SpeculativeConfig):
        self.draft = None
        if config.method == "draft_model":
            path = check_draft_model(config, engine.model_config.vocab_size, engine.tokenizer)
            self.draft = DraftModel(path, engine.args, engine.model, config.num_speculative_tokens)
        self.engine = engine
        self.config = config
        self.k = config.num_speculative_tokens
        self.num_positions = self.k + 1  # Q of the verify step
        self.batches = config.verify_batches(engine.scheduler_config.decode_buckets)  # buckets that may speculate
        engine.stats.spec_decode_num_accepted_tokens_per_pos = [0] * self.k

    def mirror(self, out: SchedulerOutput, inp) -> None:
        """A step the target runs without speculating: the draft's cache follows it (draft method only)."""
        if self.draft is not None:
            self.draft.mirror(out, inp)

    def propose(self, seq) -> list[int]:
        """Up to k proposals for a decoding row from its known tokens, never reaching past its length limit (a + 1
        tokens land after its outputs, PENDING ones included)."""
        room = seq.max_output_tokens - len(seq.output_token_ids) - 1
        if room < 1 or seq.constraint is not None or \
                not may_match(seq.prompt_token_ids, seq.output_token_ids, seq.num_known_outputs):
            return []
        c = self.config
        return propose_ngram(seq.prompt_token_ids + seq.output_token_ids[:seq.num_known_outputs],
                             k=min(self.k, room), min_n=c.prompt_lookup_min, max_n=c.prompt_lookup_max)

    def _speculates(self, out: SchedulerOutput) -> bool:
        """A step of this shape may verify: decode, one step, a verify bucket, within disable_by_batch_size."""
        limit = self.config.disable_by_batch_size
        return out.kind == "decode" and out.num_steps == 1 and out.bucket[0] in self.batches and \
            (limit is None or len(out.rows) <= limit)

    def drain(self, on_dispatch=None) -> list | None:
        """Async scheduling: when a row of the in-flight step finds proposals in its known tokens, reads that step,
        dispatches nothing and returns its outputs (the next step() verifies); None otherwise (the engine steps)."""
        eng = self.engine
        step = eng._in_flight
        if step is None or step.out is None or not self._speculates(step.out) or \
                not any(not seq.finished and self.propose(seq) for _, seq, _ in step.samples):
            return None
        eng._in_flight = None
        eng.stats.spec_decode_drains += 1
        if on_dispatch is not None:  # the previous outputs leave while the device finishes the in-flight step
            on_dispatch()
        return eng._process(step)

    def step(self, out: SchedulerOutput, on_dispatch=None) -> list | None:
        """Runs `out` as a verify step and returns its outputs, or None: it does not speculate (the engine runs it)."""
        if not self._speculates(out):
            return None
        eng = self.engine
        if self.draft is not None:
            drafts = self.draft.propose(out, eng.blocks)  # grows the rows it proposes for
        else:
            drafts = []
            for r in out.rows:
                d = self.propose(r.seq)
                if d and not eng.blocks.grow(r.seq.block_table, r.seq.num_tokens + len(d)):
                    d = []  # no pages to spare: this row verifies its newest token alone
                drafts.append(d)
        if not any(drafts):
            if self.draft is not None:  # the plain decode step runs (and mirrors): the grown pages go back
                for r in out.rows:
                    eng.blocks.shrink(r.seq.block_table, r.seq.num_tokens)
            return None
        try:
            inp, draft_ids, num_drafts, tensors, mode, wants_lp = self._inputs(out, drafts)
        except Exception:  # noqa: BLE001 - the plain decode step finds and fails the culprit request
            for r in out.rows:
                eng.blocks.shrink(r.seq.block_table, r.seq.num_tokens)
            return None
        self._count_step(out)
        if out.forks:
            eng.runner.fork(out.forks)
        t0 = time.perf_counter()
        res = eng.runner.verify(inp, draft_ids, num_drafts, tensors, mode)
        eng.stats.host_dispatch_s += time.perf_counter() - t0
        if on_dispatch is not None:
            on_dispatch()
        t0 = time.perf_counter()
        tokens, accepted = to_host(res.token_ids).tolist(), to_host(res.num_accepted).tolist()
        lp = tuple(to_host(x) for x in (res.logprobs, res.ranks, res.top_ids, res.top_logprobs)) if wants_lp else None
        t1 = time.perf_counter()
        eng.stats.host_wait_s += t1 - t0
        touched = {}
        runs = [tokens[b][:a + 1] for b, a in enumerate(accepted)]
        eng.constraints.advance([(b, r.seq, None) for b, r in enumerate(out.rows)], runs,
                                lambda seq, e: eng.fail_request(seq.request_id, e))
        for b, (r, d) in enumerate(zip(out.rows, drafts)):
            seq, a = r.seq, accepted[b]
            if seq.finished:
                continue  # its constraint refused the token (failed above)
            self._count_acceptance(len(d), a)
            try:
                self._append(seq, runs[b], lp, b)
            except Exception as e:  # noqa: BLE001 - finishing one request's row must not end the loop
                touched.pop(seq.request_id, None)
                eng.fail_request(seq.request_id, e)
                continue
            if not seq.finished:
                eng.blocks.shrink(seq.block_table, seq.num_tokens)  # the rejected proposals' pages go back
            touched[seq.request_id] = eng.requests[seq.request_id]
        outputs = eng._outputs(touched.values())
        eng.stats.host_process_s += time.perf_counter() - t1
        return outputs

    def _inputs(self, out: SchedulerOutput, drafts: list[list[int]]):
        """The verify step's numpy inputs and its sampler rows: row b's position j samples output index
        len(outputs) + j (its seed's step, its min_tokens bans) after drafts 1..j."""
        eng, Q = self.engine, self.num_positions
        B = out.bucket[0]
        sc = eng.scheduler_config
        inp, draft_ids, num_drafts = build_verify_input(
            [r.seq for r in out.rows], drafts, rows=B, num_positions=Q, page_size=eng.blocks.page_size,
            num_pages=eng.blocks.num_pages, max_pages_per_seq=sc.max_pages_per_seq,
            scratch_slot=eng.runner.scratch_slot)
        rows, constraints = [], []
        for r in out.rows:
            s, n = r.seq, len(r.seq.output_token_ids)
            if s.constraint is not None:  # no proposals: position 0 alone counts (its mask and bans), as a decode row
                rows += [sampling_row(r, eng.eos_token_ids)] * Q
                constraints += [s.constraint] + [None] * (Q - 1)
                continue
            # build_tensors reads only the length of output_ids (penalty history lives on the device): a range.
            rows += [SamplingRow(params=s.params, seed=s.seed, output_ids=range(n + j),
                                 banned_ids=s.params.banned_token_ids(n + j, eng.eos_token_ids)) for j in range(Q)]
            constraints += [None] * Q
        rows += [GREEDY_ROW] * (Q * (B - len(out.rows)))
        mode = choose_mode(rows)
        mask = None
        if mode.has_mask:
            mask = eng.constraints.bitmask(constraints + [None] * (Q * (B - len(out.rows))))
        tensors = build_tensors(rows, num_rows=B * Q, vocab_size=eng.model_config.vocab_size, with_history=False,
                                bitmask=mask)
        wants_lp = any(r.seq.params.logprobs is not None for r in out.rows)
        mode = dataclasses.replace(mode, num_logprobs=max(mode.num_logprobs, 5 if wants_lp else 0))
        return inp, draft_ids, num_drafts, tensors, mode, wants_lp

    def _append(self, seq, tokens: list[int], lp, b: int) -> None:
        """The row's accepted run (accepted drafts, then the corrected / bonus token) into its outputs, token by
        token through the stop checks where text or logprobs are needed."""
        eng = self.engine
        seq.num_computed += len(tokens)  # the fed newest token and the accepted drafts now have KV
        index = len(seq.output_token_ids)
        seq.output_token_ids.extend([PENDING] * len(tokens))
        seq.num_pending += len(tokens)
        text = eng._needs_text(seq)
        if lp is None and not text:
            eng.output_processor.append_tokens(seq, tokens, index)
            return
        for j, token in enumerate(tokens):
            if seq.finished:
                break
            seq.output_token_ids[index + j] = token
            seq.num_pending -= 1
            entry = None if lp is None else (float(lp[0][b, j]), int(lp[1][b, j]), lp[2][b, j], lp[3][b, j])
            eng.output_processor.append_token(seq, token, index + j, entry, text=text)

    def _count_step(self, out: SchedulerOutput) -> None:
        st, eng = self.engine.stats, self.engine
        st.steps += 1
        st.decode_steps += 1
        st.spec_decode_verify_steps += 1
        st.step_rows += len(out.rows)
        st.max_decode_batch = max(st.max_decode_batch, len(out.rows))
        st.preemptions = eng.scheduler.num_preemptions
        st.prefix_cache_queries = eng.blocks.query_tokens
        st.prefix_cache_hits = eng.blocks.hit_tokens

    def _count_acceptance(self, proposed: int, accepted: int) -> None:
        if not proposed:
            return
        st = self.engine.stats
        st.spec_decode_num_drafts += 1
        st.spec_decode_num_draft_tokens += proposed
        st.spec_decode_num_accepted_tokens += accepted
        for i in range(accepted):
            st.spec_decode_num_accepted_tokens_per_pos[i] += 1
