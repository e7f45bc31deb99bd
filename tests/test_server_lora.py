"""LoRA adapters on the OpenAI server, through the official `openai` client: two --lora-modules listed in
/v1/models under the base model, chosen by `model`, each completion equal to PEFT's greedy tokens; unknown models,
runtime loading and unloading (only where allowed), and bad adapters get OpenAI-shaped errors."""

from __future__ import annotations

import numpy as np
import openai
import pytest
import requests

from qwenjax.config import EngineArgs
from qwenjax.engine.async_llm import AsyncLLMEngine
from server.app import create_app
from tests.conftest import SMALL_ENGINE
from tests.lora_adapters import ALL_SEVEN, peft_greedy, peft_logprobs, peft_model, write_adapter
from tests.test_server import ServerThread

NEW = 6


@pytest.fixture(scope="module")
def adapters(untied_gqa2, tmp_path_factory):
    d = tmp_path_factory.mktemp("server_loras")
    return {"a": write_adapter(untied_gqa2, d / "a", r=8, alpha=16, targets=("q_proj", "v_proj", "down_proj"), seed=1),
            "b": write_adapter(untied_gqa2, d / "b", r=16, alpha=8, targets=ALL_SEVEN, seed=2, use_rslora=True),
            "big": write_adapter(untied_gqa2, d / "big", r=32, alpha=8, targets=("q_proj",), seed=3)}


@pytest.fixture(scope="module")
def engine(untied_gqa2):
    eng = AsyncLLMEngine(EngineArgs(model=str(untied_gqa2), skip_warmup=True, enable_lora=True, max_loras=2,
                                    max_lora_rank=16, **SMALL_ENGINE))  # an engine core process
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def server(engine, adapters):
    app = create_app(engine, served_model_names=["base"], lora_modules=[f"a={adapters['a']}",
                                                                         f'{{"name": "b", "path": "{adapters["b"]}"}}'])
    with ServerThread(app) as s:
        yield s


def _client(srv):
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0)


def test_models_lists_adapters_under_the_base(server, adapters):
    cards = {m.id: m for m in _client(server).models.list().data}
    assert list(cards) == ["base", "a", "b"]
    assert cards["a"].parent == "base" and cards["b"].parent == "base" and cards["base"].parent is None
    assert cards["a"].root == str(adapters["a"])


def test_completions_per_adapter_equal_peft(server, untied_gqa2, adapters):
    prompt = list(map(int, np.random.default_rng(4).integers(0, 512, 21)))
    client = _client(server)
    for name in ("a", "b", "base"):
        model = peft_model(untied_gqa2, None if name == "base" else adapters[name])
        want = peft_greedy(model, [prompt], NEW)[0]
        out = client.completions.create(model=name, prompt=prompt, max_tokens=NEW, temperature=0.0, logprobs=0,
                                        extra_body={"ignore_eos": True})
        assert out.model == name
        lps = out.choices[0].logprobs.token_logprobs
        np.testing.assert_allclose(lps, peft_logprobs(model, prompt, want), atol=2e-4, rtol=1e-4)
        assert out.usage.completion_tokens == NEW


def test_unknown_model_is_a_404_naming_the_models(server):
    with pytest.raises(openai.NotFoundError) as e:
        _client(server).completions.create(model="c", prompt="hi", max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and "Served models: base, a, b" in e.value.body["message"]
    assert requests.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": "/x"}
                         ).status_code == 404  # runtime updating not allowed: no such route


def test_runtime_load_and_unload(engine, adapters, monkeypatch):
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    with ServerThread(create_app(engine, served_model_names=["base"])) as srv:
        url = srv.url
        r = requests.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": str(adapters["b"])})
        assert r.status_code == 200 and "Success" in r.text
        assert [m.id for m in _client(srv).models.list().data] == ["base", "c"]
        out = _client(srv).completions.create(model="c", prompt=[1, 2, 3], max_tokens=3, temperature=0.0)
        assert out.usage.completion_tokens == 3
        r = requests.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": str(adapters["a"])})
        assert r.status_code == 400 and "has already been loaded" in r.json()["error"]["message"]
        r = requests.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "big", "lora_path": str(adapters["big"])})
        assert r.status_code == 400 and "rank r=32 exceeds max_lora_rank=16" in r.json()["error"]["message"]
        r = requests.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "d"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path"
        r = requests.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "c"})
        assert r.status_code == 200
        r = requests.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "c"})
        assert r.status_code == 404 and "cannot be found" in r.json()["error"]["message"]
        with pytest.raises(openai.NotFoundError):
            _client(srv).completions.create(model="c", prompt=[1, 2, 3], max_tokens=3)
        # loaded again under the same name: a new adapter id, served as before
        r = requests.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": str(adapters["a"])})
        assert r.status_code == 200
        assert _client(srv).completions.create(model="c", prompt=[1, 2, 3], max_tokens=2).usage.completion_tokens == 2


def test_bad_lora_modules_are_refused_at_start(engine, adapters):
    with pytest.raises(ValueError, match="rank r=32 exceeds max_lora_rank=16"):
        create_app(engine, lora_modules=[f"big={adapters['big']}"])
    with pytest.raises(ValueError, match="expected name=path"):
        create_app(engine, lora_modules=["nopath"])
