"""The sampler with the vocabulary split over meshes of 2, 4 and 8 CPU devices (worker/vocab_split.py): every path
gives the tokens, logprobs, top logprobs and ranks of the same call on whole rows, and no compiled program moves an
array of a vocabulary-sized dimension between devices. A subprocess, so the device-count flag does not leak."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.test_tensor_parallel import run_with_devices

CASES = ("greedy", "topk", "topp", "plain", "verify")


@pytest.fixture(scope="module")
def split_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("vsplit") / "result.json"
    proc = run_with_devices(["-m", "tests.vocab_split_worker", str(out)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    return {**result["cases"], "verify": result["verify"], "vocab_size": result["vocab_size"]}


def test_every_path_covers_its_mode(split_result):
    modes = {case: split_result[case]["mode"] for case in CASES}
    assert "all_greedy=True" in modes["greedy"] and all(f"{flag}=True" in modes["greedy"]
                                                        for flag in ("penalties", "has_banned", "has_mask",
                                                                     "has_bias"))
    assert "filter='topk'" in modes["topk"] and "num_logprobs=5" in modes["topk"]
    assert "filter='sort'" in modes["topp"] and "penalties=True" in modes["topp"]
    assert "filter='none'" in modes["plain"] and "num_logprobs=20" in modes["plain"]
    assert "filter='sort'" in modes["verify"] and "num_logprobs=5" in modes["verify"]


@pytest.mark.parametrize("case", CASES)
def test_split_vocabulary_gives_whole_row_results(split_result, case):
    """Seeded and greedy tokens (and ties: row 3's two equal maxima, 8191 and 8192, lie on different devices of
    every mesh and go to the lower id) are identical on every mesh; logprobs agree to fp32 rounding (per-shard
    sums, then a psum)."""
    meshes = split_result[case]["meshes"]
    base = meshes["1"]
    for n in ("2", "4", "8", "3") if case != "verify" else ("2", "4", "8"):  # 3: V not divided, rows replicated
        got = meshes[n]
        for key in ("tokens", "token_ids", "num_accepted", "top_ids", "ranks"):
            if base.get(key) is not None:
                assert got[key] == base[key], (case, n, key)
        for key in ("logprobs", "top_logprobs"):
            np.testing.assert_allclose(np.asarray(got[key]), np.asarray(base[key]), atol=1e-5, err_msg=f"{case} {n}")
    if case in ("greedy", "plain"):
        assert base["tokens"][3] == 8191  # a greedy (padding) row on the tie
    if case == "verify":
        assert base["num_accepted"][0] >= 1  # the greedy row's first draft is its argmax


@pytest.mark.parametrize("case", CASES)
def test_no_collective_moves_a_vocabulary_sized_array(split_result, case):
    """The compiled programs' all-gathers, all-reduces, all-to-alls, reduce-scatters and collective-permutes carry
    [rows] values and [rows, n * k] top-k candidates only: no array with a dimension of V on any mesh."""
    for n in ("2", "4", "8"):
        entry = split_result[case]["meshes"][n]
        assert entry["collectives"] > 0, (case, n)  # the reductions do cross devices
        assert entry["vocab_sized"] == [], (case, n, entry["vocab_sized"])


def test_lowest_kept_is_the_kth_value_and_the_top_p_cut():
    """VocabSlice.lowest_kept on whole rows against numpy: with weight 1 and budget k, the k-th largest value (ties,
    -inf and k past the finite values included); with probabilities and budget p, the last token whose preceding mass
    (descending order) is < p; p <= the best token's mass keeps the best only."""
    import jax
    import jax.numpy as jnp

    from qwenjax.worker.vocab_split import VocabSlice

    rng = np.random.default_rng(5)
    x = np.round(rng.normal(size=(4, 300)) * 2, 1).astype(np.float32)  # rounded: many ties
    x[1, 5:] = -np.inf  # five finite values
    x[2] = -x[2]
    vs = VocabSlice.whole(300)
    k = np.array([1, 7, 150, 300], np.int32)
    kth = np.asarray(jax.jit(vs.lowest_kept)(jnp.asarray(x), jnp.ones(x.shape, jnp.int32), jnp.asarray(k)))
    np.testing.assert_array_equal(kth, [np.sort(row)[::-1][i - 1] for row, i in zip(x, k)])

    p = np.exp(x - x.max(axis=1, keepdims=True))
    p = (p / p.sum(axis=1, keepdims=True)).astype(np.float32)
    top_p = np.array([0.9, 0.5, 1e-6, 0.3], np.float32)
    last = np.asarray(jax.jit(vs.lowest_kept)(jnp.asarray(x), jnp.asarray(p), jnp.asarray(top_p)))
    for r in range(4):
        order = np.argsort(-x[r], kind="stable")
        before = np.cumsum(p[r][order].astype(np.float64)) - p[r][order]
        want = x[r][order][max(1, int(np.sum(before < top_p[r]))) - 1]
        assert last[r] == want, (r, last[r], want)
    assert last[2] == x[2].max()
