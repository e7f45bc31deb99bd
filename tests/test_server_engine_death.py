"""Issue 24: after the engine dies, `python -m server` exits non-zero (vLLM's behaviour, so that a supervisor
restarts it), after a stream in flight got its error event. The server runs as a real subprocess with the built-in
model; its engine core process is SIGKILLed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

FLAGS = ["--dtype", "float32", "--max-model-len", "128", "--max-num-seqs", "4", "--max-num-batched-tokens", "128",
         "--num-kv-pages", "64", "--decode-buckets", "4", "--prefill-token-buckets", "64", "--generation-config",
         "vllm", "--disable-log-stats", "--uvicorn-log-level", "warning"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


def engine_pid(server_pid: int) -> int:
    """The engine core process: the server's child started by multiprocessing's spawn (not its resource tracker)."""
    for child in children(server_pid):
        with open(f"/proc/{child}/cmdline", "rb") as f:
            if b"spawn_main" in f.read():
                return child
    raise AssertionError(f"no engine process among the children of {server_pid}")


def start_server(tmp_path, *extra: str):
    port = free_port()
    log = open(tmp_path / "server.log", "wb")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(port), *FLAGS,
                             *extra], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600  # start-up (load, compile) on a busy CPU; only the failure path
    while True:
        assert proc.poll() is None, (tmp_path / "server.log").read_text()
        assert time.monotonic() < deadline, "the server did not start"
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)


@pytest.mark.slow
def test_engine_sigkill_stops_the_server_non_zero_after_the_stream_got_its_error(tmp_path):
    proc, url = start_server(tmp_path)
    try:
        first_chunk = threading.Event()
        lines: list[str] = []

        def stream():
            body = {"prompt": "count to a thousand", "max_tokens": 120, "temperature": 1.0, "ignore_eos": True,
                    "stream": True}
            try:
                with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
                    for line in r.iter_lines():
                        if line:
                            lines.append(line)
                            first_chunk.set()
            except httpx.TransportError as e:
                lines.append(f"transport error: {e}")
            first_chunk.set()

        t = threading.Thread(target=stream)
        t.start()
        assert first_chunk.wait(300)  # failure path only
        os.kill(engine_pid(proc.pid), signal.SIGKILL)
        t.join(300)
        code = proc.wait(timeout=120)  # failure path only: the server must exit by itself
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = (tmp_path / "server.log").read_text()
    assert code != 0, log
    assert "the engine died" in log, log
    errors = [x for x in lines if '"error"' in x]
    assert errors and "engine" in errors[0], lines[-3:]
    assert lines[-1] == "data: [DONE]", lines[-3:]
