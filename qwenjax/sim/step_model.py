"""StepTimeModel: the wall time of one engine step as a linear function of the step's shape, fitted to measured steps.

A step's shape (StepShape) is what the scheduler decided: its kind, its rows, the new tokens they compute, the KV
tokens attention reads from pages, and the compiled bucket (B, Q) it runs in. The engine pays for the bucket, not
for the rows (padding rows and padding tokens run too), and the host pays per real row, so both appear:

  decode:  seconds = base + per_row * rows + per_padded_row * B + per_kv_token * kv_tokens_read
  prefill: seconds = base + per_row * rows + per_token * new_tokens + per_padded_token * B * Q
                     + per_kv_token * kv_tokens_read

Decode is bandwidth-bound (weights once per step in `base`, KV per token read); prefill is matmul-bound (per padded
token). Each kind has its own coefficients, fitted by non-negative least squares on relative error (a 5 ms decode
step matters as much as a 500 ms prefill), from samples of measured steps (`benchmarks/step_profile.py`).
Attention's quadratic term in a dense prefill is left out: for Qwen2-7B at 1k-token prompts it is about 1.5% of the
linear layers' FLOPs.

A compiled bucket need not cost what a line through all buckets says (XLA picks kernels per shape; on a CPU a
batch-1 decode is ten times cheaper than a batch-8 one), so the fit also keeps, per bucket it measured, a scale on
the linear model: time = linear(shape) * bucket_scale[(kind, B, B * Q, reads pages)], 1 for a bucket never measured
(a prefill that reads cached context runs another executable than a fresh one of the same shape). The linear
part still carries what varies inside a bucket (real rows, tokens, KV read).

Times are intervals between schedule() calls, the host's timeline. With async scheduling the host schedules step
N + 1 while step N is still on the device (it reads N's tokens only after dispatching N + 1), so on a device-bound
engine a request that arrives during step N is too late for N + 1, already scheduled, and joins N + 2.
`schedule_ahead` is how far ahead, as a fraction of the running step's time: the simulator admits into step N + 1
only requests that arrived before (end of N) - schedule_ahead * (time of N). The profile measures it from
first-token times: about 1 when the device is the bottleneck, about 0 when the host is; an engine that runs one
step at a time schedules after the previous step has ended (the simulator then ignores it).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path
from typing import Iterable

import numpy as np

FORMAT = "qwenjax-step-model/1"
KINDS = ("decode", "prefill")
# The coefficients each kind fits (decode has Q = 1, so its tokens are its rows: the token terms would be collinear).
FEATURES = {
    "decode": ("base", "per_row", "per_padded_row", "per_kv_token"),
    "prefill": ("base", "per_row", "per_token", "per_padded_token", "per_kv_token"),
}


@dataclasses.dataclass(frozen=True)
class StepShape:
    kind: str              # "prefill" | "decode" | "mixed" (a decode step with one prefill row, see scheduler.py)
    rows: int              # sequences in the step
    new_tokens: int        # tokens the step computes (sum of its rows' num_new_tokens)
    kv_tokens_read: int    # KV tokens attention reads from pages: decode and context prefill; 0 for a dense prefill
    padded_rows: int       # B of the compiled bucket (mixed: D + B)
    padded_tokens: int     # B * Q of the compiled bucket (mixed: D + B * Q; packed prefill: its T slots)
    # mixed only: the decode segment's rows, its padded rows D, and the KV tokens its rows read
    decode_rows: int = 0
    decode_padded_rows: int = 0
    decode_kv_tokens: int = 0

    def parts(self) -> tuple["StepShape", "StepShape"]:
        """A mixed step as its decode segment and its prefill segment, each shaped as a step of its own."""
        d = StepShape("decode", self.decode_rows, self.decode_rows, self.decode_kv_tokens, self.decode_padded_rows,
                      self.decode_padded_rows)
        p = StepShape("prefill", self.rows - self.decode_rows, self.new_tokens - self.decode_rows,
                      self.kv_tokens_read - self.decode_kv_tokens, self.padded_rows - self.decode_padded_rows,
                      self.padded_tokens - self.decode_padded_rows)
        return d, p


def step_shape(out) -> StepShape:
    """The shape of a SchedulerOutput. Call it before the engine counts the step's tokens (num_computed is still the
    rows' start)."""
    B = out.bucket[0]
    D = out.decode_bucket
    reads_pages = out.kind != "prefill" or out.has_context  # a fresh prefill attends its new tokens densely
    kv = sum(r.seq.num_computed + r.num_new_tokens for r in out.rows) if reads_pages else 0
    decode_kv = sum(r.seq.num_computed + 1 for r in out.rows[:out.num_decode])
    return StepShape(kind=out.kind, rows=len(out.rows), new_tokens=sum(r.num_new_tokens for r in out.rows),
                     kv_tokens_read=kv, padded_rows=D + B, padded_tokens=out.num_slots, decode_rows=out.num_decode,
                     decode_padded_rows=D, decode_kv_tokens=decode_kv if D else 0)


