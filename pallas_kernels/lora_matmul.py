"""The batched LoRA matmul of multi-LoRA serving: every row (token) with its own adapter, or none.

Axis letters: T tokens, I input features, O output features, R rank (padded), S slots (slot 0: no adapter).

Contract:
  x    [T, I]     bfloat16 / float16 / float32
  a    [S, I, R]  x.dtype, the adapters' A stacked by slot (slot 0 all zeros, or never read)
  b    [S, R, O]  x.dtype, the adapters' B (scaling folded in) stacked by slot
  ids  [T] int32  each row's slot; 0: no adapter
  out  [T, O]     x.dtype: (x[t] @ a[ids[t]]) @ b[ids[t]], shrink then expand, each accumulated in float32 and the
                  shrink's [T, R] result rounded to x.dtype in between (as PEFT's lora_B(lora_A(x)) does)

Kernel (Punica's SGMV, a shrink and an expand over the rows grouped by slot): the rows are sorted by slot (stable,
slot-0 rows last), so each adapter's rows are one contiguous group; the shrink x_sorted @ a[1:] and the expand
h @ b[1:] are then two grouped matmuls (`grouped_matmul.py`, the MoE kernel: a tile of rows of one group streams
that group's weights), whose rows past the groups (the slot-0 rows) come out as zeros without a load. The result is
gathered back into the rows' order through the inverse permutation (a gather, which XLA fuses into the add that
follows, where a scatter would write the whole [T, O] once more). Shapes are fixed by T and S, so the mix of
adapters in a batch never recompiles anything. R must be a multiple of 16 (Triton's smallest dot), as the engine's
slots are (worker/lora_stacks.py).

Where it runs: the engine's path on one GPU for steps of more than layers/lora.SPLIT_K_MAX_ROWS tokens (prefill).
Decode-sized steps take `lora_decode.py` (same contract): there the shrink's output is only R columns wide and this
kernel's grid (row tiles x R / bn) left most of the GPU idle while each program walked all of I (NOTES 38: 0.69x the
base model's throughput, 1.67x its batch-1 time a token on an H100, with these kernels in every step).

The jnp reference gathers each row's A and B and runs the two einsums; it is what the engine uses on CPU.
`lora_matmul_dense` is the same math without the per-row gathers ([T, I, R] and [T, R, O]: gigabytes for a long
prefill): the shrink through every slot at once ([T, S, R], small), the rows' own slot kept by a one-hot mask, and the
expand as one dense matmul over the S x R axis; XLA splits it over a mesh as it splits A and B (the engine's path on
a GPU mesh, where the kernel would need a shard_map).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.grouped_matmul import grouped_matmul, supported as grouped_supported

RANK_MULTIPLE = 16  # the kernel's R: a multiple of Triton's smallest dot dimension


def lora_matmul_reference(x: jax.Array, a: jax.Array, b: jax.Array, ids: jax.Array) -> jax.Array:
    """jnp reference of the module contract: gather each row's A and B, shrink, expand."""
    h = jnp.einsum("ti,tir->tr", x, a[ids], preferred_element_type=jnp.float32).astype(x.dtype)
    return jnp.einsum("tr,tro->to", h, b[ids], preferred_element_type=jnp.float32).astype(x.dtype)


def lora_matmul_dense(x: jax.Array, a: jax.Array, b: jax.Array, ids: jax.Array) -> jax.Array:
    """The module contract through every slot at once, masked to each row's own (no per-row gathers)."""
    S, _, R = a.shape
    h = jnp.einsum("ti,sir->tsr", x, a, preferred_element_type=jnp.float32).astype(x.dtype)     # [T, S, R]
    h = jnp.where((ids[:, None] == jnp.arange(S, dtype=ids.dtype)[None, :])[:, :, None], h, 0)
    return jnp.einsum("tk,ko->to", h.reshape(h.shape[0], S * R), b.reshape(S * R, -1),
                      preferred_element_type=jnp.float32).astype(x.dtype)


def folded_rows(h_all: jax.Array, ids: jax.Array, rank: int) -> jax.Array:
    """[T, R]: each row's own slot's R columns of a folded shrink h_all [T, (S - 1) * R] (slot s at columns
    [(s - 1) R, s R)), zeros for rows of slot 0."""
    t = h_all.shape[0]
    h = jnp.take_along_axis(h_all.reshape(t, -1, rank), jnp.maximum(ids - 1, 0)[:, None, None], axis=1)[:, 0]
    return jnp.where((ids > 0)[:, None], h, jnp.zeros((), h_all.dtype))


