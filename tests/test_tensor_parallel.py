"""Tensor parallelism on 8 CPU devices (a subprocess, so the device-count flag does not leak)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.checkpoints import write_checkpoint
from tests.conftest import pythonpath_with

ROOT = Path(__file__).resolve().parents[1]


def run_with_devices(args: list[str], n: int = 8, timeout: int = 900,
                     xla_flags: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n} {xla_flags}", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": pythonpath_with(ROOT)}
    return subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def tp_result(tmp_path_factory):
    d = tmp_path_factory.mktemp("tp")
    # 8 query heads over 2 kv heads: mesh 2 splits kv heads, meshes 4 and 8 replicate them.
    ckpt = write_checkpoint(d / "ckpt", hidden_size=64, intermediate_size=128, num_heads=8, num_kv_heads=2, seed=9)
    out = d / "result.json"
    dump = d / "hlo"  # the compiled steps and sampler calls of every mesh, as XLA optimized them
    proc = run_with_devices(["-m", "tests.tp_worker", str(ckpt), str(out)],
                            xla_flags=f"--xla_dump_to={dump} --xla_dump_hlo_as_text "
                                      "--xla_dump_hlo_module_re=.*(decode_steps|forward|sample|prompt_logprobs).*")
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = {int(k) if k.isdigit() else k: v for k, v in json.loads(out.read_text()).items()}
    result["hlo"] = dump
    return result


def test_meshes_give_identical_greedy_tokens(tp_result):
    base = tp_result[1]["tokens"]
    for n in (2, 4, 8):
        assert tp_result[n]["tokens"] == base, f"mesh {n}"
    assert tp_result["multi_step_mesh2_tokens"] == base


def test_meshes_give_identical_seeded_samples(tp_result):
    """Seeded rows with top-k/top-p/min_p, top-p alone, and plain temperature (n=2: a forked penalty row), under
    penalties: the same draws on every mesh (the Gumbel noise of a row does not depend on the mesh)."""
    base = tp_result[1]["sampled_tokens"]
    assert len({tuple(t) for t in base}) == 4 and all(len(t) == 6 for t in base)
    for n in (2, 4, 8):
        assert tp_result[n]["sampled_tokens"] == base, f"mesh {n}"


def test_meshes_give_the_same_logprobs(tp_result):
    base = np.concatenate([np.asarray(x) for x in tp_result[1]["logprobs"]])
    for n in (2, 4, 8):
        ours = np.concatenate([np.asarray(x) for x in tp_result[n]["logprobs"]])
        np.testing.assert_allclose(ours, base, atol=1e-4)


def test_meshes_give_the_same_prompt_logprobs(tp_result):
    """prompt_logprobs (chosen and top-2 entries with their ranks) over a mesh: computed on each device's columns."""
    base = tp_result[1]["prompt_logprobs"]
    assert all(p[0] is None and len(p) > 1 for p in base)
    for n in (2, 4, 8):
        for ours, want in zip(tp_result[n]["prompt_logprobs"], base):
            for a, b in zip(ours[1:], want[1:]):
                assert [(t, r) for t, _, r in a] == [(t, r) for t, _, r in b], f"mesh {n}"
                np.testing.assert_allclose([x for _, x, _ in a], [x for _, x, _ in b], atol=1e-4)


def test_steps_keep_vocab_sized_arrays_split(tp_result):
    """Over a mesh the logits and the penalty state stay split on V (sharding.vocab_sharding) and the sampler (and
    prompt_logprobs) runs on each device's columns (worker/vocab_split.py): no compiled step, sampler call or
    prompt_logprobs program all-gathers, all-to-alls or
    collective-permutes a [rows, V] array. A gathered penalty state costs ~195 MB a dispatch at 256 rows of the real
    vocabulary; gathered logits cost jax 0.11.2's sampler 2.4 ms a token on the 7B (issue 31)."""
    V = tp_result[2]["vocab_size"]
    files = [f for f in Path(tp_result["hlo"]).glob("*after_optimizations.txt")
             if re.search(r"num_partitions=[2-8]\b", f.read_text()[:10000])]
    names = ("decode_steps", "forward", "sample", "prompt_logprobs")
    assert {name for f in files for name in names if name in f.name} == set(names)
    moves = re.compile(r" (all-gather|all-to-all|collective-permute)(-start)?\(")
    lines = [(f.name, line.strip()) for f in files for line in f.read_text().splitlines() if moves.search(line)]
    assert any(" all-gather" in line for _, line in lines), \
        "no all-gather at all over a mesh: the sampler's logprobs should gather per-device candidates"

    def where(line):  # the collective's shape and the JAX op (and source line) it came from
        meta = re.findall(r'(?:op_name|source_file|source_line)=("[^"]*"|\d+)', line)
        return moves.split(line)[0].split("=")[-1].strip(), meta

    # any array of the line (result or operand) with a dimension equal to V
    whole_rows = [(name, where(line)) for name, line in lines
                  if any(str(V) in dims.split(",") for dims in re.findall(r"\w+\[([\d,]*)\]", line))]
    assert not whole_rows, whole_rows
    assert tp_result[2]["penalty_spec"] == [None, "tp"] and tp_result[2]["logits_spec"] == [None, "tp"]


