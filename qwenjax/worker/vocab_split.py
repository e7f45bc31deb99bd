"""Reductions over a vocabulary that may be split over the mesh's "tp" axis, and the shard_map that splits it.

The sampler's [rows, V] work (penalties, bans, masks, noise, filters, argmax, logprobs) runs on each device's own
columns: under `over_vocab` each device sees a [rows, V / n] slice of the logits and of the penalty rows, and every
reduction over V is a per-shard reduction followed by a small collective over "tp" (pmax / psum / pmin of [rows]
values, an all_gather of [rows, k] top-k candidates). Nothing of size V ever crosses devices, whatever the
partitioner of the jax version in use would have chosen (jax 0.11.2's gathered the whole logits to the sampler).

Where the vocabulary is whole on the device (no mesh, a mesh of 1, or a vocabulary the mesh does not divide: then
lm_head and the logits are replicated, see models/mesh_padding.py) the same code runs as a plain function with
`axis=None`: every collective is the identity and the reductions are exactly the unsplit ones.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from qwenjax.compat import shard_map

AXIS = "tp"
_NO_ID = jnp.iinfo(jnp.int32).max  # larger than every token id: loses every pmin


@dataclasses.dataclass(frozen=True)
class VocabSlice:
    """The columns of the vocabulary this device holds: [offset, offset + size) of `vocab_size`."""

    vocab_size: int  # V, the whole vocabulary
    size: int  # columns held here: V / n split, V whole
    axis: str | None = None  # mesh axis the columns are split over; None: whole rows here

    @classmethod
    def whole(cls, vocab_size: int) -> VocabSlice:
        return cls(vocab_size, vocab_size, None)

    @property
    def offset(self) -> jax.Array | int:
        """Global id of this device's first column (traced under shard_map)."""
        return 0 if self.axis is None else jax.lax.axis_index(self.axis) * self.size

    def column_ids(self) -> jax.Array:
        """[size] i32 global ids of the local columns."""
        return self.offset + jnp.arange(self.size, dtype=jnp.int32)

    def local_ids(self, ids: jax.Array) -> jax.Array:
        """Global token ids -> local column ids; ids held elsewhere (or padding >= V) become `size`, which every
        scatter with mode="drop" drops."""
        if self.axis is None:
            return ids
        local = ids - self.offset
        return jnp.where((local >= 0) & (local < self.size), local, self.size)

    def local_columns(self, full: jax.Array) -> jax.Array:
        """This device's columns of an array [..., V] computed whole on every device (e.g. the Gumbel noise)."""
        if self.axis is None:
            return full
        return jax.lax.dynamic_slice_in_dim(full, self.offset, self.size, axis=full.ndim - 1)

    # -- reductions over the last axis, across shards; every result is the same on every device -------------

    def max(self, x: jax.Array) -> jax.Array:
        m = jnp.max(x, axis=-1)
        return m if self.axis is None else jax.lax.pmax(m, self.axis)

    def sum(self, x: jax.Array) -> jax.Array:
        s = jnp.sum(x, axis=-1)
        return s if self.axis is None else jax.lax.psum(s, self.axis)

    def logsumexp(self, x: jax.Array) -> jax.Array:
        """[rows] logsumexp over the whole vocabulary (jax.nn.logsumexp's own code where rows are whole)."""
        if self.axis is None:
            return jax.nn.logsumexp(x, axis=-1)
        m = self.max(x)
        m = jnp.where(jnp.isfinite(m), m, 0.0)  # an all -inf row: exp(-inf - 0) = 0, log 0 = -inf
        return m + jnp.log(self.sum(jnp.exp(x - m[:, None])))

    def argmax(self, x: jax.Array) -> jax.Array:
        """[rows] i32 global id of each row's largest value, the lowest such id on ties (jnp.argmax's rule)."""
        if self.axis is None:
            return jnp.argmax(x, axis=-1).astype(jnp.int32)
        local_max = jnp.max(x, axis=-1)
        best = jax.lax.pmax(local_max, self.axis)
        here = jnp.argmax(x, axis=-1).astype(jnp.int32) + self.offset
        return jax.lax.pmin(jnp.where(local_max == best, here, _NO_ID), self.axis)

    def take(self, x: jax.Array, ids: jax.Array) -> jax.Array:
        """[rows] x[r, ids[r]] for global ids (ids in [0, V)): the holder's value, summed with the others' zeros."""
        if self.axis is None:
            return jnp.take_along_axis(x, ids[:, None], axis=-1)[:, 0]
        local = ids - self.offset
        mine = (local >= 0) & (local < self.size)
        value = jnp.take_along_axis(x, jnp.where(mine, local, 0)[:, None], axis=-1)[:, 0]
        return jax.lax.psum(jnp.where(mine, value, jnp.zeros_like(value)), self.axis)

    def count_greater(self, x: jax.Array, than: jax.Array) -> jax.Array:
        """[rows] i32 how many values of each row are > than[r] (a token's rank is 1 + this)."""
        return self.sum((x > than[:, None]).astype(jnp.int32))

    def top_k(self, x: jax.Array, k: int, local_top_k) -> tuple[jax.Array, jax.Array]:
        """([rows, k] largest values, descending; [rows, k] i32 global ids), as `local_top_k(x, k)` on whole rows.

        Each shard's min(k, size) best (by `local_top_k`) are gathered, [rows, n * k] in shard order, and the k best
        of those kept: lax.top_k prefers the earlier of equal values, so ties resolve to the lower id as on whole
        rows. Only a k of at least V / n (tiny vocabularies) gathers whole shards.
        """
        if self.axis is None:
            return local_top_k(x, k)
        values, ids = local_top_k(x, min(k, self.size))
        # One all_gather for both: ids as float32 are exact below 2^24 (vocabularies are ~152k).
        both = jnp.stack([values.astype(jnp.float32), (ids + self.offset).astype(jnp.float32)])  # [2, rows, k]
        both = jax.lax.all_gather(both, self.axis, axis=2, tiled=True)
        values, pos = jax.lax.top_k(both[0].astype(x.dtype), k)
        return values, jnp.take_along_axis(both[1], pos, axis=-1).astype(jnp.int32)

    def lowest_kept(self, x: jax.Array, weight: jax.Array, budget: jax.Array) -> jax.Array:
        """[rows] the smallest value v of each row of x with sum(weight[x > v]) < budget[r] (the row's max when none).

        With weight 1 and budget k this is the k-th largest value (ties included); with weight the renormalised
        probabilities and budget top_p it is top-p's last kept value: a token stays iff the mass strictly before it
        in descending order is < top_p. Found by bisection over the 2^32 float32 bit patterns ordered as numbers:
        32 passes over the row, each a per-shard sum and a psum of [rows], and no sort.
        """
        keys = _order_key(x)
        lo = jnp.min(keys, axis=-1)
        hi = jnp.max(keys, axis=-1)
        if self.axis is not None:
            lo, hi = jax.lax.pmin(lo, self.axis), jax.lax.pmax(hi, self.axis)
        lo = lo - jnp.minimum(lo, 1)  # invariant: the answer is in (lo, hi]; lo itself is never tested

        def step(_, bounds):
            lo, hi = bounds
            mid = lo + (hi - lo) // 2
            ok = self.sum(jnp.where(keys > mid[:, None], weight, jnp.zeros_like(weight))) < budget
            done = hi - lo <= 1
            return jnp.where(done | ok, lo, mid), jnp.where(done | ~ok, hi, mid)

        _, hi = jax.lax.fori_loop(0, 32, step, (lo, hi))
        return _from_order_key(hi)


