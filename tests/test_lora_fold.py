"""worker/lora_fold.py: the slots' A as extra columns of the base projections. The layout (each site's kernel and
bias widened by zeros; a slot's A written at its columns, nothing else touched), where the fold applies, and the
engine on one device equal to the engine with the fold off (QWENJAX_LORA_FOLD=0, A in the stacks), both checked
against PEFT in tests/test_lora.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qwenjax.config import ModelConfig
from qwenjax.models.default_model import CONFIG
from qwenjax.models.random_weights import random_params
from qwenjax.worker.lora_fold import FOLD_ENV, SITES, LoRAFold


def _params():
    cfg = ModelConfig.from_dict(CONFIG)
    return cfg, random_params(cfg, jnp.float32, 0)[1]


def _site(params, layer, entry, leaf="kernel"):
    owner, proj = SITES[entry]
    return np.asarray(params["model"]["layers"][layer][owner][proj][leaf][...])


def test_extend_then_write_a_slot():
    cfg, params = _params()
    before = {(i, e): _site(params, i, e) for i in range(cfg.num_hidden_layers) for e in SITES}
    bias = _site(params, 0, "qkv_proj", "bias")
    fold = LoRAFold(params, cfg.num_hidden_layers, LoRAFold.rank_columns(16), num_slots=4)
    assert fold.columns == {"qkv_proj": 48, "o_proj": 16, "gate_up_proj": 32, "down_proj": 16}
    params = fold.extend(params)
    for (i, e), w in before.items():
        got = _site(params, i, e)
        assert got.shape == (w.shape[0], w.shape[1] + 3 * fold.columns[e])
        np.testing.assert_array_equal(got[:, :w.shape[1]], w)   # the base columns unchanged
        assert not got[:, w.shape[1]:].any()                      # every slot empty
    b2 = _site(params, 0, "qkv_proj", "bias")
    np.testing.assert_array_equal(b2[:bias.shape[0]], bias)
    assert b2.shape == (bias.shape[0] + 3 * 48,) and not b2[bias.shape[0]:].any()
    assert fold.nbytes == sum(w.shape[0] * 3 * fold.columns[e] * 4 for (_, e), w in before.items()) + 3 * 48 * 4 * 2

    rng = np.random.default_rng(0)
    new = [{e: rng.normal(size=(w.shape[0], fold.columns[e])).astype(np.float32) for e in SITES
            for w in [before[(i, e)]]} for i in range(cfg.num_hidden_layers)]
    leaves, tree = jax.tree.flatten(params)
    params = jax.tree.unflatten(tree, fold.write(leaves, 2, new))
    for (i, e), w in before.items():
        got, o, c = _site(params, i, e), w.shape[1], fold.columns[e]
        np.testing.assert_array_equal(got[:, o + c:o + 2 * c], new[i][e])   # slot 2's columns
        assert not got[:, o:o + c].any() and not got[:, o + 2 * c:].any()   # slots 1 and 3 untouched
        np.testing.assert_array_equal(got[:, :o], w)


def test_where_the_fold_applies(monkeypatch):
    cfg, params = _params()
    L = cfg.num_hidden_layers
    assert LoRAFold.applies(params, L, 1, False)
    assert not LoRAFold.applies(params, L, 2, False)   # a mesh: A stays in the stacks, split like the weights
    assert not LoRAFold.applies(params, L, 1, True)    # AWQ / GPTQ / FP8: no float kernel to widen
    monkeypatch.setenv(FOLD_ENV, "0")
    assert not LoRAFold.applies(params, L, 1, False)


def test_engine_with_and_without_the_fold(monkeypatch, tmp_path):
    """The same greedy tokens and logprobs with the fold and without it (A in the stacks, the shrink kernels'
    reference on CPU); the fold's engine holds no A arrays, the other one no widened weights."""
    from qwenjax import LLM, LoRARequest, SamplingParams
    from tests.checkpoints import write_checkpoint
    from tests.conftest import SMALL_ENGINE
    from tests.lora_adapters import ALL_SEVEN, write_adapter

    base = write_checkpoint(tmp_path / "base", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                            num_kv_heads=2, vocab_size=512, seed=3)
    a = write_adapter(base, tmp_path / "a", r=8, alpha=16, targets=ALL_SEVEN, seed=1)
    prompts = [[5, 9, 200, 31, 7], [100, 3, 44]]
    p = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0)
    runs = {}
    for fold in ("1", "0"):
        monkeypatch.setenv(FOLD_ENV, fold)
        llm = LLM(str(base), **SMALL_ENGINE, enable_lora=True, max_loras=2, max_lora_rank=16)
        runner = llm.llm_engine.runner
        assert all((ab[0] is None) == (fold == "1") for ab in runner.lora.stacks[0].values())
        assert _site(runner.params, 0, "o_proj").shape == (64, 64 + 2 * 16 if fold == "1" else 64)
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=p, use_tqdm=False,
                            lora_request=[LoRARequest("a", 1, str(a)), None])
        runs[fold] = ([o.outputs[0].token_ids for o in outs],
                      [lp[t].logprob for o in outs for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)])
        del llm
    assert runs["1"][0] == runs["0"][0]
    np.testing.assert_allclose(runs["1"][1], runs["0"][1], atol=1e-5)
