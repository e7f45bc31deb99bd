"""Subprocess with 4 CPU devices: the decode, verify and prefill kernels under shard_map (interpret mode) equal their
references, with float32 pages and with fp8 (e4m3) pages whose per-tensor k/v scales reach every device."""

import itertools
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from pallas_kernels.paged_attention import paged_attention_reference
from qwenjax.layers.attention import sharded_decode_kernel
from qwenjax.models.sharding import make_mesh

E4M3 = jnp.float8_e4m3fn
# kv heads split over 4 devices / kv heads replicated, 2 devices per kv head; each with f32 and fp8 pages
for N, K, dtype in ((8, 4, jnp.float32), (8, 2, jnp.float32), (8, 4, E4M3), (8, 2, E4M3)):
    mesh = make_mesh(4)
    key = jax.random.split(jax.random.PRNGKey(N * 10 + K), 3)
    S, H, pages, page = 3, 64, 12, 16
    k_scale, v_scale = (0.5, 2.0) if dtype == E4M3 else (1.0, 1.0)
    q = jax.random.normal(key[0], (S, N, H), jnp.float32)
    k = (jax.random.normal(key[1], (K, pages, page, H), jnp.float32) / k_scale).astype(dtype)
    v = (jax.random.normal(key[2], (K, pages, page, H), jnp.float32) / v_scale).astype(dtype)
    tables = jnp.asarray(np.random.default_rng(0).permutation(pages)[:S * 4].reshape(S, 4), jnp.int32)
    lens = jnp.asarray([5, 33, 64], jnp.int32)
    ref = paged_attention_reference(q, k.astype(jnp.float32) * k_scale, v.astype(jnp.float32) * v_scale, tables, lens)
    kv_spec = P("tp") if K % 4 == 0 else P()
    k, v = (jax.device_put(a, NamedSharding(mesh, kv_spec)) for a in (k, v))
    q = jax.device_put(q, NamedSharding(mesh, P(None, "tp", None)))
    out = jax.jit(lambda *a: sharded_decode_kernel(*a, mesh=mesh, sm_scale=H ** -0.5, k_scale=jnp.float32(k_scale),
                                                   v_scale=jnp.float32(v_scale), interpret=True))(q, k, v, tables, lens)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=2e-5)  # f32 q: f32 dots
    print("ok", N, K, jnp.dtype(dtype).name)

# The prefill kernel (chunks over cached pages) under the same shard_map: rows (new, cached) = (5, 0), (20, 30).
from pallas_kernels.paged_prefill import paged_prefill_reference  # noqa: E402
from qwenjax.layers.attention import sharded_prefill_kernel  # noqa: E402

# Q = 4: 4 tokens x the device's 2 q heads a kv head fit the verify kernel's tile; Q = 40: the prefill kernel.
for (N, K, dtype), (Q, q_lens) in itertools.product(((8, 4, jnp.float32), (8, 2, E4M3)), ((4, [3, 4]), (40, [5, 20]))):
    mesh = make_mesh(4)
    key = jax.random.split(jax.random.PRNGKey(N * 100 + K), 3)
    H, pages, page = 64, 12, 16
    k_scale, v_scale = (0.5, 2.0) if dtype == E4M3 else (1.0, 1.0)
    q = jax.random.normal(key[0], (2, Q, N, H), jnp.float32)
    k = (jax.random.normal(key[1], (K, pages, page, H), jnp.float32) / k_scale).astype(dtype)
    v = (jax.random.normal(key[2], (K, pages, page, H), jnp.float32) / v_scale).astype(dtype)
    tables = jnp.asarray(np.random.default_rng(1).permutation(pages)[:8].reshape(2, 4), jnp.int32)
    seq_lens, q_lens = jnp.asarray([5, 50], jnp.int32), jnp.asarray(q_lens, jnp.int32)
    ref = paged_prefill_reference(q, k, v, tables, seq_lens, q_lens, k_scale=k_scale, v_scale=v_scale)
    kv_spec = P("tp") if K % 4 == 0 else P()
    k, v = (jax.device_put(a, NamedSharding(mesh, kv_spec)) for a in (k, v))
    q = jax.device_put(q, NamedSharding(mesh, P(None, None, "tp", None)))
    out = jax.jit(lambda *a: sharded_prefill_kernel(*a, mesh=mesh, sm_scale=H ** -0.5, k_scale=jnp.float32(k_scale),
                                                    v_scale=jnp.float32(v_scale), interpret=True))(
        q, k, v, tables, seq_lens, q_lens)
    real = np.arange(Q)[None, :] < np.asarray(q_lens)[:, None]
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=2e-5, rtol=2e-5)
    print("ok prefill", N, K, Q, jnp.dtype(dtype).name)

# The fused RoPE + page-write kernel under shard_map: q heads split; kv heads (and pages) split when K divides over
# the mesh, else replicated (every device writes all of them): pages and q equal the jnp path's, bit for bit.
from pallas_kernels.rope_kv_write import rope_kv_write_reference  # noqa: E402
from qwenjax.layers.attention import sharded_rope_kv_write  # noqa: E402
from qwenjax.layers.rotary import rope_cos_sin  # noqa: E402

for N, K, dtype in ((8, 4, jnp.bfloat16), (8, 2, E4M3)):
    mesh = make_mesh(4)
    key = jax.random.split(jax.random.PRNGKey(N * 1000 + K), 3)
    T, H, pages, page = 6, 64, 4, 16
    q = jax.random.normal(key[0], (T, N, H), jnp.float32).astype(jnp.bfloat16)
    k = (jax.random.normal(key[1], (T, K, H), jnp.float32) * 3).astype(jnp.bfloat16)
    v = (jax.random.normal(key[2], (T, K, H), jnp.float32) * 3).astype(jnp.bfloat16)
    cos, sin = rope_cos_sin(jnp.asarray([0, 5, 17, 300, 4000, 9], jnp.int32), H, 1e6)
    slots = jnp.asarray([7, 63, pages * page, 0, 31, pages * page + 1], jnp.int32)
    cache = jnp.full((K, pages, page, H), 3.0, dtype)
    scales = (jnp.float32(0.37), jnp.float32(1.9)) if dtype == E4M3 else (None, None)
    ref = jax.jit(lambda *a: rope_kv_write_reference(*a, k_scale=scales[0], v_scale=scales[1]))(
        q, k, v, cos, sin, cache, cache, slots)
    kv_spec = P(None, "tp", None) if K % 4 == 0 else P()
    page_spec = P("tp") if K % 4 == 0 else P()
    k, v = (jax.device_put(a, NamedSharding(mesh, kv_spec)) for a in (k, v))
    q = jax.device_put(q, NamedSharding(mesh, P(None, "tp", None)))
    kp, vp = (jax.device_put(cache, NamedSharding(mesh, page_spec)) for _ in range(2))
    out = jax.jit(lambda *a: sharded_rope_kv_write(*a, mesh=mesh, k_scale=scales[0], v_scale=scales[1],
                                                   interpret=True))(q, k, v, cos, sin, kp, vp, slots)
    for got, want in zip(out, ref):
        np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32)))
    print("ok rope", N, K, jnp.dtype(dtype).name)
