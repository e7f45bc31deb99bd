"""The verify-step attention kernel (Q new tokens a row, the decode kernel's grid; Pallas interpret mode on CPU)
against paged_prefill's jnp reference, with NaN wherever the kernel must not read (test_paged_attention_kernel's
cases)."""
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.paged_prefill import paged_prefill_reference
from pallas_kernels.paged_verify_attention import paged_verify_attention, supported
from tests.test_paged_attention_kernel import make_case

BF16, F32, E5M2 = jnp.bfloat16, jnp.float32, jnp.float8_e5m2


@pytest.mark.parametrize("group,num_q,q_dtype,kv_dtype,num_splits", [
    (1, 2, F32, F32, 1),
    (7, 5, BF16, BF16, 3),   # Qwen2-7B's group, k = 4: a 64-row tile, split-K
    (4, 3, F32, F32, 2),
    (2, 9, BF16, E5M2, 1),   # fp8 pages with scales
])
def test_verify_kernel_matches_reference(group, num_q, q_dtype, kv_dtype, num_splits):
    lengths = (9, 16, 17, 70, 0, 40)   # a padding row (0) among them
    _, k, v, tables, lens = make_case(f"verify-{group}-{num_q}-{kv_dtype.__name__}", group=group, head_dim=64,
                                      page_size=16, q_dtype=q_dtype, kv_dtype=kv_dtype, lengths=lengths)
    rng = np.random.default_rng(group * 10 + num_q)
    S, N = len(lengths), 2 * group
    q = jnp.asarray(rng.standard_normal((S, num_q, N, 64)), F32).astype(q_dtype)
    # rows verify fewer tokens than Q too (a row with fewer proposals), never more than its context
    qlens = jnp.asarray([min(n, int(rng.integers(1, num_q + 1))) for n in lengths], jnp.int32)
    scales = dict(k_scale=0.5, v_scale=2.0) if kv_dtype == E5M2 else {}
    out = paged_verify_attention(q, k, v, tables, lens, qlens, num_splits=num_splits, interpret=True, **scales)
    ref = paged_prefill_reference(q, k, v, tables, lens, qlens, **scales)
    real = np.arange(num_q)[None, :] < np.asarray(qlens)[:, None]
    got, want = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    tol = 2e-5 if q_dtype == F32 and kv_dtype == F32 else 3e-2
    np.testing.assert_allclose(got[real], want[real], atol=tol, rtol=tol)
    assert np.all(got[~real] == 0.0)  # tokens past a row's query_len, and the padding row, come out 0


def test_verify_kernel_refuses_wide_tiles():
    assert supported(5, 7) and supported(9, 7) and not supported(10, 7) and not supported(17, 4)
    _, k, v, tables, lens = make_case("verify-wide", group=4, head_dim=64, page_size=16, q_dtype=F32, kv_dtype=F32,
                                      lengths=(20,))
    q = jnp.zeros((1, 17, 8, 64), F32)
    with pytest.raises(ValueError, match="at most 64"):
        paged_verify_attention(q, k, v, tables, lens, jnp.asarray([17], jnp.int32), interpret=True)
