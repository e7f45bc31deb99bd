"""KV pages on the host: a free list, reference counts, and the prefix cache. Plain Python; never imports jax.

Automatic prefix caching: a full page (block) of computed tokens is named by a hash chain, `block_hash(parent, its
tokens)`, so equal hashes mean equal tokens at equal positions after equal prefixes. A named page whose last holder
lets go keeps its KV and its name in the cached-free list (least recently released first); a new sequence whose
leading blocks hash to named pages takes them (ref count + 1) instead of computing them. Pages are reused, evicting
their names, only when no never-named free page is left, oldest release first.

Invariants: a page is either free (ref count 0; in exactly one of `_plain` or `_cached`) or held (ref count >= 1, in
neither); `_cached` holds exactly the free pages that have a name; `_page_of[_hash_of[p]] == p` for every named page;
`num_free + sum(held) == num_pages` at every return from a public method (`check()` asserts all of these).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from typing import Sequence


class OutOfPagesError(RuntimeError):
    pass


def block_hash(parent: int | None, tokens: Sequence[int]) -> int:
    """The name of a full block: 128 bits of blake2b over the parent's name and the block's token ids.

    Deterministic across processes and runs (unlike `hash()` of strings), so every host of a multi-host engine and
    every test sees the same names.
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(b"root" if parent is None else parent.to_bytes(16, "little"))
    h.update(array("q", tokens).tobytes())
    return int.from_bytes(h.digest(), "little")


def root_hash(key: str) -> int:
    """The parent of a chain's first block for sequences whose KV differs from the base model's for the same tokens
    (a LoRA adapter: `key` names it), so their blocks never share a name with another chain's."""
    return int.from_bytes(hashlib.blake2b(b"root:" + key.encode(), digest_size=16).digest(), "little")


WATERMARK = 0.01  # fraction of the pages kept free when admitting new sequences (vLLM's default watermark)


def pages_to_admit(pages: int, watermark: float = WATERMARK) -> int:
    """The smallest cache in which new sequences needing `pages` pages in all can be admitted at once: admission
    leaves the watermark free (`can_admit`)."""
    total = pages
    while total - pages < int(watermark * total):
        total += 1
    return total


