"""Request traces for the simulator and for replays on a real engine: when each request arrives, how long its prompt
and its output are, its priority and its client, and (optionally) a prefix it shares with other requests.

Generators draw from a seeded numpy Generator, one child stream per aspect (arrivals, lengths, priorities, clients,
prefixes), so two traces that differ in one aspect share the others exactly. A trace carries lengths, not tokens;
`Trace.prompt_token_ids(i)` derives each prompt's ids from the trace's seed, the same ids every call, so a replay on
the engine and a simulation see the same prefix-cache hits.

Invariants of a Trace: requests sorted by arrival (seconds from the trace's start, >= 0); prompt_len >= 1,
output_len >= 1; 0 <= prefix_len <= prompt_len, and prefix_len > 0 only with a prefix_id.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Iterator

import numpy as np

# Prompt token ids are drawn below Qwen2's first special token, so a detokenizer sees ordinary tokens.
NUM_REGULAR_TOKENS = 151643


# ----------------------------------------------------------------------------------------------- arrivals


@dataclasses.dataclass(frozen=True)
class Poisson:
    """Poisson arrivals: exponential gaps of mean 1 / rate."""

    rate: float  # requests per second

    def __post_init__(self):
        _positive("Poisson rate", self.rate)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return np.cumsum(rng.exponential(1.0 / self.rate, size=n))


@dataclasses.dataclass(frozen=True)
class Gamma:
    """Gamma-distributed gaps of mean 1 / rate (vLLM's `burstiness`): shape 1 is Poisson, shape < 1 is burstier
    (coefficient of variation 1 / sqrt(shape)), shape > 1 more regular."""

    rate: float
    shape: float

    def __post_init__(self):
        _positive("Gamma rate", self.rate)
        _positive("Gamma shape", self.shape)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return np.cumsum(rng.gamma(self.shape, 1.0 / (self.rate * self.shape), size=n))


@dataclasses.dataclass(frozen=True)
class OnOff:
    """Bursts: Poisson at `rate` for `on_s` seconds, then silence for `off_s` seconds, repeated. The mean rate is
    rate * on_s / (on_s + off_s)."""

    rate: float
    on_s: float
    off_s: float

    def __post_init__(self):
        _positive("OnOff rate", self.rate)
        _positive("OnOff on_s", self.on_s)
        if self.off_s < 0:
            raise ValueError(f"OnOff off_s must be >= 0, got {self.off_s}")

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        on_time = np.cumsum(rng.exponential(1.0 / self.rate, size=n))  # time spent in "on" periods
        return on_time + np.floor(on_time / self.on_s) * self.off_s


# ----------------------------------------------------------------------------------------------- lengths


@dataclasses.dataclass(frozen=True)
class Uniform:
    """Integers uniform in [lo, hi], both included."""

    lo: int
    hi: int

    def __post_init__(self):
        if not 1 <= self.lo <= self.hi:
            raise ValueError(f"Uniform lengths need 1 <= lo <= hi, got lo={self.lo}, hi={self.hi}")

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.integers(self.lo, self.hi + 1, size=n)


@dataclasses.dataclass(frozen=True)
class LogNormal:
    """round(exp(N(log median, sigma))), clipped to [lo, hi]: the long right tail of chat prompts and answers."""

    median: float
    sigma: float
    lo: int = 1
    hi: int | None = None

    def __post_init__(self):
        _positive("LogNormal median", self.median)
        if self.sigma < 0:
            raise ValueError(f"LogNormal sigma must be >= 0, got {self.sigma}")
        if self.lo < 1 or (self.hi is not None and self.hi < self.lo):
            raise ValueError(f"LogNormal needs 1 <= lo <= hi, got lo={self.lo}, hi={self.hi}")

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        x = np.rint(rng.lognormal(math.log(self.median), self.sigma, size=n)).astype(np.int64)
        return np.clip(x, self.lo, self.hi if self.hi is not None else np.iinfo(np.int64).max)


@dataclasses.dataclass(frozen=True)
class Fixed:
    value: int

    def __post_init__(self):
        if self.value < 1:
            raise ValueError(f"Fixed length must be >= 1, got {self.value}")

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return np.full(n, self.value, np.int64)


@dataclasses.dataclass(frozen=True)
class Lengths:
    """Prompt and output lengths drawn independently from two distributions."""

    prompt: Uniform | LogNormal | Fixed
    output: Uniform | LogNormal | Fixed

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        return self.prompt.sample(n, rng), self.output.sample(n, rng)


@dataclasses.dataclass(frozen=True)
class LengthsFromFile:
    """(prompt, output) pairs drawn with replacement from a JSONL file of records such as
    {"prompt_len": 412, "output_len": 96}, keeping each record's pair together (their correlation survives)."""

    path: str
    prompt_field: str = "prompt_len"
    output_field: str = "output_len"

    def pairs(self) -> np.ndarray:
        rows = []
        for lineno, rec in _read_jsonl(self.path):
            try:
                p, o = int(rec[self.prompt_field]), int(rec[self.output_field])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{self.path}:{lineno}: needs integer fields {self.prompt_field!r} and "
                                 f"{self.output_field!r}, got {rec!r}") from None
            if p < 1 or o < 1:
                raise ValueError(f"{self.path}:{lineno}: lengths must be >= 1, got {p}, {o}")
            rows.append((p, o))
        if not rows:
            raise ValueError(f"{self.path}: no records")
        return np.asarray(rows, np.int64)

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        pairs = self.pairs()
        idx = rng.integers(0, len(pairs), size=n)
        return pairs[idx, 0], pairs[idx, 1]


