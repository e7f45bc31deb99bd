"""KV pages on the host: a free list and reference counts. Plain Python; never imports jax.

Invariants: a page is either free (ref count 0, in the free list exactly once) or held (ref count >= 1, not in the
free list); `num_free + sum(held) == num_pages` at every return from a public method.
"""

from __future__ import annotations

from collections import deque


class OutOfPagesError(RuntimeError):
    pass


class BlockManager:
    def __init__(self, num_pages: int, page_size: int, *, watermark: float = 0.01):
        if num_pages < 1:
            raise ValueError(f"num_pages must be at least 1, got {num_pages}")
        self.num_pages = num_pages
        self.page_size = page_size
        self._free: deque[int] = deque(range(num_pages))
        self._ref = [0] * num_pages
        # New sequences are admitted only while this many pages stay free, so running ones can still grow.
        self.watermark_pages = int(watermark * num_pages)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_pages

    def pages_needed(self, table: list[int], num_tokens: int) -> int:
        """Pages a block table must gain to hold `num_tokens` slots."""
        return max(0, -(-num_tokens // self.page_size) - len(table))

    def can_admit(self, num_pages: int) -> bool:
        return len(self._free) - num_pages >= self.watermark_pages

    def grow(self, table: list[int], num_tokens: int) -> bool:
        """Appends pages to `table` (in place) until it holds `num_tokens` slots. False, and no change, if short."""
        need = self.pages_needed(table, num_tokens)
        if need > len(self._free):
            return False
        for _ in range(need):
            page = self._free.popleft()
            self._ref[page] = 1
            table.append(page)
        return True

    def release(self, table: list[int]) -> None:
        """Drops one reference to every page of `table` and empties it."""
        for page in table:
            self._ref[page] -= 1
            if self._ref[page] < 0:
                raise AssertionError(f"page {page} released more often than held")
            if self._ref[page] == 0:
                self._free.append(page)
        table.clear()

    def slot(self, table: list[int], position: int) -> int:
        return table[position // self.page_size] * self.page_size + position % self.page_size
