"""The donated KV cache is written in place by every decode bucket, 1-row included (no copy of the page arrays a
step). XLA used to turn the one-index page scatter of a 1-row step into a fusion over the whole cache, copying it
every step: one request decoded 10-50x slower than two on CPU (issue 25)."""

from __future__ import annotations

import re

import jax
import pytest

from qwenjax import LLM
from qwenjax.worker import packing
from qwenjax.worker.model_runner import dummy_input
from tests.conftest import SMALL_ENGINE


@pytest.fixture(scope="module")
def runner():
    return LLM(**dict(SMALL_ENGINE, decode_buckets=(1, 2, 8)), skip_warmup=True).llm_engine.runner


def _cache_sized_copies(runner, b: int) -> list[str]:
    inp = dummy_input(b, 1, runner.num_pages, runner.page_size, runner.block_table_width, runner.scratch_slot)
    i_buf, f_buf, layout = packing.pack(inp)
    with jax.set_mesh(runner.mesh):
        hlo = runner._step.lower(runner._param_leaves, runner.kv_cache, runner.penalties, runner.last_tokens, i_buf,
                                 f_buf, has_context=False, layout=layout).compile().as_text()
    K, P, S, H = runner.kv_cache[0][0].shape
    shapes = (f"[{K},{P},{S},{H}]", f"[{K},{P * S},{H}]")  # the pages, and the flat view the scatter writes
    return [line.strip() for line in hlo.splitlines()
            if re.search(r"= \w+\[[\d,]+\]\{[\d,]+\} copy\(", line) and any(s in line for s in shapes)]


@pytest.mark.parametrize("b", [1, 2, 8])
def test_decode_step_writes_the_donated_cache_in_place(runner, b):
    assert _cache_sized_copies(runner, b) == []
