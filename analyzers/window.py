"""Statistics over the sliding window (default 15 min), per route and cohort: exact here, over the store.

Computed over the ``traces`` rows completed in the window, on a refresh interval in the background;
a scrape only reads the last result. ``WindowQuery`` computes them with DuckDB over the store: the
reference, and how ``WindowState`` (analyzers/window_state.py: serve's in-memory copy of the window's
rows) is seeded. Quantiles are exact and interpolated (``quantile_cont``, numpy's default 'linear' method).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import polars as pl

from shadowlens.collector.store.database import frame

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
    # completed_at of the window's oldest trace (epoch s): it leaves at oldest + window (WindowState's folded
    # rows: the end of their oldest bucket, which leaves then)
    oldest: float | None = None


def series_key(values) -> str:
    """One string per combination of cohort values, as the window's SQL builds it: each value prefixed
    with its length in characters, so that no two combinations share a key whatever their values hold
    (a separator could be forged by a value that contains it, and let an extra series past the cap).

    >>> series_key(("a:b", "c")), series_key(("a", "b:c"))
    ('3:a:b1:c', '1:a3:b:c')
    """
    return "".join(f"{len(v)}:{v}" for v in values)


def _label_expr(label: str) -> str:
    return (f'CASE WHEN list_contains($allowed_{label}, coalesce("{label}", \'unknown\')) '
            f'THEN coalesce("{label}", \'unknown\') ELSE \'{OVERFLOW}\' END AS "{label}"')


def window_evals(rows: str) -> str:
    """CTEs ending in ``window_evals(trace_id, name, passed)``: the evals the window counts for the trace ids
    of ``rows`` (trace_id, evals_total; the window's rows), bounded below by ``$evals_from``.

    Those are the evals each trace's row was written with: the assembler reads a trace's evals up to the
    commit it completes at (a revision: completes again at), and the row's ``evals_total`` counts them. An
    eval logged after that is in none of the trace's statistics (its row, the eval counters, the gate) until
    a late span revises the trace: the window agrees with them. Joining every eval of the trace, as before,
    counted it in the window alone, and ``WindowState`` (fed the rows as they are written) never sees it. In
    the evals table they are the trace's first ``evals_total`` by ingest_seq: a round reads a range of
    commits, so evals of one commit are all in or all out and ties do not matter. (Not exact for an eval
    committed before any span of its trace, which a round reads or not depending on the other traces due
    with it.) A trace's call units carry evals_total 0: the bound is its own row's."""
    return f"""_lim AS (SELECT trace_id, max(evals_total) AS k FROM {rows} GROUP BY trace_id),
                 _ranked AS (SELECT trace_id, name, passed,
                                    row_number() OVER (PARTITION BY trace_id ORDER BY ingest_seq) AS i
                             FROM evals SEMI JOIN _lim USING (trace_id) WHERE ingest_seq >= $evals_from),
                 window_evals AS (SELECT r.trace_id, r.name, r.passed FROM _ranked r JOIN _lim USING (trace_id)
                                  WHERE r.i <= _lim.k)"""


class WindowQuery:
    def __init__(self, cursor_factory, limiter: CohortLimiter, window_s: float,
                 now: Callable[[], float] = time.time, combos: CohortLimiter | None = None,
                 eval_names: CohortLimiter | None = None):
        """``combos`` and ``eval_names``: the streaming aggregates' limiters of cohort combinations and eval
        names (StreamingAggregates), so that both kinds of series have the same values; None: not capped."""
        self.cursor_factory = cursor_factory
        self.limiter = limiter
        self.labels = limiter.labels
        self.combos = combos
        self.eval_names = eval_names
        self.window_s = window_s
        self.now = now
        route = f"CASE WHEN route IN {ROUTES!r} THEN route ELSE 'other' END AS route"
        cohort = ", ".join(_label_expr(label) for label in self.labels)
        quoted = [f'"{label}"' for label in self.labels]
        group = ", ".join(["route", *quoted])
        # A combination of cohort values past cohorts.max_series is __overflow__ in every label. The kept
        # combinations are one string each (series_key), looked up once per row (_kept): a list of lists
        # compared per row and per label took a refresh over 62k traces of the bench traffic from 95-110 ms
        # (no cap) to 210-250; now 160-170.
        capped = combos is not None and bool(quoted)
        key = "concat(" + ", ".join(f"length({q})::VARCHAR, ':', {q}" for q in quoted) + ")"
        kept = f", {key} IN (SELECT unnest($allowed_series)) AS _kept" if capped else ""
        combo = ", ".join(f"CASE WHEN _kept THEN {q} ELSE '{OVERFLOW}' END AS {q}" for q in quoted) if capped else \
            ", ".join(quoted)
        sep = ", " if quoted else ""

        def windowed(cols: str) -> str:
            return f"""w0 AS (SELECT {route}{sep}{cohort}, {cols}
                       FROM traces WHERE completed_at >= make_timestamp($cutoff::BIGINT)),
                 w AS (SELECT route{sep}{combo}, {cols} FROM (SELECT *{kept} FROM w0))"""
        self._sql_traces = f"""
            WITH {windowed("duration_seconds, steps, cost_usd, refused, escalated, completed_at, min_ingest_seq")}
            SELECT {group}, count(*) AS n, epoch_us(min(completed_at)) AS _oldest_us,
                   min(coalesce(min_ingest_seq, 0)) AS _first_seq,
                   quantile_cont(duration_seconds, {list(QUANTILES)}) AS q,
                   avg(steps) AS steps_mean, avg(cost_usd) AS cost_mean,
                   avg(refused::INTEGER) AS refusal_ratio, avg(escalated::INTEGER) AS escalation_ratio
            FROM w GROUP BY ALL"""
        self._sql_evals = f"""
            WITH {windowed("trace_id, evals_total")}, {window_evals("w0")}
            SELECT {group}, e.name AS eval, avg(CASE WHEN e.passed = false THEN 1.0 ELSE 0.0 END) AS fail_ratio,
                   count(*) AS n
            FROM w JOIN window_evals e USING (trace_id) WHERE e.name IS NOT NULL
            GROUP BY ALL"""
        # the window's rows and their evals as they are, for WindowState's seed (oldest first: it folds the
        # rows of all but the newest traces into sums)
        cohorts = "".join(f", {q}" for q in quoted)
        self.seed_rows_sql = f"""
            SELECT trace_id, route{cohorts}, duration_seconds, steps, cost_usd, refused, escalated, completed_at,
                   min_ingest_seq
            FROM traces WHERE completed_at >= make_timestamp($cutoff::BIGINT) ORDER BY completed_at"""
        self.seed_evals_sql = f"""
            WITH w0 AS (SELECT trace_id, evals_total FROM traces WHERE completed_at >= make_timestamp($cutoff::BIGINT)),
                 {window_evals("w0")}
            SELECT trace_id, name, passed, count(*)::BIGINT AS n FROM window_evals GROUP BY ALL"""
        raw = ", ".join(f"coalesce({q}, 'unknown')" for q in quoted) or "1"
        self._distinct = f"SELECT DISTINCT {raw} FROM traces WHERE completed_at >= make_timestamp($cutoff::BIGINT)"

    def refresh(self) -> WindowSnapshot:
        t0 = time.perf_counter()
        now = self.now()
        cutoff = int((now - self.window_s) * 1e6)
        con = self.cursor_factory()
        try:
            params: dict = {"cutoff": cutoff}
            combos = con.execute(self._distinct, {"cutoff": cutoff}).fetchall()     # one query for every label
            as_label = []
            for i, label in enumerate(self.labels):
                values = list(dict.fromkeys(c[i] for c in combos))
                mapped = dict(zip(values, self.limiter.map(label, values, count=False)))
                params[f"allowed_{label}"] = [v for v, m in mapped.items() if m != OVERFLOW]
                as_label.append(mapped)
            if self.combos is not None and self.labels:
                kept = list(dict.fromkeys(tuple(m[v] for m, v in zip(as_label, c)) for c in combos))
                params["allowed_series"] = [series_key(c) for c, m in zip(kept, self.combos.map("series", kept, count=False))
                                            if m != OVERFLOW]
            traces = frame(con, self._sql_traces, params)
            # The window's evals came with or after the first span of its oldest trace: their ingest_seq
            # bounds the scan (zonemaps skip the rest). Before, every refresh read the whole evals table,
            # so its cost grew with the store's retention, not the window: 250 ms over 1M evals for 81k
            # traces in the window, every analyzers.window_refresh.
            params["evals_from"] = traces["_first_seq"].min() if traces.height else 0
            evals = self._cap_evals(frame(con, self._sql_evals, params))
        finally:
            con.close()
        oldest = traces["_oldest_us"].min() if traces.height else None
        return WindowSnapshot(traces.drop("_oldest_us", "_first_seq"), evals, now, time.perf_counter() - t0,
                              None if oldest is None else oldest / 1e6)

    def _cap_evals(self, evals: pl.DataFrame) -> pl.DataFrame:
        """Eval names past metrics.max_evals pooled as __overflow__ (their ratio over all their results)."""
        if self.eval_names is None or not evals.height:
            return evals
        names = self.eval_names.map("eval", evals["eval"].to_list(), count=False)
        if OVERFLOW not in names:
            return evals
        keys = ["route", *self.labels, "eval"]
        return evals.with_columns(pl.Series("eval", names)).group_by(keys, maintain_order=True).agg(
            ((pl.col("fail_ratio") * pl.col("n")).sum() / pl.col("n").sum()).alias("fail_ratio"), pl.col("n").sum())


class WindowRefresher(Periodic):
    """Component: refreshes the window on an interval and forgets cohorts unseen for two windows.

    ``stats``: what computes the snapshot (``refresh()``, ``now``, ``window_s``): a ``WindowQuery`` over the
    store, or serve's ``WindowState`` (analyzers/window_state.py).

    ``generation``: a number that changes whenever the store's tables do (``StoreWriter.generation``; for
    a ``WindowState``, its own ``generation``: the writes it is fed, and the derived writes it does not follow).
    With it, a tick recomputes only when something was written since the last result or its oldest
    trace has left the window; otherwise the result is the same and the queries are not run again
    (an idle sidecar ran them every ``interval_s``). None: every tick recomputes."""
    thread_name = "shadowlens-window"

    def __init__(self, stats: WindowQuery, interval_s: float, forget: Callable[[float], object] | None = None,
                 generation: Callable[[], int] | None = None):
        self.stats = stats
        self.interval_s = interval_s
        self.forget = forget
        self.generation = generation
        self.latest: WindowSnapshot | None = None
        self._generation: int | None = None     # the generation the latest result was read at
        self._expires = float("inf")            # when the latest result's oldest trace leaves the window

    def stale(self) -> bool:
        if self.generation is None or self.latest is None:
            return True
        if self.generation() != self._generation or self.stats.now() >= self._expires:
            return True
        if self.forget is not None:     # time-based, and cheap (bounded dicts): also on the ticks that skip
            self.forget(2 * self.stats.window_s)
        return False

    def refresh_now(self) -> WindowSnapshot:
        # read before the queries: a write during them changes it again, and the next tick recomputes
        generation = self.generation() if self.generation is not None else None
        snap = self.stats.refresh()
        self._generation = generation
        self._expires = float("inf") if snap.oldest is None else snap.oldest + self.stats.window_s
        self.latest = snap
        if self.forget is not None:
            self.forget(2 * self.stats.window_s)
        return snap
