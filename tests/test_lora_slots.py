"""Host bookkeeping of multi-LoRA with exact slot numbers: the scheduler's device slots (core/lora_slots.py), the
prefix cache's per-adapter hash chains, and the PEFT loader's scaling (plain Python and numpy, no engine)."""

from __future__ import annotations

import numpy as np
import pytest

from qwenjax.core.block_manager import BlockManager, root_hash
from qwenjax.core.lora_slots import LoRASlots


def test_slots_fill_then_evict_the_least_recently_released():
    s = LoRASlots(2)
    assert s.acquire(7) == 1 and s.acquire(8) == 2 and s.acquire(7) == 1
    assert s.take_loads() == [(1, 7), (2, 8)]
    assert not s.can_acquire(9)           # both slots held by running sequences: 9 waits
    s.release(8)
    s.release(7)
    assert s.can_acquire(9) and s.refs == {7: 1, 8: 0}
    assert s.acquire(9) == 2 and s.take_loads() == [(2, 9)]   # 8 was idle: its slot goes to 9
    assert s.num_swaps == 1 and 8 not in s.slot_of
    s.release(7)
    s.release(9)
    assert list(s.idle) == [7, 9]
    assert s.acquire(8) == 1              # 7 released first: evicted first
    assert s.acquire(0) == 0 and s.can_acquire(0)
    s.check()


def test_a_step_never_gives_one_idle_slot_twice():
    s = LoRASlots(1)
    s.acquire(1)
    s.release(1)                          # 1 resident and idle: the only spare slot
    assert s.can_acquire(2)
    assert not s.can_acquire(1, {2})      # a row of this step takes 1's slot for 2: 1 cannot keep it too
    assert not s.can_acquire(2, {1})
    assert s.can_acquire(1, {1, 0})


def test_evict_refuses_a_slot_in_use():
    s = LoRASlots(2)
    s.acquire(3)
    assert not s.evict(3)
    s.release(3)
    assert s.evict(3) and s.acquire(4) == 1
    s.check()


def test_prefix_cache_chains_differ_per_adapter():
    blocks = BlockManager(8, 4, enable_prefix_caching=True)
    tokens = list(range(12))
    base = blocks.hash_blocks(tokens, [])
    a = blocks.hash_blocks(tokens, [], root_hash("lora:1:a:/a"))
    b = blocks.hash_blocks(tokens, [], root_hash("lora:2:b:/b"))
    assert len(base) == len(a) == len(b) == 3
    assert not set(base) & set(a) and not set(a) & set(b) and not set(base) & set(b)
    assert a == blocks.hash_blocks(tokens, [], root_hash("lora:1:a:/a"))  # deterministic


def test_peft_loader_folds_scaling_into_b(untied_gqa2, tmp_path):
    """lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA, times PEFT's own lora_B; A transposed to [in, r]."""
    from safetensors.numpy import load_file

    from qwenjax.config import ModelConfig
    from qwenjax.lora.peft import load_adapter
    from tests.lora_adapters import write_adapter

    cfg = ModelConfig.from_file(str(untied_gqa2 / "config.json"))
    for rslora, scale in ((False, 12 / 4), (True, 12 / 2)):
        path = write_adapter(untied_gqa2, tmp_path / f"r{rslora}", r=4, alpha=12, targets=("k_proj",), seed=4,
                             use_rslora=rslora)
        w = load_adapter(path, lora_name="x", lora_int_id=1, cfg=cfg, max_lora_rank=8)
        raw = load_file(str(path / "adapter_model.safetensors"))
        pre = "base_model.model.model.layers.1.self_attn.k_proj"
        a, b = w.modules[(1, "k_proj")]
        assert w.rank == 4 and w.scaling == pytest.approx(scale) and w.target_modules == ("k_proj",)
        np.testing.assert_array_equal(a, raw[f"{pre}.lora_A.weight"].T)
        np.testing.assert_allclose(b, raw[f"{pre}.lora_B.weight"].T * scale, rtol=1e-6)


def test_host_copies_are_an_lru_of_max_cpu_loras(untied_gqa2, tmp_path):
    """max_cpu_loras=2 over three adapters: the least recently used host copy is dropped and read again from its
    directory when needed; an id may not be reused for another adapter."""
    from qwenjax.config import LoRAConfig, ModelConfig
    from qwenjax.lora.registry import LoRARegistry
    from qwenjax.lora.request import LoRARequest
    from tests.lora_adapters import write_adapter

    cfg = ModelConfig.from_file(str(untied_gqa2 / "config.json"))
    reg = LoRARegistry(LoRAConfig(max_loras=1, max_lora_rank=8, max_cpu_loras=2), cfg)
    reqs = [LoRARequest(f"x{i}", i + 1, str(write_adapter(untied_gqa2, tmp_path / f"x{i}", r=4, alpha=8,
                                                          targets=("o_proj",), seed=i))) for i in range(3)]
    for r in reqs:
        reg.add(r)
    assert reg.host_ids == [2, 3] and reg.loads == 3
    w = reg.weights(1)                    # dropped: read again, now the most recent
    assert w.lora_name == "x0" and reg.host_ids == [3, 1] and reg.loads == 4
    reg.weights(3)
    assert reg.host_ids == [1, 3] and reg.loads == 4  # a host hit reads nothing
    with pytest.raises(ValueError, match="lora_int_id 2 is already adapter 'x1'"):
        reg.add(LoRARequest("other", 2, reqs[0].lora_path))
    with pytest.raises(ValueError, match="max_cpu_loras \\(1\\) must be at least max_loras \\(2\\)"):
        LoRAConfig(max_loras=2, max_cpu_loras=1)