@dataclasses.dataclass(frozen=True)
class StepSample:
    """A measured step, or the mean of `steps` consecutive steps of one shape (token and KV counts are then means)."""

    kind: str
    rows: int
    new_tokens: float
    kv_tokens_read: float
    padded_rows: int
    padded_tokens: int
    seconds: float
    steps: int = 1
    decode_rows: int = 0          # mixed steps: as in StepShape
    decode_padded_rows: int = 0
    decode_kv_tokens: float = 0

    parts = StepShape.parts

    @classmethod
    def of(cls, shape: StepShape, seconds: float, steps: int = 1) -> "StepSample":
        return cls(kind=shape.kind, rows=shape.rows, new_tokens=shape.new_tokens,
                   kv_tokens_read=shape.kv_tokens_read, padded_rows=shape.padded_rows,
                   padded_tokens=shape.padded_tokens, seconds=seconds, steps=steps, decode_rows=shape.decode_rows,
                   decode_padded_rows=shape.decode_padded_rows, decode_kv_tokens=shape.decode_kv_tokens)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "StepSample":
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class Coefficients:
    base: float = 0.0              # seconds per step
    per_row: float = 0.0           # per sequence in the step (host bookkeeping, sampling)
    per_padded_row: float = 0.0    # per row of the bucket, B
    per_token: float = 0.0         # per new token computed
    per_padded_token: float = 0.0  # per token slot of the bucket, B * Q
    per_kv_token: float = 0.0      # per KV token read from pages

    def __post_init__(self):
        bad = {k: v for k, v in dataclasses.asdict(self).items() if not (v >= 0 and np.isfinite(v))}
        if bad:
            raise ValueError(f"step-time coefficients must be finite and >= 0, got {bad}")


def _features(kind: str, s: StepShape | StepSample) -> list[float]:
    values = {"base": 1.0, "per_row": s.rows, "per_padded_row": s.padded_rows, "per_token": s.new_tokens,
              "per_padded_token": s.padded_tokens, "per_kv_token": s.kv_tokens_read}
    return [float(values[f]) for f in FEATURES[kind]]


def _bucket(s: StepShape | StepSample) -> tuple[str, int, int, bool]:
    """A compiled step: kind, B, B * Q, and whether it reads pages (a prefill with context is its own executable)."""
    return s.kind, int(s.padded_rows), int(s.padded_tokens), s.kv_tokens_read > 0


