"""The release gate over the store: the window's traces → sufficient statistics → judge → Verdict.

One SQL statement reads the window's baseline and candidate traces, pairs them and aggregates them
per rule and cohort (analyzers/compare.py); only a few hundred rows come back to Python. ``serve``
recomputes the verdict every ``gate.refresh`` in the background (GateRefresher) so ``/gate`` and the
verdict metrics never wait on DuckDB; ``shadowlens gate --data-dir`` and ``report`` run the same
statement through store/reader.py.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import polars as pl
import pyarrow as pa

from .compare import Verdict, judge, route_summary_sql, statistics
from .compare import sql_ident as _q
from .compare import sql_literal as _lit
from .evidence import ExplainedVerdict, ordered_reasons, with_evidence
from .gate_state import GateState, GateStateSink
from .periodic import Periodic
from .rules import GateSettings

EVIDENCE_EVERY_S = 300.0     # serve: example pairs are re-read at most this often while the failing set stays


def trace_frame_sql(settings: GateSettings, labels, now: float, completed: bool = False) -> str:
    """The window's traces as a trace frame (analyzers/compare.py's columns), read from ``traces`` alone:
    eval outcomes come from its eval_names / failed_evals lists, not from a join with ``evals``.
    ``completed`` adds ``_completed_us`` (when the row was written; GateState's rebuild needs it)."""
    since_us = int((now - settings.window_s) * 1e6)
    cohort = "".join(f", t.{_q(label)}" for label in labels)
    evals = "".join(
        f", CASE WHEN list_contains(t.eval_names, {_lit(n)}) THEN (NOT list_contains(t.failed_evals, {_lit(n)}))::DOUBLE"
        f" END AS {_q('eval_pass:' + n)}, CASE WHEN list_contains(t.eval_names, {_lit(n)})"
        f" THEN list_contains(t.failed_evals, {_lit(n)})::DOUBLE END AS {_q('eval_fail:' + n)}"
        for n in settings.eval_names)
    done = ", epoch_us(t.completed_at) AS _completed_us" if completed else ""
    return (
        f"SELECT t.trace_id, t.route, t.request_id, epoch_us(t.start_time) / 1e6 AS start_s{cohort},"
        " t.duration_seconds AS duration, t.cost_usd AS cost, CAST(t.steps AS DOUBLE) AS steps,"
        " CAST(t.input_tokens + t.output_tokens AS DOUBLE) AS tokens, CAST(t.refused AS DOUBLE) AS refused,"
        f" CAST(t.escalated AS DOUBLE) AS escalated{evals}{done}"
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


def reuse_evidence(verdict: Verdict, last: ExplainedVerdict) -> ExplainedVerdict:
    """A new verdict whose failing results ``last`` has evidence for (the same set, or fewer), carrying last's
    example pairs and attribution for those results."""
    fails = {(r.rule, r.cohort) for r in verdict.results if r.state == "fail"}
    explained_by = {k: v for k, v in last.explained_by.items() if k in fails}
    base = {f.name: getattr(verdict, f.name) for f in dataclasses.fields(Verdict)}
    base["reasons"] = ordered_reasons(verdict, explained_by)
    return ExplainedVerdict(**base, examples={k: v for k, v in last.examples.items() if k in fails},
                            explained_by=explained_by, trace_url=last.trace_url, examples_note=last.examples_note)


def rebuild(cursor, state: GateState, now: float) -> int:
    """Fill ``state`` from the store's window (serve's restart); returns the newest completed_at (epoch us) it
    saw, from which GateStateSink takes over. ``cursor`` is a DuckDB cursor of the store. The sums, pairs and
    sketch counts are computed by DuckDB in one statement (GateState.rebuild_sql), so a restart costs close
    to one SQL evaluation of the window (1.3x at 8M traces, docs/gate.md); only the per-bucket rows and the
    traces still waiting for a partner come back to Python."""
    sql = state.rebuild_sql(trace_frame_sql(state.settings, state.labels, now, completed=True))
    return state.load(pl.from_arrow(cursor.sql(sql).to_arrow_table()))


class GateRefresher(Periodic):
    """Component: recomputes the verdict every ``gate.refresh``; readers take ``latest`` (one reference swap)."""
    thread_name = "shadowlens-gate"

    def __init__(self, cursor_factory, settings: GateSettings, labels, now: Callable[[], float] = time.time,
                 trace_url: str | None = None, sink: GateStateSink | None = None,
                 evidence_every_s: float = EVIDENCE_EVERY_S):
        self.cursor_factory = cursor_factory
        # with a sink, a refresh judges the incremental GateState (rebuilt from the store on the first one);
        # without one, every refresh runs the SQL over the window, as `shadowlens gate --data-dir` does
        self.sink = sink
        self.evidence_every_s = evidence_every_s
        self._evidence: tuple | None = None     # (failing set, when, ExplainedVerdict) of the last evidence run
        self._last_traces: dict | None = None   # the previous refresh's traces per route (is traffic still arriving?)
        self.trace_url = trace_url
        self.settings = settings
        self.interval_s = settings.refresh_s
        self.labels = tuple(labels)
        self.now = now
        self.latest: Verdict | None = None
        self.last_seconds = 0.0

    def refresh_now(self) -> Verdict:
        started = time.perf_counter()
        if self.sink is not None:
            verdict = self._incremental()
        else:
            cur = self.cursor_factory()
            try:
                verdict = evaluate_with_evidence(lambda sql: cur.sql(sql).to_arrow_table(), self.settings,
                                                 self.labels, self.now(), self.trace_url)
            finally:
                cur.close()
        self.last_seconds = time.perf_counter() - started
        self.latest = verdict
        return verdict

    def _incremental(self) -> Verdict:
        now = self.now()
        if self.sink.after_us is None:
            # the first refresh after a start: /gate answers from one SQL evaluation of the window, then the state
            # is rebuilt from the window (GateState.rebuild_sql, which costs about as much again) and judged
            cur = self.cursor_factory()
            try:
                first = evaluate_with_evidence(lambda sql: cur.sql(sql).to_arrow_table(), self.settings, self.labels,
                                               now, self.trace_url)
                self.latest = first
                fails = frozenset((r.rule, r.cohort) for r in first.results if r.state == "fail")
                self._evidence = (fails, now, first) if fails else None
                self.sink.ready(rebuild(cur, self.sink.state, now))
            finally:
                cur.close()
        self.sink.drain()         # the rounds since the last refresh (fewer than the sink's batch_rows)
        verdict = judge(self.sink.state.statistics(now), self.settings, now)
        return self._with_evidence(verdict, now)

    def _with_evidence(self, verdict: Verdict, now: float) -> Verdict:
        """Example pairs and attribution read the store (several scans of the window), so they run only when
        a result fails that the last run did not explain, every ``evidence_every_s`` while none does, and once
        when traffic settles (the window's traces the same as at the previous refresh, not as at the last
        evidence run: the examples then match `shadowlens gate --data-dir` over the same window); in between the
        last run's evidence for the results still failing is attached to the new verdict. A borderline cohort
        that flips in and out of the failing set so costs no read (the bench traffic's did: the gate thread read
        0.002 and 0.021 cores in two runs at 1,000 spans/s with ~225k traces in the window)."""
        fails = frozenset((r.rule, r.cohort) for r in verdict.results if r.state == "fail")
        last = self._evidence
        settled = verdict.traces == self._last_traces
        self._last_traces = dict(verdict.traces)
        if not fails:
            self._evidence = None
            return with_evidence(verdict, None, self.settings, self.labels, "", self.trace_url)
        if (last is None or not fails <= last[0] or now - last[1] >= self.evidence_every_s
                or (settled and last[2].traces != verdict.traces)):
            cur = self.cursor_factory()
            try:
                explained = with_evidence(verdict, lambda sql: cur.sql(sql).to_arrow_table(), self.settings,
                                          self.labels, trace_frame_sql(self.settings, self.labels, now),
                                          self.trace_url)
            finally:
                cur.close()
            self._evidence = (fails, now, explained)
            return explained
        return reuse_evidence(verdict, last[2])
