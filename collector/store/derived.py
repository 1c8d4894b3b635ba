"""Derived writes: every DuckDB write that is not a span commit, run by the store's writer.

Trace rows (the assembler), retention's deletes, reprice's cost updates and quarantine rows
derive from stored rows. Each is a ``DerivedWrite``: a name and a function of a connection.
``StoreWriter.write`` queues it; the writer thread runs it on its own connection, in one
transaction between two span commits, counts it, and resolves the returned Future with the
function's result or its exception. So one thread writes the file, and a derived write sees
every span commit that resolved before it was queued.

The SQL that changes stored rows lives here (and in the writer, the schema and migrations),
never in the analyzers: they compute rows and hand them over through these constructors.
Without a running ``serve`` a command opens the file itself and is then the one writer
(``run_alone``): DuckDB lets one process hold a file for writing.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generic, Sequence, TypeVar

import duckdb
import pyarrow as pa

from ..errors import Overloaded

log = logging.getLogger("shadowlens.store")

T = TypeVar("T")


@dataclass(frozen=True)
class DerivedWrite(Generic[T]):
    """One write for the writer: ``apply`` runs inside a transaction on the writer's connection.

    >>> w = DerivedWrite("answer", lambda con: con.execute("SELECT 42").fetchone()[0])
    >>> run_alone_on(duckdb.connect(), w)
    42
    """
    name: str                                         # what it is for: the key of its counters
    apply: Callable[[duckdb.DuckDBPyConnection], T]   # its result resolves the caller's Future


@dataclass(frozen=True)
class _Queued:
    write: DerivedWrite
    future: Future


class DerivedQueue:
    """The writer's queue of derived writes, with a count, failures and seconds by name.

    Each caller (the assembler, retention, a reprice, a quarantine) waits for its write's Future
    before it queues another, so a handful are pending at most; ``max_pending`` bounds a bug."""

    def __init__(self, max_pending: int = 64) -> None:
        self.max_pending = max_pending
        self._pending: deque[_Queued] = deque()
        self.done: Counter = Counter()        # name -> writes committed
        self.failed: Counter = Counter()      # name -> writes rolled back (raised to their caller)
        self.seconds: Counter = Counter()     # name -> time on the writer thread

    def __bool__(self) -> bool:
        return bool(self._pending)

    def snapshot(self) -> dict[str, dict[str, float]]:
        """Copies of the counters by name, for /metrics: ``{"done": ..., "failed": ..., "seconds": ...}``."""
        return {"done": dict(self.done), "failed": dict(self.failed), "seconds": dict(self.seconds)}

    def put(self, write: DerivedWrite) -> Future:
        if not isinstance(write, DerivedWrite):
            raise TypeError(f"the store writer takes a DerivedWrite, not {type(write).__name__}")
        if len(self._pending) >= self.max_pending:
            self.failed[write.name] += 1
            raise Overloaded(f"{len(self._pending)} derived writes wait for the store writer already; "
                             f"{write.name!r} is refused: wait for your earlier writes' Futures before queuing more")
        fut: Future = Future()
        self._pending.append(_Queued(write, fut))
        return fut

    def run_pending(self, con: duckdb.DuckDBPyConnection, lock: threading.Condition) -> None:
        """Run every queued write; called holding ``lock`` (the writer's), released while each runs."""
        while self._pending:
            item = self._pending.popleft()
            lock.release()
            try:
                self._run(con, item)
            finally:
                lock.acquire()

    def _run(self, con: duckdb.DuckDBPyConnection, item: _Queued) -> None:
        name = item.write.name
        t0 = time.perf_counter()
        try:
            result = run_alone_on(con, item.write)
        except BaseException as exc:     # counted, and raised to the caller through its Future
            self.failed[name] += 1
            item.future.set_exception(exc)
        else:
            self.done[name] += 1
            item.future.set_result(result)
        finally:
            self.seconds[name] += time.perf_counter() - t0


def run_alone_on(con: duckdb.DuckDBPyConnection, write: DerivedWrite[T]) -> T:
    """``write`` in one transaction on ``con``: committed, or rolled back and raised."""
    con.begin()
    try:
        result = write.apply(con)
        con.commit()
    except BaseException:
        try:
            con.rollback()
        except duckdb.Error:      # it failed in COMMIT: no transaction is left to roll back
            pass
        raise
    return result


def run_alone(path: Path, write: DerivedWrite[T]) -> T:
    """``write`` on the store file at ``path`` when no ``serve`` holds it: this process is then the
    one writer (a running server's write lock makes the connect fail instead)."""
    con = duckdb.connect(str(path))
    try:
        return run_alone_on(con, write)
    finally:
        con.close()


# -- the writes ------------------------------------------------------------------------------

def replace_traces(rows: pa.Table, revised: Sequence[str] = (), since_us: int | None = None) -> DerivedWrite[int]:
    """Insert ``rows`` (columns of ``traces``, by name) into ``traces``; first delete the rows of the
    ``revised`` traces completed at or after ``since_us`` (``rows`` holds their revisions). Found by
    completed_at, the order rows are appended in: zonemaps skip the rest of the table."""
    columns = ", ".join(f'"{c}"' for c in rows.column_names)

    def apply(con: duckdb.DuckDBPyConnection) -> int:
        if revised:
            con.register("revised", pa.table({"trace_id": pa.array(list(revised), pa.string())}))
            try:
                con.execute("DELETE FROM traces WHERE completed_at >= make_timestamp($since::BIGINT) "
                            "AND trace_id IN (SELECT trace_id FROM revised)", {"since": since_us})
            finally:
                con.unregister("revised")
        con.register("new_traces", rows)
        try:
            con.execute(f"INSERT INTO traces ({columns}) SELECT * FROM new_traces")
        finally:
            con.unregister("new_traces")
        return rows.num_rows
    return DerivedWrite("traces", apply)


@dataclass(frozen=True)
class RetentionPass:
    spans: int                  # spans deleted
    live_segments: frozenset    # segments some payload row still references (after the deletes)


def delete_older_than(cutoff_us: int) -> DerivedWrite[RetentionPass]:
    """Delete spans that started before ``cutoff_us``, evals and logs received before it, and the
    payload rows no span references any more."""
    def apply(con: duckdb.DuckDBPyConnection) -> RetentionPass:
        cut = [cutoff_us]
        n = con.execute("DELETE FROM spans_core WHERE start_time < make_timestamp(?::BIGINT)", cut).fetchone()[0]
        con.execute("DELETE FROM evals WHERE ingest_seq <= (SELECT max(ingest_seq) FROM payloads "
                    "WHERE received_at < make_timestamp(?::BIGINT))", cut)
        con.execute("DELETE FROM logs WHERE received_at < make_timestamp(?::BIGINT)", cut)
        con.execute("DELETE FROM payloads WHERE received_at < make_timestamp(?::BIGINT) AND payload_id NOT IN "
                    "(SELECT DISTINCT payload_id FROM spans_core WHERE payload_id IS NOT NULL)", cut)
        live = frozenset(r[0] for r in con.execute("SELECT DISTINCT segment FROM payloads").fetchall())
        return RetentionPass(int(n), live)
    return DerivedWrite("retention", apply)


@dataclass(frozen=True)
class BudgetPass:
    spans: int                  # spans deleted
    payloads: int               # payload rows deleted (one per request)


def delete_segments_before(keep_from: int) -> DerivedWrite[BudgetPass]:
    """Delete the rows of every payload in segments below ``keep_from`` (the disk budget's oldest data first):
    their spans, evals and logs, the payload rows, and the trace rows none of whose spans remain (every span
    older than the oldest payload left). The caller never passes a segment that may hold a record DuckDB
    lacks (``StoreWriter.current_segment``)."""
    def apply(con: duckdb.DuckDBPyConnection) -> BudgetPass:
        k = {"keep": keep_from}
        last = con.execute("SELECT max(ingest_seq) FROM payloads WHERE segment < $keep", k).fetchone()[0]
        if last is None:
            return BudgetPass(0, 0)
        # a row's ingest_seq is its commit's, as its payload's: the bound lets zonemaps skip newer row groups
        k["last"] = last
        gone = "ingest_seq <= $last AND payload_id IN (SELECT payload_id FROM payloads WHERE segment < $keep)"
        n = con.execute(f"DELETE FROM spans_core WHERE {gone}", k).fetchone()[0]
        con.execute(f"DELETE FROM evals WHERE {gone}", k)
        con.execute(f"DELETE FROM logs WHERE {gone}", k)
        p = con.execute("DELETE FROM payloads WHERE segment < $keep", {"keep": keep_from}).fetchone()[0]
        floor = con.execute("SELECT coalesce(min(ingest_seq), $next) FROM payloads", {"next": last + 1}).fetchone()[0]
        con.execute("DELETE FROM traces WHERE max_ingest_seq < $floor", {"floor": floor})
        return BudgetPass(int(n), int(p))
    return DerivedWrite("retention", apply)


def update_costs(con: duckdb.DuckDBPyConnection, new_costs: pa.Table) -> int:
    """Set spans' ``cost_usd`` from ``new_costs`` (rid: the span's rowid, trace_id, cost) and sum the
    affected traces' costs again; the number of traces updated. Runs inside a derived write (reprice):
    the rowids come from the same transaction."""
    con.register("new_costs", new_costs)
    try:
        con.execute("UPDATE spans_core SET cost_usd = n.cost FROM new_costs n WHERE spans_core.rowid = n.rid")
        return int(con.execute("""
            UPDATE traces SET cost_usd = x.cost FROM (
                SELECT s.trace_id, coalesce(sum(s.cost_usd) FILTER (WHERE s.span_kind = 'LLM'),
                                            max(s.cost_usd) FILTER (WHERE s.parent_span_id IS NULL)) AS cost
                FROM spans_core s SEMI JOIN (SELECT DISTINCT trace_id FROM new_costs) a USING (trace_id)
                GROUP BY s.trace_id) x
            WHERE traces.trace_id = x.trace_id""").fetchone()[0])
    finally:
        con.unregister("new_costs")
