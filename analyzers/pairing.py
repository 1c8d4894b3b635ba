"""Streaming shadow pairs: mergeable sufficient statistics per rule and cohort, as counters.

Each completed trace with a ``shadow.request_id`` waits here for the other route's trace of the
same request. A matched pair adds to n, Σb, Σc, Σb², Σc², Σbc of every mean/rate rule, on all
traffic and on each cohort value; a trace whose partner does not come within ``gate.pairing_window``
is counted as unmatched (a candidate that crashed or timed out never produces its trace).

The sums only grow, so they are Prometheus counters: summed over a fleet of sidecars they give the
same paired estimates the gate computes (analyzers/compare.py documents the formulas).
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Callable

import polars as pl

from .assembly import CompletedTraces
from .cohorts import CohortLimiter
from .compare import ANY_VALUE, PAIR_STATUSES, measure_column
from .rules import GateSettings

STATS = ("n", "sb", "sc", "sbb", "scc", "sbc")
# shadowlens_pairs_total{status}: the gate's statuses, and the pair units that could not be paired for
# sure (analyzers/units.py: a parent with several calls on one side), counted here only
PAIR_COUNTS = (*PAIR_STATUSES, "ambiguous")
# the names exposed in shadowlens_compare_stat_total{stat}
STAT_NAMES = {"n": "pairs", "sb": "sum_baseline", "sc": "sum_candidate", "sbb": "sumsq_baseline",
              "scc": "sumsq_candidate", "sbc": "sum_product"}


def completed_frame(done: CompletedTraces, settings: GateSettings, labels) -> pl.DataFrame:
    """Completed traces → trace-frame rows (the columns analyzers/compare.py reads)."""
    t = done.traces
    cols = [pl.col("route"), pl.col("request_id"), pl.col("trace_id"),
            *[pl.col(label).fill_null("unknown") for label in labels],
            pl.col("duration_seconds").cast(pl.Float64).alias("duration"), pl.col("cost_usd").cast(pl.Float64).alias("cost"),
            pl.col("steps").cast(pl.Float64).alias("steps"),
            (pl.col("input_tokens") + pl.col("output_tokens")).cast(pl.Float64).alias("tokens"),
            pl.col("refused").cast(pl.Float64).alias("refused"), pl.col("escalated").cast(pl.Float64).alias("escalated")]
    frame = t.select(cols)
    for name in settings.eval_names:
        ev = done.evals.filter(pl.col("name") == name).group_by("trace_id").agg(
            pl.col("passed").drop_nulls().all().cast(pl.Float64).alias(f"eval_pass:{name}"),
            pl.col("passed").drop_nulls().len().alias("_n"))
        ev = ev.filter(pl.col("_n") > 0).drop("_n").with_columns(
            (1.0 - pl.col(f"eval_pass:{name}")).alias(f"eval_fail:{name}"))
        frame = frame.join(ev, on="trace_id", how="left")
    return frame


def pair(frame: pl.DataFrame, pairing_window_s: float) -> tuple[pl.DataFrame, dict]:
    """Baseline and candidate traces of one request id whose starts lie within the pairing window
    (polars; the gate itself pairs in SQL, see stats_sql). Returns the pairs (candidate columns
    suffixed ``_c``) and the counts per PAIR_STATUSES."""
    keyed = frame.filter(pl.col("request_id").is_not_null())
    b = keyed.filter(pl.col("route") == "baseline").unique("request_id", keep="first", maintain_order=False)
    c = keyed.filter(pl.col("route") == "candidate").unique("request_id", keep="first", maintain_order=False)
    pairs = b.join(c, on="request_id", how="inner", suffix="_c").filter(
        (pl.col("start_s") - pl.col("start_s_c")).abs() <= pairing_window_s)
    counts = {"matched": pairs.height, "unmatched_baseline": b.height - pairs.height,
              "unmatched_candidate": c.height - pairs.height}
    return pairs, counts


def paired_sums(col: str) -> list[pl.Expr]:
    """n, Σb, Σc, Σb², Σc², Σbc of one measure over pairs (polars; used by the streaming counters)."""
    ok = pl.col(col).is_not_null() & pl.col(col + "_c").is_not_null()
    b, c = pl.when(ok).then(pl.col(col)), pl.when(ok).then(pl.col(col + "_c"))
    return [ok.sum().alias(f"{col}|n"), b.sum().alias(f"{col}|sb"), c.sum().alias(f"{col}|sc"),
            (b * b).sum().alias(f"{col}|sbb"), (c * c).sum().alias(f"{col}|scc"), (b * c).sum().alias(f"{col}|sbc")]


class PairingSink:
    """A sink of the TraceAssembler: pairs traces by request id and keeps the mergeable counters."""

    def __init__(self, settings: GateSettings, limiter: CohortLimiter, max_pending: int = 500_000,
                 now: Callable[[], float] = time.time):
        self.settings = settings
        self.limiter = limiter
        self.labels = limiter.labels
        self.max_pending = max_pending
        self.now = now
        self.rules = [r for r in settings.rules if r.quantile is None]
        self.columns = sorted({measure_column(r) for r in self.rules})
        self.pairs = Counter(dict.fromkeys(PAIR_COUNTS, 0))
        # (rule, cohort values tuple) -> {stat: value}
        self.stats: dict[tuple, dict[str, float]] = {}
        self._pending: pl.DataFrame | None = None      # traces waiting for their partner, + "_arrived"
        self._lock = threading.Lock()

    def __call__(self, done: CompletedTraces) -> None:
        """Columnar: the batch joins the waiting traces by request id; what pairs is summed, the rest waits."""
        if done.ambiguous:
            with self._lock:
                self.pairs["ambiguous"] += done.ambiguous
        if done.traces.height == 0:
            return
        frame = completed_frame(done, self.settings, self.labels).drop("trace_id")
        frame = frame.filter(pl.col("request_id").is_not_null() & pl.col("route").is_in(["baseline", "candidate"]))
        if frame.height == 0:
            return
        now = self.now()
        frame = frame.with_columns(pl.lit(now).alias("_arrived"))
        with self._lock:
            pool = frame if self._pending is None else pl.concat([self._pending, frame], how="diagonal_relaxed")
            # a second trace of one request on the same route keeps the first (waiting) one
            pool = pool.unique(["request_id", "route"], keep="first", maintain_order=True)
            b = pool.filter(pl.col("route") == "baseline")
            c = pool.filter(pl.col("route") == "candidate")
            pairs = b.join(c, on="request_id", how="inner", suffix="_c")
            self._pending = pool.filter(~pl.col("request_id").is_in(pairs["request_id"].implode()))
            self._expire(now)
            self.pairs["matched"] += pairs.height
        if pairs.height:
            self._add(pairs)

    def _expire(self, now: float) -> None:
        """Traces whose partner did not come within the pairing window (or beyond max_pending) are unmatched."""
        if self._pending is None or self._pending.height == 0:
            return
        keep = pl.col("_arrived") >= now - self.settings.pairing_window_s
        if self._pending.height > self.max_pending:     # the oldest go first
            keep = keep & (pl.int_range(pl.len()) >= self._pending.height - self.max_pending)
        gone = self._pending.filter(~keep)
        for route, n in gone.group_by("route").len().iter_rows():
            self.pairs[f"unmatched_{route}"] += n
        self._pending = self._pending.filter(keep)

    def _add(self, pairs: pl.DataFrame) -> None:
        labels = self.labels
        mapped = {label: self.limiter.map(label, pairs[label].to_list(), count=False) for label in labels}
        pairs = pairs.with_columns([pl.Series(label, mapped[label]) for label in labels])
        aggs = [e for col in self.columns for e in paired_sums(col)]
        # one pass over the pairs per combination of cohort values; every sum is additive, so all
        # traffic and each label's values are summed from those few rows (not 1 + len(labels) passes)
        fine = pairs.group_by(labels).agg(aggs) if labels else pairs.select(aggs)
        sums = pl.exclude(labels).sum()
        updates = []
        for label in (None, *labels):
            out = fine.group_by(label).agg(sums) if label else fine.select(sums)
            for row in out.iter_rows(named=True):
                key = tuple(row[label] if lab == label else ANY_VALUE for lab in labels)
                for rule in self.rules:
                    col = measure_column(rule)
                    updates.append(((rule.name, key), {s: row[f"{col}|{s}"] or 0 for s in STATS}))
        with self._lock:
            for key, add in updates:
                acc = self.stats.setdefault(key, dict.fromkeys(STATS, 0))
                for s, v in add.items():
                    acc[s] += v

    def snapshot(self) -> tuple[dict, dict]:
        with self._lock:
            now = self.now()
            self._expire(now)
            return dict(self.pairs), {k: dict(v) for k, v in self.stats.items()}
