"""`qwenjax convert`: an orbax checkpoint restores into the sharded layout and generates the same tokens."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from qwenjax import LLM, SamplingParams
from qwenjax.models.convert import convert
from tests.conftest import SMALL_ENGINE


def test_orbax_roundtrip_gives_identical_tokens(untied_gqa2, tmp_path):
    dst = tmp_path / "orbax-ckpt"
    secs = convert(untied_gqa2, dst)
    assert secs > 0 and (dst / "orbax").is_dir() and (dst / "config.json").is_file()
    prompts = [list(map(int, np.random.default_rng(1).integers(0, 512, n))) for n in (4, 30)]
    p = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    a = LLM(str(untied_gqa2), **SMALL_ENGINE).generate(prompt_token_ids=prompts, sampling_params=p, use_tqdm=False)
    b = LLM(str(dst), **SMALL_ENGINE).generate(prompt_token_ids=prompts, sampling_params=p, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]


def test_convert_command_line(untied_gqa2, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "qwenjax.cli", "convert", str(untied_gqa2), str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "wrote" in proc.stdout and (tmp_path / "o" / "orbax").is_dir()