def test_parameter_and_kv_shardings(tp_result):
    specs = tp_result[4]["param_specs"]
    assert specs["model.layers.0.self_attn.q_proj.kernel"] == [None, "tp"]
    assert specs["model.layers.0.self_attn.q_proj.bias"] == ["tp"]
    assert specs["model.layers.0.self_attn.o_proj.kernel"] == ["tp", None]
    assert specs["model.layers.0.mlp.gate_up_proj.kernel"] == [None, "tp"]
    assert specs["model.layers.0.mlp.down_proj.kernel"] == ["tp", None]
    assert specs["model.embed_tokens.embedding"] == ["tp", None]
    assert specs["lm_head.kernel"] == [None, "tp"]
    # 2 kv heads on 4 devices: replicated k/v projections (so q/k/v are not fused) and pages
    assert specs["model.layers.0.self_attn.k_proj.kernel"] == []
    assert tp_result[4]["kv_spec"] == [] and tp_result[4]["kv_shard_shape"][0] == 2
    # mesh 2: one kv head per device, q/k/v fused and split like q
    assert tp_result[2]["param_specs"]["model.layers.0.self_attn.qkv_proj.kernel"] == [None, "tp"]
    assert tp_result[2]["kv_spec"] == ["tp", None, None, None]
    assert tp_result[2]["kv_shard_shape"][0] == 1 and tp_result[2]["kv_devices"] == 2


def test_fused_projections_on_meshes_match_hf(tmp_path):
    """The oracle on meshes 2 and 4: fused q/k/v and gate/up, columns in per-shard order (models/fusion.py), give
    Hugging Face's logits (prefill, then decode steps). 4 kv heads divide both meshes, so q/k/v are fused on both;
    2 kv heads divide mesh 2 only, and on mesh 4 (k/v replicated) q/k/v stay three projections while gate/up are
    fused. The orbax conversion (separate parts, convert.py) restores on each mesh to exactly the loaded arrays."""
    import torch

    from qwenjax.models.convert import convert
    from tests.checkpoints import hf_model

    ckpts = {kv: write_checkpoint(tmp_path / f"kv{kv}", hidden_size=64, intermediate_size=128, num_heads=8,
                                  num_kv_heads=kv, seed=30 + kv) for kv in (4, 2)}
    for ckpt in ckpts.values():
        convert(ckpt, ckpt.with_name(ckpt.name + "-orbax"))
    ids = list(map(int, np.random.default_rng(12).integers(0, 512, 24)))
    out = tmp_path / "result.json"
    proc = run_with_devices(["-m", "tests.tp_fused_worker", str(out), json.dumps(ids),
                             *[f"{c}|{c.with_name(c.name + '-orbax')}" for c in ckpts.values()]], n=4)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    for kv, ckpt in ckpts.items():
        with torch.no_grad():
            ref = hf_model(ckpt)(torch.tensor([ids])).logits[0].numpy()
        for n in (2, 4):
            r = res[f"{ckpt}|{n}"]
            fused_qkv = kv % n == 0
            specs = r["layer0"]
            assert ("self_attn.qkv_proj.kernel" in specs) == fused_qkv, (kv, n)
            assert ("self_attn.k_proj.kernel" in specs) != fused_qkv, (kv, n)
            assert specs["mlp.gate_up_proj.kernel"] == [None, "tp"] and "mlp.gate_proj.kernel" not in specs
            if fused_qkv:
                assert specs["self_attn.qkv_proj.kernel"] == [None, "tp"]
                assert specs["self_attn.qkv_proj.bias"] == ["tp"]
            else:
                assert specs["self_attn.k_proj.kernel"] == [] and specs["self_attn.q_proj.kernel"] == [None, "tp"]
            ours = np.asarray(r["logits"], np.float32)
            np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=1e-4, err_msg=f"kv {kv} mesh {n}")
            assert (ours.argmax(-1) == ref.argmax(-1)).all()
            assert r["restored_equal"], (kv, n)


