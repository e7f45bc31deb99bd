import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwenjax.sampling_params import SamplingParams
from qwenjax.worker.sampler import (SamplerMode, SamplingRow, apply_banned, apply_penalties, build_tensors, choose_mode,
                                    chunked_top_k, filtered_logits, history_bucket, sample)

QWEN_VOCAB = 151936
jit_sample = jax.jit(sample, static_argnames="mode")
jit_filtered = jax.jit(filtered_logits, static_argnames="mode")


def mode(**changes):
    base = dict(all_greedy=False, filter="none", topk_cap=0, penalties=False, num_logprobs=0, has_banned=False)
    return SamplerMode(**{**base, **changes})


def rows_of(*params, seed0=0):
    return [SamplingRow(p, seed=seed0 + i) for i, p in enumerate(params)]


def tensors(rows, vocab, num_rows=None):
    return build_tensors(rows, num_rows=num_rows or len(rows), vocab_size=vocab)


# ------------------------------------------------------------------------------- filters vs a numpy reference


def reference_keep(logits, temperature, min_p=0.0, top_k=0, top_p=1.0, top_p_first=False):
    """Boolean [V] mask of kept tokens, in float64: min_p, top-k, then top-p (or top-p before top-k)."""
    x = np.asarray(logits, np.float64) / temperature
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    keep = probs >= min_p * probs.max()

    def apply_top_k(keep):
        if top_k > 0:
            kth = np.sort(np.where(keep, x, -np.inf))[::-1][min(top_k, len(x)) - 1]
            keep = keep & (x >= kth)
        return keep

    def apply_top_p(keep):
        if top_p < 1.0:
            q = np.where(keep, probs, 0.0)
            q = q / q.sum()
            order = np.argsort(-q, kind="stable")
            before = np.cumsum(q[order]) - q[order]
            kept = order[: max(1, int(np.sum(before < top_p)))]
            keep = keep & np.isin(np.arange(len(x)), kept)
        return keep

    if top_p_first:
        return apply_top_k(apply_top_p(keep))
    return apply_top_p(apply_top_k(keep))


FILTER_ROWS = [
    SamplingParams(temperature=0.8, top_k=10),
    SamplingParams(temperature=1.3, top_k=50, top_p=0.9),
    SamplingParams(temperature=0.7, top_k=40, top_p=0.7, min_p=0.05),
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.5, min_p=0.1),
    SamplingParams(temperature=1.0, top_k=1),
    SamplingParams(temperature=2.0, top_k=64, top_p=0.5),
]


@pytest.mark.parametrize("filter_", ["topk", "sort"])
def test_filters_match_numpy_reference(filter_):
    v = 1000
    logits = np.random.default_rng(0).normal(size=(len(FILTER_ROWS), v)).astype(np.float32) * 3
    t = tensors(rows_of(*FILTER_ROWS), v)
    m = choose_mode(rows_of(*FILTER_ROWS))
    assert m.filter == "topk" and m.topk_cap == 64
    if filter_ == "sort":
        m = mode(filter="sort")
    out = np.asarray(jit_filtered(jnp.asarray(logits), t, m))
    for i, p in enumerate(FILTER_ROWS):
        want = reference_keep(logits[i], p.temperature, p.min_p, p.top_k, p.top_p)
        np.testing.assert_array_equal(np.isfinite(out[i]), want, err_msg=f"row {i}: {p}")
        np.testing.assert_allclose(out[i][want], logits[i][want] / p.temperature, rtol=1e-6)


def test_top_p_alone_needs_sort_and_matches_reference():
    v = 1000
    params = [SamplingParams(top_p=0.6), SamplingParams(top_p=0.95, min_p=0.01, temperature=0.9),
              SamplingParams(top_k=2000, temperature=1.1)]
    logits = np.random.default_rng(1).normal(size=(3, v)).astype(np.float32) * 2
    m = choose_mode(rows_of(*params))
    assert m.filter == "sort"
    out = np.asarray(jit_filtered(jnp.asarray(logits), tensors(rows_of(*params), v), m))
    for i, p in enumerate(params):
        want = reference_keep(logits[i], p.temperature, p.min_p, p.top_k, p.top_p)
        np.testing.assert_array_equal(np.isfinite(out[i]), want)