@dataclasses.dataclass(frozen=True)
class SharedPrefix:
    """A `fraction` of requests start with one of `groups` common prefixes of `length` tokens (a system prompt, a
    few-shot header): what the prefix cache serves. A prompt shorter than the prefix takes as much of it as fits."""

    groups: int
    length: int
    fraction: float = 1.0

    def __post_init__(self):
        if self.groups < 1 or self.length < 1 or not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"SharedPrefix needs groups >= 1, length >= 1 and fraction in [0, 1], got {self}")


# ----------------------------------------------------------------------------------------------- the trace


@dataclasses.dataclass(frozen=True)
class TraceRequest:
    arrival: float               # seconds from the trace's start
    prompt_len: int
    output_len: int              # tokens generated (the request runs with ignore_eos and max_tokens = output_len)
    priority: int = 0            # lower runs first under the "priority" policy (vLLM's convention)
    client: str = "client0"      # who sent it, for the "fair" policy
    prefix_id: int | None = None  # requests with the same id share their first prefix_len prompt tokens
    prefix_len: int = 0


@dataclasses.dataclass(frozen=True)
class Trace:
    requests: tuple[TraceRequest, ...]
    name: str = ""
    seed: int = 0  # seed of the prompt token ids

    def __post_init__(self):
        last = 0.0
        for i, r in enumerate(self.requests):
            if not (r.arrival >= last and math.isfinite(r.arrival)):
                raise ValueError(f"trace {self.name!r}: request {i} arrives at {r.arrival}, before the previous one "
                                 f"({last}) or not at a finite time >= 0; requests must be sorted by arrival")
            if r.prompt_len < 1 or r.output_len < 1:
                raise ValueError(f"trace {self.name!r}: request {i} has prompt_len={r.prompt_len}, output_len="
                                 f"{r.output_len}; both must be >= 1")
            if not 0 <= r.prefix_len <= r.prompt_len or (r.prefix_len and r.prefix_id is None):
                raise ValueError(f"trace {self.name!r}: request {i} has prefix_len={r.prefix_len} (prompt_len "
                                 f"{r.prompt_len}, prefix_id {r.prefix_id}); need 0 <= prefix_len <= prompt_len and "
                                 f"a prefix_id when prefix_len > 0")
            last = r.arrival

    def __len__(self) -> int:
        return len(self.requests)

    def __iter__(self) -> Iterator[TraceRequest]:
        return iter(self.requests)

    def __getitem__(self, i: int) -> TraceRequest:
        return self.requests[i]

    def prompt_token_ids(self, i: int, vocab_size: int = NUM_REGULAR_TOKENS) -> list[int]:
        """Request i's prompt: its shared prefix (the same ids for every request of its prefix_id), then its own
        ids. Deterministic in (trace seed, i, prefix_id)."""
        r = self.requests[i]
        hi = min(vocab_size, NUM_REGULAR_TOKENS)
        own = np.random.default_rng([self.seed, 0, i]).integers(0, hi, size=r.prompt_len - r.prefix_len)
        if not r.prefix_len:
            return own.tolist()
        prefix = np.random.default_rng([self.seed, 1, r.prefix_id]).integers(0, hi, size=r.prefix_len)
        return prefix.tolist() + own.tolist()

    def time_scaled(self, factor: float) -> "Trace":
        """The same requests arriving `factor` times faster (factor 2: twice the rate): a load sweep."""
        _positive("time_scaled factor", factor)
        reqs = tuple(dataclasses.replace(r, arrival=r.arrival / factor) for r in self.requests)
        return dataclasses.replace(self, requests=reqs, name=f"{self.name}x{factor:g}")

    def summary(self) -> dict:
        p = np.array([r.prompt_len for r in self.requests])
        o = np.array([r.output_len for r in self.requests])
        dur = self.requests[-1].arrival if self.requests else 0.0
        return {"name": self.name, "num_requests": len(self), "duration_s": dur,
                "rate": len(self) / dur if dur > 0 else None,
                "prompt_len_mean": float(p.mean()) if len(p) else None,
                "output_len_mean": float(o.mean()) if len(o) else None,
                "prompt_tokens": int(p.sum()), "output_tokens": int(o.sum())}

    # ---- files
    def save_jsonl(self, path: str | Path) -> None:
        """One header line {"trace": {"name", "seed"}}, then one request per line."""
        with open(path, "w") as f:
            f.write(json.dumps({"trace": {"name": self.name, "seed": self.seed, "format": 1}}) + "\n")
            for r in self.requests:
                f.write(json.dumps(dataclasses.asdict(r)) + "\n")

    @classmethod
    def load_jsonl(cls, path: str | Path, *, name: str | None = None, seed: int | None = None) -> "Trace":
        """Reads save_jsonl's format; the header is optional (records alone need arrival, prompt_len, output_len)."""
        header, reqs = {}, []
        fields = {f.name for f in dataclasses.fields(TraceRequest)}
        for lineno, rec in _read_jsonl(path):
            if "trace" in rec:
                header = rec["trace"]
                continue
            unknown = set(rec) - fields
            if unknown or not {"arrival", "prompt_len", "output_len"} <= set(rec):
                raise ValueError(f"{path}:{lineno}: a request needs arrival, prompt_len and output_len (and may have "
                                 f"{sorted(fields - {'arrival', 'prompt_len', 'output_len'})}); got {sorted(rec)}")
            reqs.append(TraceRequest(**rec))
        return cls(tuple(reqs), name=name if name is not None else header.get("name", Path(path).stem),
                   seed=seed if seed is not None else int(header.get("seed", 0)))


