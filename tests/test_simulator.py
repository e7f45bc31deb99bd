"""The scheduling simulator (qwenjax/sim): trace generators, the step-time model's fit, the simulator's determinism,
policies and invariants, its bookkeeping against the real engine's, and a CPU smoke run of the two GPU scripts
(benchmarks/step_profile.py, benchmarks/sim_validate.py)."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import numpy as np
import pytest

from qwenjax.layers.attention_metadata import segments
from qwenjax.sim import (Fixed, Gamma, Lengths, LengthsFromFile, LogNormal, OnOff, Poisson, SimConfig, StepSample,
                         StepShape, StepTimeModel, Trace, TraceRequest, Uniform, compare_policies, make_trace, simulate)
from qwenjax.sim.step_model import QWEN2_7B_H100_ESTIMATE, Coefficients
from qwenjax.sim.traces import SharedPrefix

REPO = Path(__file__).resolve().parents[1]
MODEL = QWEN2_7B_H100_ESTIMATE


def _loaded_config(**kw):
    """Few sequences at once and a small KV pool: requests queue, and the pool runs out (preemption)."""
    return SimConfig.build(**{**dict(max_model_len=1024, max_num_seqs=16, max_num_batched_tokens=2048,
                                     prefill_token_buckets=(256, 512), num_kv_pages=300), **kw})


def _loaded_trace(seed=1, **kw):
    return make_trace(240, Poisson(30.0), Lengths(Uniform(64, 512), Uniform(32, 256)), seed=seed, **kw)


# ----------------------------------------------------------------------------------------------- traces


def _gaps(arrivals):
    t = np.asarray(arrivals)
    return np.diff(np.concatenate([[0.0], t]))


def test_arrival_processes_have_their_rates():
    rng = np.random.default_rng(0)
    n = 20000
    g = _gaps(Poisson(5.0).sample(n, rng))
    assert abs(g.mean() - 0.2) < 0.2 * 0.03 and abs(g.std() / g.mean() - 1.0) < 0.05  # exponential: CV 1
    g = _gaps(Gamma(5.0, 0.25).sample(n, rng))
    assert abs(g.mean() - 0.2) < 0.2 * 0.06 and abs(g.std() / g.mean() - 2.0) < 0.15  # CV 1 / sqrt(shape)
    t = OnOff(10.0, on_s=2.0, off_s=6.0).sample(n, rng)
    assert abs(n / t[-1] - 10.0 * 2 / 8) < 0.1  # mean rate = rate * on / (on + off)
    assert np.all(np.mod(t, 8.0) <= 2.0 + 1e-9)  # nothing arrives in the off periods
    assert np.all(np.diff(t) >= 0)


def test_length_distributions():
    rng = np.random.default_rng(1)
    u = Uniform(128, 1024).sample(20000, rng)
    assert u.min() >= 128 and u.max() <= 1024 and abs(u.mean() - 576) < 6
    ln = LogNormal(200, 0.8, lo=8, hi=4000).sample(20000, rng)
    assert abs(np.median(ln) / 200 - 1) < 0.05 and ln.min() >= 8 and ln.max() <= 4000
    assert set(Fixed(7).sample(5, rng)) == {7}
    with pytest.raises(ValueError, match="1 <= lo <= hi"):
        Uniform(10, 5)
    with pytest.raises(ValueError, match="finite number > 0"):
        Poisson(0.0)


def test_make_trace_weights_prefixes_and_seeds():
    kw = dict(arrivals=Poisson(10.0), lengths=Lengths(Uniform(64, 256), Uniform(8, 32)))
    t = make_trace(4000, **kw, seed=3, priorities={0: 1, 1: 3}, clients={"heavy": 4, "light": 1},
                   shared_prefix=SharedPrefix(groups=2, length=48, fraction=0.5))
    assert abs(np.mean([r.priority == 1 for r in t]) - 0.75) < 0.03
    assert abs(np.mean([r.client == "light" for r in t]) - 0.2) < 0.03
    shared = [i for i, r in enumerate(t) if r.prefix_id == 1]
    assert abs(sum(r.prefix_id is not None for r in t) / len(t) - 0.5) < 0.03
    a, b = (t.prompt_token_ids(i) for i in shared[:2])
    assert a[:48] == b[:48] and a[48:] != b[48:] and len(a) == t[shared[0]].prompt_len
    # Same seed, same trace; another seed, another; one child stream per aspect: clients do not move arrivals.
    assert make_trace(50, **kw, seed=3) == make_trace(50, **kw, seed=3)
    assert make_trace(50, **kw, seed=3) != make_trace(50, **kw, seed=4)
    plain, with_clients = make_trace(50, **kw, seed=3), make_trace(50, **kw, seed=3, clients=5)
    assert [r.arrival for r in plain] == [r.arrival for r in with_clients]
    assert t.prompt_token_ids(5) == t.prompt_token_ids(5)


def test_trace_files(tmp_path):
    t = make_trace(30, Gamma(4.0, 0.5), Lengths(LogNormal(100, 0.5, hi=900), Uniform(4, 40)), seed=9, clients=3,
                   name="bursty", shared_prefix=SharedPrefix(3, 32, 0.3))
    t.save_jsonl(tmp_path / "t.jsonl")
    back = Trace.load_jsonl(tmp_path / "t.jsonl")
    assert back == t and back.prompt_token_ids(7) == t.prompt_token_ids(7)
    assert t.time_scaled(2.0)[10].arrival == pytest.approx(t[10].arrival / 2)
    # Lengths from a file keep each record's (prompt, output) pair together.
    (tmp_path / "lens.jsonl").write_text("".join(json.dumps({"prompt_len": p, "output_len": p // 10}) + "\n"
                                                 for p in (100, 200, 300)))
    t2 = make_trace(200, Poisson(1.0), LengthsFromFile(str(tmp_path / "lens.jsonl")), seed=0)
    assert {(r.prompt_len, r.output_len) for r in t2} == {(100, 10), (200, 20), (300, 30)}
    (tmp_path / "bad.jsonl").write_text('{"prompt_len": 5}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: needs integer fields"):
        LengthsFromFile(str(tmp_path / "bad.jsonl")).pairs()
    with pytest.raises(ValueError, match="must be sorted by arrival"):
        Trace((TraceRequest(1.0, 5, 5), TraceRequest(0.5, 5, 5)))


# ----------------------------------------------------------------------------------------------- step model


def _samples(model, noise, rng):
    out = []
    for b, rows in ((1, 1), (8, 5), (8, 8), (32, 20), (32, 32), (128, 90), (128, 128)):
        for kv_per_row in (100, 1000, 3000):
            shape = StepShape("decode", rows, rows, rows * kv_per_row, b, b)
            out.append(StepSample.of(shape, model.time(shape) * (1 + noise * rng.standard_normal())))
    for b, q in ((1, 512), (4, 512), (8, 512), (1, 1024), (4, 1024)):
        for rows in sorted({1, max(1, b // 2), b}):
            for fill in (0.3, 0.7, 1.0):
                shape = StepShape("prefill", rows, int(rows * q * fill), 0, b, b * q)
                out.append(StepSample.of(shape, model.time(shape) * (1 + noise * rng.standard_normal())))
    for n, ctx in ((64, 512), (64, 1024), (200, 900)):
        shape = StepShape("prefill", 1, n, ctx + n, 1, 512)
        out.append(StepSample.of(shape, model.time(shape) * (1 + noise * rng.standard_normal())))
    return out


def test_fit_recovers_known_coefficients():
    # Every term moves some samples by several percent, so 0.5% noise cannot hide it.
    true = StepTimeModel(decode=Coefficients(base=6e-3, per_row=5e-5, per_padded_row=8e-5, per_kv_token=2.2e-8),
                         prefill=Coefficients(base=5e-3, per_row=1e-3, per_token=5e-6, per_padded_token=2e-5,
                                              per_kv_token=5e-6))
    fit = StepTimeModel.fit(_samples(true, 0.005, np.random.default_rng(0)), per_bucket=False)
    for kind in ("decode", "prefill"):
        want, got = dataclasses.asdict(getattr(true, kind)), dataclasses.asdict(getattr(fit, kind))
        for name, w in want.items():
            assert got[name] == pytest.approx(w, rel=0.15, abs=1e-12), (kind, name, got[name], w)
    clean = _samples(true, 0.0, np.random.default_rng(1))
    assert all(e["max_abs_rel_err"] < 0.03 for e in fit.errors(clean).values())


def test_fit_per_bucket_scale_and_files(tmp_path):
    base = StepTimeModel(decode=Coefficients(base=5e-3, per_padded_row=1e-4, per_kv_token=2e-8),
                         prefill=Coefficients(base=4e-3, per_padded_token=2e-5))
    # One bucket runs 30% slower than the line through the others (a different kernel choice, say).
    skewed = dataclasses.replace(base, bucket_scale={("decode", 32, 32, True): 1.3})
    fit = StepTimeModel.fit(_samples(skewed, 0.0, np.random.default_rng(0)), schedule_ahead=0.9,
                            meta={"source": "test"})
    shape = StepShape("decode", 20, 20, 20 * 700, 32, 32)
    assert fit.time(shape) == pytest.approx(skewed.time(shape), rel=0.03)
    errors = fit.errors(_samples(skewed, 0.0, np.random.default_rng(2)))
    assert all(e["max_abs_rel_err"] < 0.05 for e in errors.values())
    fit.save(tmp_path / "m.json")
    back = StepTimeModel.load(tmp_path / "m.json")
    assert back == fit and back.bucket_scale == fit.bucket_scale and back.schedule_ahead == 0.9
    assert back.meta == {"source": "test"}
    (tmp_path / "result.json").write_text(json.dumps({"benchmark": "step-profile", "config": {"step_model":
                                                                                              fit.to_dict()}}))
    assert StepTimeModel.load(tmp_path / "result.json").time(shape) == fit.time(shape)
    with pytest.raises(ValueError, match="no prefill samples"):
        StepTimeModel.fit([s for s in _samples(base, 0.0, np.random.default_rng(0)) if s.kind == "decode"])
    with pytest.raises(ValueError, match="finite and >= 0"):
        Coefficients(base=-1.0)


# ----------------------------------------------------------------------------------------------- simulator


def test_simulator_is_deterministic_for_a_seed():
    cfg = _loaded_config()
    a = simulate(_loaded_trace(seed=1), MODEL, cfg, "fair")
    b = simulate(_loaded_trace(seed=1), MODEL, cfg, "fair")
    assert a.metrics == b.metrics
    assert [r.token_times for r in a.requests] == [r.token_times for r in b.requests]
    c = simulate(_loaded_trace(seed=2), MODEL, cfg, "fair")
    assert c.metrics["ttft_ms_mean"] != a.metrics["ttft_ms_mean"]


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_simulator_keeps_the_invariants(async_scheduling):
    cfg = _loaded_config(num_kv_pages=120, async_scheduling=async_scheduling)  # 120 pages: preemption
    trace = _loaded_trace(shared_prefix=SharedPrefix(groups=3, length=96, fraction=0.6))
    rep = simulate(trace, MODEL, cfg, "fcfs")
    m = rep.metrics
    assert m["preemptions"] > 0 and m["prefix_cache_hits"] > 0
    assert m["kv_pages_free_at_end"] == m["kv_pages"] == 120  # every page back in the free pool
    for r, want in zip(rep.requests, trace):
        assert len(r.token_times) == want.output_len  # every request ran to its length
        assert r.ttft > 0 and all(b > a for a, b in zip(r.token_times, r.token_times[1:]))
    assert m["output_tokens"] == sum(r.output_len for r in trace)
    assert 0 < m["output_tok_s"] and m["ttft_ms_p50"] <= m["ttft_ms_p99"]


def test_priority_policy_serves_high_priority_first():
    trace = _loaded_trace(priorities={0: 1, 1: 3})
    cfg = _loaded_config()
    pri = simulate(trace, MODEL, cfg, "priority").by("priority")
    fcfs = simulate(trace, MODEL, cfg, "fcfs").by("priority")
    assert pri[0]["ttft_ms_mean"] * 5 < pri[1]["ttft_ms_mean"]  # loaded: priority 0 jumps the queue
    assert pri[0]["ttft_ms_mean"] * 5 < fcfs[0]["ttft_ms_mean"]
    assert 0.5 < fcfs[0]["ttft_ms_mean"] / fcfs[1]["ttft_ms_mean"] < 2  # FCFS ignores priority


def test_fair_share_protects_the_light_client():
    trace = _loaded_trace(clients={"heavy": 4, "light": 1})
    cfg = _loaded_config()
    fair = simulate(trace, MODEL, cfg, "fair").by("client")
    fcfs = simulate(trace, MODEL, cfg, "fcfs").by("client")
    assert fair["light"]["ttft_ms_mean"] * 3 < fair["heavy"]["ttft_ms_mean"]
    assert fair["light"]["ttft_ms_mean"] * 3 < fcfs["light"]["ttft_ms_mean"]


def test_a_policy_of_your_own():
    from qwenjax.core.policies import SchedulingPolicy

    class ShortestOutputFirst(SchedulingPolicy):
        """An oracle: admits the request with the fewest tokens to generate first."""

        name = "sof"

        def key(self, seq):
            return seq.params.max_tokens, seq.arrival_time, seq.seq_id

    trace, cfg = _loaded_trace(), _loaded_config()
    reps = compare_policies(trace, MODEL, cfg, policies=("fcfs", ShortestOutputFirst))
    assert list(reps) == ["fcfs", "sof"]
    assert reps["sof"].metrics["ttft_ms_p50"] < reps["fcfs"].metrics["ttft_ms_p50"]
    assert SimConfig.from_dict(cfg.to_dict()) == cfg


def test_simulator_refuses_what_the_engine_refuses():
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        SimConfig.build(max_model_len=1024, num_kv_pages=10)
    trace = Trace((TraceRequest(0.0, 2000, 4),))
    with pytest.raises(ValueError, match="longer than max_model_len"):
        simulate(trace, MODEL, _loaded_config(), "fcfs")
    with pytest.raises(ValueError, match="policy must be one of"):
        simulate(_loaded_trace(), MODEL, _loaded_config(), "lifo")


# ----------------------------------------------------------------------------------------------- against the engine


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_simulator_schedules_what_the_engine_schedules(untied_gqa2, async_scheduling):
    """Every request at time 0 (so timing cannot matter): the real engine and the simulator run the same steps,
    row for row, through admission limits, prefix hits and preemptions."""
    from qwenjax import LLM
    from tests.conftest import SMALL_ENGINE

    kw = {**SMALL_ENGINE, "num_kv_pages": 24, "decode_buckets": (4, 8)}
    llm = LLM(str(untied_gqa2), **kw, skip_warmup=True, async_scheduling=async_scheduling)
    engine = llm.llm_engine
    engine.final_only = True
    trace = make_trace(14, Poisson(1e6), Lengths(Uniform(5, 70), Uniform(3, 40)), seed=5,
                       shared_prefix=SharedPrefix(groups=2, length=40, fraction=0.5))
    trace = Trace(tuple(dataclasses.replace(r, arrival=0.0) for r in trace), seed=trace.seed)
    vocab = engine.model_config.vocab_size

    def row_view(out):
        return out.kind, out.bucket, [(r.seq.request_id, r.seq.num_computed, r.num_new_tokens, r.samples)
                                      for r in out.rows], [s.request_id for s in out.preempted]

    real = []
    schedule = engine.scheduler.schedule

    def recording():
        out = schedule()
        if out is not None:
            real.append(row_view(out))
        return out

    engine.scheduler.schedule = recording
    from qwenjax import SamplingParams

    for i, r in enumerate(trace):
        engine.add_request(str(i), None, SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True,
                                                        detokenize=False),
                           prompt_token_ids=trace.prompt_token_ids(i, vocab), arrival_time=0.0)
    while engine.has_unfinished_requests():
        engine.step()
    simulated = []
    rep = simulate(trace, MODEL, SimConfig.from_engine(engine), "fcfs", vocab_size=vocab,
                   on_step=lambda clock, out: simulated.append(row_view(out)))
    assert engine.scheduler.num_preemptions > 0 and engine.blocks.hit_tokens > 0  # the test covers both
    assert simulated == real
    assert rep.metrics["preemptions"] == engine.scheduler.num_preemptions
    assert rep.metrics["prefix_cache_hits"] == engine.blocks.hit_tokens


# ----------------------------------------------------------------------------------------------- an emulated device


def _bench(name: str):
    """A benchmark script as a module (benchmarks/ is not a package; its scripts import each other by name)."""
    path = str(REPO / "benchmarks")
    sys.path.insert(0, path)
    try:
        return importlib.import_module(name)
    finally:
        while path in sys.path:
            sys.path.remove(path)


class _VirtualClock:
    """Stands in for the `time` module of the engine and the two benchmark scripts, and is the emulated device's
    clock: time passes only while someone waits (for a step's sampled ids, or in the replay's sleep until the next
    arrival), so the host's own work takes no time and a run is the same on an idle or a loaded host."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    perf_counter = monotonic

    def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)

    def __getattr__(self, name):
        return getattr(time, name)


