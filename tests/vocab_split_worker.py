"""Run in a subprocess with 8 CPU devices: the sampler and the rejection sampler in every path, with the vocabulary
split over meshes of 2, 4 and 8 (sampler.sample_over_mesh), against the same calls on whole rows; and the
collectives of each compiled program. Writes JSON (see tests/test_vocab_split.py)."""

from __future__ import annotations

import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

V = 16384  # V / 8 = 2048 columns a device: more than the 1024 top-k candidates of mode 'sort'
B = 6
COLLECTIVE = re.compile(r" (all-gather|all-gather-start|all-to-all|collective-permute|collective-permute-start|"
                        r"all-reduce|all-reduce-start|reduce-scatter)\(")


def rows(case: str):
    from qwenjax.sampling_params import SamplingParams as P
    from qwenjax.worker.sampler import SamplingRow

    hist = dict(prompt_ids=[1, 2, 3, 9000, 16000], output_ids=[5, 9000, 9000, 12345])
    if case == "greedy":  # penalties, banned ids, logit_bias and an allowed-token mask, logprobs
        ps = [P(temperature=0, repetition_penalty=1.3, logprobs=3), P(temperature=0, logit_bias={16383: 50.0}),
              P(temperature=0, presence_penalty=0.5, frequency_penalty=0.3, allowed_token_ids=list(range(8000, 9000)))]
        return [SamplingRow(p, seed=i, banned_ids=[77, 10000] if i == 0 else (), **hist) for i, p in enumerate(ps)]
    if case == "topk":  # top-k with top-p, min_p, penalties, a greedy row among seeded ones, logprobs
        ps = [P(top_k=20, top_p=0.8, seed=7, logprobs=5), P(top_k=50, min_p=0.05, repetition_penalty=1.2),
              P(temperature=0), P(top_k=3, temperature=0.5, seed=11), P(min_p=0.2, temperature=2.0)]
        return [SamplingRow(p, seed=100 + i, **hist) for i, p in enumerate(ps)]
    if case == "topp":  # top-p alone: the 1024 candidates hold a peaked row's set, not the flat row's (bisection)
        ps = [P(top_p=0.9, seed=3), P(top_p=0.5, presence_penalty=1.0), P(top_p=0.95, top_k=2000),
              P(temperature=0)]
        return [SamplingRow(p, seed=200 + i, **hist) for i, p in enumerate(ps)]
    if case == "plain":  # temperature only, with logprobs (mode 'none')
        return [SamplingRow(P(temperature=t, logprobs=20, seed=5), seed=300) for t in (0.7, 1.0, 1.5)]
    raise ValueError(case)


def logits_for(rng) -> np.ndarray:
    x = (rng.normal(size=(B, V)) * 3).astype(np.float32)
    x[1, :] = (rng.normal(size=V) * 0.01).astype(np.float32)  # flat: top_p=0.5 keeps thousands of tokens
    x[2, 9000] += 40.0
    x[3, 8191] = x[3, 8192] = x[3].max() + 1.0  # a tie across the devices of every mesh: the lower id wins
    return x


def collectives(text: str, vocab: int) -> tuple[int, list[str]]:
    """(number of collectives, those with an array of a dimension equal to `vocab` among result and operands)."""
    found = [line.strip() for line in text.splitlines() if COLLECTIVE.search(line)]
    whole = [line[:300] for line in found
             if any(str(vocab) in dims.split(",") for dims in re.findall(r"\w+\[([\d,]*)\]", line))]
    return len(found), whole


