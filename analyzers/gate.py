"""The release gate over the store: traces of the gate window → trace frame → compare → Verdict.

One SQL statement reads the window's baseline and candidate traces with their eval outcomes; the
rest is columnar (analyzers/compare.py). ``serve`` recomputes the verdict every ``gate.refresh`` in
the background (GateRefresher) so ``/gate`` and the verdict metrics never wait on DuckDB;
``shadowlens gate --data-dir`` and ``report`` run the same statement through store/reader.py.
"""
from __future__ import annotations

import time
from typing import Callable

import polars as pl
import pyarrow as pa

from .compare import Verdict, compare
from .periodic import Periodic
from .rules import GateSettings


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _ident(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'


def trace_frame_sql(settings: GateSettings, labels, now: float, window_s: float | None = None) -> str:
    """The window's baseline and candidate traces as a trace frame (analyzers/compare.py's columns)."""
    since_us = int((now - (settings.window_s if window_s is None else window_s)) * 1e6)
    evals = settings.eval_names
    cohort = "".join(f", t.{_ident(label)}" for label in labels)
    eval_cols = "".join(
        f", CAST(ev.{_ident('e' + str(i))} AS DOUBLE) AS {_ident('eval_pass:' + name)},"
        f" 1.0 - CAST(ev.{_ident('e' + str(i))} AS DOUBLE) AS {_ident('eval_fail:' + name)}"
        for i, name in enumerate(evals))
    ev_cte = ""
    join = ""
    if evals:
        # a trace passes an eval when every result of that eval on it passed
        aggs = ", ".join(f"bool_and(passed) FILTER (WHERE name = {_quote(n)}) AS {_ident('e' + str(i))}"
                         for i, n in enumerate(evals))
        names = ", ".join(_quote(n) for n in evals)
        ev_cte = (f"WITH ev AS (SELECT trace_id, {aggs} FROM evals WHERE name IN ({names}) AND passed IS NOT NULL"
                  f" AND trace_id IN (SELECT trace_id FROM traces WHERE start_time >= make_timestamp({since_us}))"
                  " GROUP BY trace_id) ")
        join = " LEFT JOIN ev USING (trace_id)"
    return (
        f"{ev_cte}SELECT t.route, t.request_id, epoch_us(t.start_time) / 1e6 AS start_s{cohort},"
        " t.duration_seconds AS duration, t.cost_usd AS cost, CAST(t.steps AS DOUBLE) AS steps,"
        " CAST(t.input_tokens + t.output_tokens AS DOUBLE) AS tokens, CAST(t.refused AS DOUBLE) AS refused,"
        f" CAST(t.escalated AS DOUBLE) AS escalated{eval_cols}"
        f" FROM traces t{join}"
        f" WHERE t.route IN ('baseline', 'candidate') AND t.start_time >= make_timestamp({since_us})"
    )


def frame_from_arrow(table: pa.Table, settings: GateSettings, labels) -> pl.DataFrame:
    frame = pl.from_arrow(table)
    for name in settings.eval_names:       # no eval results at all: the columns still exist
        for col in (f"eval_pass:{name}", f"eval_fail:{name}"):
            if col not in frame.columns:
                frame = frame.with_columns(pl.lit(None, dtype=pl.Float64).alias(col))
    return frame.with_columns([pl.col(label).fill_null("unknown") for label in labels])


def evaluate(run_sql: Callable[[str], pa.Table], settings: GateSettings, labels,
             now: float | None = None, window_s: float | None = None) -> Verdict:
    """Read the window through ``run_sql`` (a cursor or the query socket) and judge it."""
    now = time.time() if now is None else now
    table = run_sql(trace_frame_sql(settings, labels, now, window_s))
    return compare(frame_from_arrow(table, settings, labels), settings, labels, now)


class GateRefresher(Periodic):
    """Component: recomputes the verdict every ``gate.refresh``; readers take ``latest`` (one reference swap)."""
    thread_name = "shadowlens-gate"

    def __init__(self, cursor_factory, settings: GateSettings, labels, now: Callable[[], float] = time.time):
        self.cursor_factory = cursor_factory
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
            verdict = evaluate(lambda sql: cur.sql(sql).to_arrow_table(), self.settings, self.labels, self.now())
        finally:
            cur.close()
        self.last_seconds = time.perf_counter() - started
        self.latest = verdict
        return verdict
