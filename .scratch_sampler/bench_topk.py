import time, jax, jax.numpy as jnp, numpy as np
V = 151936

def two_stage(x, k, chunk):
    b, v = x.shape
    pad = (-v) % chunk
    xp = jnp.pad(x, ((0, 0), (0, pad)), constant_values=-jnp.inf).reshape(b, -1, chunk)
    cmax = xp.max(-1)                                   # [B, G]
    _, cidx = jax.lax.top_k(cmax, k)                    # [B, k] chunks holding the top k
    cand = jnp.take_along_axis(xp, cidx[:, :, None], axis=1).reshape(b, k * chunk)
    vals, _ = jax.lax.top_k(cand, k)
    return vals

def timeit(fn, *a, n=50):
    jax.block_until_ready(fn(*a))
    t0 = time.perf_counter()
    for _ in range(n): o = fn(*a)
    jax.block_until_ready(o)
    return (time.perf_counter() - t0) / n * 1e3

for B in (8, 64, 256):
    x = jax.random.normal(jax.random.key(0), (B, V), jnp.float32) * 3
    for k in (64, 256, 1024):
        ref = jax.jit(lambda x: jax.lax.top_k(x, k)[0])
        r = ref(x)
        line = f"B={B:4d} k={k:5d} lax.top_k {timeit(ref, x):7.3f} ms"
        for chunk in (16, 32, 64, 128):
            f = jax.jit(lambda x, c=chunk: two_stage(x, k, c))
            ok = bool(jnp.array_equal(f(x), r))
            line += f" | c{chunk} {timeit(f, x):6.3f}{'' if ok else ' WRONG'}"
        srt = jax.jit(lambda x: jnp.sort(x, axis=-1, descending=True))
        line += f" | sort {timeit(srt, x):6.3f}"
        g = jax.jit(lambda x: jax.random.gumbel(jax.random.key(1), x.shape) + x)
        line += f" | gumbel+add {timeit(g, x):6.3f}"
        print(line, flush=True)