class _Pending:
    """Sampled ids that exist once the emulated device finishes their step (np.asarray waits for it)."""

    is_fully_addressable = True

    def __init__(self, value, ready: float, clock: _VirtualClock):
        self.value, self.ready, self.clock = value, ready, clock

    def __array__(self, dtype=None, copy=None):
        self.clock.sleep(self.ready - self.clock.monotonic())
        return self.value


class _EmulatedDevice:
    """Stands in for ModelRunner.execute: one step at a time, each taking `model.time(shape)`, queued behind the
    previous one as a GPU queues its work; the host's work stays the engine's own."""

    def __init__(self, model: StepTimeModel, clock: _VirtualClock):
        self.model, self.clock, self.free = model, clock, 0.0

    def execute(self, inp, has_context, tensors, mode):
        parts = []
        for seg in segments(inp.meta):  # one segment, or a mixed step's decode and prefill segments
            q, lens = np.asarray(seg.query_lens), np.asarray(seg.seq_lens)
            if seg.positions.ndim == 1:  # a packed prefill step: R rows on T slots
                B, T = len(q), seg.positions.shape[0]
                parts.append(StepShape("prefill", int((q > 0).sum()), int(q.sum()), 0, B, T))
                continue
            B, Q = seg.positions.shape
            kv = int(lens.sum()) if Q == 1 or has_context else 0
            parts.append(StepShape("decode" if Q == 1 else "prefill", int((q > 0).sum()), int(q.sum()), kv, B, B * Q))
        if len(parts) == 1:
            shape = parts[0]
        else:
            d, p = parts
            shape = StepShape("mixed", d.rows + p.rows, d.new_tokens + p.new_tokens,
                              d.kv_tokens_read + p.kv_tokens_read, d.padded_rows + p.padded_rows,
                              d.padded_tokens + p.padded_tokens, decode_rows=d.rows,
                              decode_padded_rows=d.padded_rows, decode_kv_tokens=d.kv_tokens_read)
        self.free = max(self.free, self.clock.monotonic()) + self.model.time(shape)
        rows = inp.slots.shape[0]
        return types.SimpleNamespace(token_ids=_Pending(np.full((rows,), 100, np.int32), self.free, self.clock)), None