def test_top_k_is_applied_before_top_p():
    # probs 0.5, 0.3, 0.2. top_k=2 renormalises to 0.625, 0.375 and top_p=0.6 then keeps one token;
    # top-p first would keep two.
    logits = np.log(np.array([[0.5, 0.3, 0.2]], np.float32))
    p = SamplingParams(top_k=2, top_p=0.6)
    assert reference_keep(logits[0], 1.0, top_k=2, top_p=0.6).sum() == 1
    assert reference_keep(logits[0], 1.0, top_k=2, top_p=0.6, top_p_first=True).sum() == 2
    for m in (mode(filter="topk", topk_cap=64), mode(filter="sort")):
        out = np.asarray(jit_filtered(jnp.asarray(logits), tensors(rows_of(p), 3), m))
        np.testing.assert_array_equal(np.isfinite(out[0]), [True, False, False])


# ---------------------------------------------------------------------------------------------------- penalties


def test_repetition_penalty_matches_transformers():
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor

    v = 300
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(4, v)).astype(np.float32) * 4
    rows = []
    for i, penalty in enumerate([1.3, 0.7, 1.05, 1.0]):
        prompt = rng.integers(0, v, size=5 + 7 * i).tolist()
        output = rng.integers(0, v, size=3 * i).tolist()
        rows.append(SamplingRow(SamplingParams(repetition_penalty=penalty), seed=i, prompt_ids=prompt,
                                output_ids=output))
    out = np.asarray(jax.jit(apply_penalties)(jnp.asarray(logits), tensors(rows, v)))
    for i, r in enumerate(rows):
        processor = RepetitionPenaltyLogitsProcessor(penalty=r.params.repetition_penalty)
        ids = torch.tensor([list(r.prompt_ids) + list(r.output_ids)])
        want = processor(ids, torch.tensor(logits[i : i + 1])).numpy()[0]
        np.testing.assert_allclose(out[i], want, rtol=1e-6)


def test_presence_and_frequency_penalties_match_formula():
    v = 200
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(3, v)).astype(np.float32) * 4
    settings = [(1.2, 0.5, 0.3), (1.0, -0.4, 1.5), (0.9, 2.0, -2.0)]  # (repetition, presence, frequency)
    rows = []
    for i, (rep, pres, freq) in enumerate(settings):
        params = SamplingParams(repetition_penalty=rep, presence_penalty=pres, frequency_penalty=freq)
        rows.append(SamplingRow(params, seed=i, prompt_ids=rng.integers(0, v, 20).tolist(),
                                output_ids=rng.integers(0, 30, 40).tolist()))  # repeats likely
    out = np.asarray(jax.jit(apply_penalties)(jnp.asarray(logits), tensors(rows, v)))
    for i, ((rep, pres, freq), r) in enumerate(zip(settings, rows)):
        want = logits[i].astype(np.float64)
        counts = np.bincount(r.output_ids, minlength=v)
        seen = (counts > 0) | np.isin(np.arange(v), r.prompt_ids)
        want = np.where(seen, np.where(want > 0, want / rep, want * rep), want)
        want = want - freq * counts - pres * (counts > 0)
        np.testing.assert_allclose(out[i], want, rtol=1e-5, atol=1e-5)


def test_banned_ids_are_never_sampled_and_padding_is_dropped():
    v = 50
    logits = jnp.zeros((2, v)).at[:, 7].set(100.0)
    rows = [SamplingRow(SamplingParams(temperature=0.0), seed=0, banned_ids=[7, 8]),
            SamplingRow(SamplingParams(), seed=1)]
    t = tensors(rows, v)
    assert t.banned.shape == (2, 16) and (t.banned[1] == v).all()
    banned = np.asarray(apply_banned(logits, t))
    assert np.isneginf(banned[0, [7, 8]]).all() and np.isfinite(banned[1]).all()
    out = jit_sample(logits, t, choose_mode(rows))
    assert int(out.token_ids[0]) != 7 and int(out.token_ids[1]) == 7


