"""N-gram (prompt lookup) proposals on the host: plain Python and numpy, never JAX.

For a row whose tokens (prompt + known outputs) are t[0..L), look for the longest suffix t[L-n..L) with
prompt_lookup_min <= n <= prompt_lookup_max that also occurs earlier, at t[i..i+n) with i + n < L; propose the (up to
k) tokens that followed it there, t[i+n..i+n+k). Among several earlier occurrences of that suffix the most recent one
followed by k whole tokens is taken (the freshest context), else the earliest (the most tokens follow it: in a loop of
period p < k the latest occurrence is followed by only p tokens). A proposal is deterministic given the row's
tokens, which is what lets the rejection sampler treat it as a one-hot draft distribution.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def propose_ngram(tokens: Sequence[int] | np.ndarray, *, k: int, min_n: int, max_n: int) -> list[int]:
    """Up to `k` proposed next tokens for a row whose tokens so far are `tokens` ([] when no suffix of length
    min_n..max_n occurs earlier)."""
    t = np.asarray(tokens, dtype=np.int64)
    L = t.shape[0]
    if k < 1 or L < min_n + 1:
        return []
    # Every earlier occurrence of a suffix ends where the last token occurs earlier: the candidates, found in one
    # O(L) pass (a row's search costs O(L + candidates x n), not O(L x n) per n: it runs every step for every row).
    ends = np.flatnonzero(t[:L - 1] == t[L - 1])
    for n in range(min(max_n, L - 1), min_n - 1, -1):
        # Windows starting at 0 .. L-n-1: each is followed by at least one token, and none is the suffix itself.
        starts = ends[ends >= n - 1] - (n - 1)
        if not starts.size:
            continue
        same = (t[starts[:, None] + np.arange(n)] == t[L - n:]).all(axis=1)
        hits = starts[same]
        if hits.size:
            full = hits[hits + n + k <= L]
            i = int(full[-1] if full.size else hits[0])
            return t[i + n:i + n + k].tolist()
    return []


def may_match(prompt: list[int], outputs: list, num_known: int) -> bool:
    """Whether a row whose known tokens are prompt + outputs[:num_known] can get a proposal at all: its last token
    occurs earlier (every suffix that occurs earlier ends with it). C-speed list scans, no copies: the engine asks
    this of every decoding row every step, and most rows of most steps answer no."""
    if num_known:
        last = outputs[num_known - 1]
        return last in prompt or outputs.index(last) < num_known - 1
    return len(prompt) > 1 and prompt.index(prompt[-1]) < len(prompt) - 1
