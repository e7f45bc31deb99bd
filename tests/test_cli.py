"""vLLM's command lines: `qwenjax serve MODEL [flags]`, `qwenjax bench NAME [args]`, and the server flags vLLM
command lines carry (--config YAML, --no-enable-prefix-caching, --enforce-eager, --revision / --download-dir, -pp,
CORS, TLS), each mapped onto EngineArgs, uvicorn or the middleware; no model runs here except the built-in tiny one,
loaded without compiling."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from qwenjax.cli import benchmark_script
from qwenjax.config import EngineArgs
from qwenjax.engine.async_llm import AsyncLLMEngine
from qwenjax.models.loader import ModelNotFoundError, resolve_model_path
from server.__main__ import engine_args, make_parser, served_names
from server.app import create_app
from server.http_options import add_cors, check_http_options, uvicorn_options
from tests.conftest import SMALL_ENGINE, pythonpath_with
from tests.test_server_units import FakeEngine

ROOT = Path(__file__).resolve().parents[1]


def parse(*argv: str):
    return make_parser("qwenjax serve").parse_args(list(argv))


def test_vllm_engine_flags_map_onto_engine_args():
    a = engine_args(parse("Qwen/Qwen2-7B-Instruct", "--enforce-eager", "--no-enable-prefix-caching",
                          "--revision", "v1.1", "--download-dir", "/data/hf", "-pp", "1", "--no-async-scheduling",
                          "--no-enable-chunked-prefill"))
    assert (a.model, a.enforce_eager, a.enable_prefix_caching) == ("Qwen/Qwen2-7B-Instruct", True, False)
    assert (a.revision, a.download_dir, a.pipeline_parallel_size) == ("v1.1", "/data/hf", 1)
    assert (a.async_scheduling, a.enable_chunked_prefill) == (False, False)
    d = engine_args(parse())
    assert (d.model, d.enforce_eager, d.revision, d.download_dir, d.pipeline_parallel_size) == (None, False, None,
                                                                                                 None, 1)
    assert (d.enable_prefix_caching, d.async_scheduling, d.enable_chunked_prefill) == (True, True, None)
    # Switches: vLLM's --flag / --no-flag, and this server's first form, --flag true|false and --flag=false.
    assert engine_args(parse("--enable-prefix-caching")).enable_prefix_caching is True
    assert engine_args(parse("--enable-prefix-caching", "false")).enable_prefix_caching is False
    assert engine_args(parse("--enable-prefix-caching=off", "m/x")).enable_prefix_caching is False
    assert engine_args(parse("--enable-chunked-prefill", "m/x")).enable_chunked_prefill is True
    assert parse("--enable-prefix-caching", "m/x").model == "m/x"  # a model after a switch is not its value
    # The positional model is --model, and wins over it (vLLM: `vllm serve MODEL`); served under that name.
    assert parse("--model", "/a", "/b").model == "/b" and served_names(parse("/ckpt/q")) == ["/ckpt/q"]
    assert make_parser().parse_args(["--model", "/a"]).model == "/a"  # python -m server, as before


def test_pipeline_parallelism_is_refused_by_name():
    for argv in (["-pp", "2"], ["--pipeline-parallel-size", "4"]):
        with pytest.raises(ValueError, match=r"pipeline parallelism.*--tensor-parallel-size / --mesh"):
            engine_args(parse(*argv))
    from qwenjax import LLM

    with pytest.raises(NotImplementedError, match="pipeline_parallel_size=2 \\(pipeline parallelism"):
        LLM(pipeline_parallel_size=2)  # offline too, before anything loads
    with pytest.raises(ValueError, match="pipeline_parallel_size must be at least 1, got 0"):
        EngineArgs(pipeline_parallel_size=0)


def test_config_file_merges_under_the_command_line(tmp_path):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("model: Qwen/Qwen2-7B-Instruct\nport: 9001\nhost: 0.0.0.0\nmax_model_len: 4096\n"
                   "served-model-name: [qwen, q]\nenable-prefix-caching: false\nenforce-eager: true\n"
                   "allow-credentials: false\nallowed-origins: ['https://a.example', 'https://b.example']\n"
                   "decode-buckets: [8, 64]\nseed: -1\nrevision:\n")
    ns = parse("--config", str(cfg), "--port", "9002", "--enable-prefix-caching")
    assert (ns.model, ns.host, ns.port) == ("Qwen/Qwen2-7B-Instruct", "0.0.0.0", 9002)
    assert ns.allowed_origins == ["https://a.example", "https://b.example"] and not ns.allow_credentials
    a = engine_args(ns)
    assert (a.max_model_len, a.served_model_name, a.enforce_eager, a.seed) == (4096, ("qwen", "q"), True, -1)
    assert a.enable_prefix_caching is True and a.decode_buckets == (8, 64) and a.revision is None
    assert engine_args(parse("--config", str(cfg))).enable_prefix_caching is False
    assert parse("/ckpt/local", "--config", str(cfg)).model == "/ckpt/local"  # the positional model wins


@pytest.mark.parametrize("text, message", [
    ("max-model-lenn: 8\n", "'max-model-lenn' is not a flag of qwenjax serve"),
    ("- port\n", "expected a mapping of flag names to values"),
    ("enforce-eager: 3\n", "'enforce-eager' is a switch: give it true or false"),
    ("port: [\n", "not valid YAML"),
    ("port: eighty\n", "argument --port: invalid int value: 'eighty'"),
    ("enable-prefix-caching: maybe\n", "'enable-prefix-caching' is a switch"),
])
def test_config_file_errors_name_the_file_and_key(tmp_path, capsys, text, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(SystemExit) as e:
        parse("--config", str(cfg))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"--config {cfg}" in err and message in err


def test_tls_flags_reach_uvicorn(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    key.write_text("k")
    cert.write_text("c")
    ns = parse("--ssl-keyfile", str(key), "--ssl-certfile", str(cert), "--ssl-cert-reqs", "2", "--port", "8443")
    check_http_options(ns)
    opts = uvicorn_options(ns)
    assert (opts["ssl_keyfile"], opts["ssl_certfile"], opts["ssl_cert_reqs"], opts["port"]) == (str(key), str(cert),
                                                                                                 2, 8443)
    assert uvicorn_options(parse())["ssl_certfile"] is None
    with pytest.raises(ValueError, match="--ssl-keyfile needs --ssl-certfile"):
        check_http_options(parse("--ssl-keyfile", str(key)))
    with pytest.raises(ValueError, match="--ssl-certfile /nowhere/cert.pem: no such file"):
        check_http_options(parse("--ssl-certfile", "/nowhere/cert.pem"))


@pytest.fixture
def app_for():
    engines = []

    def build(*argv: str, api_key: str | None = None):
        ns = parse(*argv)
        engine = AsyncLLMEngine(FakeEngine(), start=False)  # the CORS tests send no request to the engine
        engines.append(engine)
        app = create_app(engine, served_model_names=["m"], api_key=api_key)
        add_cors(app, ns)
        return TestClient(app)

    yield build
    for engine in engines:
        engine.shutdown()


def test_cors_follows_allowed_origins(app_for):
    client = app_for("--allowed-origins", '["https://a.example"]', "--allow-credentials", api_key="k")
    ok = client.get("/version", headers={"Origin": "https://a.example"})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://a.example"
    assert ok.headers["access-control-allow-credentials"] == "true"
    other = client.get("/version", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    # A browser's preflight is answered by the middleware, before the API key is asked for.
    pre = client.options("/v1/chat/completions", headers={"Origin": "https://a.example",
                                                         "Access-Control-Request-Method": "POST",
                                                         "Access-Control-Request-Headers": "authorization"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://a.example"
    denied = client.options("/v1/chat/completions", headers={"Origin": "https://evil.example",
                                                            "Access-Control-Request-Method": "POST"})
    assert denied.status_code == 400
    # vLLM's defaults: any origin, method and header; a request without Origin gets no CORS headers.
    default = app_for()
    assert default.get("/version", headers={"Origin": "https://x.example"}).headers["access-control-allow-origin"] \
        == "*"
    assert "access-control-allow-origin" not in default.get("/version").headers
    comma = app_for("--allowed-origins", "https://a.example,https://b.example", "--allowed-methods", "GET")
    pre = comma.options("/version", headers={"Origin": "https://b.example", "Access-Control-Request-Method": "POST"})
    assert pre.status_code == 400  # POST is not an allowed method


def _fake_hub_cache(root: Path, repo: str, refs: dict[str, str]) -> None:
    """The huggingface_hub cache layout: models--ORG--NAME/refs/REF holds a commit; snapshots/COMMIT the files."""
    store = root / ("models--" + repo.replace("/", "--"))
    for ref, commit in refs.items():
        (store / "refs").mkdir(parents=True, exist_ok=True)
        (store / "refs" / ref).write_text(commit)
        (store / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
        (store / "snapshots" / commit / "config.json").write_text("{}")


def test_revision_and_download_dir_pick_the_snapshot(tmp_path):
    main_c, v1_c = "a" * 40, "b" * 40
    _fake_hub_cache(tmp_path, "Qwen/Fake", {"main": main_c, "v1": v1_c})
    assert resolve_model_path("Qwen/Fake", download_dir=str(tmp_path)).name == main_c
    assert resolve_model_path("Qwen/Fake", revision="v1", download_dir=str(tmp_path)).name == v1_c
    assert resolve_model_path("Qwen/Fake", revision=v1_c, download_dir=str(tmp_path)).name == v1_c
    with pytest.raises(ModelNotFoundError, match=r"'Qwen/Fake' at revision 'v2' is not available offline.*"
                                                 r"--revision v2 --cache-dir"):
        resolve_model_path("Qwen/Fake", revision="v2", download_dir=str(tmp_path))
    local = tmp_path / "models--Qwen--Fake" / "snapshots" / main_c
    with pytest.raises(ValueError, match="is a local directory, which has no revisions"):
        resolve_model_path(str(local), revision="v1")
    assert resolve_model_path(str(local), download_dir="/elsewhere") == local  # logged as unused, not refused


def test_enforce_eager_loads_without_compiling(caplog):
    from qwenjax import LLM

    with pytest.raises(ValueError, match="revision='v1' .* the built-in model"):
        LLM(revision="v1", **SMALL_ENGINE)
    with caplog.at_level(logging.INFO, logger="qwenjax"):
        llm = LLM(enforce_eager=True, **SMALL_ENGINE)
    assert llm.llm_engine.model.warmup_seconds == 0.0
    assert any("enforce_eager: no start-up warm-up" in r.getMessage() for r in caplog.records)


def test_benchmark_scripts_are_found_in_the_checkout_only(tmp_path):
    assert benchmark_script("latency") == ROOT / "benchmarks" / "latency.py"
    with pytest.raises(SystemExit, match=r"benchmarks/throughput.py does not exist.*part of the installed package"):
        benchmark_script("throughput", root=tmp_path)
    with pytest.raises(SystemExit, match="unknown benchmark 'latncy'; choose one of latency, throughput, serve"):
        benchmark_script("latncy")


@pytest.mark.parametrize("argv, expect", [
    (["-m", "qwenjax.cli", "serve", "--help"], ["usage: qwenjax serve", "--enforce-eager", "--allowed-origins",
                                                "--no-enable-prefix-caching", "--config FILE.yaml"]),
    (["-m", "qwenjax.cli", "bench", "latency", "--help"], ["--prompt-len"]),
    (["-m", "server", "--help"], ["usage: python -m server", "--pipeline-parallel-size"]),
])
def test_commands_answer_help(argv, expect):
    env = dict(os.environ, PYTHONPATH=pythonpath_with(ROOT), JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, *argv], check=False, capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    for text in expect:
        assert text in r.stdout
