"""Every fenced code block of docs/user_guide.md, run in order on CPU; none is skipped.

Python blocks are executed (in this process, or in a subprocess with N CPU devices for `tensor_parallel_size=N`);
bash blocks run as commands: `python -m server ...` as a real server process on a free loopback port, `curl` blocks
against it, `pip install` as a dry run. The rewrites (documented at the end of the guide) only map the guide's model
names to checkpoints that exist here, point clients at the test's port, and give every engine small static shapes so
that CPU compilation stays short. A line `# prints: TEXT` in a block is checked against the block's output
(`...` in TEXT matches anything).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "user_guide.md"
FENCE = re.compile(r"^(\s*)(```+)\s*([\w+-]*)")


# ------------------------------------------------------------------ the guide's blocks


@dataclasses.dataclass(frozen=True)
class Block:
    index: int
    lang: str
    code: str
    line: int  # 1-based line of the opening fence

    @property
    def expected(self) -> list[str]:
        return [m.strip() for m in re.findall(r"#\s*prints:\s*(.*)$", self.code, re.M)]

    @property
    def is_client(self) -> bool:
        return "localhost:8000" in self.code

    @property
    def is_server(self) -> bool:
        return self.lang == "bash" and re.search(r"^\s*python -m server\b", self.code, re.M) is not None


def parse_blocks(text: str) -> list[Block]:
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.groups()
        body, j = [], i + 1
        while j < len(lines) and lines[j].strip() != fence:
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        assert j < len(lines), f"docs/user_guide.md:{i + 1}: code block never closed"
        blocks.append(Block(len(blocks), lang, "\n".join(body) + "\n", i + 1))
        i = j + 1
    return blocks


def count_fences(text: str) -> int:
    """Independent of the parser: every block has an opening and a closing fence line."""
    n = sum(1 for line in text.splitlines() if line.lstrip().startswith("```"))
    assert n % 2 == 0, "unbalanced ``` fences in docs/user_guide.md"
    return n // 2


BLOCKS = parse_blocks(GUIDE.read_text())


def check_output(block: Block, output: str) -> None:
    for want in block.expected:
        pattern = ".*?".join(re.escape(part.strip()) for part in want.split("..."))
        assert re.search(pattern, output, re.S), (
            f"docs/user_guide.md:{block.line}: expected output matching {want!r}, got:\n{output[-3000:]}")


# ------------------------------------------------------------------ rewrites


def _kv_bytes_per_token(cfg: dict, itemsize: int) -> int:
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * itemsize


def kv_scale(nbytes: int) -> int:
    """A KV budget for Qwen2-7B-Instruct (bf16) -> the one giving the built-in model (float32) as many tokens."""
    from qwenjax.models.default_model import CONFIG

    big = json.loads((ROOT / "qwenjax/assets/configs/qwen2-7b-instruct.json").read_text())
    return nbytes * _kv_bytes_per_token(CONFIG, 4) // _kv_bytes_per_token(big, 2)


# Small static shapes for every engine the guide builds; a block's own settings win.
SMALL = dict(max_model_len=256, max_num_seqs=4, max_num_batched_tokens=64, decode_buckets=(4,),
             prefill_token_buckets=(64,))


def small_engine() -> dict:
    return {**SMALL, "kv_cache_memory_bytes": kv_scale(1 << 30)}


def small_server_flags() -> list[str]:
    flags = []
    for key, value in small_engine().items():
        flags += ["--" + key.replace("_", "-"), ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    return flags


NAME_RE = re.compile(r"(?:Qwen|neuralmagic)/Qwen[\w.\-]*")
CHECKPOINT_OF = {  # the guide's names -> which test checkpoint stands in for them
    "Qwen/Qwen2-7B-Instruct": "builtin",
    "Qwen/Qwen2-72B-Instruct": "builtin",
    "Qwen/Qwen2.5-7B-Instruct": "builtin",
    "Qwen/Qwen2-72B-Instruct-AWQ": "awq",
    "Qwen/Qwen2-72B-Instruct-GPTQ-Int4": "gptq4",
    "Qwen/Qwen2-7B-Instruct-GPTQ-Int8": "gptq8",
    "neuralmagic/Qwen2-7B-Instruct-FP8": "fp8",
}


def mesh_size(block: Block) -> int:
    m = re.search(r"tensor_parallel_size\s*=\s*(\d+)|(?:--tensor-parallel-size|--mesh|-tp)[ =](\d+)", block.code)
    return int(m.group(1) or m.group(2)) if m else 1


class Checkpoints:
    """Tiny stand-ins for the guide's models, written on first use."""

    def __init__(self, root: Path):
        self.root, self.made = root, {}

    def for_name(self, name: str, block: Block) -> str:
        assert name in CHECKPOINT_OF, f"docs/user_guide.md:{block.line}: no test checkpoint for {name!r}"
        kind = CHECKPOINT_OF[name]
        if kind == "builtin" and re.search(r"max_model_len|--max-model-len", block.code):
            kind = "builtin_long"  # the FAQ asks for Qwen2-7B's context length
        if kind not in self.made:
            self.made[kind] = str(getattr(self, "_" + kind)())
        return self.made[kind]

    def _builtin(self) -> Path:
        from qwenjax.models.default_model import default_model_dir

        return default_model_dir()

    def _builtin_long(self) -> Path:
        """The built-in model with Qwen2-7B-Instruct's max_position_embeddings (32768)."""
        src, dst = self._builtin(), self.root / "builtin-long"
        dst.mkdir()
        for f in src.iterdir():
            if f.name == "model.safetensors":
                os.symlink(f, dst / f.name)
            elif f.name != "config.json":
                shutil.copy(f, dst / f.name)
        cfg = json.loads((src / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 32768}, indent=2))
        return dst

    def _float(self) -> Path:
        if "float" not in self.made:
            from tests.checkpoints import REAL_VOCAB, write_checkpoint

            # Qwen2's vocabulary and tokenizer (text prompts); widths that groups of 128 divide.
            self.made["float"] = write_checkpoint(self.root / "float", vocab_size=REAL_VOCAB, hidden_size=128,
                                                  intermediate_size=256, num_heads=4, num_kv_heads=2, tie=True,
                                                  seed=8, with_tokenizer=True, embed_std=0.15)
        return self.made["float"]

    def _quantized(self, name: str, scheme) -> Path:
        from tests.quant_writer import write_quantized

        src, dst = self._float(), self.root / name
        write_quantized(src, dst, None, scheme)
        for f in src.iterdir():  # the tokenizer files
            if not (dst / f.name).exists():
                shutil.copy(f, dst / f.name)
        return dst

    def _awq(self) -> Path:
        from tests.quant_writer import Scheme

        return self._quantized("awq", Scheme("awq", bits=4, group_size=128))

    def _gptq4(self) -> Path:
        from tests.quant_writer import Scheme

        return self._quantized("gptq-int4", Scheme("gptq", bits=4, group_size=128, sym=True))

    def _fp8(self) -> Path:
        """Per-tensor weight scales and static input scales, as AutoFP8 writes them (tests/fp8_writer.py)."""
        from tests.fp8_writer import Fp8Scheme, write_fp8

        return write_fp8(self._float(), self.root / "fp8", Fp8Scheme("per_tensor", "static"))

    def _gptq8(self) -> Path:
        from tests.quant_writer import Scheme

        return self._quantized("gptq-int8", Scheme("gptq", bits=8, group_size=128, sym=True))