@dataclasses.dataclass(frozen=True)
class StepTimeModel:
    decode: Coefficients
    prefill: Coefficients
    # (kind, B, B * Q, reads pages) -> scale on the linear model for that bucket (absent: 1.0)
    bucket_scale: dict = dataclasses.field(default_factory=dict, compare=False, hash=False)
    schedule_ahead: float = 0.0  # async scheduling: step N + 1 is scheduled this fraction of step N before N ends

    def __post_init__(self):
        if not 0.0 <= self.schedule_ahead <= 1.0:
            raise ValueError(f"schedule_ahead must be in [0, 1] (a fraction of a step's time), got "
                             f"{self.schedule_ahead}")
    meta: dict = dataclasses.field(default_factory=dict, compare=False, hash=False)  # where it was fitted

    def linear(self, shape: StepShape | StepSample) -> float:
        if shape.kind == "mixed":  # its decode segment and its prefill row, with one step's fixed cost, not two
            d, p = shape.parts()
            return self.linear(d) + self.linear(p) - min(self.decode.base, self.prefill.base)
        c = self.decode if shape.kind == "decode" else self.prefill
        return float(np.dot([getattr(c, f) for f in FEATURES[shape.kind]], _features(shape.kind, shape)))

    def time(self, shape: StepShape | StepSample) -> float:
        """Seconds the engine spends on a step of this shape (from one schedule() to the next)."""
        return self.linear(shape) * self.bucket_scale.get(_bucket(shape), 1.0)

    # ---- fitting
    @classmethod
    def fit(cls, samples: Iterable[StepSample], *, per_bucket: bool = True, schedule_ahead: float = 0.0,
            meta: dict | None = None) -> "StepTimeModel":
        """Non-negative least squares on relative error, each kind on its own samples; every sample counts once
        (a sample that averages many steps is no more certain about the shape's cost than the grid is). Then, with
        `per_bucket`, each measured bucket's scale: the least-squares factor on the linear model's relative error
        over that bucket's samples."""
        samples = list(samples)
        coefs = {}
        for kind in KINDS:
            mine = [s for s in samples if s.kind == kind]
            if not mine:
                raise ValueError(f"no {kind} samples to fit; the profile must run both prefill and decode steps")
            X = np.array([_features(kind, s) for s in mine])
            y = np.array([s.seconds for s in mine])
            if (y <= 0).any():
                raise ValueError(f"{kind} samples must have seconds > 0")
            w = _nnls_relative(X, y)
            coefs[kind] = Coefficients(**dict(zip(FEATURES[kind], map(float, w))))
        model = cls(decode=coefs["decode"], prefill=coefs["prefill"], schedule_ahead=schedule_ahead,
                    meta=dict(meta or {}))
        if not per_bucket:
            return model
        groups: dict = {}
        for s in samples:
            groups.setdefault(_bucket(s), []).append(model.linear(s) / s.seconds)
        scale = {}
        for key, r in sorted(groups.items()):
            r = np.asarray(r)  # predicted / measured; argmin_k sum((k r - 1)^2) = sum(r) / sum(r^2)
            if (r > 0).all():
                scale[key] = float(r.sum() / (r * r).sum())
        return dataclasses.replace(model, bucket_scale=scale)

    def errors(self, samples: Iterable[StepSample]) -> dict:
        """Relative errors (predicted / measured - 1) per kind: mean of |err|, the largest |err|, and the count."""
        out = {}
        for kind in KINDS:
            err = [self.time(s) / s.seconds - 1 for s in samples if s.kind == kind]  # type: ignore[arg-type]
            if err:
                a = np.abs(err)
                out[kind] = {"mean_abs_rel_err": float(a.mean()), "max_abs_rel_err": float(a.max()),
                             "samples": len(err)}
        return out

    # ---- files
    def to_dict(self) -> dict:
        return {"format": FORMAT, "decode": dataclasses.asdict(self.decode),
                "prefill": dataclasses.asdict(self.prefill),
                "bucket_scale": [{"kind": k, "padded_rows": b, "padded_tokens": t, "reads_pages": r, "scale": v}
                                 for (k, b, t, r), v in sorted(self.bucket_scale.items())],
                "schedule_ahead": self.schedule_ahead, "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict) -> "StepTimeModel":
        if "step_model" in d.get("config", {}):  # a step-profile result file holds its model under config
            d = d["config"]["step_model"]
        if d.get("format") != FORMAT:
            raise ValueError(f"not a step-time model (format {d.get('format')!r}, expected {FORMAT!r})")
        scale = {(e["kind"], int(e["padded_rows"]), int(e["padded_tokens"]), bool(e["reads_pages"])): float(e["scale"])
                 for e in d.get("bucket_scale", [])}
        return cls(decode=Coefficients(**d["decode"]), prefill=Coefficients(**d["prefill"]), bucket_scale=scale,
                   schedule_ahead=float(d.get("schedule_ahead", 0.0)), meta=dict(d.get("meta", {})))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "StepTimeModel":
        """A model JSON, or a step-profile result file (benchmarks/results/step-profile-*.json)."""
        return cls.from_dict(json.loads(Path(path).read_text()))


# An estimate for Qwen2-7B bf16 on one H100, from ../shared/BENCHMARKS.md and benchmarks/NOTES.md (not fitted):
# decode about 8 ms per step at batch 1 (4.7 ms device + host), 0.1 ms more per padded row (14.2 ms at batch 64 and
# 38.2 ms at 256, context 1024), 57,344 KV bytes per token at ~2.6 TB/s; prefill about 21 us per token (8 x 2048
# tokens in 347 ms); async scheduling a step ahead of the device. For notebooks and examples when no fitted model
# is at hand; fit one (benchmarks/step_profile.py) for anything you report.
QWEN2_7B_H100_ESTIMATE = StepTimeModel(
    decode=Coefficients(base=8.0e-3, per_row=2.0e-5, per_padded_row=1.0e-4, per_kv_token=2.2e-8),
    prefill=Coefficients(base=8.0e-3, per_row=5.0e-5, per_padded_token=2.1e-5, per_kv_token=2.2e-8),
    schedule_ahead=1.0,  # async scheduling, device-bound
    meta={"source": "estimate from BENCHMARKS.md figures (Qwen2-7B, H100); not fitted"})


def _nnls_relative(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """argmin_w>=0 sum(((X w - y) / y)^2), exactly, by trying every subset of columns (there are at most five).

    Columns are scaled to unit maximum first (token counts reach 1e5, the base column is 1). Among subsets with
    non-negative solutions the smallest residual wins; a subset must beat the smaller ones by more than rounding,
    so collinear columns (rows == padded rows when every bucket was full) leave the extra one at 0.
    """
    A = X / y[:, None]
    b = np.ones_like(y)
    scale = np.abs(A).max(axis=0)
    scale[scale == 0] = 1.0
    A = A / scale
    k = A.shape[1]
    best_w, best_r = np.zeros(k), float(b @ b)
    for size in range(1, k + 1):
        for cols in itertools.combinations(range(k), size):
            sub = A[:, cols]
            w, *_ = np.linalg.lstsq(sub, b, rcond=None)
            if (w < 0).any():
                continue
            r = float(np.sum((sub @ w - b) ** 2))
            if r < best_r * (1 - 1e-9) - 1e-15:
                best_r = r
                best_w = np.zeros(k)
                best_w[list(cols)] = w
    return best_w / scale
