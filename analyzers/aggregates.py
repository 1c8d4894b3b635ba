"""Cumulative per (route, cohort) aggregates, updated once per batch of completed traces.

Counters and histograms (CONTRACT §6, streaming part): they only grow while the process runs
and are meant for ``sum``/``rate``/``histogram_quantile`` across sidecars. Updates are columnar:
a few numpy passes per batch for all series at once (``bucket_by_group``), not per trace or series.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import polars as pl

from .assembly import CompletedTraces
from .cohorts import OVERFLOW, CohortLimiter

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

    def merge(self, counts: np.ndarray, total: float, exemplars: dict) -> None:
        """Adds per-bucket ``counts`` (not cumulative), their sum of values, and {bucket: exemplar}."""
        self.counts += counts
        self.total += total
        for b, ex in exemplars.items():
            self.exemplars[b] = ex


def bucket_by_group(bounds, gid: np.ndarray, groups: int, values: np.ndarray, trace_ids: list[str] | None,
                    ts: float) -> tuple[np.ndarray, np.ndarray, dict]:
    """Histogram updates for many groups at once: ``values[i]`` belongs to group ``gid[i]``.

    Returns per-bucket counts (groups x buckets, the last bucket +Inf), the sum of values per group,
    and with ``trace_ids`` the exemplars {group: {bucket: (trace_id, value, ts)}}: the last trace of
    each bucket, as a histogram that saw the values one by one would keep.
    """
    nb = len(bounds) + 1
    idx = np.searchsorted(np.asarray(bounds), values, side="left")      # value <= bound ("le")
    cell = gid * nb + idx
    counts = np.bincount(cell, minlength=groups * nb).reshape(groups, nb)
    totals = np.bincount(gid, weights=values, minlength=groups)
    exemplars: dict[int, dict] = {}
    if trace_ids is not None and len(cell):
        cells, first_from_end = np.unique(cell[::-1], return_index=True)
        for c, pos in zip(cells.tolist(), (len(cell) - 1 - first_from_end).tolist()):
            exemplars.setdefault(c // nb, {})[c % nb] = (trace_ids[pos], float(values[pos]), ts)
    return counts, totals, exemplars


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

    def __init__(self, limiter: CohortLimiter, now: Callable[[], float] = time.time, max_series: int = 100,
                 max_models: int = 50, max_evals: int = 10):
        self.limiter = limiter
        self.labels = limiter.labels
        self.now = now
        # the other client-set labels, capped like a cohort label (analyzers/cohorts.py)
        forget = limiter.forget_after_s
        self.combos = CohortLimiter(("series",), max_series, forget, limiter.now)
        self.models = CohortLimiter(("model",), max_models, forget, limiter.now)
        self.eval_names = CohortLimiter(("eval",), max_evals, forget, limiter.now)
        self.series: dict[tuple, Series] = {}
        self.evals: dict[tuple, int] = {}           # (series key, eval, result) -> count
        self.tokens: dict[tuple, int] = {}          # (route, model, type) -> count
        self.cost_total: dict[tuple, float] = {}    # (route, model) -> USD
        self._seen: dict[tuple[str, str], float] = {}  # ("model" | "eval", value) -> last update
        self._lock = threading.Lock()

    @property
    def limiters(self) -> tuple[CohortLimiter, ...]:
        return (self.limiter, self.combos, self.models, self.eval_names)

    def cohort_key(self, combos: list[tuple]) -> list[tuple]:
        """Each trace's cohort values (each label already capped) -> within the cap on combinations: a new
        combination past ``max_series`` becomes __overflow__ in every label."""
        overflow = (OVERFLOW,) * len(self.labels)
        return [overflow if c == OVERFLOW else c for c in self.combos.map("series", combos)]

    def __call__(self, done: CompletedTraces) -> None:
        self.add(done)

    def add(self, done: CompletedTraces) -> None:
        t = done.traces
        if t.height == 0:
            return
        routes, gid, groups = self._groups(t)
        ids = t["trace_id"].to_list()
        now = self.now()
        measures = _measures(t, gid, len(groups), ids, now)
        with self._lock:
            self._merge_series(groups, measures, now)
            # evals and models summed per series / route in polars first: a few rows, not one per trace
            if done.evals.height:
                self._add_evals(done.evals, ids, gid, groups, now)
            if done.models is not None and done.models.height:
                self._add_models(done.models, ids, routes, now)

    def _groups(self, t: pl.DataFrame) -> tuple[list[str], np.ndarray, list[tuple]]:
        """Each trace's route label, its series' group number, and the series keys in group order."""
        routes = [route_label(r) for r in t["route"].to_list()]
        columns = [routes]
        for label in self.labels:
            columns.append(self.limiter.map(label, t[label].fill_null("unknown").to_list()))
        key_rows = [(r, *c) for r, c in zip(routes, self.cohort_key(list(zip(*columns[1:]))))]   # series keys
        index: dict[tuple, int] = {}                       # series key -> group, in order of appearance
        gid = np.fromiter((index.setdefault(k, len(index)) for k in key_rows), dtype=np.int64, count=len(key_rows))
        return routes, gid, list(index)

    def _merge_series(self, groups: list[tuple], measures: tuple, now: float) -> None:
        traces, refusals, escalations, duration, steps, cost = measures
        for g, key in enumerate(groups):
            s = self.series.get(key)
            if s is None:
                s = self.series[key] = Series()
            s.last_seen = now
            s.traces += int(traces[g])
            s.refusals += int(refusals[g])
            s.escalations += int(escalations[g])
            for hist, (counts, totals, exemplars) in ((s.duration, duration), (s.steps, steps), (s.cost, cost)):
                hist.merge(counts[g], float(totals[g]), exemplars.get(g, {}))

    def _add_evals(self, evals: pl.DataFrame, ids: list[str], gid: np.ndarray, groups: list[tuple], now: float) -> None:
        per_series = evals.join(pl.DataFrame({"trace_id": ids, "_g": gid}), on="trace_id").filter(
            pl.col("name").is_not_null()).group_by("_g", "name", pl.col("passed") == False).agg(  # noqa: E712
            pl.col("n").sum())
        names = self.eval_names.map("eval", per_series["name"].to_list(), count=False)
        overflowed = 0
        for (g, _, failed, n), name in zip(per_series.iter_rows(), names):
            k = (groups[g], name, "fail" if failed else "pass")
            self.evals[k] = self.evals.get(k, 0) + int(n)
            self._seen[("eval", name)] = now
            overflowed += int(n) if name == OVERFLOW else 0
        self.eval_names.add_overflow("eval", overflowed)     # eval results

    def _add_models(self, models_frame: pl.DataFrame, ids: list[str], routes: list[str], now: float) -> None:
        per_route = models_frame.join(pl.DataFrame({"trace_id": ids, "_route": routes}), on="trace_id").group_by(
            "_route", pl.col("model").fill_null("unknown")).agg(
            *(e for c in ("input_tokens", "output_tokens", "cost_usd")
              for e in (pl.col(c).sum(), pl.col(c).count().alias(c + "_n"))), pl.len().alias("_rows"))
        models = self.models.map("model", per_route["model"].to_list(), count=False)
        # one a trace and model (the rows of done.models), as cohorts count one a trace
        self.models.add_overflow("model", sum(n for m, n in zip(models, per_route["_rows"].to_list())
                                              if m == OVERFLOW))
        for (route, _, prompt, prompt_n, completion, completion_n, cost, cost_n, _), model in zip(
                per_route.iter_rows(), models):
            self._seen[("model", model)] = now
            if prompt_n:
                self.tokens[(route, model, "prompt")] = self.tokens.get((route, model, "prompt"), 0) + int(prompt)
            if completion_n:
                k = (route, model, "completion")
                self.tokens[k] = self.tokens.get(k, 0) + int(completion)
            if cost_n:
                self.cost_total[(route, model)] = self.cost_total.get((route, model), 0.0) + float(cost)

    def forget_stale(self, older_than_s: float) -> int:
        """Remove series (and their eval counters) unseen for ``older_than_s``, and the counters of models and
        eval names unseen as long (their limiters free the place: a new value may take it)."""
        cutoff = self.now() - older_than_s
        with self._lock:
            stale = {k for k, s in self.series.items() if s.last_seen < cutoff}
            for k in stale:
                del self.series[k]
            gone = {k for k, t in self._seen.items() if t < cutoff}
            for k in gone:
                del self._seen[k]
            for k in [k for k in self.evals if k[0] in stale or ("eval", k[1]) in gone]:
                del self.evals[k]
            for d in (self.tokens, self.cost_total):
                for k in [k for k in d if ("model", k[1]) in gone]:
                    del d[k]
        return len(stale)

    def snapshot(self):
        """A consistent copy for one scrape (numpy arrays copied, small dicts copied)."""
        with self._lock:
            series = {k: (s.traces, s.refusals, s.escalations,
                          *((h.counts.copy(), h.total, list(h.exemplars)) for h in (s.duration, s.steps, s.cost)))
                      for k, s in self.series.items()}
            return series, dict(self.evals), dict(self.tokens), dict(self.cost_total)


def _measures(t: pl.DataFrame, gid: np.ndarray, ngroups: int, ids: list[str], now: float) -> tuple:
    """Per group: traces, refusals, escalations, and the duration, steps and cost histogram updates.
    One numpy pass per measure for all series (a polars group-by per series cost ~0.5 ms each)."""
    traces = np.bincount(gid, minlength=ngroups)
    refusals = np.bincount(gid, weights=t["refused"].fill_null(False).cast(pl.Float64).to_numpy(), minlength=ngroups)
    escalations = np.bincount(gid, weights=t["escalated"].fill_null(False).cast(pl.Float64).to_numpy(), minlength=ngroups)
    duration = bucket_by_group(DURATION_BUCKETS, gid, ngroups,
                               t["duration_seconds"].fill_null(0.0).cast(pl.Float64).to_numpy(), ids, now)
    steps = bucket_by_group(STEPS_BUCKETS, gid, ngroups, t["steps"].cast(pl.Float64).to_numpy(), None, now)
    cost_col = t["cost_usd"].cast(pl.Float64)
    priced = cost_col.is_not_null().to_numpy()
    cost = bucket_by_group(COST_BUCKETS, gid[priced], ngroups, cost_col.drop_nulls().to_numpy(), None, now)
    return traces, refusals, escalations, duration, steps, cost
