"""step-profile: the real engine's time per step over a grid of controlled workloads, and the simulator's
StepTimeModel fitted to it (qwenjax/sim/step_model.py).

The grid (none of it the validation trace of sim_validate.py, which draws Poisson arrivals of mixed lengths from its
own seed): decode phases, B requests of one prompt length C decoding together for --decode-steps steps, for B at
every decode bucket and half-way below each (full and part-full buckets) and C over three context lengths;
prefill phases, R new prompts of length P added before each step (each asks for one token, so every step is a
prefill of R rows), for P over four lengths and R from 1 to what the prefill budget holds; context-prefill phases
(prefix caching on), one request per step reusing a cached prefix, so the step reads it from pages.

How steps are timed: through `LLMEngine.step`, not the runner alone, because the simulator's clock must include
the host's share of a step (scheduling, batch building, sampling inputs, bookkeeping: 3 ms of a 7B decode step and
most of a 0.5B one on an H100, benchmarks/NOTES.md), which a runner-only timing would miss. The scheduler's
schedule() is wrapped (an instance attribute, so the engine's own call goes through it) to record each step's
shape and the time it was called; a step's time is the interval to the next schedule() call (the phase's end for
the last), which is what the simulated clock advances by. Every step of a run of one shape costs the same, so the
run's mean interval is its wall time over its steps, whether or not the engine overlaps the dispatch of step N+1
with reading step N's tokens; the first and the last step of each run (a change of shape, a compilation on first
use) are left out. Each run gives one sample; the model is fitted to the samples. The requests' first-token times
give `schedule_ahead` (see schedule_ahead() below and qwenjax/sim/step_model.py): with async scheduling the host
schedules step N + 1 while step N runs, so a request arriving during N waits for N + 2.

The engine is sized as sim_validate.py sizes it (same flags, same defaults: max_model_len from the prompt and output
ranges, max_num_seqs 128, a 4 x longest-prompt prefill budget, prefill buckets at half and all of the longest
prompt), because the model is only valid for the buckets it was measured on; sim_validate refuses a model fitted on
another configuration.

  python benchmarks/step_profile.py --model qwen2-7b-instruct --compilation-cache-dir .jaxcache --out $OUT
  python benchmarks/step_profile.py --model tiny --scale 0.05 --skip-warmup           # CPU smoke run
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cli_args  # noqa: E402
import device_ceilings  # noqa: E402
import engine_setup  # noqa: E402
import model_specs  # noqa: E402
import result_files  # noqa: E402
import workloads  # noqa: E402

from qwenjax.scheduler_config import packed_len  # noqa: E402

BENCHMARK = "step-profile"


# ------------------------------------------------------------------------------------------ shared with sim_validate


def add_engine_workload_args(p) -> None:
    """The flags that size the engine; step_profile and sim_validate take the same ones."""
    w = p.add_argument_group("workload sizing (shared with sim_validate.py)")
    w.add_argument("--prompt-range", type=cli_args._int_list, default=None, help="lo,hi (default 128,1024, x --scale)")
    w.add_argument("--output-range", type=cli_args._int_list, default=None, help="lo,hi (default 64,512, x --scale)")


def fill_sizing_defaults(args) -> None:
    s = args.scale
    args.prompt_range = tuple(args.prompt_range or (cli_args.scaled(128, s, 2), cli_args.scaled(1024, s, 2)))
    args.output_range = tuple(args.output_range or (cli_args.scaled(64, s, 2), cli_args.scaled(512, s, 2)))
    args.max_num_seqs = args.max_num_seqs or cli_args.scaled(128, s, 2)
    for name, r in (("--prompt-range", args.prompt_range), ("--output-range", args.output_range)):
        if len(r) != 2 or r[0] > r[1]:
            raise SystemExit(f"{name} takes lo,hi with lo <= hi, got {','.join(map(str, r))}")


def engine_kwargs(args) -> dict:
    """LLM(...) arguments for the profile and the validation replay alike (explicit engine flags win)."""
    from qwenjax.scheduler_config import SchedulerConfig, pow2_at_least

    pmax, omax = args.prompt_range[1], args.output_range[1]
    mml = cli_args.round_up(pmax + omax, args.block_size)
    budget = pow2_at_least(4 * pmax, 16)
    decode = SchedulerConfig.build(max_model_len=args.max_model_len or mml, max_num_seqs=args.max_num_seqs,
                                   max_num_batched_tokens=args.max_num_batched_tokens or budget,
                                   block_size=args.block_size).decode_buckets  # the engine's own default
    kw = engine_setup.engine_kwargs(args, max_model_len=mml, max_num_seqs=args.max_num_seqs,
                                    max_num_batched_tokens=budget, decode_buckets=decode,
                                    prefill_buckets=tuple(sorted({max(2, pmax // 2), pmax})))
    kw["enable_prefix_caching"] = True
    return kw


def prepare(args):
    """(model spec, ModelConfig, device info, ceilings): what comes before the engine in both scripts."""
    spec = model_specs.resolve_model(args.model)
    engine_setup.setup_jax(args)
    cfg = model_specs.model_config(spec)
    dev = result_files.device_info()
    ceilings = device_ceilings.measure_ceilings(cfg, mode=args.ceilings, platform=dev["platform"],
                                                gemm_tokens=engine_kwargs(args)["max_num_batched_tokens"])
    return spec, cfg, dev, ceilings


def build_engine(args, spec, **extra):
    """(llm, kwargs, startup seconds); `extra` engine arguments go on top of engine_kwargs(args). The engine reports
    finished requests only, and requests ask for no detokenization (see sampling()): the simulator models the
    engine's core loop, not a server's text handling."""
    kwargs = dict(engine_kwargs(args), **extra)
    llm, startup = engine_setup.build_llm(spec, kwargs)
    llm.llm_engine.final_only = True
    return llm, kwargs, startup


def sampling(max_tokens: int):
    from qwenjax import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=int(max_tokens), ignore_eos=True, detokenize=False)


# ----------------------------------------------------------------------------------------------- recording steps


class StepRecorder:
    """Records every step the engine runs while installed: the time of its schedule() call (time.monotonic, the
    engine's clock for request metrics), its StepShape, and the requests whose first token it samples."""

    def __init__(self, engine):
        from qwenjax.sim import step_shape

        self._shape = step_shape
        self.sched = engine.scheduler
        self._schedule = self.sched.schedule
        self.steps: list = []   # (t, StepShape)
        self.firsts: list = []  # per step: request ids whose first output token this step samples
        self.sched.schedule = self._wrapped

    def _wrapped(self):
        t = time.monotonic()
        out = self._schedule()
        if out is not None:  # before the engine counts the step's tokens
            self.steps.append((t, self._shape(out)))
            self.firsts.append([r.seq.request_id for r in out.rows if r.samples and not r.seq.output_token_ids])
        return out

    def close(self) -> None:
        del self.sched.schedule  # the class's method again


def _run_key(shape):
    """Steps of one run share everything but their KV reads (decode contexts grow by one token a step)."""
    return (shape.kind, shape.rows, shape.new_tokens, shape.padded_rows, shape.padded_tokens,
            shape.kv_tokens_read > 0)


def aggregate(steps: list, t_end: float, *, trim: int = 1) -> list:
    """Runs of consecutive same-shape steps -> one StepSample each (mean interval, mean KV read), `trim` steps off
    both ends of every run."""
    from qwenjax.sim import StepSample

    times = [t for t, _ in steps] + [t_end]
    out = []
    i = 0
    while i < len(steps):
        key, j = _run_key(steps[i][1]), i
        while j < len(steps) and _run_key(steps[j][1]) == key:
            j += 1
        keep = range(i + trim, j - trim)
        if len(keep):
            s = steps[i][1]
            secs = sum(times[k + 1] - times[k] for k in keep) / len(keep)
            kv = sum(steps[k][1].kv_tokens_read for k in keep) / len(keep)
            out.append(StepSample(kind=s.kind, rows=s.rows, new_tokens=s.new_tokens, kv_tokens_read=kv,
                                  padded_rows=s.padded_rows, padded_tokens=s.padded_tokens, seconds=secs,
                                  steps=len(keep)))
        i = j
    return out


def schedule_ahead(steps: list, firsts: list, first_token_time: dict, t_end: float) -> list[float]:
    """For each step k that sampled some request's first token, with steps k + 1 and k + 2 after it: (when its
    tokens reached the host - when step k + 1 was scheduled) / the interval of step k + 1.

    With async scheduling on a device-bound engine, step k + 1 is scheduled as step k starts on the device (after
    k - 1's tokens are read), k's tokens arrive when k ends, and the interval after k + 1's schedule() is k's device
    time: the ratio is about 1, the fraction of a step by which the host schedules ahead. When the host is the
    bottleneck, or the engine runs one step at a time, tokens arrive about as the next step is scheduled: about 0.
    """
    times = [t for t, _ in steps] + [t_end]
    out = []
    for k in range(len(steps) - 2):
        got = [first_token_time[r] for r in firsts[k] if first_token_time.get(r) is not None]
        nxt = times[k + 2] - times[k + 1]
        if got and nxt > 0:
            out.append((sum(got) / len(got) - times[k + 1]) / nxt)
    return out


# ----------------------------------------------------------------------------------------------- the grid


@dataclasses.dataclass(frozen=True)
class Phase:
    name: str
    prompt_len: int
    count: int             # requests (decode: all at once; prefill / context: `per_step` before each step)
    max_tokens: int
    per_step: int = 0      # > 0: add this many requests before each of `count // per_step` steps
    prefix_len: int = 0    # > 0: every prompt starts with one shared prefix of this many tokens (prefix hits)


def make_grid(args, sc) -> list[Phase]:
    """Decode, prefill and context-prefill phases sized to the engine's configuration `sc` (a SchedulerConfig)."""
    pmin, pmax = args.prompt_range
    K, M = args.decode_steps, args.prefill_steps
    # Every decode bucket full, and half-way between it and the bucket below (padding rows cost too).
    bs = sc.decode_buckets
    batches = args.batches or sorted(set(bs) | {(a + b + 1) // 2 for a, b in zip((0,) + bs, bs)})
    contexts = args.contexts or sorted({pmin, (pmin + pmax) // 2, pmax})
    phases = []
    for c in contexts:
        if c + K + 1 > sc.max_model_len:
            raise SystemExit(f"context {c} + {K} decode steps exceeds max_model_len {sc.max_model_len}")
        for b in batches:
            phases.append(Phase(f"decode B={b} C={c}", c, b, K + 1))
    for p in args.prefill_lens or sorted({pmin, (pmin + pmax) // 2, (3 * pmax) // 4, pmax}):
        if p > sc.max_prefill_chunk:
            raise SystemExit(f"a {p}-token prompt is longer than the prefill chunk ({sc.max_prefill_chunk})")
        rmax = max(1, min(sc.max_num_seqs, sc.max_num_batched_tokens // packed_len(p)))  # rows of a packed step
        for r in sorted({1, min(2, rmax), max(1, 3 * rmax // 4), rmax}):
            phases.append(Phase(f"prefill R={r} P={p}", p, r * M, 1, per_step=r))
    if args.context_prefill:
        ps = sc.block_size
        suffix = max(2, pmin // 2)
        for x in sorted({(pmax // 2) // ps * ps, pmax // ps * ps}):
            if x >= ps and x + suffix < sc.max_model_len:
                phases.append(Phase(f"context X={x} s={suffix}", x + suffix, M + 1, 1, per_step=1, prefix_len=x))
    return phases


def run_phase(engine, rec: StepRecorder, phase: Phase, rng, vocab: int, ids) -> dict:
    """Runs one phase to the end (no request left): its steps, the requests' first-token times, the end time."""
    hi = min(vocab, workloads.NUM_REGULAR_TOKENS)
    prefix = rng.integers(0, hi, size=phase.prefix_len).tolist()
    params = sampling(phase.max_tokens)
    first: dict[str, float] = {}

    def add(k: int) -> None:
        for _ in range(k):
            own = rng.integers(0, hi, size=phase.prompt_len - phase.prefix_len).tolist()
            engine.add_request(f"profile-{next(ids)}", None, params, prompt_token_ids=prefix + own)

    def step() -> None:
        for out in engine.step():  # finished requests only (final_only)
            first[out.request_id] = out.metrics.first_token_time

    gc.collect()
    start = len(rec.steps)
    if phase.per_step:
        for _ in range(phase.count // phase.per_step):
            add(phase.per_step)
            step()
    else:
        add(phase.count)
    while engine.has_unfinished_requests():
        step()
    return {"steps": rec.steps[start:], "firsts": rec.firsts[start:], "first_token_time": first,
            "t_end": time.monotonic()}


# ----------------------------------------------------------------------------------------------- main


def parse(argv=None):
    p = cli_args.base_parser(__doc__.splitlines()[0])
    add_engine_workload_args(p)
    g = p.add_argument_group("grid")
    g.add_argument("--decode-steps", type=int, default=None, help="decode steps per decode phase (default 48, x "
                                                                   "--scale, at least 4)")
    g.add_argument("--prefill-steps", type=int, default=6, help="steps per prefill / context phase")
    g.add_argument("--batches", type=cli_args._int_list, default=None, help="decode batch sizes (default: every "
                                                                          "decode bucket and half-way below each)")
    g.add_argument("--contexts", type=cli_args._int_list, default=None, help="decode context lengths (default: low, "
                                                                           "middle and high end of --prompt-range)")
    g.add_argument("--prefill-lens", type=cli_args._int_list, default=None, help="prefill prompt lengths")
    g.add_argument("--no-context-prefill", dest="context_prefill", action="store_false",
                   help="skip the context-prefill (prefix hit) phases")
    g.add_argument("--steps-out", default=None, help="also write every step (shape, interval) to this JSON file")
    args = p.parse_args(argv)
    fill_sizing_defaults(args)
    args.decode_steps = args.decode_steps or cli_args.scaled(48, args.scale, 4)
    if args.prefill_steps < 3:
        raise SystemExit("--prefill-steps must be at least 3 (the first and last step of each run are left out)")
    return args


def profile(engine, grid: list[Phase], *, seed: int, vocab: int, keep_steps: bool = False) -> dict:
    """Runs every phase of `grid` on `engine`: samples (one per run of same-shape steps), the schedule-ahead ratios,
    a summary per phase, the number of steps, and (keep_steps) every step with its interval."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = itertools.count()
    rec = StepRecorder(engine)
    samples, aheads, raw, phases = [], [], [], []
    try:
        for ph in grid:
            run = run_phase(engine, rec, ph, rng, vocab, ids)
            steps, t_end = run["steps"], run["t_end"]
            got = aggregate(steps, t_end)
            ahead = schedule_ahead(steps, run["firsts"], run["first_token_time"], t_end)
            samples += got
            aheads += ahead
            phases.append({"phase": ph.name, "steps": len(steps), "samples": len(got),
                           "wall_s": round(t_end - steps[0][0], 4) if steps else 0.0,
                           "schedule_ahead_median": round(statistics.median(ahead), 4) if ahead else None})
            if keep_steps:
                times = [t for t, _ in steps] + [t_end]
                raw += [dict(dataclasses.asdict(s), phase=ph.name, seconds=times[k + 1] - times[k])
                        for k, (_, s) in enumerate(steps)]
    finally:
        rec.close()
    return {"samples": samples, "schedule_ahead": aheads, "phases": phases, "num_steps": len(rec.steps),
            "steps": raw}


def fit(prof: dict, meta: dict):
    """The StepTimeModel of a profile: fitted samples, and schedule_ahead = the median ratio, clipped to [0, 1]."""
    from qwenjax.sim import StepTimeModel

    if not prof["schedule_ahead"]:
        raise RuntimeError("no step with a first token and two steps after it: schedule_ahead was not measured")
    ahead = min(max(statistics.median(prof["schedule_ahead"]), 0.0), 1.0)
    return StepTimeModel.fit(prof["samples"], schedule_ahead=ahead, meta=meta)


def main(argv=None) -> dict:
    args = parse(argv)
    spec, cfg, dev, ceilings = prepare(args)
    from qwenjax.sim import SimConfig

    llm, kwargs, startup = build_engine(args, spec)
    engine = llm.llm_engine
    grid = make_grid(args, engine.scheduler_config)
    workloads.warm_generate(llm, [list(range(1, args.prompt_range[0] + 1))] * 2)
    t0 = time.perf_counter()
    prof = profile(engine, grid, seed=args.seed, vocab=cfg.vocab_size, keep_steps=bool(args.steps_out))
    profile_s = time.perf_counter() - t0
    samples = prof["samples"]
    sim_config = SimConfig.from_engine(engine).to_dict()
    commit, _ = result_files.git_commit()
    model = fit(prof, meta={
        "model": spec.name, "device": dev["device"], "commit": commit, "date": result_files.today(),
        "sim_config": sim_config, "kv_cache_dtype": args.kv_cache_dtype, "dtype": args.dtype,
        "samples": len(samples), "steps": sum(s.steps for s in samples),
        "fitted_on": "step_profile grid (homogeneous decode / prefill / context-prefill phases)"})
    errs = model.errors(samples)
    metrics = {"samples": len(samples), "steps": prof["num_steps"], "profile_s": profile_s,
               "schedule_ahead": model.schedule_ahead}
    for kind, e in errs.items():
        metrics[f"{kind}_fit_rel_err_mean"] = e["mean_abs_rel_err"]
        metrics[f"{kind}_fit_rel_err_max"] = e["max_abs_rel_err"]
    config = {"prompt_len_range": list(args.prompt_range), "output_len_range": list(args.output_range),
              "seed": args.seed, "decode_steps": args.decode_steps, "prefill_steps": args.prefill_steps,
              "dtype": args.dtype, "kv_cache_dtype": args.kv_cache_dtype, "greedy": True, "ignore_eos": True,
              "detokenize": False, "timing": "interval between schedule() calls through LLMEngine.step, mean over "
              "each run of same-shape steps, first and last left out"}
    config.update(engine_setup.engine_config(llm, kwargs, startup))
    config["sim_config"] = sim_config
    config["phases"] = prof["phases"]
    config["step_model"] = model.to_dict()
    config["fit_errors"] = errs
    config["samples"] = [s.to_dict() for s in samples]
    result = result_files.make_result(benchmark=BENCHMARK, model=spec.name, dev=dev, config=config, ceilings=ceilings,
                                      metrics=metrics)
    path = result_files.write_result(result, devtag=dev["devtag"], results_dir=args.results_dir, out=args.out)
    if args.steps_out:
        Path(args.steps_out).write_text(json.dumps(prof["steps"]) + "\n")
    d, p = model.decode, model.prefill
    rows = [("model", spec.name), ("device", dev["device"]),
            ("phases / samples / steps", f"{len(grid)} / {len(samples)} / {prof['num_steps']}"),
            ("decode base ms", d.base * 1e3), ("decode us per row", d.per_row * 1e6),
            ("decode us per padded row", d.per_padded_row * 1e6), ("decode ns per KV token", d.per_kv_token * 1e9),
            ("prefill base ms", p.base * 1e3), ("prefill us per token", p.per_token * 1e6),
            ("prefill us per padded token", p.per_padded_token * 1e6),
            ("prefill ns per KV token", p.per_kv_token * 1e9), ("measured buckets", len(model.bucket_scale)),
            ("schedule_ahead (of a step)", model.schedule_ahead)]
    rows += [(f"{k}_fit_rel_err_{s}", metrics[f"{k}_fit_rel_err_{s}"]) for k in errs for s in ("mean", "max")]
    rows += [("profile_s", profile_s), ("startup_s (load + compile)", startup)]
    result_files.print_result_table(f"{BENCHMARK} {spec.name}", rows, result, False, path)
    return result


if __name__ == "__main__":
    main()