def _order_key(x: jax.Array) -> jax.Array:
    """float32 -> uint32 with the order of the numbers (NaN aside): -inf lowest, +inf highest."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _from_order_key(key: jax.Array) -> jax.Array:
    bits = jnp.where(key >> 31 == 1, key & jnp.uint32(0x7FFFFFFF), ~key)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def vocab_axis_size(mesh, vocab_size: int) -> int:
    """n > 1 when `mesh` splits a vocabulary of `vocab_size` over "tp" (sharding.vocab_sharding's rule), else 1."""
    if mesh is None or mesh.empty or AXIS not in mesh.axis_names:
        return 1
    n = mesh.shape[AXIS]
    return n if n > 1 and vocab_size % n == 0 else 1


def split_columns(x: jax.Array, mesh) -> jax.Array:
    """x [..., V] constrained to the logits' split on V over `mesh` (sharding.vocab_sharding's rule); x as is where
    the vocabulary is not split. For arrays computed from replicated values alone (the Gumbel noise): XLA then
    computes each device's columns there."""
    n = vocab_axis_size(mesh, x.shape[-1])
    if n == 1:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*([None] * (x.ndim - 1)), AXIS)))


def over_vocab(fn, mesh, vocab_size: int, split: tuple, whole, split_out: bool = False):
    """fn(VocabSlice, split, whole) on each device's columns: `split` a tuple of arrays [..., V] (the logits, the
    penalty state), `whole` a pytree every device gets entire. fn's outputs must be equal on every device (results
    of the slice's collectives) and come back replicated; or, `split_out`, they are [rows, V / n] columns (the
    updated penalty state) and come back split like `split`. `mesh` (a Mesh or AbstractMesh; None: none) splits the
    vocabulary as sharding.vocab_sharding does (vocab_axis_size); without a split fn runs once on whole rows."""
    n = vocab_axis_size(mesh, vocab_size)
    if n == 1:
        return fn(VocabSlice.whole(vocab_size), split, whole)
    if vocab_size >= 1 << 24:
        raise NotImplementedError(f"a vocabulary of {vocab_size} tokens split over the mesh: the merged top-k "
                                  f"carries ids as float32, exact below 2^24 = 16777216 only")
    vs = VocabSlice(vocab_size, vocab_size // n, AXIS)
    split_specs = tuple(P(*([None] * (a.ndim - 1)), AXIS) for a in split)
    whole_specs = jax.tree.map(lambda _: P(), whole)
    body = lambda s, w: fn(vs, s, w)  # noqa: E731
    return shard_map(body, mesh=mesh, in_specs=(split_specs, whole_specs),
                     out_specs=P(None, AXIS) if split_out else P())(tuple(split), whole)
