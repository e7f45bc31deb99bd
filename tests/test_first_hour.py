"""What a new user meets first (issue 25): the built-in model answers a request without max_tokens in bounded time,
logprobs show text, `LLM()` in a plain script logs what it does (and JAX's INFO lines do not), a second start loads
its compiled programs from the persistent cache, and a missing model names today's download command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qwenjax import LLM, SamplingParams
from qwenjax.models.default_model import DEFAULT_MAX_NEW_TOKENS, default_model_dir
from qwenjax.models.loader import ModelNotFoundError
from qwenjax.tokenizer import load_generation_defaults
from tests.conftest import SMALL_ENGINE, pythonpath_with

ROOT = Path(__file__).resolve().parent.parent
SMALL = dict(max_model_len=256, max_num_seqs=4, max_num_batched_tokens=64, decode_buckets=(4,),
             prefill_token_buckets=(64,), num_kv_pages=64)


@pytest.fixture(scope="module")
def builtin():
    return LLM(**SMALL)  # the built-in default model


def test_builtin_model_bounds_a_request_without_max_tokens(builtin):
    assert load_generation_defaults(default_model_dir()).sampling_overrides()["max_tokens"] == DEFAULT_MAX_NEW_TOKENS
    out = builtin.generate(["Tell me something about large language models."],
                           SamplingParams(temperature=0, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert (len(out.token_ids), out.finish_reason) == (DEFAULT_MAX_NEW_TOKENS, "length")
    out = builtin.generate(["hi"], SamplingParams(temperature=0, ignore_eos=True, max_tokens=3),
                           use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 3  # an explicit max_tokens still wins


def test_logprob_decoded_token_is_text(builtin):
    out = builtin.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=4, logprobs=5,
                                                                      ignore_eos=True), use_tqdm=False)[0].outputs[0]
    tok = builtin.get_tokenizer()
    for entry in out.logprobs:
        for tid, lp in entry.items():
            assert lp.decoded_token == tok.decode([tid])
            assert "Ġ" not in lp.decoded_token  # byte-level BPE's stand-in for a space never leaks
    assert any(" " in lp.decoded_token for entry in out.logprobs for lp in entry.values())


def test_missing_model_names_hf_download():
    with pytest.raises(ModelNotFoundError, match="hf download Qwen/Qwen2-does-not-exist"):
        LLM("Qwen/Qwen2-does-not-exist", **SMALL_ENGINE)


def _run(script: str, env_extra: dict) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR",)}
    env.update(PYTHONPATH=pythonpath_with(ROOT), JAX_PLATFORMS="cpu", **env_extra)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, env=env,
                          timeout=600, cwd=ROOT)


def test_a_plain_script_logs_qwenjax_info_and_not_jax_info(tmp_path):
    out = _run("""
        import logging
        from qwenjax import LLM
        logging.getLogger("jax._src.xla_bridge").info("jax-info-probe")
        LLM(compilation_cache_dir=None, max_model_len=128, max_num_seqs=2, num_kv_pages=16, decode_buckets=(2,),
            prefill_token_buckets=(32,))
    """, {"XDG_CACHE_HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert "INFO" in out.stderr and "qwenjax: loaded" in out.stderr and "KV cache: 16 pages" in out.stderr
    assert "jax-info-probe" not in out.stderr


def test_second_start_loads_compiled_programs_from_the_cache(tmp_path):
    script = """
        import json, jax
        from qwenjax import LLM, SamplingParams
        events = []
        jax.monitoring.register_event_duration_secs_listener(lambda e, d, **kw: events.append(e))
        llm = LLM(compilation_cache_dir=%r, max_model_len=128, max_num_seqs=2, num_kv_pages=16, decode_buckets=(2,),
                  prefill_token_buckets=(32,))
        llm.generate(["hi"], SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)
        print(json.dumps({"programs": events.count("/jax/core/compile/backend_compile_duration"),
                          "from_cache": events.count("/jax/compilation_cache/cache_retrieval_time_sec")}))
    """ % str(tmp_path / "jax-cache")
    first, second = (_run(script, {"XDG_CACHE_HOME": str(tmp_path)}) for _ in range(2))
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    cold, warm = (json.loads(r.stdout.strip().splitlines()[-1]) for r in (first, second))
    assert cold["programs"] > 0 and cold["from_cache"] == 0 and any((tmp_path / "jax-cache").iterdir())
    # (JAX reports a backend compile for a program it loads from the cache too, with a retrieval beside it.)
    assert warm == {"programs": cold["programs"], "from_cache": cold["programs"]}


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(builtin):
    ids = list(range(1000, 1040))
    greedy = dict(temperature=0, max_tokens=4, ignore_eos=True)
    cut = builtin.generate(prompt_token_ids=[ids], sampling_params=SamplingParams(truncate_prompt_tokens=8, **greedy),
                           use_tqdm=False)[0]
    last = builtin.generate(prompt_token_ids=[ids[-8:]], sampling_params=SamplingParams(**greedy), use_tqdm=False)[0]
    assert cut.prompt_token_ids == ids[-8:]
    assert cut.outputs[0].token_ids == last.outputs[0].token_ids
    with pytest.raises(ValueError, match="truncate_prompt_tokens must be at least 1"):
        SamplingParams(truncate_prompt_tokens=0)
