"""TraceAssembler: committed spans -> completed traces (CONTRACT §5).

A trace completes when its root span has arrived and no span came for ``traces.idle_seconds``,
or ``traces.max_seconds`` after its first span (then it is ``incomplete`` if the root never came).
Times are arrival times at the sidecar, not the agent's clock. Memory is bounded by
``traces.max_open``: beyond it the oldest open trace is finalized as incomplete and counted.

The assembler follows the store's commits (``StoreWriter.follow``): it sees the committed rows'
trace ids as Arrow columns and never queries DuckDB to learn what arrived. It reads the rows of
completing traces on its own cursor, in a read-only transaction, and hands the trace rows to the
store's writer (``derived.replace_traces``), which writes them between two span commits.

Exactly-once: a trace that completes again (late spans) gets its row replaced (``revision`` + 1)
and is not handed to the metrics again. Which traces have a row is known from memory: the last
``RECENT_COMPLETED`` completed traces (seeded from the ``traces`` table at start), and, after a
restart, traces with spans newer than their row. Asking the table for every completing trace cost
a scan of every trace id in it each round (1.5 s at 20M rows). Like the OpenTelemetry Collector's
tail-sampling decision cache, this is a horizon: a span whose trace completed longer ago than
that starts a new, incomplete trace row. After a restart, open traces are rebuilt from spans that
have no trace row.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Callable

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from shadowlens.collector.store.commit import CommittedRows
from shadowlens.collector.store.database import frame
from shadowlens.collector.store.derived import replace_traces

from .rollup import EVALS_SQL, NO_EVALS, RouteResolver, models_of, rollup, spans_sql, trace_rows
from .units import CALLS_SQL, GATEWAY_SCOPES, ROOT_CALLS_SQL, CallUnits, ContentPairer, call_units

_GATEWAY_SCOPES = pa.array(GATEWAY_SCOPES, pa.string())

log = logging.getLogger("shadowlens.assembly")

# Completed traces remembered by id: a late span of one revises its row (the horizon of "late"),
# and its trace had a root (it completes after idle_seconds again, not max_seconds). 50k: ~12 s of
# the ingest benchmark's traffic, over an hour at 10 traces/s; 200k held ~35 MB (tracemalloc) of
# the store process's memory budget.
RECENT_COMPLETED = 50_000
# Finalization rounds at most this often (and at most every idle_seconds / 2): a round costs ~20 ms
# of query planning and fixed work whatever its size, and ran after every commit (3-4 a second under
# load). Completion is at most this much later than idle_seconds.
ROUND_S = 1.0
# Below this many due traces a round waits, up to idle_seconds after the last one: at 1,000 spans/s
# (~90 traces/s) the round's fixed cost was most of the sidecar's CPU (73 ms of a core per second at
# 1 s rounds; at idle_seconds / 2 rounds, 0.025-0.031 cores, and 0.015-0.021 at idle_seconds). The
# window and the gate ask for a round before they refresh (round_now), so what they read is as fresh
# as before, and at low rates most rounds are the window's (every 5 s); under load every round has
# enough. Planning the round's three queries once (PREPARE over a temporary table of the due traces)
# was tried: no difference at 1,000 spans/s, the queries' execution is most of their cost.
ROUND_MIN_DUE = 1000
FAILURE_LOG_S = 60.0           # while rounds keep failing, a reminder this often (the first has the traceback)


@dataclass(slots=True)
class _Open:
    first_seen: float
    last_seen: float
    root: bool
    first_seq: int
    last_seq: int      # the highest ingest_seq of its spans consumed so far
    evals_seq: int = -1                  # the highest ingest_seq of its evals seen while open (-1: none)
    row_completed_us: int | None = None  # completed_at of its row in ``traces`` (None: it has none)


@dataclass(frozen=True)
class CompletedTraces:
    """One finalization round: ``traces`` rows completed for the first time, and their evals."""
    traces: pl.DataFrame           # columns of the traces table
    evals: pl.DataFrame            # trace_id, name, passed, n
    models: pl.DataFrame | None    # trace_id, model, input_tokens, output_tokens, cost_usd (LLM spans)
    late_spans: int
    revised: int
    ambiguous: int = 0             # parents whose calls could not be paired for sure (analyzers/units.py)


@dataclass
class AssemblyCounters:
    late_spans: int = 0
    evicted: int = 0
    completed: int = 0
    revised: int = 0
    open_traces: int = 0


def traces_of(spans: pa.Table) -> tuple[list[str], list[int]]:
    """The distinct trace ids (hex) of a batch of ``spans_core`` rows, and each one's number of root spans.

    numpy on the stored integers, hex-formatted in one pass: 0.8 us a trace, where pyarrow's
    group-by and an f-string per trace cost 3.1 (measured on the benchmark's 32k-span commits)."""
    hi = spans.column("trace_id_hi").to_numpy()
    lo = spans.column("trace_id_lo").to_numpy()
    root = spans.column("parent_span_id_int").is_null().to_numpy(zero_copy_only=False)
    order = np.lexsort((lo, hi))
    hi, lo = hi[order], lo[order]
    first = np.ones(len(hi), dtype=bool)
    first[1:] = (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
    starts = np.flatnonzero(first)
    roots = np.add.reduceat(root[order].astype(np.int64), starts) if len(starts) else np.zeros(0, np.int64)
    ids = np.empty((len(starts), 2), dtype=">u8")      # big-endian: the hex reads as the id's bytes
    ids[:, 0], ids[:, 1] = hi[starts], lo[starts]
    text = ids.tobytes().hex()
    return [text[i:i + 32] for i in range(0, len(text), 32)], roots.tolist()


class TraceAssembler:
    def __init__(self, store, cohort_labels, idle_s: float, max_s: float, routes, *, max_open: int = 100_000,
                 poll_s: float = 0.25, sinks: list[Callable[[CompletedTraces], None]] | None = None,
                 now: Callable[[], float] = time.time, content_pairing_s: float = 0.0):
        """``content_pairing_s``: traces.content_pairing_seconds (0: off; analyzers/units.py)."""
        self.store = store
        self.cohort_labels = tuple(cohort_labels)
        self.idle_s, self.max_s = idle_s, max_s
        self.max_open = max_open
        self.poll_s = poll_s
        self.sinks = list(sinks or [])
        # Called after each round's write with what the ``traces`` table now holds for the round: every row
        # written (first completions, revisions, call units), the evals read for them, and the trace ids whose
        # earlier rows the write replaced. A sink sees first completions only; a follower of the table (the
        # window's in-memory copy) needs the revisions too.
        self.writes: list[Callable[[pl.DataFrame, pl.DataFrame, list[str]], None]] = []
        self.now = now
        self.routes = RouteResolver(routes)
        self.content = ContentPairer(content_pairing_s, max_s)
        # open traces with a gateway's span (analyzers/units.py): a round reads calls for these only, so
        # traffic without one pays no extra query
        self._gateway: set[str] = set()
        self.stats = AssemblyCounters()
        self._sql = spans_sql(self.cohort_labels)
        self._open: dict[str, _Open] = {}                         # insertion order = first_seen order
        self._by_last: OrderedDict[str, None] = OrderedDict()     # least recently updated first
        # Recently completed traces: (had a root, completed_at in us). A late span re-opens its trace
        # with that root, and its row is found by completed_at (a zonemap range, not a table scan).
        self._recent: OrderedDict[str, tuple[bool, int]] = OrderedDict()
        self._feed: deque[CommittedRows] = deque()       # appended by the store's writer thread
        self._wake = threading.Event()       # set by a commit fed to us, and by shutdown
        self._following = False
        self.wakeups = 0                     # loop iterations (tests: an idle assembler sleeps)
        self._seq = 0          # the last commit consumed
        self._seen = 0         # the last commit the store announced
        self.round_s = min(ROUND_S, idle_s / 2)
        self.lazy_round_s = idle_s          # the longest a due trace waits for ROUND_MIN_DUE others
        self._asks: deque[threading.Event] = deque()     # round_now callers waiting for a round
        self._last_round = float("-inf")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._con: duckdb.DuckDBPyConnection | None = None
        self._columns: list[str] | None = None
        self._failing_since: float | None = None     # monotonic time of the first failure of a run of them
        self._failure_logged = 0.0

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._con = self.store.cursor()
        self.store.follow(self._on_commit)           # first: a commit after the next line is fed
        self._following = True
        self._seq = self._seen = self.store.committed_seq
        self._remember_completed()
        self._rebuild()
        self._thread = threading.Thread(target=self._run, name="shadowlens-assembler", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stops; open traces stay open and are rebuilt from the store on the next start."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        while self._asks:               # asked after the last round: nothing more is coming
            self._asks.popleft().set()
        if self._con is not None:
            self._con.close()
            self._con = None

    def _remember_completed(self) -> None:
        rows = self._con.execute(
            "SELECT trace_id, NOT incomplete, epoch_us(completed_at) FROM traces ORDER BY completed_at DESC LIMIT ?",
            [RECENT_COMPLETED]).fetchall()
        for tid, root, completed_us in reversed(rows):
            self._recent[tid] = (bool(root), int(completed_us))

    def _rebuild(self) -> None:
        con = self._con
        rows = con.execute("""
            SELECT s.trace_id, bool_or(s.parent_span_id IS NULL), min(s.ingest_seq), max(s.ingest_seq),
                   epoch(min(s.received_at)), epoch(max(s.received_at)), NULL
            FROM spans_core s ANTI JOIN traces t USING (trace_id)
            GROUP BY s.trace_id ORDER BY 5""").fetchall()
        late = con.execute("""
            SELECT s.trace_id, true, min(t.min_ingest_seq), max(s.ingest_seq), epoch(min(s.received_at)),
                   epoch(max(s.received_at)), min(epoch_us(t.completed_at))
            FROM spans_core s JOIN traces t USING (trace_id)
            WHERE s.ingest_seq > t.max_ingest_seq GROUP BY s.trace_id ORDER BY 5""").fetchall()
        for tid, root, first_seq, last_seq, first, last, completed_us in rows + late:
            self._gateway.add(tid)       # not known without reading their spans: the first round reads them
            self._touch(tid, bool(root), int(first_seq), int(last_seq), float(first), float(last),
                        None if completed_us is None else int(completed_us))
        self.stats.open_traces = len(self._open)
        if rows or late:
            log.info("rebuilt %d open traces (%d with late spans) from the store", len(rows) + len(late), len(late))

    # -- the loop --------------------------------------------------------------------------
    def _on_commit(self, committed: CommittedRows) -> None:
        self._feed.append(committed)
        self._wake.set()

    def _wait(self) -> None:
        """Until the next commit or round_now, or ``poll_s`` while a trace is open (it becomes due with
        time alone). With none open nothing can become due before a span arrives: the thread sleeps
        until then instead of waking four times a second on an idle sidecar."""
        if not self._following:
            self._seen = self.store.wait_for_commit(self._seen, self.poll_s)
        elif self._open or self._failing_since is not None:
            self._wake.wait(self.poll_s)
        else:
            self._wake.wait()
        self._wake.clear()       # before the feed is read: a commit after this sets it again

    def round_now(self, timeout: float = 5.0) -> None:
        """Finalize what is due now, on the assembler's thread, before a reader of the traces table
        refreshes (the window, the gate): rounds may wait for more due traces at low rates, readers
        do not. Returns at once when no trace is open (an idle sidecar); waits at most ``timeout``."""
        if not self._open or self._thread is None or self._stop.is_set():
            return
        self.store.flush(timeout)       # spans the writer holds back for a bigger group count as arrived
        done = threading.Event()
        self._asks.append(done)
        self._wake.set()
        done.wait(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._wait()
                self.wakeups += 1
                while self._feed:
                    committed = self._feed.popleft()
                    if committed.seq > self._seq:      # older ones were read from the store at start
                        self._consume(committed)
                        self._seq = committed.seq
                now = time.monotonic()
                asks = [self._asks.popleft() for _ in range(len(self._asks))]
                try:
                    pressed = asks or len(self._open) > self.max_open or now - self._last_round >= self.lazy_round_s
                    if pressed:
                        self._last_round = now
                        self.complete_due()
                    elif now - self._last_round >= self.round_s and self.complete_due(ROUND_MIN_DUE):
                        self._last_round = now
                finally:
                    for done in asks:       # also after a failed round: the reader reads what there is
                        done.set()
                if self._failing_since is not None:
                    log.info("trace assembly rounds succeed again after %.0f s of failures",
                             time.monotonic() - self._failing_since)
                    self._failing_since = None
            except Exception as exc:  # the assembler must outlive a bad round; it is logged
                self._log_failure(exc)
                time.sleep(self.poll_s)

    def _log_failure(self, exc: Exception) -> None:
        """The first failure with its traceback, then one line a minute while rounds keep failing (a
        full disk fails every round for as long as it lasts: a traceback each time buried the log)."""
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = self._failure_logged = now
            log.exception("trace assembly round failed; retrying")
        elif now - self._failure_logged >= FAILURE_LOG_S:
            self._failure_logged = now
            log.error("trace assembly rounds still fail after %.0f s (%s: %s); retrying",
                      now - self._failing_since, type(exc).__name__, exc)

    def _touch(self, tid: str, root: bool, first_seq: int, last_seq: int, first: float, last: float,
               row_completed_us: int | None = None) -> None:
        st = self._open.get(tid)
        if st is None:
            self._open[tid] = _Open(first, last, root, first_seq, last_seq, row_completed_us=row_completed_us)
        else:
            st.last_seen = max(st.last_seen, last)
            st.root = st.root or root
            st.first_seq = min(st.first_seq, first_seq)
            st.last_seq = max(st.last_seq, last_seq)
            if st.row_completed_us is None:
                st.row_completed_us = row_completed_us
        self._by_last[tid] = None
        self._by_last.move_to_end(tid)

    def _consume(self, committed: CommittedRows) -> None:
        now, seq = self.now(), committed.seq
        recent, open_ = self._recent, self._open
        if committed.spans is not None and committed.spans.num_rows:
            for tid, roots in zip(*traces_of(committed.spans)):
                # a late span: the trace had a row (found by its completed_at), and maybe a root
                known = recent.get(tid) if tid not in open_ else None
                self._touch(tid, roots > 0 or bool(known and known[0]), seq, seq, now, now, known and known[1])
            gateway = pc.is_in(committed.spans.column("scope_name"), value_set=_GATEWAY_SCOPES)
            if pc.any(gateway).as_py():
                self._gateway.update(traces_of(committed.spans.filter(gateway))[0])
        if committed.evals is not None:
            for tid in committed.evals.column("trace_id").unique().to_pylist():
                st = open_.get(tid)
                if st is not None:
                    st.evals_seq = seq
        self.stats.open_traces = len(open_)

    def complete_due(self, min_due: int = 1) -> int:
        """Finalize every trace that is due now, if at least ``min_due`` are; returns how many were finalized."""
        now = self.now()
        due: dict[str, bool] = {}
        for tid, st in self._open.items():              # max_seconds, in first_seen order
            if now - st.first_seen < self.max_s:
                break
            due[tid] = False
        for tid in self._by_last:                       # idle_seconds, least recently updated first
            st = self._open[tid]
            if now - st.last_seen < self.idle_s:
                break
            if st.root:
                due[tid] = False
        excess = len(self._open) - len(due) - self.max_open
        if excess > 0:                                  # bounded memory: the oldest are finalized
            for tid in self._open:
                if tid not in due:
                    due[tid] = True
                    excess -= 1
                    if excess <= 0:
                        break
        if not due or len(due) < min_due:
            return 0
        self._finalize(due)
        return len(due)

    def _finalize(self, due: dict[str, bool]) -> None:
        # The spans of the due traces lie between these: a round reads about the spread of their
        # arrival, not everything since the oldest (5 s and more of traffic, read again each round).
        # A span committed after the last _consume is left for the next round, as a late span.
        states = [self._open[t] for t in due]
        seqs = (min(st.first_seq for st in states), max(st.last_seq for st in states),
                # evals are read up to the last one seen for these traces (evals of other traces keep arriving);
                # an eval that comes by log after its trace completed counts only if a late span revises the trace
                max(st.evals_seq for st in states))
        revisit = {t: st.row_completed_us for t, st in zip(due, states) if st.row_completed_us is not None}
        now_us = int(self.now() * 1e6)
        rows, evals, models, old, cu = self._read_rows(due, seqs, revisit, now_us)
        rows, units = cu.rows, cu.units
        written = rows if units is None else pl.concat([rows, units], how="diagonal_relaxed")
        # the store's writer deletes the revised traces' rows (and units) and inserts the new ones in one transaction
        self.store.write(replace_traces(written.to_arrow(), list(old), min(revisit.values()) if old else None)).result()
        for follower in self.writes:
            follower(written, evals, list(old))
        new_ids = [t for t in rows["trace_id"].to_list() if t not in old]
        self._forget_finalized(due, rows, now_us)
        late = 0
        rounds: list[CompletedTraces] = []
        if old:
            late = sum(max(0, n - old[t]["n"]) for t, n in zip(rows["trace_id"].to_list(), rows["span_count"].to_list())
                       if t in old)
        self.stats.late_spans += late
        self.stats.revised += len(old)
        self.stats.completed += len(new_ids)
        self.stats.evicted += sum(due.values())
        self.stats.open_traces = len(self._open)
        if new_ids:
            fresh, ev, mo = rows, evals, models.drop("calls")
            if old:
                fresh = rows.filter(pl.col("revision") == 0)
                ev = evals.filter(pl.col("trace_id").is_in(new_ids)) if evals.height else evals
                mo = mo.filter(pl.col("trace_id").is_in(new_ids)) if mo.height else mo
            rounds.append(CompletedTraces(fresh, ev, mo, late, len(old), cu.ambiguous))
        if units is not None:
            # calls compared on their own reach every sink as trace rows of their own (the pair counters and the
            # gate pair them by request id; the trace's evals and models stay with its row), once: a revision's
            # units only where the earlier row had none (the calls' spans came after the application's)
            had = [t for t, o in old.items() if o["units"]]
            units = units.filter(~pl.col("trace_id").is_in(had)) if had else units
            if units.height:
                rounds.append(CompletedTraces(units, evals.clear(), None, 0, 0))
        for sink in self.sinks:
            for result in rounds:
                sink(result)

    def _read_rows(self, due: dict[str, bool], seqs: tuple[int, int, int], revisit: dict[str, int], now_us: int):
        """The due traces' rows, evals and models, and the rows of those completing again (by trace id),
        read from the commits ``seqs`` = (lo, hi, evals_hi) in one read-only transaction."""
        con = self._con
        lo, hi, evals_hi = seqs
        con.register("done", pa.table({"trace_id": list(due), "evicted": list(due.values())}))
        con.execute("BEGIN TRANSACTION READ ONLY")
        try:
            old = self._old_rows(revisit) if revisit else {}
            if old:
                lo = min([lo] + [o["lo"] for o in old.values() if o["lo"] is not None])
                evals_hi = self._seq      # a revision counts evals that came after the first completion
            spans = frame(con, self._sql, {"lo": lo, "hi": hi})
            evals = frame(con, EVALS_SQL, {"lo": lo, "evals_hi": evals_hi}) if evals_hi >= lo else NO_EVALS
            # a revision of a trace with units or a request id is read again (its late span may be the app's)
            gateway = not self._gateway.isdisjoint(due) or any(o["units"] or o["rid"] for o in old.values())
            calls = frame(con, CALLS_SQL, {"lo": lo, "hi": hi}) if gateway else None
            roots = frame(con, ROOT_CALLS_SQL, {"lo": lo, "hi": hi}) if gateway and self.content.window_ns > 0 else None
        finally:
            con.execute("ROLLBACK")       # read only: nothing to keep
            con.unregister("done")
        # the rows and the models from one read of the spans (analyzers/rollup.py says why not in SQL)
        rows, models = rollup(spans, self.cohort_labels, now_us), models_of(spans)
        rows = self._finish_rows(trace_rows(rows, evals, models), old)
        cu = call_units(rows, calls, self.cohort_labels) if calls is not None else CallUnits(rows, None, 0)
        kept = {t: o["rid"] for t, o in old.items() if o["rid"]}
        if kept or (roots is not None and roots.height):
            # a revision keeps the request id its first row got (content pairing's: the spans carry none)
            revised = cu.rows.filter(pl.col("revision") > 0).with_columns(pl.coalesce(
                "request_id", pl.col("trace_id").replace_strict(kept, default=None, return_dtype=pl.Utf8)).alias("request_id"))
            fresh, ambiguous = cu.rows.filter(pl.col("revision") == 0), 0
            if roots is not None and roots.height:
                fresh, ambiguous = self.content.assign(fresh, roots)
            cu = CallUnits(pl.concat([fresh, revised], how="diagonal_relaxed"), cu.units, cu.ambiguous + ambiguous)
        return rows, evals, models, old, cu

    def _forget_finalized(self, due: dict[str, bool], rows: pl.DataFrame, now_us: int) -> None:
        """Close the finalized traces and remember them as completed (a late span revises their row)."""
        open_, by_last, recent = self._open, self._by_last, self._recent
        for tid in due:
            del open_[tid]
            del by_last[tid]
        self._gateway.difference_update(due)
        for tid, complete in zip(rows["trace_id"].to_list(), (~rows["incomplete"]).to_list()):
            if tid in recent:
                recent.move_to_end(tid)
            recent[tid] = (complete, now_us)
        while len(recent) > RECENT_COMPLETED:
            recent.popitem(last=False)

    def _old_rows(self, revisit: dict[str, int]) -> dict:
        """Rows of traces completing again (the caller replaces them with their revision), by trace id.
        Found by completed_at, which rows are appended in order of: zonemaps skip the rest of the table."""
        con = self._con
        con.register("revisit", pa.table({"trace_id": list(revisit)}))
        try:
            # a trace's row and its call units' rows (analyzers/units.py) share these values
            return dict(con.execute(
                "SELECT trace_id, struct_pack(n := any_value(span_count), rev := max(revision), lo := min(min_ingest_seq),"
                " units := bool_or(call_span_id IS NOT NULL), rid := max(request_id) FILTER (WHERE call_span_id IS NULL))"
                " FROM traces "
                "SEMI JOIN revisit USING (trace_id) WHERE completed_at >= make_timestamp($since::BIGINT) GROUP BY trace_id",
                {"since": min(revisit.values())}).fetchall())
        finally:
            con.unregister("revisit")

    def _finish_rows(self, rows: pl.DataFrame, old: dict) -> pl.DataFrame:
        route_from_model = [self.routes.route(m) if r is None else r
                            for r, m in zip(rows["route"].to_list(), rows["_request_model"].to_list())]
        rows = rows.with_columns(
            pl.Series("route", route_from_model, dtype=pl.Utf8),
            pl.Series("revision", [old[t]["rev"] + 1 if t in old else 0 for t in rows["trace_id"].to_list()],
                      dtype=pl.Int32),
        ).drop("_request_model")
        return rows