class BlockManager:
    def __init__(self, num_pages: int, page_size: int, *, watermark: float = WATERMARK,
                 enable_prefix_caching: bool = False):
        if num_pages < 1:
            raise ValueError(f"num_pages must be at least 1, got {num_pages}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self._plain: deque[int] = deque(range(num_pages))   # free pages without a name: used first
        self._cached: OrderedDict[int, None] = OrderedDict()  # free named pages, least recently released first
        self._ref = [0] * num_pages
        self._hash_of: dict[int, int] = {}   # page -> name
        self._page_of: dict[int, int] = {}   # name -> page
        # New sequences are admitted only while this many pages stay free, so running ones can still grow.
        self.watermark_pages = int(watermark * num_pages)
        # Metrics (vLLM's prefix_cache_queries / prefix_cache_hits): tokens looked up, tokens found.
        self.query_tokens = 0
        self.hit_tokens = 0
        self.evictions = 0

    @property
    def num_free(self) -> int:
        return len(self._plain) + len(self._cached)

    @property
    def num_cached_free(self) -> int:
        """Free pages still holding a named block (reusable by a prefix hit until evicted)."""
        return len(self._cached)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_pages

    def ref_count(self, page: int) -> int:
        return self._ref[page]

    def name_of(self, page: int) -> int | None:
        return self._hash_of.get(page)

    def pages_needed(self, table: list[int], num_tokens: int) -> int:
        """Pages a block table must gain to hold `num_tokens` slots."""
        return max(0, -(-num_tokens // self.page_size) - len(table))

    def can_admit(self, num_pages: int) -> bool:
        return self.num_free - num_pages >= self.watermark_pages

    def _pop_free(self) -> int:
        if self._plain:
            return self._plain.popleft()
        page, _ = self._cached.popitem(last=False)  # evict the least recently released name
        del self._page_of[self._hash_of.pop(page)]
        self.evictions += 1
        return page

    def grow(self, table: list[int], num_tokens: int) -> bool:
        """Appends pages to `table` (in place) until it holds `num_tokens` slots. False, and no change, if short."""
        need = self.pages_needed(table, num_tokens)
        if need > self.num_free:
            return False
        for _ in range(need):
            page = self._pop_free()
            self._ref[page] = 1
            table.append(page)
        return True

    def shrink(self, table: list[int], num_tokens: int) -> None:
        """Drops the pages of `table` past the ones holding `num_tokens` slots (speculative decoding: the pages of
        rejected proposals). They must be unnamed pages this table alone holds (its growing tail)."""
        keep = -(-num_tokens // self.page_size)
        if len(table) > keep:
            tail = table[keep:]
            del table[keep:]
            for page in tail:
                if self._ref[page] != 1 or page in self._hash_of:
                    raise AssertionError(f"page {page} is shared or named: not a tail this table alone holds")
            self.release(tail)

    def release(self, table: list[int]) -> None:
        """Drops one reference to every page of `table` and empties it.

        Pages are released last first, so a sequence's tail (least shared) is evicted before its prefix.
        """
        for page in reversed(table):
            self._ref[page] -= 1
            if self._ref[page] < 0:
                raise AssertionError(f"page {page} released more often than held")
            if self._ref[page] == 0:
                if page in self._hash_of:
                    self._cached[page] = None
                else:
                    self._plain.append(page)
        table.clear()

    def slot(self, table: list[int], position: int) -> int:
        return table[position // self.page_size] * self.page_size + position % self.page_size

    # ---- prefix cache
    def hash_blocks(self, tokens: Sequence[int], known: list[int], root: int | None = None) -> list[int]:
        """Extends `known` (the names of the first len(known) blocks of `tokens`) to every full block; returns it.
        `root` (root_hash) is the first block's parent: None for the base model."""
        ps = self.page_size
        for i in range(len(known), len(tokens) // ps):
            known.append(block_hash(known[-1] if known else root, tokens[i * ps:(i + 1) * ps]))
        return known

    def lookup(self, hashes: Sequence[int], max_blocks: int) -> list[int]:
        """Pages of the longest cached prefix of `hashes` (at most `max_blocks`); takes nothing."""
        pages: list[int] = []
        if not self.enable_prefix_caching:
            return pages
        for h in hashes[:max_blocks]:
            page = self._page_of.get(h)
            if page is None:
                break
            pages.append(page)
        return pages

    def num_reclaimed(self, pages: Sequence[int]) -> int:
        """How many of `pages` are free now (taking them lowers `num_free`)."""
        return sum(1 for p in pages if self._ref[p] == 0)

    def take(self, table: list[int], pages: Sequence[int], *, query_tokens: int) -> None:
        """Starts an empty block table with cached `pages` (a prefix hit), one more reference each.

        `query_tokens` (the tokens looked up) and the hit tokens go to the metrics counters.
        """
        if table:
            raise AssertionError("a prefix hit starts an empty block table")
        for page in pages:
            if self._ref[page] == 0:
                del self._cached[page]
            self._ref[page] += 1
            table.append(page)
        self.query_tokens += query_tokens
        self.hit_tokens += len(pages) * self.page_size

    def share(self, pages: Sequence[int]) -> list[int]:
        """A new block table holding one more reference to each of `pages` (held pages: a fork of a sequence's
        prefix, see Scheduler._fork_waiting)."""
        for page in pages:
            if self._ref[page] < 1:
                raise AssertionError(f"page {page} is shared but not held")
            self._ref[page] += 1
        return list(pages)

    def commit(self, table: list[int], hashes: Sequence[int], start: int, end: int) -> None:
        """Names pages table[start:end] (full, computed blocks) with hashes[start:end].

        A page whose block is already cached under another page stays unnamed (two sequences computed the same
        block at once); it returns to the plain free list when released.
        """
        if not self.enable_prefix_caching:
            return
        for i in range(start, end):
            page, h = table[i], hashes[i]
            if page in self._hash_of or h in self._page_of:
                continue
            self._hash_of[page] = h
            self._page_of[h] = page

    def reset_prefix_cache(self) -> int:
        """Forgets every free named page (held ones keep their names). Returns how many were dropped."""
        dropped = list(self._cached)
        for page in dropped:
            del self._page_of[self._hash_of.pop(page)]
            self._plain.append(page)
        self._cached.clear()
        return len(dropped)

    def check(self) -> None:
        """Asserts the invariants in the module docstring (tests)."""
        free = list(self._plain) + list(self._cached)
        assert len(free) == len(set(free)), "a page is free twice"
        assert all(self._ref[p] == 0 for p in free), "a free page is held"
        assert sum(1 for r in self._ref if r > 0) + len(free) == self.num_pages, "a page is lost"
        assert all(p in self._hash_of for p in self._cached), "an unnamed page in the cached list"
        assert all(self._page_of[h] == p for p, h in self._hash_of.items()), "names out of step"
        assert len(self._page_of) == len(self._hash_of)
