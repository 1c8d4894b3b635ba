"""The release gate over the store: the window's traces → sufficient statistics → judge → Verdict.

One SQL statement reads the window's baseline and candidate traces, pairs them and aggregates them
per rule and cohort (analyzers/compare.py); only a few hundred rows come back to Python. ``serve``
recomputes the verdict every ``gate.refresh`` in the background (GateRefresher) so ``/gate`` and the
verdict metrics never wait on DuckDB; ``shadowlens gate --data-dir`` and ``report`` run the same
statement through store/reader.py.
"""
from __future__ import annotations

import time
from typing import Callable

import pyarrow as pa

from .compare import Verdict, judge, route_summary_sql, statistics
from .compare import sql_ident as _q
from .compare import sql_literal as _lit
from .evidence import with_evidence
from .periodic import Periodic
from .rules import GateSettings


def trace_frame_sql(settings: GateSettings, labels, now: float) -> str:
    """The window's traces as a trace frame (analyzers/compare.py's columns), read from ``traces`` alone:
    eval outcomes come from its eval_names / failed_evals lists, not from a join with ``evals``."""
    since_us = int((now - settings.window_s) * 1e6)
    cohort = "".join(f", t.{_q(label)}" for label in labels)
    evals = "".join(
        f", CASE WHEN list_contains(t.eval_names, {_lit(n)}) THEN (NOT list_contains(t.failed_evals, {_lit(n)}))::DOUBLE"
        f" END AS {_q('eval_pass:' + n)}, CASE WHEN list_contains(t.eval_names, {_lit(n)})"
        f" THEN list_contains(t.failed_evals, {_lit(n)})::DOUBLE END AS {_q('eval_fail:' + n)}"
        for n in settings.eval_names)
    return (
        f"SELECT t.trace_id, t.route, t.request_id, epoch_us(t.start_time) / 1e6 AS start_s{cohort},"
        " t.duration_seconds AS duration, t.cost_usd AS cost, CAST(t.steps AS DOUBLE) AS steps,"
        " CAST(t.input_tokens + t.output_tokens AS DOUBLE) AS tokens, CAST(t.refused AS DOUBLE) AS refused,"
        f" CAST(t.escalated AS DOUBLE) AS escalated{evals}"
        f" FROM traces t WHERE t.route IN ('baseline', 'candidate') AND t.start_time >= make_timestamp({since_us})"
    )


def evaluate(run_sql: Callable[[str], pa.Table], settings: GateSettings, labels, now: float | None = None) -> Verdict:
    """Judge the window's traces; ``run_sql`` is a store cursor or the query socket (store/reader.py)."""
    now = time.time() if now is None else now
    source = f"({trace_frame_sql(settings, labels, now)}) AS t"
    return judge(statistics(run_sql, settings, labels, source), settings, now)


def evaluate_with_evidence(run_sql: Callable[[str], pa.Table], settings: GateSettings, labels,
                           now: float | None = None, trace_url: str | None = None) -> Verdict:
    """evaluate(), then example pairs and attribution for the failing results (analyzers/evidence.py)."""
    now = time.time() if now is None else now
    verdict = evaluate(run_sql, settings, labels, now)
    return with_evidence(verdict, run_sql, settings, labels, trace_frame_sql(settings, labels, now), trace_url)


def route_summary(run_sql: Callable[[str], pa.Table], settings: GateSettings, labels, now: float) -> list[dict]:
    """The report's per-cohort, per-route figures over the same window."""
    source = f"({trace_frame_sql(settings, labels, now)}) AS t"
    return run_sql(route_summary_sql(labels, settings.eval_names, source)).to_pylist()


class GateRefresher(Periodic):
    """Component: recomputes the verdict every ``gate.refresh``; readers take ``latest`` (one reference swap)."""
    thread_name = "shadowlens-gate"

    def __init__(self, cursor_factory, settings: GateSettings, labels, now: Callable[[], float] = time.time,
                 trace_url: str | None = None):
        self.cursor_factory = cursor_factory
        self.trace_url = trace_url
        self.settings = settings
        self.interval_s = settings.refresh_s
        self.labels = tuple(labels)
        self.now = now
        self.latest: Verdict | None = None
        self.last_seconds = 0.0

    def refresh_now(self) -> Verdict:
        started = time.perf_counter()
        cur = self.cursor_factory()
        try:
            verdict = evaluate_with_evidence(lambda sql: cur.sql(sql).to_arrow_table(), self.settings, self.labels,
                                             self.now(), self.trace_url)
        finally:
            cur.close()
        self.last_seconds = time.perf_counter() - started
        self.latest = verdict
        return verdict