def test_profile_and_simulation_reproduce_an_emulated_device(monkeypatch):
    """Behind the real engine (async scheduling, its real host work), a device whose step times a known model gives:
    step_profile's grid recovers the model and schedule_ahead from the engine's steps alone, and the simulator, with
    the fitted model, matches a replay of a trace the profile never ran on mean TTFT, TPOT and throughput. Every
    clock involved is one virtual clock (_VirtualClock), so the figures do not depend on the host's load."""
    from qwenjax import LLM

    sp, sv = _bench("step_profile"), _bench("sim_validate")
    true = StepTimeModel(decode=Coefficients(base=0.012, per_padded_row=4e-4, per_kv_token=2e-6),
                         prefill=Coefficients(base=0.010, per_padded_token=1e-4))
    llm = LLM(max_model_len=256, max_num_seqs=16, max_num_batched_tokens=512, prefill_token_buckets=(64, 128),
              num_kv_pages=256, skip_warmup=True)  # the built-in tiny model; nothing compiles: no step runs on it
    engine = llm.llm_engine
    engine.final_only = True
    clock = _VirtualClock()
    # Every module that stamps a request's times: the engine (arrival, finish) and its output processor (first token).
    stampers = {sys.modules[type(x).__module__] for x in (engine, engine.output_processor)}
    for module in (*stampers, sp, sv):
        monkeypatch.setattr(module, "time", clock)
    engine.runner.execute = _EmulatedDevice(true, clock).execute
    vocab = engine.model_config.vocab_size
    grid_args = types.SimpleNamespace(prompt_range=(16, 128), decode_steps=8, prefill_steps=4, batches=(1, 6, 16),
                                      contexts=(16, 128), prefill_lens=(64, 128), context_prefill=True)
    prof = sp.profile(engine, sp.make_grid(grid_args, engine.scheduler_config), seed=0, vocab=vocab)
    model = sp.fit(prof, meta={})
    # The device is the bottleneck (the host's work takes no virtual time): the host schedules a whole step ahead.
    assert model.schedule_ahead == pytest.approx(1.0, abs=1e-6)
    # The samples are exact step times; what is left is the fit's (each run's KV reads enter as their mean).
    errors = [abs(model.time(s) / true.time(s) - 1) for s in prof["samples"]]
    assert max(errors) < 0.01, errors

    trace = make_trace(60, Poisson(12.0), Lengths(Uniform(16, 128), Uniform(8, 64)), seed=3)
    prompts = [trace.prompt_token_ids(i, vocab) for i in range(len(trace))]
    measured = sv.summarize(sv.replay(engine, trace, prompts), trace)
    simulated = simulate(trace, model, SimConfig.from_engine(engine), "fcfs", vocab_size=vocab).metrics
    # Deterministic figures (0.05-0.3% apart when written): what separates them is the fitted model's error above
    # and the simulator's own approximations, not the host.
    for f in sv.FIGURES:
        assert simulated[f] == pytest.approx(measured[f], rel=0.01), (f, measured[f], simulated[f])


