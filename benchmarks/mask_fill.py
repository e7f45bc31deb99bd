"""mask-fill: llguidance's bitmask fill for a batch of matchers under structured.py's JSON schema, with no engine
running: each matcher follows its own seeded trajectory (a uniformly drawn allowed token each step) and every step's
fill of the whole batch is timed. Variants: matchers deep-copied from one compiled matcher (what the engine does) or
each compiled on its own; llguidance worker counts. Isolates the host's mask cost from the engine (BENCHMARKS.md,
issue 26's profile).

  python benchmarks/mask_fill.py [--batch 64] [--steps 200] [--threads 1,4,16] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from structured import SCHEMA  # noqa: E402

TOKENIZER = Path(__file__).resolve().parent.parent / "qwenjax" / "assets" / "qwen2-tokenizer"
VOCAB = 152064  # Qwen2-7B's embedding rows


def run(batch: int, steps: int, threads: int, fresh: bool, seed: int = 0) -> dict:
    import llguidance
    import llguidance.hf
    from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask_par
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    llt = llguidance.hf.from_tokenizer(tok, n_vocab=VOCAB, eos_token=[tok.eos_token_id])
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
    base = llguidance.LLMatcher(llt, grammar, log_level=0)
    matchers = [llguidance.LLMatcher(llt, grammar, log_level=0) if fresh else base.deep_copy() for _ in range(batch)]
    executor = llguidance.LLExecutor(threads or None)
    rng = np.random.default_rng(seed)
    mask = allocate_token_bitmask(batch, VOCAB)
    times = []
    for _ in range(steps):
        rows = [(m, i) for i, m in enumerate(matchers) if not m.is_stopped()]
        if not rows:
            break
        t0 = time.perf_counter()
        fill_next_token_bitmask_par(executor, rows, mask)
        times.append(time.perf_counter() - t0)
        for m, i in rows:
            allowed = np.flatnonzero(np.unpackbits(mask[i].view(np.uint8), bitorder="little")[:VOCAB])
            assert m.consume_token(int(rng.choice(allowed))), m.get_error()
    t = np.array(times) * 1e3
    return {"batch": batch, "threads": threads, "matchers": "fresh" if fresh else "deep_copy", "steps": len(t),
            "fill_ms_mean": float(t.mean()), "fill_ms_p50": float(np.median(t)),
            "fill_ms_p90": float(np.percentile(t, 90)), "fill_ms_max": float(t.max())}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--threads", default="1,4,0", help="llguidance workers (0: one per core)")
    p.add_argument("--out", default=None, help="also write mask-fill.json here")
    args = p.parse_args(argv)
    rows = [run(args.batch, args.steps, int(n), fresh) for fresh in (False, True)
            for n in args.threads.split(",")]
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "runs": rows}
    for r in rows:
        print(f"{r['matchers']:9s} threads {r['threads']:2d}: fill ms a step mean {r['fill_ms_mean']:.2f} "
              f"p50 {r['fill_ms_p50']:.2f} p90 {r['fill_ms_p90']:.2f} max {r['fill_ms_max']:.1f} ({r['steps']} steps)")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "mask-fill.json").write_text(json.dumps(info, indent=1))
    return rows


if __name__ == "__main__":
    main()