# --------------------------------------------------------------------------------------------------- sampling


def test_greedy_is_argmax_of_penalised_logits():
    v = 500
    logits = jnp.asarray(np.random.default_rng(4).normal(size=(3, v)), jnp.float32)
    rows = rows_of(SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, top_k=5),
                   SamplingParams(temperature=0.0))
    m = choose_mode(rows)
    assert m.all_greedy and m.filter == "none"
    out = jit_sample(logits, tensors(rows, v, num_rows=4), m)  # a greedy padding row too
    np.testing.assert_array_equal(out.token_ids[:3], jnp.argmax(logits, -1)[:3])
    # Mixed batch: the greedy row still takes the argmax.
    mixed = rows_of(SamplingParams(temperature=0.0), SamplingParams(top_p=0.5), SamplingParams(top_k=3))
    out = jit_sample(logits, tensors(mixed, v), choose_mode(mixed))
    assert int(out.token_ids[0]) == int(jnp.argmax(logits[0]))
    # A greedy row with a repetition penalty avoids its previous argmax when the penalty flips the order.
    best = int(jnp.argmax(logits[0]))
    rep = [SamplingRow(SamplingParams(temperature=0.0, repetition_penalty=50.0), seed=0, output_ids=[best])]
    out = jit_sample(logits[:1], tensors(rep, v), choose_mode(rep))
    assert int(out.token_ids[0]) != best


def test_seeded_row_independent_of_batch_position_and_mode():
    v = 1000
    rng = np.random.default_rng(5)
    target_logits = rng.normal(size=(v,)).astype(np.float32)
    target = SamplingRow(SamplingParams(temperature=1.0, seed=123), seed=123, output_ids=[1, 2, 3])
    others_a = [SamplingRow(SamplingParams(temperature=0.0), seed=9)]
    others_b = [SamplingRow(SamplingParams(top_p=0.3, repetition_penalty=1.2), seed=10, output_ids=[4]),
                SamplingRow(SamplingParams(top_k=5, logprobs=2), seed=11)]
    batches = [[target] + others_a, others_b + [target], [others_b[1], target]]
    tokens = []
    for rows in batches:
        logits = rng.normal(size=(4, v)).astype(np.float32)
        pos = rows.index(target)
        logits[pos] = target_logits
        m = choose_mode(rows)
        out = jit_sample(jnp.asarray(logits), tensors(rows, v, num_rows=4), m)
        tokens.append((m.filter, int(out.token_ids[pos])))
    assert [f for f, _ in tokens] == ["none", "sort", "topk"]
    assert len({tok for _, tok in tokens}) == 1, tokens


def test_seeds_and_steps_change_the_draw():
    v = 1000
    logits = jnp.zeros((16, v))  # uniform: every draw is pure noise
    by_seed = jit_sample(logits, tensors(rows_of(*[SamplingParams()] * 16), v), mode()).token_ids
    assert len(set(np.asarray(by_seed).tolist())) > 12
    by_step = [SamplingRow(SamplingParams(), seed=7, output_ids=[0] * s) for s in range(16)]
    by_step = jit_sample(logits, tensors(by_step, v), mode()).token_ids
    assert len(set(np.asarray(by_step).tolist())) > 12
    again = jit_sample(logits, tensors(rows_of(*[SamplingParams()] * 16), v), mode()).token_ids
    np.testing.assert_array_equal(by_seed, again)


def chi_square(tokens, probs):
    counts = np.bincount(tokens, minlength=len(probs))
    expected = probs * len(tokens)
    return float(np.sum((counts - expected) ** 2 / expected)), counts


