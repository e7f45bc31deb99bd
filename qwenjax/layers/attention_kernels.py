"""The GPU kernels' side of attention: which Pallas kernel runs a step's shape (the backend switches, read when a
step is traced), and the kernels run on each device's heads under shard_map (`_over_heads`). layers/attention.py
dispatches to these; the jnp references live there.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from qwenjax.compat import platform

KERNEL_HEAD_DIMS = (64, 128)
# "reference" makes every platform trace the jnp reference (the benchmarks' kernel-versus-reference comparison);
# "auto" (unset) picks by platform. Read when a step is traced: set it before the engine starts.
BACKEND_ENV = "QWENJAX_ATTENTION_BACKEND"
BACKENDS = ("auto", "reference")
# Which GPU kernel attends a rectangular chunk over pages (context-prefill and mixed steps, a lone long prompt's
# chunks) and a packed step's rows (`packed_kernels`): "auto" takes the Hopper (Mosaic GPU) kernel for rectangular
# chunks on compute capability 9.x where it supports the shapes and dtypes (q and pages one 16-bit dtype), else the
# Triton one, and the Triton kernel for packed steps; "routed" also sends a packed step's long rows to the Hopper
# kernel (packed_routing.py: measured slower than the Triton kernel alone on 8 x 2,048 and 32 x 256 steps on an H100
# at 411731a, benchmarks/NOTES.md entry 45, so not the default); "triton" forces the Triton kernel everywhere. Read
# when a step is traced.
PREFILL_KERNEL_ENV = "QWENJAX_PREFILL_KERNEL"
PREFILL_KERNELS = ("auto", "triton", "routed")
# Chunks of a few tokens a row (Q x GQA group <= 64: speculative verify steps) take the verify kernel unless this is
# "prefill" (then the kernel above: the comparison the verify kernel was measured against). Read when traced.
VERIFY_KERNEL_ENV = "QWENJAX_VERIFY_KERNEL"


def prefill_kernel(q_dtype, kv_dtype, head_dim: int, page_size: int, group: int) -> str:
    """"hopper" or "triton": the GPU kernel `sharded_prefill_kernel` (and `packed_kernels` for long rows) runs for
    these shapes (see PREFILL_KERNEL_ENV)."""
    from pallas_kernels import paged_prefill_hopper

    forced = os.environ.get(PREFILL_KERNEL_ENV, "auto")
    if forced not in PREFILL_KERNELS:
        raise ValueError(f"{PREFILL_KERNEL_ENV}={forced!r}: expected one of {', '.join(PREFILL_KERNELS)}")
    capability = str(getattr(jax.devices()[0], "compute_capability", ""))
    if forced != "triton" and capability.startswith("9.") and paged_prefill_hopper.supports(
            q_dtype, kv_dtype, head_dim, page_size, group):
        return "hopper"
    return "triton"


def decode_backend(head_dim: int) -> str:
    """Which paged attention runs (decode rows and prefill rows over cached pages): "pallas" (GPU, head_dim 64 or
    128) or "reference" (jnp). Logged at start-up, so a GPU engine never falls back without saying so."""
    forced = os.environ.get(BACKEND_ENV, "auto")
    if forced not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={forced!r}: expected one of {', '.join(BACKENDS)}")
    if forced == "reference":
        return "reference"
    return "pallas" if platform() == "gpu" and head_dim in KERNEL_HEAD_DIMS else "reference"


def sharded_decode_kernel(q, k_pages, v_pages, block_tables, lengths, *, mesh, sm_scale: float, k_scale=None,
                          v_scale=None, interpret: bool = False):
    """The Pallas decode kernel, q [S, N, H], on each device's heads (see `_over_heads`)."""
    from pallas_kernels.paged_attention import paged_attention

    def kernel(q, k, v, s, t, l):  # s [2]: (k_scale, v_scale)
        return paged_attention(q, k, v, t, l, k_scale=s[0], v_scale=s[1], sm_scale=sm_scale, interpret=interpret)

    return _over_heads(kernel, q, k_pages, v_pages, (block_tables, lengths), k_scale, v_scale, mesh=mesh)