def main(out: str) -> None:
    from qwenjax.models.sharding import make_mesh, vocab_sharding
    from qwenjax.worker import penalty_state
    from qwenjax.worker.rejection_sampler import rejection_sample_over_mesh
    from qwenjax.worker.sampler import build_tensors, choose_mode, sample_over_mesh

    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(0)
    logits = logits_for(rng)
    R = B + 1
    mask = rng.random((R, V)) < 0.001
    counts = (rng.random((R, V)) < 0.001).astype(np.int32) * rng.integers(1, 4, (R, V)).astype(np.int32)
    slots = np.arange(B, dtype=np.int32)[::-1].copy()
    result = {"vocab_size": V, "cases": {}}
    for case in ("greedy", "topk", "topp", "plain"):
        rs = rows(case)
        mode = choose_mode(rs)
        bitmask = None
        if mode.has_mask:
            bitmask = np.full((B, -(-V // 32)), -1, np.int32)
            allowed = np.zeros(V, bool)
            allowed[8000:9000] = True
            bitmask[2] = np.packbits(allowed.reshape(-1, 32)[:, ::-1], axis=1, bitorder="big").view(">i4")[:, 0]
        t = build_tensors(rs, num_rows=B, vocab_size=V, with_history=False, bitmask=bitmask)
        per_mesh = {}
        # Mesh 3 does not divide V: the logits and penalty state are replicated and rows are sampled whole there.
        for n in (1, 2, 4, 8, 3):
            mesh = make_mesh(n) if n > 1 else None
            put = (lambda a: jax.device_put(a, vocab_sharding(mesh, V))) if mesh else jnp.asarray
            state = penalty_state.PenaltyState(put(mask), put(counts))

            def run(lg, st, t, sl, mesh=mesh, mode=mode):
                hist = penalty_state.history_of(st, sl) if mode.penalties else None
                return sample_over_mesh(mesh, lg, t, mode, hist, with_ranks=mode.num_logprobs > 0)

            fn = jax.jit(run)
            args = (put(logits), state, t, slots)
            (o, ranks) = fn(*args)
            entry = {"tokens": np.asarray(o.token_ids).tolist(), "logprobs": np.asarray(o.logprobs).tolist(),
                     "top_ids": np.asarray(o.top_ids).tolist(), "top_logprobs": np.asarray(o.top_logprobs).tolist(),
                     "ranks": None if ranks is None else np.asarray(ranks).tolist()}
            if n > 1:
                entry["collectives"], entry["vocab_sized"] = collectives(fn.lower(*args).compile().as_text(), V)
            per_mesh[n] = entry
        result["cases"][case] = {"mode": str(mode), "meshes": per_mesh}
    # Speculative verify: B2 rows of Q = 3 positions (2 drafts), greedy and sampled rows, penalties on.
    B2, Q = 2, 3
    vlogits = (rng.normal(size=(B2, Q, V)) * 3).astype(np.float32)
    drafts = np.array([[int(vlogits[0, 0].argmax()), 5], [9000, 77]], np.int32)
    from qwenjax.sampling_params import SamplingParams as P
    from qwenjax.worker.sampler import SamplingRow
    vrows = [SamplingRow(p, seed=40, output_ids=[1] * j) for p in (P(temperature=0, repetition_penalty=1.1, logprobs=2),
                                                                   P(top_p=0.9, seed=4, presence_penalty=0.2))
             for j in range(Q)]
    vmode = choose_mode(vrows)
    vt = build_tensors(vrows, num_rows=B2 * Q, vocab_size=V, with_history=False)
    vslots = np.array([3, 0], np.int32)
    per_mesh = {}
    for n in (1, 2, 4, 8):
        mesh = make_mesh(n) if n > 1 else None
        put = (lambda a: jax.device_put(a, vocab_sharding(mesh, V))) if mesh else jnp.asarray
        lg = jax.device_put(vlogits, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, None, "tp"))) \
            if mesh else jnp.asarray(vlogits)
        state = penalty_state.PenaltyState(put(mask), put(counts))

        def vrun(lg, st, t, d, nd, sl, mesh=mesh):
            return rejection_sample_over_mesh(mesh, lg, t, vmode, d, nd, penalty_state.history_of(st, sl))

        fn = jax.jit(vrun)
        args = (lg, state, vt, drafts, np.array([2, 2], np.int32), vslots)
        o = fn(*args)
        entry = {k: np.asarray(getattr(o, k)).tolist() for k in ("token_ids", "num_accepted", "logprobs", "ranks",
                                                                  "top_ids", "top_logprobs")}
        if n > 1:
            entry["collectives"], entry["vocab_sized"] = collectives(fn.lower(*args).compile().as_text(), V)
        per_mesh[n] = entry
    result["verify"] = {"mode": str(vmode), "meshes": per_mesh}
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
