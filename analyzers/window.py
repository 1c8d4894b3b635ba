"""Exact statistics over the sliding window (default 15 min), per route and cohort.

Computed by DuckDB over the ``traces`` rows completed in the window, on a refresh interval in
the background; a scrape only reads the last result. Quantiles are exact and interpolated
(``quantile_cont``, numpy's default 'linear' method).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import polars as pl

from collector.store.database import frame

from .aggregates import ROUTES
from .cohorts import OVERFLOW, CohortLimiter
from .periodic import Periodic

QUANTILES = (0.5, 0.9, 0.99)


@dataclass(frozen=True)
class WindowSnapshot:
    traces: pl.DataFrame       # route, <cohorts>, n, p50, p90, p99, steps_mean, cost_mean, refusal_ratio, escalation_ratio
    evals: pl.DataFrame        # route, <cohorts>, eval, fail_ratio
    as_of: float
    seconds: float             # how long the refresh took


def _label_expr(label: str) -> str:
    return (f'CASE WHEN list_contains($allowed_{label}, coalesce("{label}", \'unknown\')) '
            f'THEN coalesce("{label}", \'unknown\') ELSE \'{OVERFLOW}\' END AS "{label}"')


class WindowStats:
    def __init__(self, cursor_factory, limiter: CohortLimiter, window_s: float,
                 now: Callable[[], float] = time.time):
        self.cursor_factory = cursor_factory
        self.limiter = limiter
        self.labels = limiter.labels
        self.window_s = window_s
        self.now = now
        route = f"CASE WHEN route IN {ROUTES!r} THEN route ELSE 'other' END AS route"
        cohort = ", ".join(_label_expr(label) for label in self.labels)
        group = ", ".join(["route", *(f'"{label}"' for label in self.labels)])
        self._sql_traces = f"""
            WITH w AS (SELECT {route}, {cohort}, duration_seconds, steps, cost_usd, refused, escalated
                       FROM traces WHERE completed_at >= make_timestamp($cutoff::BIGINT))
            SELECT {group}, count(*) AS n,
                   quantile_cont(duration_seconds, {list(QUANTILES)}) AS q,
                   avg(steps) AS steps_mean, avg(cost_usd) AS cost_mean,
                   avg(refused::INTEGER) AS refusal_ratio, avg(escalated::INTEGER) AS escalation_ratio
            FROM w GROUP BY ALL"""
        self._sql_evals = f"""
            WITH w AS (SELECT trace_id, {route}, {cohort} FROM traces
                       WHERE completed_at >= make_timestamp($cutoff::BIGINT))
            SELECT {group}, e.name AS eval, avg(CASE WHEN e.passed = false THEN 1.0 ELSE 0.0 END) AS fail_ratio,
                   count(*) AS n
            FROM w JOIN evals e USING (trace_id) WHERE e.name IS NOT NULL GROUP BY ALL"""
        self._distinct = {label: f'SELECT DISTINCT coalesce("{label}", \'unknown\') FROM traces '
                                 f'WHERE completed_at >= make_timestamp($cutoff::BIGINT)' for label in self.labels}

    def refresh(self) -> WindowSnapshot:
        t0 = time.perf_counter()
        now = self.now()
        cutoff = int((now - self.window_s) * 1e6)
        con = self.cursor_factory()
        try:
            params: dict = {"cutoff": cutoff}
            for label in self.labels:
                values = [r[0] for r in con.execute(self._distinct[label], {"cutoff": cutoff}).fetchall()]
                mapped = self.limiter.map(label, values, count=False)
                params[f"allowed_{label}"] = [v for v, m in zip(values, mapped) if m != OVERFLOW]
            traces = frame(con, self._sql_traces, params)
            evals = frame(con, self._sql_evals, params)
        finally:
            con.close()
        return WindowSnapshot(traces, evals, now, time.perf_counter() - t0)


class WindowRefresher(Periodic):
    """Component: refreshes the window on an interval and forgets cohorts unseen for two windows."""
    thread_name = "shadowlens-window"

    def __init__(self, stats: WindowStats, interval_s: float, forget: Callable[[float], object] | None = None):
        self.stats = stats
        self.interval_s = interval_s
        self.forget = forget
        self.latest: WindowSnapshot | None = None

    def refresh_now(self) -> WindowSnapshot:
        snap = self.stats.refresh()
        self.latest = snap
        if self.forget is not None:
            self.forget(2 * self.stats.window_s)
        return snap
