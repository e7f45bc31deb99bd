"""Multi-LoRA on the GPU (`pytest tests/gpu --gpu`; deselected elsewhere): the decode step runs one expand kernel per
projection group of every layer (pallas_kernels/lora_decode.py's expand of the shrink folded into the base
projection, worker/lora_fold.py; never the grouped pair nor the dense jnp fallback) and the same bucket without an
adapter row runs none; with the fold off, a split-K shrink and an expand; both kernel pairs
equal the jnp reference at the 7B's projection shapes; and a batch mixing two adapters and the base model gives, row
by row, the greedy tokens of PEFT on transformers (CPU torch) for the same checkpoint (float32 on both sides)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.lora_decode import lora_decode_expand, lora_decode_matmul, plan
from pallas_kernels.lora_matmul import folded_expand_grouped, group_by_slot, lora_matmul, lora_matmul_reference
from qwenjax import LLM, LoRARequest, SamplingParams
from qwenjax.worker import packing
from qwenjax.worker.model_runner import dummy_input
from tests.checkpoints import write_checkpoint
from tests.lora_adapters import ALL_SEVEN, peft_greedy, peft_model, write_adapter

pytestmark = pytest.mark.gpu
LAYERS = 2
# head_dim 64 (the attention kernels'), every projection width a multiple of 16 (the LoRA kernels')
ENGINE = dict(dtype="float32", max_model_len=256, max_num_seqs=8, decode_buckets=(8,), prefill_token_buckets=(64, 256),
              num_kv_pages=64, block_size=16, enable_lora=True, max_loras=2, max_lora_rank=16)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpu-lora")
    base = write_checkpoint(d / "base", hidden_size=256, intermediate_size=512, num_layers=LAYERS, num_heads=4,
                            num_kv_heads=2, vocab_size=512, seed=3)
    a = write_adapter(base, d / "a", r=8, alpha=16, targets=("q_proj", "v_proj", "down_proj"), seed=1)
    b = write_adapter(base, d / "b", r=16, alpha=8, targets=ALL_SEVEN, seed=2, use_rslora=True)
    jax.config.update("jax_default_matmul_precision", "highest")  # no TF32: float32 like transformers on CPU
    return base, {"a": LoRARequest("a", 1, str(a)), "b": LoRARequest("b", 2, str(b))}, LLM(str(base), **ENGINE)


PARTS = {4608: (3584, 512, 512), 37888: (18944, 18944)}  # the groups' parts (q/k/v, gate/up): B block-diagonal


@pytest.mark.parametrize("impl", ["decode", "decode_fused", "decode_add", "grouped", "folded", "folded_grouped",
                                  "folded_parts", "folded_inplace"])
@pytest.mark.parametrize("shape", [(3584, 48, 4608), (3584, 16, 3584), (18944, 16, 3584), (3584, 32, 37888)])
@pytest.mark.parametrize("rows", [1, 8, 64, 257, 512])
def test_kernel_matches_reference_at_7b_shapes(impl, shape, rows):
    i, r, o = shape  # the one-device groups: qkv (3 x rank 16), o, down, gate_up (2 x rank 16)
    S = 9  # 8 adapters + the empty slot 0
    k = jax.random.split(jax.random.key(rows), 4)
    x = jax.random.normal(k[0], (rows, i), jnp.bfloat16)
    a = (jax.random.normal(k[1], (S, i, r)) * 0.05).astype(jnp.bfloat16).at[0].set(0)
    b = (jax.random.normal(k[2], (S, r, o)) * 0.05).astype(jnp.bfloat16).at[0].set(0)
    ids = jax.random.randint(k[3], (rows,), 0, S, jnp.int32)
    parts = PARTS.get(o, ()) if impl == "folded_parts" else ()
    if parts:  # as the stacks hold a group: part g's rank rows feed only its columns
        b = b * jnp.asarray(np.eye(len(parts)).repeat(r // len(parts), 0).repeat(np.asarray(parts), 1), jnp.bfloat16)
    base = (jax.random.normal(k[0], (rows, o)) * 0.05).astype(jnp.bfloat16)
    if impl == "decode_add":  # the default (XLA-summed) reduction, added into base's buffer by the expand
        y = lora_decode_matmul(x, a, b, plan(ids, S), base=base)
        assert (np.asarray(y)[np.asarray(ids) == 0] == np.asarray(base)[np.asarray(ids) == 0]).all()
        got = y.astype(jnp.float32) - base.astype(jnp.float32)
    elif impl.startswith("decode"):  # decode_fused: the partials summed inside the expand
        got = lora_decode_matmul(x, a, b, plan(ids, S), fuse_reduction=impl == "decode_fused").astype(jnp.float32)
    elif impl.startswith("folded"):  # the fold: every slot's shrink as extra columns of the base product
        h_all = jnp.einsum("ti,sir->tsr", x, a[1:], preferred_element_type=jnp.float32).astype(x.dtype)
        h_all = h_all.reshape(rows, (S - 1) * r)
        if impl == "folded_inplace":  # the slots' columns read from the projection's whole output, after its O
            got = lora_decode_expand(jnp.concatenate([base, h_all], axis=1), b, plan(ids, S), col0=o)
        elif impl == "folded_grouped":
            got = folded_expand_grouped(h_all, b, ids, group_by_slot(ids, S))
        else:
            got = lora_decode_expand(h_all, b, plan(ids, S), parts=parts)
        got = got.astype(jnp.float32)
    else:
        got = lora_matmul(x, a, b, ids, group_by_slot(ids, S)).astype(jnp.float32)
    ref = lora_matmul_reference(x.astype(jnp.float32), a.astype(jnp.float32), b.astype(jnp.float32), ids)
    err = float(jnp.linalg.norm(got - ref) / jnp.maximum(jnp.linalg.norm(ref), 1e-6))
    assert err < 2e-2, f"{impl}, rows {rows}, {shape}: relative error {err}"
    assert not np.asarray(got)[np.asarray(ids) == 0].any()  # rows without an adapter: exactly zero


def _step_hlo_lines(runner, lora_stacks) -> list[str]:
    """The Pallas (Triton) kernel calls of the compiled batch-8 decode step's HLO."""
    inp = dummy_input(8, 1, runner.num_pages, runner.page_size, runner.block_table_width, runner.scratch_slot)
    i_buf, f_buf, layout = packing.pack(inp)
    with jax.set_mesh(runner.mesh):
        lowered = runner._step.lower(runner._param_leaves, runner.kv_cache, runner.penalties, runner.last_tokens,
                                     i_buf, f_buf, lora_stacks, has_context=False, layout=layout)
    return [ln for ln in lowered.compile().as_text().splitlines() if "__gpu$xla.gpu.triton" in ln]