def rewrite_python(block: Block, ckpts: Checkpoints, port: int | None) -> str:
    code = block.code
    if block.is_client:  # model names are the server's served names: leave them
        assert port is not None
        return code.replace("localhost:8000", f"127.0.0.1:{port}")
    code = NAME_RE.sub(lambda m: ckpts.for_name(m.group(0), block), code)
    return re.sub(r"kv_cache_memory_bytes=([^,)\n]+)",
                  lambda m: f"kv_cache_memory_bytes={kv_scale(int(eval(m.group(1), {'__builtins__': {}})))}", code)


def server_argv(block: Block, ckpts: Checkpoints, port: int) -> list[str]:
    lines = [line for line in block.code.splitlines() if not line.lstrip().startswith("#")]
    argv = shlex.split(" ".join(lines).replace("\\", " "), comments=True)
    assert argv[:3] == ["python", "-m", "server"], f"docs/user_guide.md:{block.line}: not a server command: {argv}"
    user = argv[3:]
    out = []
    i = 0
    while i < len(user):
        if user[i] == "--model":
            name = user[i + 1]
            out += ["--model", ckpts.for_name(name, block), "--served-model-name", name]
            i += 2
        elif user[i] == "--kv-cache-memory-bytes":
            out += [user[i], str(kv_scale(int(user[i + 1])))]
            i += 2
        else:
            out.append(user[i])
            i += 1
    # The small shapes come first so that the block's own flags override them (argparse keeps the last value).
    return [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(port), *small_server_flags(), *out]


