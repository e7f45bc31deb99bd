"""Host time of a 512-row decode step, serving against offline (CPU is enough: it measures the host, not the device).

The engine core's loop body as the server runs it (final_only False: incremental detokenization, then each advanced
request's delta encoded straight from it, EngineCore's raw_outputs) and as offline generation runs it (final_only True,
text decoded once at the end), on the built-in tiny model with 512 running requests. Host time = wall time minus
the time spent waiting for sampled ids in `to_host`. The device step of the 7B shape on an H100 at 512 rows is
~22 ms: a serving host step near or above that shows as slower served steps (benchmarks/NOTES.md).

    JAX_PLATFORMS=cpu python benchmarks/serve_host_step.py serve offline
"""

from __future__ import annotations

import sys
import time

import numpy as np

from qwenjax import SamplingParams
from qwenjax.config import EngineArgs
from qwenjax.engine import llm_engine as engine_mod
from qwenjax.engine.core import OutputEncoder
from qwenjax.engine.llm_engine import LLMEngine

ROWS, PROMPT, WARM_STEPS, STEPS = 512, 64, 8, 25


def main(modes: list[str]) -> None:
    waited = [0.0]
    read = engine_mod.to_host

    def timed(x):  # the wait for the device, then the copy
        t = time.perf_counter()
        x.block_until_ready()
        waited[0] += time.perf_counter() - t
        return read(x)

    engine_mod.to_host = timed
    eng = LLMEngine(EngineArgs(max_model_len=256, max_num_seqs=ROWS, decode_buckets=(ROWS,),
                               prefill_token_buckets=(PROMPT,), max_num_batched_tokens=8192,
                               num_kv_pages=ROWS * 16 + 1))
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0.0, max_tokens=WARM_STEPS + STEPS + 4, ignore_eos=True)
    for mode in modes:
        eng.final_only = mode == "offline"
        eng.raw_outputs = mode == "serve"
        enc = OutputEncoder()
        for i in range(ROWS):
            rid = f"{mode}{i}"
            eng.add_request(rid, None, params, prompt_token_ids=list(map(int, rng.integers(0, 150000, PROMPT))))
            enc.add(rid, send_prompt_ids=False)
        for _ in range(WARM_STEPS):  # the prefill steps, then decoding at full batch
            eng.step()
        waited[0] = 0.0
        t = time.perf_counter()
        for _ in range(STEPS):
            for out in eng.step():
                if mode == "serve":
                    enc.encode_request(out)
        wall = (time.perf_counter() - t) / STEPS
        print(f"{mode}: wall {wall * 1e3:.1f} ms/step, host {(wall - waited[0] / STEPS) * 1e3:.1f} ms/step", flush=True)
        while eng.has_unfinished_requests():
            eng.step()


if __name__ == "__main__":
    main(sys.argv[1:] or ["serve", "offline"])