def test_temperature_sampling_follows_softmax():
    n, v = 4000, 5
    base = np.array([1.0, 0.5, 0.0, -1.0, -2.0], np.float32)
    logits = jnp.asarray(np.tile(base, (n, 1)))
    params = SamplingParams(temperature=0.8)
    t = tensors(rows_of(*[params] * n), v)
    tokens = np.asarray(jit_sample(logits, t, mode()).token_ids)
    probs = np.exp(base / 0.8) / np.exp(base / 0.8).sum()
    stat, counts = chi_square(tokens, probs)
    assert stat < 25.0, (stat, counts, probs * n)  # 4 degrees of freedom; p ~ 5e-5

    # top_k=3 renormalises over the three best tokens.
    params = SamplingParams(temperature=0.8, top_k=3)
    t = tensors(rows_of(*[params] * n, seed0=n), v)
    tokens = np.asarray(jit_sample(logits, t, mode(filter="topk", topk_cap=64)).token_ids)
    assert tokens.max() <= 2
    stat, counts = chi_square(tokens, probs[:3] / probs[:3].sum())  # 2 degrees of freedom
    assert stat < 25.0, (stat, counts)


def test_logprobs_come_from_raw_logits():
    v = 300
    logits = jnp.asarray(np.random.default_rng(6).normal(size=(2, v)) * 3, jnp.float32)
    rows = [SamplingRow(SamplingParams(temperature=0.0, repetition_penalty=2.0, logprobs=3), seed=0,
                        output_ids=[int(jnp.argmax(logits[0]))]),
            SamplingRow(SamplingParams(temperature=0.5, top_k=4), seed=1)]
    m = choose_mode(rows)
    assert m.num_logprobs == 5
    out = jit_sample(logits, tensors(rows, v), m)
    raw = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    rows_idx = np.arange(2)
    np.testing.assert_allclose(out.logprobs, raw[rows_idx, np.asarray(out.token_ids)], rtol=1e-5)
    np.testing.assert_array_equal(out.top_ids, np.argsort(-raw, axis=-1)[:, :5])
    np.testing.assert_allclose(out.top_logprobs, np.sort(raw, axis=-1)[:, ::-1][:, :5], rtol=1e-5)
    none = jit_sample(logits, tensors(rows, v), mode(filter="topk", topk_cap=64))
    assert none.top_ids.shape == (2, 0) and none.top_logprobs.shape == (2, 0)


@pytest.mark.parametrize("k", [5, 64, 1024])
def test_chunked_top_k_is_exact_with_ties(k):
    # Integer logits make many ties, across chunks and at the k-th value.
    x = jnp.asarray(np.random.default_rng(8).integers(-50, 50, size=(3, 70001)), jnp.float32)
    x = x.at[1, :].set(-jnp.inf).at[1, 123].set(3.0).at[1, 70000].set(2.0)  # a row with two finite values
    want_values, _ = jax.lax.top_k(x, k)
    values, ids = jax.jit(chunked_top_k, static_argnums=1)(x, k)
    np.testing.assert_array_equal(values, want_values)
    assert ids.dtype == jnp.int32
    finite = np.isfinite(np.asarray(values))
    rows = np.nonzero(finite)[0]
    np.testing.assert_array_equal(np.asarray(x)[rows, np.asarray(ids)[finite]], np.asarray(values)[finite])
    assert len(set(np.asarray(ids[0]).tolist())) == k


def test_sort_mode_falls_back_to_whole_rows_only_when_needed():
    # Row 0's top-p set is 3 tokens: the 1024 candidates hold it. Row 1 is almost flat, so top_p=0.9 keeps about
    # 90% of 5000 tokens: only the fallback over whole rows (a bisection, sampler_filters._bisected_threshold) finds
    # its threshold. Both must match the reference.
    v = 5000
    rng = np.random.default_rng(9)
    peaked = rng.normal(size=v).astype(np.float32)
    peaked[:3] += 30.0
    flat = (rng.normal(size=v) * 0.01).astype(np.float32)
    for rows_logits, params in [([peaked, peaked], [SamplingParams(top_p=0.9), SamplingParams(top_p=0.5)]),
                                ([peaked, flat], [SamplingParams(top_p=0.9), SamplingParams(top_p=0.9)])]:
        logits = np.stack(rows_logits)
        m = choose_mode(rows_of(*params))
        assert m.filter == "sort"
        out = np.asarray(jit_filtered(jnp.asarray(logits), tensors(rows_of(*params), v), m))
        for i, p in enumerate(params):
            want = reference_keep(logits[i], p.temperature, p.min_p, p.top_k, p.top_p)
            np.testing.assert_array_equal(np.isfinite(out[i]), want)
    assert np.isfinite(out[1]).sum() > 4000