def device_env(n: int) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    if n > 1:
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ running python blocks


def exec_python(code: str, filename: str) -> tuple[str, list]:
    """Runs `code` with qwenjax.LLM giving small engine shapes by default; returns (stdout, engines built)."""
    import qwenjax

    original, built = qwenjax.LLM, []
    defaults = small_engine()

    class GuideLLM(original):
        def __init__(self, model=None, **kwargs):
            super().__init__(model, **{**defaults, **kwargs})
            built.append(self)

    out = io.StringIO()
    qwenjax.LLM = GuideLLM
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, filename, "exec"), {"__name__": "__guide__"})
    finally:
        qwenjax.LLM = original
    return out.getvalue(), built


def _mesh_worker(code_file: str, n: int) -> None:
    """In a subprocess with n CPU devices: runs the block, then checks the engine really is sharded n ways."""
    import jax

    assert jax.device_count() == n, jax.devices()
    text, built = exec_python(Path(code_file).read_text(), code_file)
    print(text, end="")
    assert built, "the block built no LLM"
    llm = built[-1]
    assert llm.engine_args.tensor_parallel_size == n
    leaves = jax.tree.leaves(llm.llm_engine.runner.params)
    sharded = [x for x in leaves if len(x.sharding.device_set) == n and not x.sharding.is_fully_replicated]
    assert sharded, "no parameter is split over the mesh"
    print(f"[mesh check] {len(sharded)} of {len(leaves)} parameters split over {n} devices")


# ------------------------------------------------------------------ the runner


