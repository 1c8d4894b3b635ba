"""Cumulative per (route, cohort) aggregates, updated once per batch of completed traces.

Counters and histograms (CONTRACT §6, streaming part): they only grow while the process runs
and are meant for ``sum``/``rate``/``histogram_quantile`` across sidecars. Updates are columnar:
one polars group-by and one ``numpy.searchsorted`` per batch, not per trace.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import polars as pl

from .assembly import CompletedTraces
from .cohorts import CohortLimiter

# Agents run for minutes: the duration buckets reach 30 min. Few enough buckets that 1,000 cohort
# series stay a cheap scrape (each bucket is a line per series).
DURATION_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1200, 1800)
STEPS_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 30, 50, 100)
COST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

ROUTES = ("baseline", "candidate")


def route_label(route: str | None) -> str:
    """Only baseline and candidate are compared; other route values share one series."""
    return route if route in ROUTES else "other"


@dataclass
class Histogram:
    bounds: tuple[float, ...]
    counts: np.ndarray = None       # per bucket (not cumulative), last one is +Inf
    total: float = 0.0
    exemplars: list = None          # per bucket: (trace_id, value, unix time) or None

    def __post_init__(self):
        self.counts = np.zeros(len(self.bounds) + 1, dtype=np.int64)
        self.exemplars = [None] * (len(self.bounds) + 1)

    def add(self, values: np.ndarray, trace_ids: list[str] | None, ts: float) -> None:
        idx = np.searchsorted(np.asarray(self.bounds), values, side="left")   # value <= bound ("le")
        self.counts += np.bincount(idx, minlength=len(self.counts))
        self.total += float(values.sum())
        if trace_ids is not None:
            for i, b in enumerate(idx):             # the last trace of each bucket is its exemplar
                self.exemplars[b] = (trace_ids[i], float(values[i]), ts)


@dataclass
class Series:
    traces: int = 0
    refusals: int = 0
    escalations: int = 0
    duration: Histogram = field(default_factory=lambda: Histogram(DURATION_BUCKETS))
    steps: Histogram = field(default_factory=lambda: Histogram(STEPS_BUCKETS))
    cost: Histogram = field(default_factory=lambda: Histogram(COST_BUCKETS))
    last_seen: float = 0.0


class StreamingAggregates:
    """The sink of TraceAssembler; read by the Prometheus exporter through ``snapshot``."""

    def __init__(self, limiter: CohortLimiter, now: Callable[[], float] = time.time):
        self.limiter = limiter
        self.labels = limiter.labels
        self.now = now
        self.series: dict[tuple, Series] = {}
        self.evals: dict[tuple, int] = {}           # (series key, eval, result) -> count
        self.tokens: dict[tuple, int] = {}          # (route, model, type) -> count
        self.cost_total: dict[tuple, float] = {}    # (route, model) -> USD
        self._lock = threading.Lock()

    def __call__(self, done: CompletedTraces) -> None:
        self.add(done)

    def add(self, done: CompletedTraces) -> None:
        t = done.traces
        if t.height == 0:
            return
        keys = {"route": [route_label(r) for r in t["route"].to_list()]}
        for label in self.labels:
            keys[label] = self.limiter.map(label, t[label].fill_null("unknown").to_list())
        frame = pl.DataFrame({
            **keys,
            "trace_id": t["trace_id"], "duration": t["duration_seconds"].fill_null(0.0).cast(pl.Float64),
            "steps": t["steps"].cast(pl.Float64), "cost": t["cost_usd"].cast(pl.Float64),
            "refused": t["refused"].fill_null(False), "escalated": t["escalated"].fill_null(False),
        })
        group_cols = ["route", *self.labels]
        now = self.now()
        with self._lock:
            for key, g in frame.group_by(group_cols, maintain_order=True):
                s = self.series.get(key)
                if s is None:
                    s = self.series[key] = Series()
                s.last_seen = now
                s.traces += g.height
                s.refusals += int(g["refused"].sum())
                s.escalations += int(g["escalated"].sum())
                ids = g["trace_id"].to_list()
                s.duration.add(g["duration"].to_numpy(), ids, now)
                s.steps.add(g["steps"].to_numpy(), None, now)
                cost = g.filter(pl.col("cost").is_not_null())
                if cost.height:
                    s.cost.add(cost["cost"].to_numpy(), None, now)
            if done.evals.height:
                series_of = dict(zip(frame["trace_id"].to_list(), frame.select(group_cols).rows()))
                for tid, name, passed, n in done.evals.iter_rows():
                    key = series_of.get(tid)
                    if key is None or name is None:
                        continue
                    result = "fail" if passed is False else "pass"
                    k = (key, name, result)
                    self.evals[k] = self.evals.get(k, 0) + int(n)
            if done.models is not None and done.models.height:
                route_of = dict(zip(frame["trace_id"].to_list(), frame["route"].to_list()))
                for tid, model, prompt, completion, cost in done.models.iter_rows():
                    route = route_of.get(tid)
                    if route is None:
                        continue
                    model = model or "unknown"
                    if prompt is not None:
                        self.tokens[(route, model, "prompt")] = self.tokens.get((route, model, "prompt"), 0) + int(prompt)
                    if completion is not None:
                        k = (route, model, "completion")
                        self.tokens[k] = self.tokens.get(k, 0) + int(completion)
                    if cost is not None:
                        self.cost_total[(route, model)] = self.cost_total.get((route, model), 0.0) + float(cost)

    def forget_stale(self, older_than_s: float) -> int:
        """Remove series (and their eval counters) unseen for ``older_than_s``."""
        cutoff = self.now() - older_than_s
        with self._lock:
            stale = {k for k, s in self.series.items() if s.last_seen < cutoff}
            for k in stale:
                del self.series[k]
            for k in [k for k in self.evals if k[0] in stale]:
                del self.evals[k]
        return len(stale)

    def snapshot(self):
        """A consistent copy for one scrape (numpy arrays copied, small dicts copied)."""
        with self._lock:
            series = {k: (s.traces, s.refusals, s.escalations,
                          *((h.counts.copy(), h.total, list(h.exemplars)) for h in (s.duration, s.steps, s.cost)))
                      for k, s in self.series.items()}
            return series, dict(self.evals), dict(self.tokens), dict(self.cost_total)
