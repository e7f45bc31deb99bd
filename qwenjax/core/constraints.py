"""Per-request token constraints that depend on more than the sampler's parameters: structured outputs (a grammar
matcher per sequence), allowed_token_ids (a fixed bitmask) and bad_words (ids banned given the outputs so far).

`Constraints.prepare` runs when a request is added and raises ValueError for a bad constraint (nothing is queued);
each sequence then holds a `SeqConstraint`. Before a step samples, the engine asks each row for its banned ids and
fills the step's bitmask here; as outputs become known, `advance` feeds them to the row's matcher.

A row whose mask or bans depend on its newest output (a matcher, or a bad word of several tokens) cannot be sampled
before that output is read: `needs_known_outputs` tells the engine, which then dispatches the step's model call
first and its sampler after reading the previous step (llm_engine: async scheduling keeps the model's overlap).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time

import numpy as np

from qwenjax.core.grammar import GrammarCompiler, allowed_bitmask, consume
from qwenjax.sampling_params import SamplingParams


@dataclasses.dataclass(frozen=True)
class RequestConstraint:
    """What a request's constraints compile to, shared by its n sequences."""

    structured: object | None  # StructuredOutputsParams (each sequence gets its own matcher)
    allowed: np.ndarray | None  # [W] int32 bitmask of allowed_token_ids
    single_bans: tuple[int, ...]  # bad words of one token: always banned
    multi_bans: tuple[tuple[int, ...], ...]  # longer bad words: last token banned after the others


@dataclasses.dataclass
class SeqConstraint:
    request: RequestConstraint
    matcher: object | None  # llguidance.LLMatcher; has consumed every known output of the sequence
    eos_token_ids: frozenset[int] = frozenset()
    pool: GrammarCompiler | None = None  # takes the matcher back when the sequence ends

    def release(self) -> None:
        """The sequence has ended: its matcher goes back to the pool (called once; later calls do nothing)."""
        m, self.matcher = self.matcher, None
        if m is not None and self.pool is not None:
            self.pool.release(self.request.structured, m)

    @property
    def late(self) -> bool:
        return self.matcher is not None or bool(self.request.multi_bans)

    def banned(self, outputs: list[int]) -> tuple[int, ...]:
        """Bad-word ids banned at the next step, given the known `outputs`: vLLM's rule, a word's last token when
        the outputs end with the word's other tokens."""
        rc = self.request
        bans = list(rc.single_bans)
        for word in rc.multi_bans:
            prefix = word[:-1]
            if len(outputs) >= len(prefix) and tuple(outputs[len(outputs) - len(prefix):]) == prefix:
                bans.append(word[-1])
        return tuple(bans)

    def advance(self, tokens: list[int]) -> None:
        if self.matcher is not None:
            consume(self.matcher, tokens, self.eos_token_ids)


class Constraints:
    def __init__(self, tokenizer, vocab_size: int, eos_token_ids):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.grammars = GrammarCompiler(tokenizer, vocab_size, eos_token_ids)
        self._eos_ids = frozenset(eos_token_ids)
        self._eos_mask = allowed_bitmask(eos_token_ids, vocab_size)
        self.mask_seconds = 0.0  # host time spent building bitmasks (benchmarks read it)
        self.mask_steps = 0
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        # False (default): a late step's masks are built inline, as soon as the tokens before it are read; True: on
        # a worker thread while the engine handles those tokens. Measured on the H100 (7B, 64 rows, structured.py):
        # inline was faster, the worker waiting for the GIL while the engine thread held it.
        self.masks_on_thread = False

    def advance(self, rows, tokens_by_row, on_error) -> None:
        """Feeds each constrained, unfinished sequence of `rows` ((row, sequence, output index) of a step) its new
        tokens (`tokens_by_row[row]`); a sequence whose token its constraint refuses goes to `on_error(seq, exc)`.
        Called as soon as a step's tokens are read, before they are handled, so the next masks can start."""
        for b, seq, _ in rows:
            if seq.constraint is not None and not seq.finished:
                try:
                    seq.constraint.advance(tokens_by_row[b])
                except Exception as e:  # noqa: BLE001 - one request's constraint must not end the loop
                    on_error(seq, e)

    def bitmask_async(self, rows: list[SeqConstraint | None]) -> concurrent.futures.Future:
        """`bitmask(rows)` as a future: computed now (masks_on_thread False), or on a worker thread, where llguidance
        fills the masks outside the GIL while the caller goes on (handling the step's tokens). The rows' matchers
        must not advance until the future is done."""
        if not self.masks_on_thread:
            done: concurrent.futures.Future = concurrent.futures.Future()
            done.set_result(self.bitmask(rows))
            return done
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="qwenjax-masks")
        return self._pool.submit(self.bitmask, rows)

    @property
    def bitmask_width(self) -> int:
        return self.grammars.bitmask_width

    def prepare(self, params: SamplingParams) -> RequestConstraint | None:
        """Compiles a request's constraints (None: it has none). Raises ValueError naming a bad one."""
        so, allowed, bad = params.structured_outputs, params.allowed_token_ids, params.bad_words
        if so is None and allowed is None and not bad:
            return None
        if so is not None:
            self.grammars.compile(so)
        words = self._bad_word_ids(bad or ())
        return RequestConstraint(
            structured=so,
            allowed=None if allowed is None else allowed_bitmask(allowed, self.vocab_size),
            single_bans=tuple(sorted({w[0] for w in words if len(w) == 1})),
            multi_bans=tuple(w for w in words if len(w) > 1),
        )

    def start(self, rc: RequestConstraint) -> SeqConstraint:
        if rc.structured is None:
            return SeqConstraint(rc, None, self._eos_ids)
        return SeqConstraint(rc, self.grammars.matcher(rc.structured), self._eos_ids, self.grammars)

    def _bad_word_ids(self, words) -> list[tuple[int, ...]]:
        """Each word's token ids as generated mid-text (with a leading space) and at the start (without), as
        vLLM tokenizes bad_words."""
        out: set[tuple[int, ...]] = set()
        for word in words:  # non-empty (SamplingParams checks)
            for text in (word.lstrip(), " " + word.lstrip()):
                ids = tuple(self.tokenizer.encode(text, add_special_tokens=False))
                if ids:
                    out.add(ids)
        return sorted(out)

    def bitmask(self, rows: list[SeqConstraint | None]) -> np.ndarray:
        """The step's bitmask [len(rows), W]: -1 (all allowed) for rows without a mask, allowed_token_ids, and each
        matcher's next-token mask (and-ed with allowed_token_ids when a row has both)."""
        t0 = time.perf_counter()
        mask = np.full((len(rows), self.bitmask_width), -1, np.int32)
        fills = []
        for i, c in enumerate(rows):
            if c is None:
                continue
            if c.matcher is not None and not c.matcher.is_stopped():
                fills.append((c.matcher, i))
            elif c.matcher is not None:  # complete: only an EOS may follow (it ends the sequence)
                mask[i] = self._eos_mask
        self.grammars.fill_bitmasks(fills, mask)
        for i, c in enumerate(rows):
            if c is not None and c.request.allowed is not None:
                mask[i] &= c.request.allowed
        self.mask_seconds += time.perf_counter() - t0
        self.mask_steps += 1
        return mask
