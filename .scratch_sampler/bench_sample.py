import time, jax, jax.numpy as jnp, numpy as np
from qwenjax.sampler import *
from qwenjax.sampling_params import SamplingParams as S
V = 151936
f = jax.jit(sample, static_argnames="mode")
def bench(B, rows_fn, label, flat=False):
    rows = [rows_fn(i) for i in range(B)]
    m = choose_mode(rows); t = jax.device_put(build_tensors(rows, num_rows=B, vocab_size=V))
    x = jax.random.normal(jax.random.key(0), (B, V), jnp.float32) * (0.01 if flat else 3.0)
    jax.block_until_ready(f(x, t, m))
    n = 50; t0 = time.perf_counter()
    for _ in range(n): o = f(x, t, m)
    jax.block_until_ready(o)
    dt = (time.perf_counter() - t0) / n * 1e3
    print(f"B={B:4d} {label:30s} {m.filter:5s} cap={m.topk_cap:4d} pen={m.penalties!s:5} L={m.num_logprobs:2d} {dt:7.3f} ms", flush=True)
hist = list(range(512))
for B in (8, 64, 256):
    bench(B, lambda i: SamplingRow(S(temperature=0), seed=i), "greedy")
    bench(B, lambda i: SamplingRow(S(temperature=0, logprobs=5), seed=i), "greedy +logprobs 5")
    bench(B, lambda i: SamplingRow(S(temperature=0.8), seed=i), "temperature")
    bench(B, lambda i: SamplingRow(S(temperature=0.7, top_k=20, top_p=0.8), seed=i), "qwen k20 p0.8")
    bench(B, lambda i: SamplingRow(S(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05), seed=i, prompt_ids=hist, output_ids=hist[:200]), "qwen defaults +rep pen")
    bench(B, lambda i: SamplingRow(S(temperature=1.0, top_k=1000), seed=i), "top_k 1000")
    bench(B, lambda i: SamplingRow(S(temperature=0.8, top_p=0.9, logprobs=5), seed=i), "top_p only +logprobs 5")
    bench(B, lambda i: SamplingRow(S(temperature=0.8, top_p=0.9), seed=i), "top_p only, flat (full sort)", flat=True)
