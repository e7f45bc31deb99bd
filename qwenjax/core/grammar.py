"""Structured outputs on the host: constraints compiled by llguidance, one matcher per sequence, token bitmasks.

A constraint (qwenjax.structured_outputs) becomes an llguidance grammar, which is validated and compiled once per
distinct constraint (an LRU cache of grammars). Each sequence gets a matcher of its own, advanced token by token as its
outputs become known, and handed back when the sequence ends: a pool per grammar keeps them (reset) for later
sequences. Matchers are never deep copies of one another: copies share their lexer's state cache behind a lock, so
llguidance's threads would fill a batch's masks one row at a time (measured on the H100 host's 16 cores: the fill of
64 rows got slower with more threads; independent matchers got faster).

Before a step samples, `fill_bitmasks` writes each constrained row's allowed tokens into an int32 bitmask
[rows, ceil(V / 32)] (bit t % 32 of word t // 32 set: token t allowed), in parallel threads outside the GIL; the
sampler sets the logits of every other token to -inf.

Invariants: a matcher has consumed exactly the sequence's known output tokens; bits past the tokenizer's vocabulary
(the model's padded rows) are 0, so those ids are never drawn under a constraint.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time

import numpy as np

from qwenjax.structured_outputs import StructuredOutputsParams

logger = logging.getLogger("qwenjax")

CACHE_SIZE = 256  # distinct constraints whose compiled grammar is kept
POOL_SIZE = 512  # idle matchers kept per grammar, for the sequences to come
# Compact JSON (see qwenjax.structured_outputs): no whitespace between tokens.
_JSON_OPTIONS = {"whitespace_flexible": False}


def llguidance_grammar(so: StructuredOutputsParams) -> str:
    """The llguidance grammar text of a constraint (not yet validated)."""
    import llguidance

    kind = so.kind
    if kind in ("json", "json_object"):
        return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(so.schema), defaults=_JSON_OPTIONS)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(so.regex)
    if kind == "choice":
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in so.choice))
    try:
        return llguidance.grammar_from("grammar", so.grammar)  # Lark, or GBNF converted to Lark
    except ValueError as e:
        raise ValueError(f"structured outputs grammar is neither Lark nor GBNF: {e}") from None


class GrammarCompiler:
    """Compiles constraints for one tokenizer and vocabulary size; thread-safe (the server validates requests on
    worker threads while the engine loop makes matchers)."""

    def __init__(self, hf_tokenizer, vocab_size: int, eos_token_ids, *, threads: int | None = None):
        self._hf_tokenizer = hf_tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self._threads = threads
        self._tokenizer = None  # llguidance's, built on first use (~1 s for Qwen2's vocabulary)
        self._executor = None
        self._cache: collections.OrderedDict[tuple, str] = collections.OrderedDict()  # key -> validated grammar
        self._idle: dict[tuple, list] = {}  # key -> matchers handed back, in their initial state after reset()
        self._lock = threading.Lock()
        self.compile_seconds: list[float] = []  # wall time of each compile that missed the cache (benchmarks read it)

    @property
    def bitmask_width(self) -> int:
        return (self.vocab_size + 31) // 32

    def _ll_tokenizer(self):
        if self._tokenizer is None:
            import llguidance
            import llguidance.hf

            self._tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer, n_vocab=self.vocab_size,
                                                           eos_token=self.eos_token_ids or None)
            self._executor = llguidance.LLExecutor(self._threads)
        return self._tokenizer

    def compile(self, so: StructuredOutputsParams) -> str:
        """The validated llguidance grammar of `so` (cached; the first time, a matcher is built to check it). Raises
        ValueError naming what is wrong with the constraint."""
        import llguidance

        key = _key(so)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        t0 = time.perf_counter()
        try:
            grammar = llguidance_grammar(so)
        except ValueError as e:
            raise ValueError(f"structured outputs {so.kind}: {e}") from None
        tokenizer = self._ll_tokenizer()
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
        if is_error:
            raise ValueError(f"structured outputs {so.kind} is not supported or not valid: {messages[0]}")
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"structured outputs {so.kind} is not supported or not valid: {matcher.get_error()}")
        self.compile_seconds.append(time.perf_counter() - t0)
        with self._lock:
            self._cache[key] = grammar
            self._idle.setdefault(key, []).append(matcher)
            while len(self._cache) > CACHE_SIZE:
                old, _ = self._cache.popitem(last=False)
                self._idle.pop(old, None)
        return grammar

    def matcher(self, so: StructuredOutputsParams):
        """A matcher of its own for one sequence, in its initial state: an idle one from the pool, else a new one.
        Give it back with `release` when the sequence ends."""
        import llguidance

        grammar = self.compile(so)
        key = _key(so)
        with self._lock:
            idle = self._idle.get(key)
            m = idle.pop() if idle else None
        if m is not None and m.reset():
            return m
        return llguidance.LLMatcher(self._ll_tokenizer(), grammar, log_level=0)

    def release(self, so: StructuredOutputsParams, matcher) -> None:
        """Takes back a sequence's matcher (its sequence has ended; nothing fills its mask any more)."""
        key = _key(so)
        with self._lock:
            idle = self._idle.get(key)
            if idle is not None and len(idle) < POOL_SIZE:  # None: the grammar left the cache
                idle.append(matcher)

    def use_threads(self, threads: int | None) -> None:
        """Fill masks with `threads` llguidance workers from now on (None: llguidance's default, one per core)."""
        import llguidance

        self._ll_tokenizer()
        self._threads = threads
        self._executor = llguidance.LLExecutor(threads)

    def fill_bitmasks(self, rows: list[tuple[object, int]], bitmask: np.ndarray) -> None:
        """Writes each (matcher, row) pair's allowed tokens into bitmask[row] (C-contiguous int32 [B, W]); rows not
        named keep their contents. Runs llguidance's threads outside the GIL."""
        if not rows:
            return
        from llguidance.numpy import fill_next_token_bitmask_par

        self._ll_tokenizer()
        fill_next_token_bitmask_par(self._executor, rows, bitmask)


def _key(so: StructuredOutputsParams) -> tuple:
    return so.kind, getattr(so, so.kind)


def consume(matcher, tokens: list[int], eos_token_ids: frozenset[int]) -> None:
    """Advances a sequence's matcher over its newly known output tokens. Raises RuntimeError when one is not allowed:
    a token the grammar refuses (an engine defect), or anything but EOS once the constraint is complete (min_tokens
    or bad_words banning EOS leave no allowed token)."""
    for t in tokens:
        if matcher.is_stopped():
            if t in eos_token_ids:
                return  # the sequence ends here; later tokens are discarded with it
            raise RuntimeError(f"structured outputs: the output is complete and only EOS may follow, but token {t} was "
                               f"drawn (min_tokens or bad_words ban EOS here)")
        if not matcher.consume_token(t):
            raise RuntimeError(f"structured outputs: token {t} is not allowed by the request's constraint "
                               f"({matcher.get_error()})")


def allowed_bitmask(token_ids, vocab_size: int) -> np.ndarray:
    """The int32 bitmask [ceil(V / 32)] of a token id list (allowed_token_ids)."""
    ids = np.unique(np.asarray(list(token_ids), np.int64))
    # Ids past the vocabulary are never drawn: e.g. the tokenizer's EOS ids (151643..) over a small model's embedding.
    ids = ids[(ids >= 0) & (ids < vocab_size)]
    words = np.zeros(((vocab_size + 31) // 32,), np.uint32)
    np.bitwise_or.at(words, ids // 32, (np.uint32(1) << (ids % 32).astype(np.uint32)))
    return words.view(np.int32)
