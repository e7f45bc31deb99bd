"""Stop strings: find one completed in the newest text, and how much text a stream must hold back meanwhile.

Semantics (one ``StopChecker`` per request, fed the request's detokenized output text after every delta):
  * A stop string counts only when it ends inside the newest delta; earlier text was checked by earlier calls.
    So each stop string ``s`` is searched only in the last ``num_new_chars + len(s) - 1`` characters.
  * When several stop strings complete in one delta, the one that completes first (smallest end offset) wins, so
    the result does not depend on how the text was split into deltas; among those ending at the same offset the
    longest (earliest start) wins.
  * The kept text ends right before the stop string, or right after it with ``include_stop_str_in_output``;
    anything after the stop string in the same delta is dropped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class StopMatch:
    """A stop string completed by the newest delta."""

    stop: str  # the stop string that matched (becomes the completion's stop_reason)
    text: str  # the final output text: cut before ``stop``, or after it with include_stop_str_in_output
    start: int  # offset of ``stop`` in the output text that was checked


class StopChecker:
    """Checks one request's growing output text against its stop strings.

    ``stop`` strings must be non-empty; duplicates are dropped (first occurrence kept).
    """

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        if isinstance(stop, str):
            raise TypeError(f"stop must be a sequence of strings, not a single string {stop!r}; wrap it in a list")
        for i, s in enumerate(stop):
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop[{i}] must be a non-empty string, got {s!r}")
        self._stops: tuple[str, ...] = tuple(dict.fromkeys(stop))
        self._include = include_stop_str_in_output

    @property
    def stops(self) -> tuple[str, ...]:
        return self._stops

    @property
    def include_stop_str_in_output(self) -> bool:
        return self._include

    def check(self, output_text: str, num_new_chars: int) -> StopMatch | None:
        """Return the first stop string completed within the last ``num_new_chars`` characters, or None.

        ``output_text`` is the whole output so far, its last ``num_new_chars`` characters the delta just added.
        """
        if not 0 <= num_new_chars <= len(output_text):
            raise ValueError(f"num_new_chars must be in [0, len(output_text)={len(output_text)}], got {num_new_chars}")
        if num_new_chars == 0 or not self._stops:
            return None
        new_start = len(output_text) - num_new_chars
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for s in self._stops:
            # Earliest occurrence that ends inside the new text; find() returns the earliest-ending one too, since
            # every occurrence of s has the same length.
            start = output_text.find(s, max(0, new_start - len(s) + 1))
            if start < 0:
                continue
            key = (start + len(s), start, s)
            if best is None or key[:2] < best[:2]:
                best = key
        if best is None:
            return None
        end, start, s = best
        return StopMatch(stop=s, text=output_text[: end if self._include else start], start=start)

    def holdback(self, output_text: str) -> int:
        """How many trailing characters of ``output_text`` a stream must not send yet.

        They are the longest suffix that is a proper prefix of some stop string: if the next delta completed that
        stop string, those characters would be cut from the output, so they must not have been streamed. Stream
        ``output_text[:len(output_text) - holdback(output_text)]``; at finish the final text (a ``StopMatch.text``
        or the whole output) is sent in full. The streamed length never decreases from one delta to the next.
        With ``include_stop_str_in_output`` nothing is ever cut from already-checked text, so nothing needs
        holding back: returns 0.
        """
        if self._include:
            return 0
        longest = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(output_text)), longest, -1):
                if output_text.endswith(s[:k]):
                    longest = k
                    break
        return longest