def test_qwen_vocab_sampling_never_sorts_the_vocabulary():
    """Top-k / top-p rows at Qwen's vocabulary: the cost is a top-k of the capped width (256), never a sort over the
    151,936 logits, and no intermediate is larger than the [rows, vocab] logits; the tokens obey each row's filter."""
    v = QWEN_VOCAB
    rng = np.random.default_rng(7)
    logits = jnp.asarray(rng.normal(size=(4, v)) * 3, jnp.float32)
    rows = [SamplingRow(SamplingParams(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05,
                                       logprobs=1), seed=1, prompt_ids=list(range(100)), output_ids=[5, 6, 7]),
            SamplingRow(SamplingParams(temperature=0.0, min_tokens=4), seed=2, banned_ids=[151643, 151645]),
            SamplingRow(SamplingParams(temperature=1.0, top_k=200), seed=3)]
    m = choose_mode(rows)
    assert m == mode(filter="topk", topk_cap=256, penalties=True, num_logprobs=5, has_banned=True)
    t = tensors(rows, v, num_rows=4)
    jaxpr = jax.make_jaxpr(functools.partial(sample, mode=m))(logits, t).jaxpr
    assert "sort" not in primitive_names(jaxpr)
    top_ks = [eqn.params["k"] for eqn in all_eqns(jaxpr) if eqn.primitive.name == "top_k"]
    assert top_ks and max(top_ks) <= 256, top_ks
    biggest = max(np.prod(var.aval.shape) for eqn in all_eqns(jaxpr) for var in eqn.outvars)
    assert biggest <= logits.size, biggest  # nothing larger than the logits: no [rows, vocab, k] intermediate
    out = jit_sample(logits, t, m)
    kept = np.isfinite(np.asarray(jit_filtered(apply_penalties(logits, t), t, m)))
    assert kept[0].sum() <= 20 and kept[0, int(out.token_ids[0])]
    assert kept[2].sum() == 200 and kept[2, int(out.token_ids[2])]
    assert int(out.token_ids[1]) == int(jnp.argmax(logits[1].at[jnp.array([151643, 151645])].set(-jnp.inf)))


# ------------------------------------------------------------------------------------------ compiled program


def primitive_names(jaxpr):
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if hasattr(sub, "eqns"):
                    names |= primitive_names(sub)
                elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                    names |= primitive_names(sub.jaxpr)
    return names