def folded_expand_reference(h_all: jax.Array, b: jax.Array, ids: jax.Array) -> jax.Array:
    """The expand of a folded shrink (h_all [T, (S - 1) * R], b [S, R, O] -> [T, O] in b.dtype): each row's own
    slot's columns @ that slot's B, accumulated in float32; rows of slot 0 zero. Per-row gathers: the CPU path."""
    h = folded_rows(h_all, ids, b.shape[1])
    out = jnp.einsum("tr,tro->to", h, b[ids], preferred_element_type=jnp.float32).astype(b.dtype)
    return jnp.where((ids > 0)[:, None], out, jnp.zeros((), b.dtype))


@functools.partial(jax.jit, static_argnames=("interpret",))
def folded_expand_grouped(h_all: jax.Array, b: jax.Array, ids: jax.Array, grouping, *,
                          interpret: bool = False) -> jax.Array:
    """folded_expand_reference's contract as one grouped matmul over the rows sorted by slot (prefill steps): the
    rows' own columns gathered ([T, R], small), then this module's expand."""
    order, inverse, sizes = grouping
    h = folded_rows(h_all, ids, b.shape[1])
    return grouped_matmul(h[order], b[1:], sizes, interpret=interpret)[inverse]


def supported(in_features: int, out_features: int, rank: int, dtype) -> bool:
    """Whether the kernels take these shapes (else the caller uses a jnp path)."""
    return (rank % RANK_MULTIPLE == 0 and grouped_supported(in_features, rank, dtype)
            and grouped_supported(rank, out_features, dtype))


def group_by_slot(ids: jax.Array, num_slots: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(order [T], inverse [T], group_sizes [S - 1]): `x[order]` has the rows of slot 1 first, then slot 2, ..., and
    the rows of slot 0 (no adapter) last, each group in row order; `y[inverse]` puts them back; group_sizes[s - 1]
    rows use slot s."""
    key = jnp.where(ids == 0, num_slots, ids)
    order = jnp.argsort(key, stable=True).astype(jnp.int32)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=jnp.int32), unique_indices=True)
    sizes = jnp.sum(ids[None, :] == jnp.arange(1, num_slots, dtype=ids.dtype)[:, None], axis=1).astype(jnp.int32)
    return order, inverse, sizes


def validate_operands(x, a, b, ids):
    """The module contract's shape, dtype and rank checks (both kernel pairs'), each error naming what is allowed."""
    if x.ndim != 2 or a.ndim != 3 or b.ndim != 3 or ids.ndim != 1:
        raise ValueError(f"x must be [T, I], a [S, I, R], b [S, R, O], ids [T]; got x{x.shape}, a{a.shape}, "
                         f"b{b.shape}, ids{ids.shape}")
    if a.shape[1] != x.shape[1] or b.shape[:2] != (a.shape[0], a.shape[2]) or ids.shape[0] != x.shape[0]:
        raise ValueError(f"shapes disagree: x{x.shape}, a{a.shape}, b{b.shape}, ids{ids.shape}")
    if a.dtype != x.dtype or b.dtype != x.dtype:
        raise ValueError(f"a and b must have x's dtype {x.dtype}; got {a.dtype}, {b.dtype}")
    if a.shape[2] % RANK_MULTIPLE:
        raise ValueError(f"the rank axis R={a.shape[2]} must be a multiple of {RANK_MULTIPLE} (pad with zeros)")
    if a.shape[0] < 2:
        raise ValueError(f"a and b need slot 0 (no adapter) and at least one adapter slot; got S={a.shape[0]}")


@functools.partial(jax.jit, static_argnames=("interpret",))
def lora_matmul(x: jax.Array, a: jax.Array, b: jax.Array, ids: jax.Array, grouping=None, *,
                interpret: bool = False) -> jax.Array:
    """x [T, I] with per-row slots `ids` [T] -> [T, O] in x.dtype (the module contract), as Pallas kernels.

    Args:
        x, a, b, ids: see the module docstring.
        grouping: `group_by_slot(ids, S)` when the caller has it (a model step computes it once for all its
            projections); None: computed here.
        interpret: run the kernels in Pallas interpret mode (CPU tests).
    """
    validate_operands(x, a, b, ids)
    order, inverse, sizes = group_by_slot(ids, a.shape[0]) if grouping is None else grouping
    one = x.shape[0] == 1  # batch-1 decode: the order is the identity, no gathers
    h = grouped_matmul(x if one else x[order], a[1:], sizes, interpret=interpret)  # [T, R] shrink, slot-0 rows 0
    ys = grouped_matmul(h, b[1:], sizes, interpret=interpret)                      # [T, O] expand
    return ys if one else ys[inverse]
