"""The n-gram proposer of speculative decoding (core/ngram_proposer.py): fixed cases, and every proposal (and the
engine's may_match filter) against a literal transcription of its docstring on random sequences."""

import numpy as np

from qwenjax.core.ngram_proposer import may_match, propose_ngram


def test_ngram_proposer():
    assert propose_ngram([1, 2, 3, 4, 1, 2], k=3, min_n=1, max_n=3) == [3, 4, 1]
    # the longest suffix wins: (1, 2, 3) occurs before 9; the shorter (3,) before 4 is not taken
    assert propose_ngram([1, 2, 3, 4, 1, 2, 3, 9, 1, 2, 3], k=3, min_n=1, max_n=3) == [9, 1, 2]
    assert propose_ngram([1, 2, 3, 4, 1, 2, 3, 9, 1, 2, 3], k=3, min_n=4, max_n=5) == []  # too short a match
    assert propose_ngram([5] * 8, k=3, min_n=1, max_n=3) == [5, 5, 5]  # an occurrence followed by k tokens
    assert propose_ngram([5] * 4, k=3, min_n=1, max_n=3) == [5]  # none: the earliest occurrence
    assert propose_ngram([1, 2, 3], k=3, min_n=1, max_n=3) == []
    assert propose_ngram([7, 1, 8, 7, 2, 8, 7], k=2, min_n=1, max_n=1) == [2, 8]  # the most recent occurrence


def _propose_by_definition(t, k, min_n, max_n):
    """The proposer's docstring, literally: the longest suffix (min_n..max_n) occurring earlier; the most recent
    occurrence followed by k whole tokens, else the earliest."""
    for n in range(min(max_n, len(t) - 1), min_n - 1, -1):
        hits = [i for i in range(len(t) - n) if t[i:i + n] == t[len(t) - n:]]
        if hits:
            full = [i for i in hits if i + n + k <= len(t)]
            i = full[-1] if full else hits[0]
            return t[i + n:i + n + k]
    return []


def test_ngram_proposer_matches_its_definition():
    rng = np.random.default_rng(0)
    for trial in range(300):
        t = rng.integers(0, int(rng.integers(2, 6)), int(rng.integers(1, 40))).tolist()  # small vocabularies repeat
        k, lo = int(rng.integers(1, 6)), int(rng.integers(1, 4))
        hi = lo + int(rng.integers(0, 4))
        assert propose_ngram(t, k=k, min_n=lo, max_n=hi) == _propose_by_definition(t, k, lo, hi), (t, k, lo, hi)
        # the engine's filter never drops a row that has a proposal (any split into prompt / known / pending)
        cut = int(rng.integers(0, len(t) + 1))
        known = t[cut:] + [-1] * int(rng.integers(0, 3))  # PENDING-like entries past the known outputs
        if propose_ngram(t, k=k, min_n=1, max_n=len(t)):
            assert may_match(t[:cut], known, len(t) - cut), (t, cut)
        else:
            assert not may_match(t[:cut], known, len(t) - cut), (t, cut)