def all_eqns(jaxpr):
    """Every equation of `jaxpr` and of the jaxprs nested in its equations' parameters."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if hasattr(sub, "eqns"):
                    yield from all_eqns(sub)
                elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                    yield from all_eqns(sub.jaxpr)


@pytest.mark.parametrize(
    "m, bisects",
    [
        (mode(filter="none", penalties=True, has_banned=True, num_logprobs=5), False),
        (mode(filter="topk", topk_cap=64, penalties=True), False),
        (mode(all_greedy=True), False),
        (mode(filter="sort"), True),
    ],
)
def test_no_mode_sorts_and_only_sort_mode_has_the_bisection(m, bisects):
    """Mode 'sort' falls back (under a cond) to bisecting each row's threshold, never to sorting the vocabulary
    (a sort cannot keep a vocabulary split over a mesh; vocab_split.VocabSlice.lowest_kept)."""
    v = 1000
    rows = rows_of(SamplingParams(top_k=3, top_p=0.5), SamplingParams(temperature=0.0))
    jaxpr = jax.make_jaxpr(functools.partial(sample, mode=m))(jnp.zeros((2, v)), tensors(rows, v))
    names = primitive_names(jaxpr.jaxpr)
    assert "sort" not in names, sorted(names)
    assert ("cond" in names) == bisects and (bool(names & {"while", "scan"})) == bisects, sorted(names)
    assert ("top_k" in names) == (m.filter != "none" or m.num_logprobs > 0)


# ----------------------------------------------------------------------------------------------- host helpers


def test_choose_mode():
    P = SamplingParams
    assert choose_mode([]) == mode(all_greedy=True)
    assert choose_mode(rows_of(P(temperature=0.0, top_k=5))) == mode(all_greedy=True)
    assert choose_mode(rows_of(P(temperature=0.0), P())) == mode()
    assert choose_mode(rows_of(P(top_k=64), P(min_p=0.1))) == mode(filter="topk", topk_cap=64)
    assert choose_mode(rows_of(P(top_k=65, top_p=0.9))) == mode(filter="topk", topk_cap=256)
    assert choose_mode(rows_of(P(top_k=1024), P())) == mode(filter="topk", topk_cap=1024)
    assert choose_mode(rows_of(P(top_k=1025))) == mode(filter="sort")
    assert choose_mode(rows_of(P(top_k=5), P(top_p=0.9))) == mode(filter="sort")
    assert choose_mode(rows_of(P(temperature=0.0, repetition_penalty=1.1))) == mode(all_greedy=True,
                                                                                    penalties=True)
    assert choose_mode(rows_of(P(presence_penalty=0.1), P(logprobs=0))).penalties
    assert choose_mode(rows_of(P(logprobs=0))).num_logprobs == 0
    assert choose_mode(rows_of(P(logprobs=1), P(logprobs=6))).num_logprobs == 20
    assert choose_mode(rows_of(P(logprobs=30))).num_logprobs == 30
    assert choose_mode([SamplingRow(P(), seed=0, banned_ids=[3])]).has_banned
    with pytest.raises(ValueError, match="topk_cap must be > 0"):
        mode(filter="topk")
    with pytest.raises(ValueError, match="filter must be one of"):
        mode(filter="topp")


def test_build_tensors_pads_rows_and_histories():
    v = 1000
    rows = [
        SamplingRow(SamplingParams(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.1), seed=-1,
                    prompt_ids=list(range(40)), output_ids=[1, 2, 3]),
        SamplingRow(SamplingParams(temperature=0.0, min_p=0.3), seed=2**40 + 5, output_ids=[9] * 17,
                    prompt_ids=list(range(100))),  # no penalty: its histories are not copied
        SamplingRow(SamplingParams(frequency_penalty=0.5), seed=3, prompt_ids=[1] * 200, output_ids=[4] * 20,
                    banned_ids=[7]),
    ]
    t = build_tensors(rows, num_rows=4, vocab_size=v)
    np.testing.assert_allclose(t.temperature, [0.7, 0.0, 1.0, 0.0])
    np.testing.assert_allclose(t.top_p, [0.8, 1.0, 1.0, 1.0])
    np.testing.assert_array_equal(t.top_k, [20, 0, 0, 0])
    np.testing.assert_allclose(t.min_p, 0.0)  # greedy rows drop min_p
    np.testing.assert_allclose(t.repetition_penalty, [1.1, 1.0, 1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(t.frequency_penalty, [0.0, 0.0, 0.5, 0.0])
    np.testing.assert_array_equal(t.seeds, [2**32 - 1, 5, 3, 0])
    np.testing.assert_array_equal(t.steps, [3, 17, 20, 0])
    assert t.seeds.dtype == np.uint32 and t.steps.dtype == np.int32 and t.top_k.dtype == np.int32
    # Prompt ids only for the repetition-penalised row; output ids for every penalised row.
    assert t.prompt_tokens.shape == (4, 64) and t.output_tokens.shape == (4, 32) and t.banned.shape == (4, 16)
    np.testing.assert_array_equal(t.prompt_tokens[0, :40], np.arange(40))
    assert (t.prompt_tokens[0, 40:] == v).all() and (t.prompt_tokens[1:] == v).all()
    assert (t.output_tokens[1] == v).all() and (t.output_tokens[2, :20] == 4).all()
    np.testing.assert_array_equal(t.banned[:, 0], [v, v, 7, v])
    with pytest.raises(ValueError, match="num_rows=2"):
        build_tensors(rows, num_rows=2, vocab_size=v)


def test_history_buckets():
    assert [history_bucket(n) for n in (0, 1, 16, 17, 32, 33, 1000)] == [16, 16, 16, 32, 32, 64, 1024]