def _decode_step_kernels(runner, lora_stacks) -> dict[str, int]:
    """Pallas kernel calls of the compiled batch-8 decode step, by kernel name prefix ("lora_expand_add": the
    expands that add into the base projection's buffer, a subset of "lora_expand")."""
    lines = _step_hlo_lines(runner, lora_stacks)
    counts = {name: sum(f"qwenjax_{name}" in ln for ln in lines) for name in ("lora_shrink", "lora_expand",
                                                                             "grouped_matmul")}
    return dict(counts, lora_expand_add=sum("qwenjax_lora_expand" in ln and "_add" in ln for ln in lines))


def test_decode_step_runs_the_lora_kernels(setup):
    runner = setup[2].llm_engine.runner
    # one device: groups qkv_proj, o_proj, gate_up_proj, down_proj (worker/lora_stacks.py), each one expand of the
    # shrink folded into the base projection (worker/lora_fold.py): no shrink kernel
    lines = _step_hlo_lines(runner, runner._lora_stacks)
    assert _decode_step_kernels(runner, runner._lora_stacks) == {"lora_shrink": 0, "lora_expand": 4 * LAYERS,
                                                                "grouped_matmul": 0, "lora_expand_add": 0}
    assert sum("qwenjax_lora_expand" in ln and "_folded" in ln for ln in lines) == 4 * LAYERS
    # q/k/v and gate/up: their tiles read only their own part's block of B (lora_decode.block_diagonal)
    assert sum("qwenjax_lora_expand" in ln and "_parts" in ln for ln in lines) == 2 * LAYERS
    # a step with no adapter row gets no stacks (model_runner._lora_stacks_for): the base program, no LoRA kernel
    inp = dummy_input(8, 1, runner.num_pages, runner.page_size, runner.block_table_width, runner.scratch_slot)
    assert runner._lora_stacks_for(inp) is None
    assert _decode_step_kernels(runner, None) == {"lora_shrink": 0, "lora_expand": 0, "grouped_matmul": 0,
                                                  "lora_expand_add": 0}


