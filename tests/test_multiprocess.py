"""Several hosts, simulated: two jax.distributed processes on CPU give the same tokens as one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from qwenjax import LLM, SamplingParams
from tests.checkpoints import write_checkpoint
from tests.conftest import SMALL_ENGINE, pythonpath_with

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [[5, 9, 13], list(range(20, 60)), [7, 8, 9]]
# The third row has per-token controls: a sampler mask and bias in the broadcast step, and a two-token bad word, whose
# bans need the previous token (a late sampler: the leader announces the step only once its sampler inputs are known).
PARAMS = [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)] * 2 + [
    SamplingParams(temperature=1.0, seed=3, max_tokens=8, ignore_eos=True, allowed_token_ids=list(range(100, 140)),
                   logit_bias={101: 3.0, 102: -2.0}, bad_words=["hello world"])]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt", hidden_size=64, intermediate_size=128, num_heads=8, num_kv_heads=2,
                            seed=12)
    coord = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": pythonpath_with(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-m", "tests.mp_worker", str(ckpt), coord, str(pid),
                               str(tmp_path / f"out{pid}.json")], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for pid in (0, 1)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=600)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert [p.returncode for p in procs] == [0, 0], "\n".join(l[-3000:] for l in logs)
    leader = json.loads((tmp_path / "out0.json").read_text())
    follower = json.loads((tmp_path / "out1.json").read_text())
    assert leader["devices"] == follower["devices"] == 4 and follower["followed"]

    single = LLM(str(ckpt), **SMALL_ENGINE).generate(prompt_token_ids=PROMPTS, sampling_params=PARAMS, use_tqdm=False)
    assert leader["tokens"] == [o.outputs[0].token_ids for o in single]
    assert set(leader["tokens"][2]) <= set(range(100, 140))