# ----------------------------------------------------------------------------------------------- the GPU scripts on CPU


def test_step_profile_and_sim_validate_smoke(tmp_path):
    res = tmp_path / "results"
    common = ["--model", "tiny", "--results-dir", str(res), "--ceilings", "none", "--skip-warmup",
              "--prompt-range", "8,24", "--output-range", "4,8", "--max-num-seqs", "4",
              "--compilation-cache-dir", str(tmp_path / "jaxcache")]
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO / 'benchmarks')!r})
        import step_profile, sim_validate
        a = {common!r}
        step_profile.main(a + ["--decode-steps", "5", "--prefill-steps", "3", "--batches", "1,3", "--contexts",
                               "8,24", "--prefill-lens", "8,24"])
        sim_validate.main(a + ["--num-requests", "8", "--request-rate", "20", "--save-trace",
                               {str(tmp_path / 'trace.jsonl')!r}])
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu", QWENJAX_COMMIT="smoke-test")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    files = {json.loads(p.read_text())["benchmark"]: p for p in res.glob("*.json")}
    assert sorted(files) == ["simulator-validation", "step-profile"]
    prof = json.loads(files["step-profile"].read_text())
    assert files["step-profile"].name.startswith("step-profile-tiny-cpu-")
    assert prof["commit"] == "smoke-test" and prof["config"]["samples"]
    model = StepTimeModel.load(files["step-profile"])  # the result file is the model file
    assert model.meta["sim_config"]["max_num_seqs"] == 4 and 0 <= model.schedule_ahead <= 1
    val = json.loads(files["simulator-validation"].read_text())
    m = val["metrics"]
    for f in ("ttft_ms_mean", "tpot_ms_mean", "output_tok_s"):
        assert m[f"{f}_measured"] > 0 and m[f"{f}_simulated"] > 0
        assert m[f"{f}_rel_err"] == pytest.approx(m[f"{f}_simulated"] / m[f"{f}_measured"] - 1, rel=1e-3, abs=1e-5)
    assert isinstance(m["pass"], bool) and val["config"]["trace"]["num_requests"] == 8
    assert val["config"]["sim_config"] == prof["config"]["sim_config"]
    assert len(Trace.load_jsonl(tmp_path / "trace.jsonl")) == 8