def sharded_prefill_kernel(q, k_pages, v_pages, block_tables, seq_lens, query_lens, *, mesh, sm_scale: float,
                           k_scale=None, v_scale=None, interpret: bool = False):
    """The Pallas prefill-over-pages kernel, q [B, Q, N, H], on each device's heads (see `_over_heads`): for a few
    tokens a row (Q x the device's GQA group <= 64: speculative verify steps) the decode kernel's layout widened to
    Q tokens (paged_verify_attention.py: the context read once per kv head, not once per q head or query tile);
    else the Hopper kernel where `prefill_kernel` picks it (16-bit pages: no scales), else the Triton one."""
    from pallas_kernels import paged_verify_attention
    from pallas_kernels.paged_prefill import paged_prefill_attention
    from pallas_kernels.paged_prefill_hopper import hopper_paged_prefill_attention

    small_q = os.environ.get(VERIFY_KERNEL_ENV, "auto") != "prefill"
    hopper = not interpret and prefill_kernel(q.dtype, k_pages.dtype, q.shape[-1], k_pages.shape[2],
                                              q.shape[-2] // k_pages.shape[0]) == "hopper"

    def kernel(q, k, v, s, t, sl, ql):
        if small_q and paged_verify_attention.supported(q.shape[1], q.shape[2] // k.shape[0]):  # verify steps
            return paged_verify_attention.paged_verify_attention(q, k, v, t, sl, ql, k_scale=s[0], v_scale=s[1],
                                                                 sm_scale=sm_scale, interpret=interpret)
        if hopper:
            return hopper_paged_prefill_attention(q, k, v, t, sl, ql, sm_scale=sm_scale)
        return paged_prefill_attention(q, k, v, t, sl, ql, k_scale=s[0], v_scale=s[1], sm_scale=sm_scale,
                                       interpret=interpret)

    return _over_heads(kernel, q, k_pages, v_pages, (block_tables, seq_lens, query_lens), k_scale, v_scale,
                       mesh=mesh)


def packed_kernels(q, k_pages, *, sm_scale: float, interpret: bool = False):
    """The kernels of a packed prefill step, or None off the Pallas path (the jnp reference runs): (hopper, triton,
    aligned) with triton the ragged Triton kernel and, under QWENJAX_PREFILL_KERNEL=routed where `prefill_kernel`
    picks the Hopper kernel and the step has room for a long row, hopper that kernel and aligned its buffer's slots
    (qwenjax/layers/packed_routing.py); else hopper None and aligned 0. Each kernel takes (q, k_pages, v_pages,
    scales [2], block_tables, seq_lens, query_lens, row_starts) on one device's heads. interpret: the Triton kernel
    alone, in Pallas' interpreter (CPU tests)."""
    from pallas_kernels.paged_prefill import ragged_paged_prefill_attention
    from pallas_kernels.paged_prefill_hopper import hopper_ragged_prefill_attention
    from qwenjax.layers.packed_routing import HOPPER_TILE, aligned_slots
    from qwenjax.scheduler_config import PACKED_ROW_ALIGN

    if not interpret and decode_backend(q.shape[-1]) != "pallas":
        return None

    def triton(q, k, v, s, t, sl, ql, rs):
        return ragged_paged_prefill_attention(q, k, v, t, sl, ql, rs, k_scale=s[0], v_scale=s[1], sm_scale=sm_scale,
                                              row_align=PACKED_ROW_ALIGN, interpret=interpret)

    def hopper(q, k, v, s, t, sl, ql, rs):  # 16-bit pages: no scales
        return hopper_ragged_prefill_attention(q, k, v, t, sl, ql, rs, sm_scale=sm_scale, row_align=HOPPER_TILE)

    routed = os.environ.get(PREFILL_KERNEL_ENV, "auto") == "routed"
    aligned = aligned_slots(q.shape[0]) if routed and not interpret else 0
    if aligned and prefill_kernel(q.dtype, k_pages.dtype, q.shape[-1], k_pages.shape[2],
                                  q.shape[-2] // k_pages.shape[0]) == "hopper":
        return hopper, triton, aligned
    return None, triton, 0


def sharded_ragged_prefill_kernel(q, k_pages, v_pages, block_tables, seq_lens, query_lens, row_starts, *, mesh,
                                  k_scale=None, v_scale=None, kernels: tuple):
    """The Pallas prefill kernels on a packed layout, q [T, N, H], on each device's heads (see `_over_heads`):
    `kernels` from `packed_kernels`; with a Hopper kernel the rows are split between the two
    (`packed_routing.routed_ragged_attention`)."""
    from qwenjax.layers.packed_routing import routed_ragged_attention

    hopper, triton, aligned = kernels
    kernel = triton if hopper is None else functools.partial(routed_ragged_attention, hopper_fn=hopper,
                                                             triton_fn=triton, aligned=aligned)
    return _over_heads(kernel, q, k_pages, v_pages, (block_tables, seq_lens, query_lens, row_starts), k_scale,
                       v_scale, mesh=mesh)


def _over_heads(kernel, q, k_pages, v_pages, rest: tuple, k_scale, v_scale, *, mesh):
    """Runs `kernel(q, k_pages, v_pages, scales, *rest)` under shard_map over the "tp" axis of `mesh`.

    q [..., N, H] is split on query heads (axis -2). Pages [K, P, S, H] are split on kv heads when K divides over
    the mesh; otherwise they are replicated and each device slices the one kv head its query heads belong to.
    k_scale / v_scale (float32 scalars, None: 1.0) dequantize fp8 pages inside the kernel; every device gets both.
    `rest` (block tables, lengths) is replicated.
    """
    scales = jnp.stack([jnp.asarray(1.0 if s is None else s, jnp.float32).reshape(()) for s in (k_scale, v_scale)])
    n = 1 if mesh is None or mesh.empty or "tp" not in mesh.axis_names else mesh.shape["tp"]
    if n == 1:
        return kernel(q, k_pages, v_pages, scales, *rest)
    N, K = q.shape[-2], k_pages.shape[0]
    G = N // K
    heads = P(*([None] * (q.ndim - 2)), "tp", None)
    if K % n == 0:
        body, kv_spec = kernel, P("tp", None, None, None)
    elif n % K == 0 and G % (N // n) == 0:
        def body(q, k, v, *args):  # this device's N/n query heads all read kv head (first q head) // G
            kv = jax.lax.axis_index("tp") * (N // n) // G
            k = jax.lax.dynamic_slice_in_dim(k, kv, 1, axis=0)
            v = jax.lax.dynamic_slice_in_dim(v, kv, 1, axis=0)
            return kernel(q, k, v, *args)
        kv_spec = P()
    else:
        raise NotImplementedError(f"paged attention kernel with {N} query / {K} kv heads over a mesh of {n}")
    return jax.shard_map(body, mesh=mesh, in_specs=(heads, kv_spec, kv_spec, P()) + (P(),) * len(rest),
                         out_specs=heads, check_vma=False)(q, k_pages, v_pages, scales, *rest)