def make_trace(n: int, arrivals: Poisson | Gamma | OnOff, lengths: Lengths | LengthsFromFile, *, seed: int = 0,
               priorities: dict[int, float] | None = None, clients: dict[str, float] | int | None = None,
               shared_prefix: SharedPrefix | None = None, name: str = "") -> Trace:
    """`n` requests. `priorities` / `clients`: each request's priority / client drawn with these weights (an int
    `clients` is that many equally likely clients "client0", "client1", ...); default priority 0, one client."""
    if n < 1:
        raise ValueError(f"a trace needs at least 1 request, got n={n}")
    ra, rl, rp, rc, rx = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(5))
    times = arrivals.sample(n, ra)
    plen, olen = lengths.sample(n, rl)
    prio = _choose(priorities or {0: 1.0}, n, rp)
    if isinstance(clients, int):
        clients = {f"client{i}": 1.0 for i in range(clients)}
    who = _choose(clients or {"client0": 1.0}, n, rc)
    pid: list[int | None] = [None] * n
    plens = [0] * n
    if shared_prefix is not None:
        shared = rx.random(n) < shared_prefix.fraction
        group = rx.integers(0, shared_prefix.groups, size=n)
        for i in np.flatnonzero(shared):
            pid[i], plens[i] = int(group[i]), min(shared_prefix.length, int(plen[i]))
    reqs = tuple(TraceRequest(arrival=float(times[i]), prompt_len=int(plen[i]), output_len=int(olen[i]),
                              priority=int(prio[i]), client=str(who[i]), prefix_id=pid[i], prefix_len=plens[i])
                 for i in range(n))
    return Trace(reqs, name=name, seed=seed)


def _choose(weights: dict, n: int, rng: np.random.Generator) -> list:
    keys = list(weights)
    w = np.asarray([weights[k] for k in keys], np.float64)
    if len(keys) == 0 or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {weights}")
    return [keys[i] for i in rng.choice(len(keys), size=n, p=w / w.sum())]


def _positive(what: str, x: float) -> None:
    if not (x > 0 and math.isfinite(x)):
        raise ValueError(f"{what} must be a finite number > 0, got {x}")


def _read_jsonl(path: str | Path):
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not JSON ({e.msg})") from None