class Server:
    def __init__(self, block: Block, argv: list[str], port: int, log: Path, env: dict):
        self.block, self.port, self.log_path = block, port, log
        self.url = f"http://127.0.0.1:{port}"
        self.served = argv[argv.index("--served-model-name") + 1] if "--served-model-name" in argv else None
        self._log = open(log, "w")
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def wait_ready(self, timeout: float = 300.0) -> bool:
        """True once /health answers 200; False if the process exited first."""
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise AssertionError(f"docs/user_guide.md:{self.block.line}: server not ready in {timeout:.0f} s:\n"
                             f"{self.log()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self._log.close()


class GuideRunner:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.ckpts = Checkpoints(tmp / "ckpts")
        self.ckpts.root.mkdir()
        self.server: Server | None = None
        self.ran: list[int] = []

    def run(self, block: Block) -> None:
        if block.lang == "python":
            self._python(block)
        elif block.lang == "bash" and re.search(r"^\s*pip install", block.code, re.M):
            self._install(block)
        elif block.is_server:
            self._server(block)
        elif block.lang == "bash" and "curl " in block.code:
            self._curl(block)
        else:
            raise AssertionError(f"docs/user_guide.md:{block.line}: no rule runs a {block.lang!r} block like this; "
                                 f"teach tests/test_user_guide.py how")
        self.ran.append(block.index)

    # ---- python
    def _python(self, block: Block) -> None:
        port = self._ensure_server(block).port if block.is_client else None
        code = rewrite_python(block, self.ckpts, port)
        n = mesh_size(block)
        name = f"docs/user_guide.md:{block.line}"
        if n == 1:
            output, _ = exec_python(code, name)
        else:
            path = self.tmp / f"block{block.index}.py"
            path.write_text(code)
            res = subprocess.run(
                [sys.executable, "-c", f"from tests.test_user_guide import _mesh_worker; "
                                       f"_mesh_worker({str(path)!r}, {n})"],
                cwd=ROOT, env=device_env(n), capture_output=True, text=True, timeout=600)
            assert res.returncode == 0, f"{name} failed on {n} CPU devices:\n{res.stdout}\n{res.stderr[-5000:]}"
            output = res.stdout
            assert "[mesh check]" in output
        check_output(block, output)

    # ---- bash
    def _install(self, block: Block) -> None:
        py = shlex.quote(sys.executable)
        code = re.sub(r"^(\s*)pip install", rf"\1{py} -m pip install --dry-run --no-deps", block.code, flags=re.M)
        code = re.sub(r"^(\s*)python ", rf"\1{py} ", code, flags=re.M)
        res = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=ROOT, env=device_env(1),
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"docs/user_guide.md:{block.line} failed:\n{res.stdout}\n{res.stderr[-5000:]}"
        check_output(block, res.stdout + res.stderr)

    def _start(self, block: Block) -> Server:
        self.stop_server()
        port = free_port()
        argv = server_argv(block, self.ckpts, port)
        return Server(block, argv, port, self.tmp / f"server{block.index}.log", device_env(mesh_size(block)))

    def _server(self, block: Block) -> None:
        import httpx

        server = self._start(block)
        ready = server.wait_ready()
        if block.expected:  # the guide says this command stops with an error
            log = server.log()
            server.stop()
            assert not ready, f"docs/user_guide.md:{block.line}: the guide says this server stops, but it serves"
            assert server.proc.returncode != 0
            check_output(block, log)
            return
        assert ready, f"docs/user_guide.md:{block.line}: the server exited:\n{server.log()[-5000:]}"
        self.server = server
        models = httpx.get(server.url + "/v1/models", timeout=30).json()
        assert server.served in [m["id"] for m in models["data"]], models
        r = httpx.post(server.url + "/v1/completions", json={"model": server.served, "prompt": "Hello",
                                                             "max_tokens": 4}, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] >= 1

    def _ensure_server(self, block: Block) -> Server:
        """The server the guide started last; started again if it is not running (e.g. a block run alone)."""
        if self.server is not None and self.server.proc.poll() is None:
            return self.server
        starts = [b for b in BLOCKS[:block.index] if b.is_server and not b.expected]
        assert starts, f"docs/user_guide.md:{block.line}: no server block before this client block"
        self.server = self._start(starts[-1])
        assert self.server.wait_ready(), self.server.log()[-5000:]
        return self.server

    def _curl(self, block: Block) -> None:
        server = self._ensure_server(block)
        code = block.code.replace("localhost:8000", f"127.0.0.1:{server.port}")
        res = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, f"docs/user_guide.md:{block.line} failed:\n{res.stdout}\n{res.stderr}"
        body = json.loads(res.stdout)
        if block.expected:
            check_output(block, res.stdout)
        else:
            assert "error" not in body, body
            assert body.get("choices") or body.get("text"), body

    def stop_server(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


# ------------------------------------------------------------------ tests


@pytest.fixture(scope="module")
def guide(tmp_path_factory):
    runner = GuideRunner(tmp_path_factory.mktemp("user_guide"))
    yield runner
    runner.stop_server()


@pytest.mark.parametrize("block", BLOCKS, ids=[f"{b.index:02d}-{b.lang}-line{b.line}" for b in BLOCKS])
def test_block(guide, block):
    guide.run(block)


def test_every_block_ran(guide):
    text = GUIDE.read_text()
    assert len(BLOCKS) == count_fences(text) > 0
    assert guide.ran == [b.index for b in BLOCKS], "some blocks of docs/user_guide.md did not run (see above)"