def test_paged_kernels_under_shard_map():
    proc = run_with_devices(["-m", "tests.sharded_kernel_worker"], n=4, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("ok") == 10 and proc.stdout.count("ok prefill") == 4 and proc.stdout.count("ok rope") == 2


def test_sharded_loading_makes_no_full_host_copy(tmp_path, capsys):
    """Peak anonymous host memory while loading at mesh 8 stays near what the 8 CPU devices hold (their shards),
    well under shards + one full copy of the checkpoint, which loading through a host copy would need."""
    ckpt = write_checkpoint(tmp_path / "ckpt", vocab_size=4096, hidden_size=256, intermediate_size=1024,
                            num_layers=4, num_heads=8, num_kv_heads=8, seed=2)
    out = tmp_path / "mem.json"
    proc = run_with_devices(["-m", "tests.load_memory_worker", str(ckpt), str(out)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    with capsys.disabled():
        print(f"\nloading {r['checkpoint'] / 2**20:.1f} MiB at mesh 8: peak extra host memory "
              f"{r['peak_extra'] / 2**20:.1f} MiB, shards placed {r['placed'] / 2**20:.1f} MiB, {r['seconds']:.2f} s")
    assert r["peak_extra"] < r["placed"] + 0.5 * r["checkpoint"]


def test_server_with_mesh_4_starts_and_serves(tmp_path):
    """`python -m server --mesh 4` on 4 CPU devices: the built-in model sharded 4 ways answers over HTTP."""
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": pythonpath_with(ROOT)}
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "server", "--mesh", "4", "--host", "127.0.0.1", "--port",
                             str(port), "--max-model-len", "128", "--max-num-seqs", "4", "--decode-buckets", "4",
                             "--prefill-token-buckets", "32", "--num-kv-pages", "32", "--dtype", "float32"],
                            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(1)
        body = json.dumps({"model": "qwenjax/tiny-random-qwen2", "prompt": "Hello", "max_tokens": 5,
                           "temperature": 0, "ignore_eos": True}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            out = json.loads(r.read())
        assert out["usage"]["completion_tokens"] == 5 and out["choices"][0]["finish_reason"] == "length"
        assert "decode attention" in (tmp_path / "server.log").read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_quantized_checkpoints_shard_like_float_ones(tmp_path):
    """AWQ and GPTQ (act-order) weights stay packed and split over 2 and 4 devices along the same features as the
    float weights (column-parallel outputs, row-parallel inputs and their groups), and give mesh 1's greedy tokens.
    Mesh 2 fuses q/k/v and gate/up (packed columns in per-shard order); mesh 4 fuses gate/up only (2 kv heads)."""
    from tests.quant_writer import Scheme, write_quantized

    src = write_checkpoint(tmp_path / "float", vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2,
                           num_heads=4, num_kv_heads=2, tie=False, seed=21)
    paths = {}
    for scheme in (Scheme("awq", group_size=32), Scheme("gptq", bits=4, group_size=32, desc_act=True)):
        write_quantized(src, tmp_path / scheme.name, None, scheme, seed=1)
        paths[scheme.method] = str(tmp_path / scheme.name)
    out = tmp_path / "result.json"
    proc = run_with_devices(["-m", "tests.tp_quant_worker", str(out), *paths.values()], n=4)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    for method, path in paths.items():
        one, two, four = res[f"{path}|1"], res[f"{path}|2"], res[f"{path}|4"]
        assert two["tokens"] == one["tokens"] and four["tokens"] == one["tokens"], method
        for name in ("self_attn.qkv_proj", "mlp.gate_up_proj"):
            assert two["specs"][f"{name}.qweight"] == two["specs"][f"{name}.qzeros"] == [None, "tp"]
        assert two["specs"]["self_attn.qkv_proj.bias"] == ["tp"]
        specs, shards = four["specs"], four["shard_shapes"]
        assert four["dtypes"]["self_attn.q_proj.qweight"] == "int32"  # packed on the devices
        for name in ("self_attn.q_proj", "mlp.gate_up_proj"):                       # column-parallel
            assert specs[f"{name}.qweight"] == specs[f"{name}.scales"] == specs[f"{name}.qzeros"] == [None, "tp"]
        for name in ("self_attn.o_proj", "mlp.down_proj"):                          # row-parallel
            assert specs[f"{name}.qweight"] == specs[f"{name}.scales"] == specs[f"{name}.qzeros"] == ["tp", None]
        # 2 kv heads on 4 devices: k/v projections are replicated, as in the float model
        assert specs["self_attn.k_proj.qweight"] == []
        # down_proj [256 in -> 128 out], 8 groups of 32 rows: each device holds 64 input rows and their 2 groups
        assert shards["mlp.down_proj.scales"] == [2, 128]
        if method == "awq":
            assert shards["mlp.down_proj.qweight"] == [64, 16] and shards["self_attn.q_proj.qweight"] == [128, 4]
        else:
            assert shards["mlp.down_proj.qweight"] == [8, 128] and specs["mlp.down_proj.g_idx"] == ["tp"]
            assert specs["self_attn.q_proj.g_idx"] == []


def test_skinny_kernel_per_device_on_meshes(tmp_path):
    """The int4 skinny kernel (Pallas interpret mode, as a GPU would choose it) on each device's shard under
    shard_map, AWQ and GPTQ act-order (group 32, rows sorted into group order at load): every product of the decode
    steps runs it (and the 18-token prefill's where a device's shape fits), column-parallel ones on their local
    columns, row-parallel ones on
    their local rows with float32 partials (psum, then bfloat16), and the bfloat16 logits of meshes 2 and 4 equal
    mesh 1's within bfloat16 rounding, with the same greedy tokens."""
    from tests.quant_writer import Scheme, write_quantized

    src = write_checkpoint(tmp_path / "float", vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2,
                           num_heads=4, num_kv_heads=2, tie=False, seed=21)
    paths = []
    for scheme in (Scheme("awq", group_size=32), Scheme("gptq", bits=4, group_size=32, desc_act=True)):
        write_quantized(src, tmp_path / scheme.name, None, scheme, seed=1)
        paths.append(str(tmp_path / scheme.name))
    out = tmp_path / "result.json"
    proc = run_with_devices(["-m", "tests.tp_quant_kernel_worker", str(out), *paths], n=4)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    for path in paths:
        one = np.asarray(res[f"{path}|1"]["logits"])
        for n in (1, 2, 4):
            r = res[f"{path}|{n}"]
            # Decode: no product falls back to the XLA path. Prefill (18 rows) does where a device's shape is under
            # the dot mode's 128-row / 128-column block (the fma mode takes at most 8 rows), as on one device.
            assert 1 not in r["xla"] and (n > 1 or r["xla"] == []), (path, n, r["xla"])
            shapes = {tuple(c[:3]) for c in r["calls"]}  # each device's products: (rows, local K, local N)
            down, o_proj = (1, 256 // n, 128), (1, 128 // n, 128)  # row-parallel: local rows
            assert {down, o_proj, (1, 128, 512 // n), (18, 128, 512 // n)} <= shapes, (path, n, sorted(shapes))
            # float32 partials (psum-ed, then rounded) exactly for the row-parallel products, when split
            partials = {tuple(c[:3]) for c in r["calls"] if c[3] == "float32"}
            assert (partials == set()) if n == 1 else ({down, o_proj} <= partials <= {
                (m, k, 128) for m in (1, 18) for k in (256 // n, 128 // n)}), (path, n, sorted(partials))
            got = np.asarray(r["logits"])
            err = np.abs(got - one).max()
            assert err <= 2.0 ** -6 * np.abs(one).max(), (path, n, err)
            top2 = -np.sort(-one, axis=-1)[:, :2]
            clear = top2[:, 0] - top2[:, 1] > 2 * err
            assert clear.sum() >= len(one) // 2 and (got.argmax(-1) == one.argmax(-1))[clear].all(), (path, n)
