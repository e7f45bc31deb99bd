"""Subprocess with 8 CPU devices: load a checkpoint at mesh 8 while sampling anonymous (non-file) memory."""

import json
import sys
import threading
import time
from pathlib import Path

import jax


def rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def main(ckpt: str, out: str) -> None:
    import jax.numpy as jnp

    from qwenjax.models.loader import load_model_config, load_params, safetensors_files
    from qwenjax.models.sharding import make_mesh

    cfg = load_model_config(Path(ckpt))
    mesh = make_mesh(8)
    jax.block_until_ready(jnp.zeros(8) + 1)  # backend up before the baseline
    base = rss_anon()
    peak, done = [base], threading.Event()

    def sample():
        while not done.is_set():
            peak.append(rss_anon())
            time.sleep(0.002)

    t = threading.Thread(target=sample)
    t.start()
    t0 = time.perf_counter()
    _, params = load_params(Path(ckpt), cfg, jnp.float32, mesh=mesh)
    jax.block_until_ready(params)
    secs = time.perf_counter() - t0
    done.set()
    t.join()
    placed = sum(s.data.nbytes for x in jax.tree.leaves(params) for s in x.addressable_shards)
    ckpt_bytes = sum(f.stat().st_size for f in safetensors_files(Path(ckpt)))
    json.dump({"peak_extra": max(peak) - base, "placed": placed, "checkpoint": ckpt_bytes, "seconds": secs},
              open(out, "w"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
