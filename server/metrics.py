"""Prometheus metrics of one app, in a private registry, under vLLM's metric names so its dashboards work.

Engine state (running / waiting sequences, KV cache usage, preemptions, prefix cache queries and hits in tokens, and
speculative decoding's drafts, draft tokens and accepted tokens, in all and by position) is read from the engine at
scrape time.
Per-request figures are counted by the app as its requests progress: prompt tokens once a request's prompt has been
processed (its first token exists), generated tokens as they arrive, and time to first token, inter-token latency
(from the engine's step times) and end-to-end latency, all measured from the request's arrival at the server.
"""

from __future__ import annotations

import bisect

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.samples import Sample

from qwenjax.outputs import RequestOutput

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
               0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0)


class _EngineCollector:
    """Engine gauges and counters. Data parallel (an engine view with `replica_views`): one series per replica
    labelled engine="i" (vLLM's label) and, under the same name without the label, their sum."""

    def __init__(self, engine, model_name: str):
        self.engine = engine  # the LLMEngine (or its view); only counters and queue lengths are read
        self.model_name = model_name

    def collect(self):
        e = self.engine
        views = e.replica_views() if hasattr(e, "replica_views") else []
        for kind, name, doc, read in _ENGINE_SERIES:
            fam = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(name, doc,
                                                                                 labels=["model_name", "engine"])
            value_name = fam.name + ("_total" if kind == "counter" else "")
            fam.samples.append(Sample(value_name, {"model_name": self.model_name}, read(e)))
            for index, view in views:
                fam.add_metric([self.model_name, str(index)], read(view))
            yield fam
        yield from self._spec_decode(e.stats)

    def _spec_decode(self, st):
        """Speculative decoding's counters (vLLM's names), when the engine speculates (k positions a row)."""
        per_pos = getattr(st, "spec_decode_num_accepted_tokens_per_pos", None)
        if not per_pos:
            return
        for name, doc, value in (
                ("vllm:spec_decode_num_drafts", "Rows that verified proposed tokens.", st.spec_decode_num_drafts),
                ("vllm:spec_decode_num_draft_tokens", "Proposed tokens verified.", st.spec_decode_num_draft_tokens),
                ("vllm:spec_decode_num_accepted_tokens", "Proposed tokens accepted.",
                 st.spec_decode_num_accepted_tokens)):
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric([self.model_name], value)
            yield c
        c = CounterMetricFamily("vllm:spec_decode_num_accepted_tokens_per_pos",
                                "Proposed tokens accepted, by their position among a row's proposals.",
                                labels=["model_name", "position"])
        for i, n in enumerate(per_pos):
            c.add_metric([self.model_name, str(i)], n)
        yield c


_ENGINE_SERIES = (
    ("gauge", "vllm:num_requests_running", "Sequences in the running batch.", lambda e: e.num_running),
    ("gauge", "vllm:num_requests_waiting", "Sequences waiting to be scheduled.", lambda e: e.num_waiting),
    ("gauge", "vllm:kv_cache_usage_perc", "Fraction of KV cache pages in use (1 = all).", lambda e: e.blocks.usage),
    ("counter", "vllm:num_preemptions", "Sequences preempted (their pages taken back).",
     lambda e: e.stats.preemptions),
    ("counter", "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
     lambda e: e.blocks.query_tokens),
    ("counter", "vllm:prefix_cache_hits", "Of those, tokens found cached (not computed).",
     lambda e: e.blocks.hit_tokens),
)


class _Histogram:
    """A histogram observed from one thread (the app's event loop): a few hundred nanoseconds per observation,
    against a few microseconds for prometheus_client's locked one, since ITL is observed once per token."""

    def __init__(self, name: str, doc: str, buckets: tuple[float, ...]):
        self.name, self.doc, self.buckets = name, doc, tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def family(self, labels: list[str]) -> HistogramMetricFamily:
        f = HistogramMetricFamily(self.name, self.doc, labels=["model_name"])
        cum, rows = 0, []
        for le, n in zip([*map(str, self.buckets), "+Inf"], self.counts):
            cum += n
            rows.append((le, cum))
        f.add_metric(labels, rows, self.sum)
        return f


class _HistogramCollector:
    def __init__(self, histograms: list[_Histogram], model_name: str):
        self.histograms, self.labels = histograms, [model_name]

    def collect(self):
        for h in self.histograms:
            yield h.family(self.labels)


class ServerMetrics:
    def __init__(self, engine, model_name: str):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        lab = ["model_name"]
        r = self.registry
        self.ttft = _Histogram("vllm:time_to_first_token_seconds", "Time to first token, from arrival.",
                               TTFT_BUCKETS)
        self.itl = _Histogram("vllm:inter_token_latency_seconds",
                              "Time between consecutive token steps of a request.", ITL_BUCKETS)
        self.e2e = _Histogram("vllm:e2e_request_latency_seconds", "Request latency, arrival to last token.",
                              E2E_BUCKETS)
        r.register(_HistogramCollector([self.ttft, self.itl, self.e2e], model_name))
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed.", lab, registry=r).labels(
            model_name)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated.", lab, registry=r).labels(
            model_name)
        self._success = Counter("vllm:request_success", "Requests finished, by finish reason.",
                                ["model_name", "finished_reason"], registry=r)
        r.register(_EngineCollector(engine, model_name))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def tracker(self, arrival: float, prompt_tokens: int) -> "RequestTracker":
        return RequestTracker(self, arrival, prompt_tokens)


class RequestTracker:
    """Feeds one engine request's progress into the metrics; `update` is called with each output received."""

    def __init__(self, metrics: ServerMetrics, arrival: float, prompt_tokens: int):
        self.m = metrics
        self.arrival = arrival
        self.prompt_tokens = prompt_tokens
        self.tokens = 0
        self.done = False

    def update(self, stream, out: RequestOutput) -> None:
        if self.done:
            return
        m = self.m
        n = sum(len(c.token_ids) for c in out.outputs)
        if n > self.tokens:
            if self.tokens == 0:
                m.prompt_tokens.inc(self.prompt_tokens)
                if stream.first_token_time is not None:
                    m.ttft.observe(max(0.0, stream.first_token_time - self.arrival))
            m.generation_tokens.inc(n - self.tokens)
            self.tokens = n
        for gap in stream.take_itl():
            m.itl.observe(gap)
        if out.finished:
            self.done = True
            if stream.finished_time is not None:
                m.e2e.observe(max(0.0, stream.finished_time - self.arrival))
            m._success.labels(m.model_name, out.outputs[0].finish_reason or "abort").inc()

    def abort(self) -> None:
        """The client left before the request finished."""
        if not self.done:
            self.done = True
            self.m._success.labels(self.m.model_name, "abort").inc()