def test_mixed_batch_equals_peft_on_the_gpu(setup):
    base, adapters, llm = setup
    rng = np.random.default_rng(5)
    prompts = [list(map(int, rng.integers(0, 512, n))) for n in (5, 17, 33, 9, 40, 16)]
    mix = ["a", "b", None, "a", "b", None]
    p = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=p, use_tqdm=False,
                        lora_request=[None if m is None else adapters[m] for m in mix])
    oracle = {m: peft_greedy(peft_model(base, None if m is None else adapters[m].lora_path), prompts, 12)
              for m in (None, "a", "b")}
    for i, (m, out) in enumerate(zip(mix, outs)):
        assert out.outputs[0].token_ids == oracle[m][i], f"row {i} (adapter {m})"
    assert oracle["a"] != oracle[None] and oracle["b"] != oracle[None]  # the adapters change the output
    assert llm.llm_engine.blocks.num_free == llm.llm_engine.blocks.num_pages


@pytest.mark.parametrize("fuse", ["0", "1"])
def test_expand_add_equals_peft_on_the_gpu(setup, monkeypatch, fuse):
    """QWENJAX_LORA_EXPAND_ADD=1 (layers/lora.py): the expand adds each delta into the base projection's buffer;
    every expand of the decode step is one that adds, and the mixed batch still gives PEFT's greedy tokens. With
    QWENJAX_LORA_FUSE_REDUCTION=1 too, the expand also sums the shrink's partials (tiles of 16 K-slices)."""
    from qwenjax.layers.lora import EXPAND_ADD_ENV, FUSE_REDUCTION_ENV
    from qwenjax.worker.lora_fold import FOLD_ENV

    monkeypatch.setenv(EXPAND_ADD_ENV, "1")
    monkeypatch.setenv(FUSE_REDUCTION_ENV, fuse)
    monkeypatch.setenv(FOLD_ENV, "0")  # A in the stacks: the shrink kernels, whose expand these variables change
    base, adapters, _ = setup
    llm = LLM(str(base), **ENGINE)  # traced with the variable set
    runner = llm.llm_engine.runner
    k = _decode_step_kernels(runner, runner._lora_stacks)
    assert k["lora_expand"] == k["lora_expand_add"] == k["lora_shrink"] == 4 * LAYERS
    fused = sum("qwenjax_lora_expand" in ln and "_fused" in ln for ln in _step_hlo_lines(runner, runner._lora_stacks))
    assert fused == (4 * LAYERS if fuse == "1" else 0)
    prompts = [[int(t) for t in np.random.default_rng(9).integers(0, 512, n)] for n in (7, 21, 12)]
    mix = ["b", None, "a"]
    p = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=p, use_tqdm=False,
                        lora_request=[None if m is None else adapters[m] for m in mix])
    for i, (m, out) in enumerate(zip(mix, outs)):
        want = peft_greedy(peft_model(base, None if m is None else adapters[m].lora_path), [prompts[i]], 8)[0]
        assert out.outputs[0].token_ids == want, f"row {i} (adapter {m})"
