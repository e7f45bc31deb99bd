"""RoPE-scaled models against transformers (the oracle), on prompts longer than the original context (64 tokens
here, scaled 4x to 256): logits through the paged cache (prefill, chunks over cached pages, decode past the
boundary) and greedy tokens through the whole engine (chunked prefill, prefix-cache hits), for yarn, linear and
dynamic; and hf_overrides turning YaRN on for a checkpoint without it.

dynamic is compared with transformers in the state qwenjax's static form reproduces (qwenjax/rope_scaling.py): its
rotary primed by a call over all 256 positions, and only prompts longer than max_position_embeddings (a shorter
forward call makes transformers drop back to plain RoPE)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from qwenjax import LLM, SamplingParams
from tests.checkpoints import hf_greedy, hf_model, write_checkpoint
from tests.conftest import SMALL_ENGINE
from tests.test_model_vs_hf import ATOL, _our_logits

ORIGINAL, FACTOR = 64, 4.0
LONGEST = int(ORIGINAL * FACTOR)  # 256: the max_model_len each scaling allows
KINDS = {"yarn": {"rope_type": "yarn", "factor": FACTOR, "original_max_position_embeddings": ORIGINAL},
         "linear": {"rope_type": "linear", "factor": FACTOR},
         "dynamic": {"rope_type": "dynamic", "factor": FACTOR}}
NEW = 12
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)
# Chunked prefill: at most 64 tokens a step and 32 a prefill row, so the long prompts take several chunks that read
# the pages of the ones before.
CHUNKED = {**SMALL_ENGINE, "max_model_len": LONGEST, "max_num_batched_tokens": 64, "prefill_token_buckets": (16, 32)}


@pytest.fixture(scope="module")
def scaled(ckpt_dir):
    """{kind: checkpoint}: the same weights (seed) with each scaling, max_position_embeddings 64."""
    return {kind: write_checkpoint(ckpt_dir / f"rope_{kind}", max_position_embeddings=ORIGINAL, seed=12,
                                   rope_parameters=params) for kind, params in KINDS.items()}


def hf_scaled(path, kind: str):
    model = hf_model(path)
    if kind == "dynamic":  # grow transformers' dynamic NTK to the longest context (the static form)
        rotary = model.model.rotary_emb
        with torch.no_grad():
            rotary(torch.zeros(1, 1, 16), torch.arange(LONGEST)[None])
        assert rotary.max_seq_len_cached == LONGEST
    return model


def prompts_for(kind: str) -> list[list[int]]:
    """Prompts past the original context, one sharing 96 tokens (6 pages) with another, and (except dynamic) one
    of 58 tokens whose decode crosses position 64."""
    rng = np.random.default_rng(3)
    lengths = [150, 70] + ([] if kind == "dynamic" else [58])
    out = [list(map(int, rng.integers(0, 512, n))) for n in lengths]
    out.append(out[0][:96] + list(map(int, rng.integers(0, 512, 30))))
    return out


@pytest.mark.parametrize("kind", list(KINDS))
def test_logits_match_hf_across_the_boundary(scaled, kind):
    """200 tokens: prefilled in chunks of 48 (each over the cached pages before it) up to 180, then 20 decode steps;
    every position's logits equal transformers' full forward."""
    ids = list(map(int, np.random.default_rng(9).integers(0, 512, 200)))
    with torch.no_grad():
        ref = hf_scaled(scaled[kind], kind)(torch.tensor([ids])).logits[0].numpy()
    ours = _our_logits(scaled[kind], ids, chunk=48, decode_from=180)
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=1e-4)
    assert (ours.argmax(-1) == ref.argmax(-1)).all()
    if kind == "yarn":  # and as one fresh prefill of all 200 tokens
        np.testing.assert_allclose(_our_logits(scaled[kind], ids), ref, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("kind", list(KINDS))
def test_greedy_equals_hf_with_chunks_and_prefix_hits(scaled, kind):
    prompts = prompts_for(kind)
    want = hf_greedy(hf_scaled(scaled[kind], kind), prompts, NEW)
    llm = LLM(str(scaled[kind]), **CHUNKED)
    assert llm.llm_engine.max_model_len == LONGEST
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == want
    stats = llm.llm_engine.stats
    assert stats.prefill_steps + stats.mixed_steps >= -(-sum(map(len, prompts)) // 64)  # really chunked
    # Again: every full page before each prompt's last token now comes from the prefix cache.
    before = stats.prefix_cache_hits
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == want
    assert stats.prefix_cache_hits - before == sum((len(p) - 1) // 16 * 16 for p in prompts)


@pytest.fixture(scope="module")
def plain(scaled, ckpt_dir):
    """The YaRN checkpoint's weights with config.json's RoPE scaling taken out (plain RoPE, 64 positions)."""
    src, dst = scaled["yarn"], ckpt_dir / "rope_plain"
    dst.mkdir()
    for f in src.iterdir():
        if f.name.endswith(".safetensors"):
            os.symlink(f, dst / f.name)
        elif f.name != "config.json":
            shutil.copy(f, dst / f.name)
    cfg = json.loads((src / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg["rope_parameters"]["rope_theta"]}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


LEGACY_YARN = {"rope_scaling": {"type": "yarn", "factor": FACTOR, "original_max_position_embeddings": ORIGINAL}}


def test_hf_overrides_turn_yarn_on(scaled, plain):
    """vLLM's hf_overrides on a checkpoint without scaling (the legacy `type` form): transformers' tokens for the
    same weights with YaRN in config.json, the default max_model_len becomes 256, and without the override 256 is
    refused with the fix named."""
    engine = {k: v for k, v in SMALL_ENGINE.items() if k != "max_model_len"}
    with pytest.raises(ValueError) as e:
        LLM(str(plain), **engine, max_model_len=LONGEST)
    assert "max_model_len=256" in str(e.value) and "64" in str(e.value) and "hf_overrides=" in str(e.value)
    prompts = prompts_for("yarn")
    want = hf_greedy(hf_scaled(scaled["yarn"], "yarn"), prompts, NEW)
    llm = LLM(str(plain), **engine, hf_overrides=LEGACY_YARN)
    assert llm.llm_engine.max_model_len == LONGEST and llm.llm_engine.model_config.rope_scaling.rope_type == "yarn"
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == want


@pytest.mark.parametrize("overrides, error, words", [
    ({"rope_scaling": {"type": "longrope", "factor": 2.0}}, NotImplementedError, "'longrope'"),
    ({"rope_scaling": {"type": "ntk-by-parts", "factor": 2.0}}, ValueError, "'ntk-by-parts'"),
    (LEGACY_YARN, ValueError, "max_model_len=512 is larger than the model's longest context, 256"),
])
def test_bad_overrides_are_refused_before_loading(plain, overrides, error, words):
    engine = {k: v for k, v in SMALL_ENGINE.items() if k != "max_model_len"}
    with pytest.raises(error, match=words):
        LLM(str(plain), **engine, hf_overrides=overrides, max_model_len=512)


def test_hf_overrides_reach_every_config_key(plain):
    """Any config.json key: max_position_embeddings alone raises the default max_model_len (vLLM's use of it)."""
    engine = {k: v for k, v in SMALL_ENGINE.items() if k != "max_model_len"}
    llm = LLM(str(plain), **engine, hf_overrides={"max_position_embeddings": 128})
    assert llm.llm_engine.max_model_len == 128 and llm.llm_engine.model_config.rope_scaling is None
