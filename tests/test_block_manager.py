"""BlockManager on the host: exact page ids, names (hash chain), hits, LRU eviction, metrics. No JAX."""

from __future__ import annotations

import pytest

from qwenjax.core.block_manager import BlockManager, block_hash, pages_to_admit

PS = 4


def _named(bm: BlockManager, tokens: list[int]) -> list[int]:
    """A table holding `tokens`, computed and named, as the scheduler leaves it."""
    table: list[int] = []
    assert bm.grow(table, len(tokens))
    hashes = bm.hash_blocks(tokens, [])
    bm.commit(table, hashes, 0, len(tokens) // PS)
    return table


def test_hash_chain_is_deterministic_and_depends_on_the_prefix():
    a = block_hash(None, [1, 2, 3, 4])
    assert a == block_hash(None, [1, 2, 3, 4])  # same across calls (and processes: blake2b, no hash seed)
    assert a != block_hash(None, [1, 2, 3, 5])
    assert block_hash(a, [5, 6, 7, 8]) != block_hash(None, [5, 6, 7, 8])  # equal tokens after another prefix
    bm = BlockManager(8, PS)
    hashes = bm.hash_blocks([1, 2, 3, 4, 5, 6, 7, 8, 9], [])
    assert hashes == [a, block_hash(a, [5, 6, 7, 8])]  # only full blocks are named
    assert bm.hash_blocks(list(range(1, 13)), hashes) is hashes and len(hashes) == 3
    assert 0 <= a < 2**128


def test_plain_allocation_order_and_release():
    bm = BlockManager(6, PS)
    t = []
    assert bm.grow(t, 9) and t == [0, 1, 2]
    u = []
    assert bm.grow(u, 4) and u == [3]
    assert not bm.grow(u, 4 * 4) and u == [3]  # 3 more needed, 2 free: no change
    bm.release(t)
    assert t == [] and bm.num_free == 5
    assert bm.grow(u, 4 * 4) and u == [3, 4, 5, 2]  # plain pages come back last-first: 2, 1, 0
    bm.check()


def test_hits_share_pages_and_count_tokens():
    bm = BlockManager(8, PS, enable_prefix_caching=True)
    prompt = list(range(10, 20))  # 10 tokens: blocks [10..13], [14..17], partial [18, 19]
    a = _named(bm, prompt)
    assert a == [0, 1, 2]
    assert bm.name_of(0) is not None and bm.name_of(2) is None  # the partial block has no name
    hashes = bm.hash_blocks(prompt, [])
    hit = bm.lookup(hashes, (len(prompt) - 1) // PS)
    assert hit == [0, 1]
    b: list[int] = []
    bm.take(b, hit, query_tokens=len(prompt))
    assert bm.grow(b, len(prompt))
    assert b == [0, 1, 3]
    assert [bm.ref_count(p) for p in range(4)] == [2, 2, 1, 1]
    assert (bm.query_tokens, bm.hit_tokens) == (10, 8)
    bm.release(a)
    assert bm.num_free == 5 and bm.num_cached_free == 0  # 0 and 1 still held by b
    bm.release(b)
    assert bm.num_cached_free == 2 and bm.num_free == 8
    bm.check()


def test_other_prefix_misses():
    bm = BlockManager(8, PS, enable_prefix_caching=True)
    _named(bm, [1, 2, 3, 4, 5, 6, 7, 8])
    assert bm.lookup(bm.hash_blocks([1, 2, 3, 4, 9, 9, 9, 9, 0], []), 2) == [0]  # first block only
    assert bm.lookup(bm.hash_blocks([0, 2, 3, 4, 5, 6, 7, 8, 0], []), 2) == []    # a chain breaks at its first miss


def test_disabled_cache_never_hits():
    bm = BlockManager(8, PS)
    t = _named(bm, [1, 2, 3, 4, 5])
    assert bm.name_of(t[0]) is None
    assert bm.lookup(bm.hash_blocks([1, 2, 3, 4, 5], []), 1) == []


def test_free_named_pages_survive_until_evicted_lru():
    bm = BlockManager(4, PS, enable_prefix_caching=True)
    x = _named(bm, [1] * 4)   # page 0
    y = _named(bm, [2] * 4)   # page 1
    z = _named(bm, [3] * 4)   # page 2
    bm.release(y)
    bm.release(x)
    bm.release(z)             # cached-free, least recently released first: 1, 0, 2; plain: 3
    assert bm.num_free == 4 and bm.num_cached_free == 3
    t: list[int] = []
    assert bm.grow(t, 4) and t == [3]                # unnamed pages go first
    assert bm.grow(t, 8) and t == [3, 1]             # then the least recently released name: y's
    assert bm.evictions == 1
    assert bm.lookup(bm.hash_blocks([2] * 4, []), 1) == []
    assert bm.lookup(bm.hash_blocks([1] * 4, []), 1) == [0]
    # A hit on a free named page takes it out of the eviction order.
    hit: list[int] = []
    bm.take(hit, [0], query_tokens=5)
    assert bm.grow(t, 12) and t == [3, 1, 2]         # z's page evicted; x's is held by `hit`
    assert bm.evictions == 2 and bm.num_free == 0
    bm.check()


def test_release_order_evicts_a_tail_before_its_prefix():
    bm = BlockManager(3, PS, enable_prefix_caching=True)
    t = _named(bm, list(range(12)))
    assert t == [0, 1, 2]
    bm.release(t)
    u: list[int] = []
    assert bm.grow(u, 4) and u == [2]  # the last block of the released table is evicted first
    assert bm.lookup(bm.hash_blocks(list(range(12)), []), 3) == [0, 1]


def test_duplicate_block_stays_unnamed():
    bm = BlockManager(4, PS, enable_prefix_caching=True)
    a = _named(bm, [7] * 4)
    b = _named(bm, [7] * 4)  # computed at the same time as a's, before either was named
    assert (a, b) == ([0], [1])
    assert bm.name_of(0) is not None and bm.name_of(1) is None
    bm.release(b)
    assert bm.num_cached_free == 0 and bm.num_free == 3
    bm.check()


def test_reclaimed_count_and_reset():
    bm = BlockManager(4, PS, enable_prefix_caching=True)
    a = _named(bm, [5] * 8)
    held = list(a)
    bm.release(a)
    assert bm.num_reclaimed(held) == 2
    assert bm.reset_prefix_cache() == 2
    assert bm.lookup(bm.hash_blocks([5] * 8, []), 2) == []
    bm.check()


@pytest.mark.parametrize("need", [1, 25, 1025, 24577])
def test_pages_to_admit_is_the_smallest_cache_that_admits(need):
    total = pages_to_admit(need)
    assert BlockManager(total, 16).can_admit(need)
    assert total == need or not BlockManager(total - 1, 16).can_admit(need)
