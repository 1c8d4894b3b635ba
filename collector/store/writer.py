"""The only DuckDB writer: one thread, a bounded queue, group commit, deduplication.

One way in. The ingest frontend has already made each payload durable in the segment log (the
write-ahead log: framed, fdatasynced) and acknowledged it; the supervisor hands the decoded
columns over with the payload's place (``payload_ref``) and the writer inserts them in large
groups, off the acknowledgement path, so DuckDB's commits and checkpoints never hold up a client.
An acknowledged span survives ``kill -9``: records the database never got are re-inserted from
the segment log on restart (``replay.py``).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import duckdb
import numpy as np
import pyarrow as pa

from .. import schema
from ..decode.normalize import NormalizedBatch, span_keys
from ..errors import SetAside, ShuttingDown
from ..stats import IngestStats
from . import diskfull
from .commit import Commit, Committed
from .database import SEGMENTS_DIR, PayloadDecoder, db_path, migrate, register_functions, sandbox
from .derived import DerivedQueue, DerivedWrite
from .files import make_private_dir, tighten
from .quarantine import DDL as QUARANTINE_DDL
from .quarantine import Quarantine, is_data_error
from .segments import list_segments, segment_sizes

log = logging.getLogger("shadowlens.store")

# Group sizes, measured on bench/ingest.py (medians of 3-run sets, ingest only): at least 8k spans or
# 0.1 s: 42-44k spans/s; 16k or 0.2 s: 50.5k, 47.8k, 43.1k; 32k or 0.3 s: 44k. Within the run-to-run
# spread, but not worse. In isolation DuckDB appends 1M unique rows at 8.6 us/row in 8k-row groups
# and 7.8 in 32k; but each commit frees room in the frontend's queue, and big commits free it in lumps.
MAX_GROUP_SPANS = 32768
MIN_GROUP_SPANS = 16384
# Measured (one DuckDB thread, 786k benchmark spans in 32k-row commits): 6.0 us/row with DuckDB's
# default 122,880-row groups (3.6 of it in COMMIT: WAL, then checkpoints); 16,384: 4.7, worst commit 0.44 -> 0.18 s.
ROW_GROUP_ROWS = 16384
GROUP_LINGER_S = 0.2           # bounds the time to visibility of acknowledged spans
DEDUP_SEED_SECONDS = 3600
SLOW_COMMIT_S = 0.5
REPLAY_META_KEY = "replay_from_segment"


@dataclass
class _Task:
    batch: NormalizedBatch
    future: Future
    payload_ref: tuple[int, int, int]   # (segment, offset, length) of the payload in the segment log


class RecentKeys:
    """Bounded memory of recently stored spans' 64-bit keys (``normalize.span_keys``), 8 bytes a key.

    A pre-filter, never a verdict: a key it has seen says only "maybe stored", and the writer
    compares the whole (trace_id, span_id) with the stored rows before it drops a span. So each
    run of keys also remembers the commit sequence numbers (``ingest_seq``) its spans were stored
    under, and a lookup says which range of commits to compare against.

    Retries (a client re-sending after a lost response) arrive within seconds or minutes. Keys
    live in sorted numpy runs merged like a log-structured tree (a new run merges into the last
    one while it is at least half its size), so a lookup is a few ``searchsorted`` and no key is
    touched from Python. The oldest runs are dropped beyond ``max_keys``.
    """

    GENERATION = 262_144       # the size at which a run stops growing (the unit of forgetting)

    def __init__(self, max_keys: int):
        self.max_keys = max(self.GENERATION, max_keys)
        self.max_generations = max(1, max_keys // self.GENERATION)
        self.runs: deque[tuple[np.ndarray, int, int]] = deque()    # (sorted keys, lowest seq, highest seq)

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, tuple[int, int] | None, bool]:
        """(True where a key may belong to a stored span, the commit range those spans are in,
        whether a key repeats within ``keys``): one sort of the keys answers all three."""
        keys = np.asarray(keys, dtype=np.uint64)
        seen = np.zeros(len(keys), dtype=bool)
        if len(keys) < 2 and not self.runs:
            return seen, None, False
        # sorted queries: numpy's binary search starts each from the previous answer, which
        # measured ~4x faster than searching the runs in arrival order
        order = np.argsort(keys)
        sk = keys[order]
        repeated = bool((sk[1:] == sk[:-1]).any())
        hit_sorted = np.zeros(len(sk), dtype=bool)
        lo = hi = None
        for run, run_lo, run_hi in self.runs:
            idx = np.searchsorted(run, sk)
            idx[idx == len(run)] = 0
            hit = run[idx] == sk
            if hit.any():
                hit_sorted |= hit
                lo = run_lo if lo is None else min(lo, run_lo)
                hi = run_hi if hi is None else max(hi, run_hi)
        seen[order] = hit_sorted
        return seen, (None if lo is None else (lo, hi)), repeated

    def remember(self, keys: np.ndarray, seq: int, last_seq: int | None = None) -> None:
        """Remember the keys of spans stored by commit ``seq`` (or commits ``seq`` .. ``last_seq``)."""
        run = np.sort(np.asarray(keys, dtype=np.uint64))
        # distinct, by a mask: np.unique took 7.4 ms for 32k keys where the sort takes 0.9
        run = run[np.concatenate(([True], run[1:] != run[:-1]))] if len(run) else run
        if not len(run):
            return
        lo, hi = seq, seq if last_seq is None else last_seq
        runs = self.runs
        # a merge is a sort of the two (radix for integers); a key may sit in two runs (a rare
        # collision of distinct spans): the union of the runs' commit ranges still covers both
        while runs and len(runs[-1][0]) < self.GENERATION and len(run) * 2 >= len(runs[-1][0]):
            prev, prev_lo, prev_hi = runs.pop()
            run = np.sort(np.concatenate((prev, run)), kind="stable")
            lo, hi = min(lo, prev_lo), max(hi, prev_hi)
        runs.append((run, lo, hi))
        while self.size() > self.max_keys and len(runs) > 1:
            runs.popleft()

    def size(self) -> int:
        return sum(len(r[0]) for r in self.runs)

    def nbytes(self) -> int:
        return sum(r[0].nbytes for r in self.runs)


class StoreWriter:
    """Owns the DuckDB file for writing. ``submit`` from any thread; everything else runs on one thread."""

    def __init__(self, data_dir: Path, cohort_labels, stats: IngestStats, *, dedup_max_keys: int = 4_000_000,
                 duckdb_settings: dict | None = None,
                 now: Callable[[], float] = time.time):
        self.data_dir = Path(data_dir)
        self.cohort_labels = tuple(cohort_labels)
        self.stats = stats
        self.now = now
        # One DuckDB thread and a larger checkpoint threshold: with 2 cores shared with the decoder,
        # parallel inserts and frequent checkpoints cost more than they give (measured: 53k -> 65k
        # spans/s for the commit path alone). The memory limit bounds the sidecar's RSS.
        self.duckdb_settings = {"threads": 1, "checkpoint_threshold": "64MB", "memory_limit": "128MB",
                                **(duckdb_settings or {})}
        self._dedup = RecentKeys(dedup_max_keys) if dedup_max_keys else None
        self._queue: deque[_Task] = deque()
        self._queued_spans = 0
        self._queued_tasks = 0          # ever queued / ever finished (committed or failed): flush()
        self._finished_tasks = 0
        self._frontend_low = 0          # lowest segment the frontend may still send records of
        self.replay_from = 0            # every record in lower segments is in DuckDB
        self._failed_low = 1 << 62      # lowest segment of a record whose commit failed (replayed on start)
        self._cond = threading.Condition()
        self._commit_cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.committed_seq = 0
        self.con: duckdb.DuckDBPyConnection | None = None
        self.decoder: PayloadDecoder | None = None
        self._insert_spans = schema.spans_insert_select(self.cohort_labels, "new_spans")
        self.replay_normalizer = None   # set by serve: re-decodes records found only in the segment log
        # called on the writer thread after each commit, in seq order; must be quick (append to a queue)
        self._followers: list[Callable[[Committed], None]] = []
        self.derived = DerivedQueue()   # trace rows, retention, reprice, quarantine: run between span commits
        stats.gauges["ingest_queue_spans"] = lambda: float(self._queued_spans)

    # -- lifecycle -------------------------------------------------------------------------
    def open(self) -> None:
        """Open or create the store (also rebuilds dedup memory); called before receivers start."""
        make_private_dir(self.data_dir)
        self.con = _connect(db_path(self.data_dir), self.duckdb_settings)
        tighten(self.data_dir)      # the database just created, and what an older version left readable
        self._catalog = self.con.execute("SELECT current_database()").fetchall()[0][0]
        self.decoder = PayloadDecoder(self.data_dir)
        register_functions(self.con, self.decoder)
        migrate(self.con, self.cohort_labels)
        self.con.execute(QUARANTINE_DDL)
        self.quarantine = Quarantine(self.data_dir, self.data_dir / SEGMENTS_DIR, self.stats)
        row = self.con.execute("SELECT coalesce(max(payload_id), 0), coalesce(max(ingest_seq), 0) FROM payloads").fetchone()
        self._next_payload_id = int(row[0]) + 1
        self.committed_seq = int(row[1])
        existing = list_segments(self.data_dir / SEGMENTS_DIR)
        # A fresh segment per start: a torn tail from a crash is never appended to.
        self._drop_torn_payloads()
        self.first_segment = (existing[-1] + 1) if existing else 1
        rows = self.con.execute("SELECT value FROM shadowlens_meta WHERE key = ?", [REPLAY_META_KEY]).fetchall()
        # A store without the key predates framed segments: nothing in it can be replayed.
        self.replay_from = int(rows[0][0]) if rows else self.first_segment
        self._frontend_low = self.first_segment
        if self._dedup is not None:
            self._seed_dedup()
        from .replay import replay
        replay(self, self.data_dir / SEGMENTS_DIR, self.replay_from, self.first_segment)
        self._write_replay_from(self.first_segment)
        self.replay_from = self.first_segment

    def _seed_dedup(self) -> None:
        """Remember the keys of the last hour's spans (at most ``dedup_max_keys``), oldest first,
        each generation with the commits it came from."""
        cutoff = self.now() - DEDUP_SEED_SECONDS
        t = self.con.sql(
            "SELECT trace_id_hi, trace_id_lo, span_id_int, ingest_seq FROM spans_core"
            " WHERE received_at >= make_timestamp($cutoff::BIGINT) ORDER BY received_at DESC, ingest_seq DESC LIMIT $n",
            params={"cutoff": int(cutoff * 1e6), "n": self._dedup.max_generations * RecentKeys.GENERATION}
        ).to_arrow_table()
        if not t.num_rows:
            return
        cols = [t.column(c).to_numpy()[::-1] for c in ("trace_id_hi", "trace_id_lo", "span_id_int", "ingest_seq")]
        keys, seqs = span_keys(*cols[:3]), cols[3]
        step = RecentKeys.GENERATION
        for i in range(0, len(keys), step):
            part = seqs[i:i + step]
            self._dedup.remember(keys[i:i + step], int(part.min()), int(part.max()))

    def _new_spans(self, traced: list[_Task]) -> np.ndarray:
        """True for the spans of ``traced`` (in order) to store: the first of each identity
        (trace_id, span_id) within the group, unless a span of that identity is stored already.

        The memory of keys only nominates candidates; the whole identity decides, compared within
        the group in numpy and against the nominated commits' rows in DuckDB. Retries are rare, so
        the query runs for few commits and reads only the row groups of the nominated commits."""
        keys = np.concatenate([np.asarray(t.batch.keys, dtype=np.uint64) for t in traced])
        keep = np.ones(len(keys), dtype=bool)
        maybe, commits, repeated = self._dedup.lookup(keys)
        ids = None
        if repeated:     # a repeated key in the group: compare identities
            ids = _identities(traced)
            _, first = np.unique(ids, return_index=True)
            keep[:] = False
            keep[first] = True
        maybe &= keep
        if maybe.any():
            ids = _identities(traced) if ids is None else ids
            idx = np.flatnonzero(maybe)
            cand = ids[idx]
            candidates = pa.table({"i": pa.array(idx, pa.int64()), "hi": cand["hi"], "lo": cand["lo"],
                                   "s": cand["s"]})
            self.con.register("dedup_candidates", candidates)
            try:
                stored = self.con.execute(
                    "SELECT c.i FROM dedup_candidates c WHERE EXISTS (SELECT 1 FROM spans_core s"
                    " WHERE s.ingest_seq BETWEEN $lo AND $hi AND s.trace_id_hi = c.hi AND s.trace_id_lo = c.lo"
                    " AND s.span_id_int = c.s)", {"lo": commits[0], "hi": commits[1]}).fetchnumpy()["i"]
            finally:
                self.con.unregister("dedup_candidates")
            keep[np.asarray(stored, dtype=np.int64)] = False
        return keep

    def _drop_torn_payloads(self) -> None:
        """After a crash, rows may reference payload bytes whose fdatasync never finished (DuckDB
        commits while the payload sync runs; neither was acknowledged). Such rows are deleted, so
        a client's retry of those spans is stored again instead of being taken for a duplicate."""
        sizes = segment_sizes(self.data_dir / SEGMENTS_DIR)
        ends = self.con.execute("SELECT segment, max(byte_offset + length) FROM payloads GROUP BY segment").fetchall()
        torn = [(seg, sizes.get(seg, 0)) for seg, end in ends if end > sizes.get(seg, 0)]
        if not torn:
            return
        con = self.con
        con.begin()
        for seg, size in torn:
            ids = "SELECT payload_id FROM payloads WHERE segment = $seg AND byte_offset + length > $size"
            for table in ("spans_core", "evals", "logs"):
                con.execute(f"DELETE FROM {table} WHERE payload_id IN ({ids})", {"seg": seg, "size": size})
            con.execute("DELETE FROM payloads WHERE segment = $seg AND byte_offset + length > $size",
                        {"seg": seg, "size": size})
        con.commit()
        log.warning("removed rows of %d torn payload segment tail(s) left by a crash (never acknowledged)", len(torn))

    def start(self) -> None:
        if self.con is None:
            self.open()
        self._thread = threading.Thread(target=self._run, name="shadowlens-store-writer", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Refuse new work, commit everything queued, checkpoint, close. Safe twice and without start."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self.con is not None:
            try:
                self.con.execute("CHECKPOINT")
            except duckdb.Error as exc:
                log.warning("checkpoint at shutdown failed: %s", exc)
            self.con.close()
            self.con = None
            self.decoder.close()

    # -- API for receivers -----------------------------------------------------------------
    def current_segment(self) -> int:
        """Retention deletes no segment from this one on: it may hold records DuckDB lacks yet."""
        return min(self.replay_from, self._frontend_low) if self._frontend_low else self.replay_from

    def submit(self, batch: NormalizedBatch, payload_ref: tuple[int, int, int], low_segment: int | None = None) -> Future:
        """Queue a decoded record for the next group commit; the Future resolves once it is in DuckDB.

        The ingest frontend has appended, synced and acknowledged the payload (``payload_ref``: its
        segment, offset and length) and admitted it against its own limit: the writer must take it.
        ``low_segment``: the lowest segment the frontend may still send records of.
        """
        fut: Future = Future()
        with self._cond:
            self._queued_spans += batch.accepted
            if low_segment is not None:
                self._frontend_low = max(self._frontend_low, low_segment)
            self._queue.append(_Task(batch, fut, payload_ref))
            self._queued_tasks += 1
            self._cond.notify()
        return fut

    def wait_for_room(self, limit: int, timeout: float) -> bool:
        """Block while more than ``limit`` spans wait for their commit (or until stopping); False on timeout."""
        with self._commit_cond:
            return self._commit_cond.wait_for(lambda: self._queued_spans <= limit or self._stopping, timeout)

    def flush(self, timeout: float) -> bool:
        """Wait until everything submitted so far is committed (or failed); False on timeout."""
        with self._commit_cond:
            target = self._queued_tasks
            return self._commit_cond.wait_for(lambda: self._finished_tasks >= target, timeout)

    def wait_for_commit(self, seq: int, timeout: float) -> int:
        """Block until a commit newer than ``seq`` exists (or timeout); returns the newest seq."""
        with self._commit_cond:
            self._commit_cond.wait_for(lambda: self.committed_seq > seq, timeout)
            return self.committed_seq

    def follow(self, callback: Callable[[Committed], None]) -> None:
        """Call ``callback`` with every later commit's stored rows, on the writer thread, in seq order.
        Commits before the call are not replayed: read them from the store (``committed_seq``)."""
        self._followers.append(callback)

    def write(self, write: DerivedWrite) -> Future:
        """Queue a derived write (trace rows, retention, reprice, quarantine: ``derived.py``) for the writer
        thread, which runs it in one transaction between span commits. The Future resolves with its result
        once committed, or with the exception that rolled it back."""
        with self._cond:
            if self._stopping or self._thread is None:
                raise ShuttingDown(f"the store writer is not running: {write.name!r} cannot be written now "
                                   "(start the store first; at shutdown, stop writing before it)")
            fut = self.derived.put(write)
            self._cond.notify()
        return fut

    def set_aside(self, ref: tuple[int, int, int], signal: str, stage: str, reason: str):
        """Set an acknowledged record aside from any thread (the decoder could not read it); its path."""
        write = DerivedWrite("quarantine", lambda con: self.quarantine.set_aside(con, ref, signal, stage, reason))
        return self.write(write).result()

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A connection for another thread's reads (readers, analyzers, exporters); SQL functions are shared
        with it. Writes go through ``write``."""
        cur = self.con.cursor()
        cur.execute(f'USE "{self._catalog}"')     # a cursor starts in the connection's default catalog
        return cur

    # -- the writer thread -----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    self.derived.run_pending(self.con, self._cond)      # releases the lock while each runs
                    if self._queue or self._stopping:
                        break
                    self._cond.wait()
                if not self._queue and self._stopping:
                    return
                # Linger for a bigger group: fewer, larger commits (the clients have their acks already).
                deadline = time.monotonic() + GROUP_LINGER_S
                while (self._queued_spans < MIN_GROUP_SPANS and not self._stopping
                       and (left := deadline - time.monotonic()) > 0):
                    self._cond.wait(left)
                    self.derived.run_pending(self.con, self._cond)      # a linger's idle time is theirs
                group, spans = [], 0
                while self._queue and spans < MAX_GROUP_SPANS:
                    task = self._queue.popleft()
                    group.append(task)
                    spans += task.batch.accepted
                # every record below this segment has reached the queue; those still queued are later
                low = min([self._frontend_low or self.first_segment, self._failed_low]
                          + [t.payload_ref[0] for t in self._queue])
            try:
                t0 = time.perf_counter()
                results = self._commit(group, low)
                self.stats.add("store_insert_seconds", None, time.perf_counter() - t0)
                self.stats.add("store_commits", None, 1)
                took = time.perf_counter() - t0
                self.stats.add("store_commit_seconds", None, took)
                if took > SLOW_COMMIT_S:
                    log.info("a commit of %d spans took %.2f s (DuckDB checkpoints run inside commits)", spans, took)
            except BaseException as exc:  # the store failed: no waiting caller gets an ack
                # (records the frontend acknowledged stay in the segment log; replay_from did not
                # move past them, so the next start inserts them)
                log.exception("commit of %d requests failed", len(group))
                try:
                    self.con.rollback()
                except duckdb.Error:
                    pass
                # disk full: keep the group and retry it until space returns (diskfull.py); else it fails
                # else a record's values: commit the others, set the culprit aside (quarantine.py)
                results = diskfull.retry_group(self, group, low, exc) or self._isolate(group, low, exc)
            failed = [t.payload_ref[0] for t, r in zip(group, results)
                      if isinstance(r, BaseException) and not isinstance(r, SetAside)]
            with self._cond:
                self._queued_spans -= spans
                if failed:     # left for the next start's replay: replay_from must not pass them
                    self._failed_low = min(self._failed_low, *failed)
            for task, result in zip(group, results):
                if isinstance(result, BaseException):
                    task.future.set_exception(result)
                else:
                    task.future.set_result(result)
            with self._commit_cond:
                self._finished_tasks += len(group)
                self._commit_cond.notify_all()

    def commit_replayed(self, items: list[tuple[NormalizedBatch, tuple[int, int, int]]]) -> None:
        """Insert records recovered from the segment log (before the writer thread starts). A record
        that cannot be inserted is set aside, so that it cannot keep ``serve`` from starting."""
        group = [_Task(batch, Future(), ref) for batch, ref in items]
        try:
            self._commit(group)
        except Exception as exc:  # isolated, or raised again, below
            self._rollback()
            for result in self._isolate(group, None, exc):
                if isinstance(result, BaseException) and not isinstance(result, SetAside):
                    raise result

    def _isolate(self, group: list[_Task], low: int | None, exc: BaseException) -> list:
        """The commit of ``group`` failed with ``exc``: if a record's values can be the cause, commit
        the records one by one and set aside each that fails alone; the results in ``group``'s order.

        One bad record never takes its group down with it. Failures that are not about values (I/O,
        a broken database), or that every record of a group shares, set nothing aside: the records
        stay in the segment log and are inserted on the next start, as before."""
        if not is_data_error(exc):
            return [exc] * len(group)
        results: list = []
        culprits: list[int] = []
        for i, task in enumerate(group):
            try:
                # replay_from does not move until every record of the group is committed or set aside
                results.extend(self._commit([task]))
            except Exception as one:  # classified below
                self._rollback()
                results.append(one)
                culprits.append(i)
        if len(group) > 1 and len(culprits) == len(group):
            log.error("every one of %d records failed alone (%s): the store is at fault, not a record; they stay in "
                      "the segment log", len(group), exc)
            return results
        for i in culprits:
            task, error = group[i], results[i]
            if not is_data_error(error):
                continue
            path = self.quarantine.set_aside(self.con, task.payload_ref, task.batch.signal, "insert", error,
                                             task.batch.payload or None)
            results[i] = SetAside(f"the store could not insert this request ({error}); it was set aside in {path}")
        if low is not None and low > self.replay_from and all(
                not isinstance(r, BaseException) or isinstance(r, SetAside) for r in results):
            self._write_replay_from(low)
            self.replay_from = low
        return results

    def _rollback(self) -> None:
        try:
            self.con.rollback()
        except duckdb.Error:      # no transaction open (it failed in COMMIT, or before BEGIN)
            pass

    def _write_replay_from(self, segment: int) -> None:
        """Record in the open transaction (or auto-commit) that segments below ``segment`` are all in DuckDB."""
        self.con.execute("INSERT OR REPLACE INTO shadowlens_meta VALUES (?, ?)", [REPLAY_META_KEY, str(segment)])

    def _commit(self, group: list[_Task], low: int | None = None) -> list[Commit]:
        seq = self.committed_seq + 1
        now_us = int(self.now() * 1e6)
        span_tables, eval_tables, log_tables, payload_rows, results = [], [], [], [], []
        dup_total = 0
        # one dedup decision for the whole group, then each request's slice of the answer
        traced = [t for t in group if t.batch.signal == "traces" and t.batch.accepted]
        keeps: dict[int, np.ndarray] = {}
        stored_keys = []
        if self._dedup is not None and traced:
            mask = self._new_spans(traced)
            pos = 0
            for t in traced:
                keeps[id(t)] = mask[pos:pos + t.batch.accepted]
                stored_keys.append(np.asarray(t.batch.keys, dtype=np.uint64)[keeps[id(t)]])
                pos += t.batch.accepted
        for task in group:
            b = task.batch
            keep = keeps.get(id(task))
            dups = 0
            if keep is not None:
                dups = int(len(keep) - np.count_nonzero(keep))
            stored = b.accepted - dups
            dup_total += dups
            results.append(Commit(seq, stored, dups))
            if stored == 0 and b.logs is None and b.evals is None:
                continue
            payload_id = self._next_payload_id
            self._next_payload_id += 1
            seg, off, length = task.payload_ref
            payload_rows.append((payload_id, seg, off, length, b.signal))
            if b.spans is not None and stored:
                t = b.spans if not dups else b.spans.filter(pa.array(keep))
                span_tables.append(t.append_column("payload_id", _const(payload_id, t.num_rows)))
            if b.evals is not None:
                ev = b.evals
                if dups:
                    gone = b.spans.filter(pa.array(~keep))
                    dropped = {f"{hi:016x}{lo:016x}{s_:016x}" for hi, lo, s_ in zip(
                        *(gone.column(c).to_pylist() for c in ("trace_id_hi", "trace_id_lo", "span_id_int")))}
                    mask = [(t_ + s_) not in dropped for t_, s_ in zip(ev.column(0).to_pylist(), ev.column(1).to_pylist())]
                    ev = ev.filter(pa.array(mask))
                if ev.num_rows:
                    eval_tables.append(ev.append_column("payload_id", _const(payload_id, ev.num_rows)))
            if b.logs is not None:
                log_tables.append(b.logs.append_column("payload_id", _const(payload_id, b.logs.num_rows)))
        con = self.con
        con.begin()
        new_spans = new_evals = None
        if span_tables:
            new_spans = pa.Table.from_batches(span_tables)
            con.register("new_spans", new_spans)
            con.execute(self._insert_spans, {"seq": seq, "now": _ts_literal(now_us)})
            con.unregister("new_spans")
        if eval_tables:
            new_evals = pa.Table.from_batches(eval_tables)
            con.register("new_evals", new_evals)
            con.execute("INSERT INTO evals SELECT * EXCLUDE (payload_id), ?::BIGINT, payload_id FROM new_evals", [seq])
            con.unregister("new_evals")
        if log_tables:
            new_logs = pa.Table.from_batches(log_tables)
            con.register("new_logs", new_logs)
            con.execute(
                "INSERT INTO logs SELECT trace_id, span_id, make_timestamp(time_ns // 1000), event_name, severity_text,"
                " service_name, body, attributes, resource_attributes, ?::BIGINT, make_timestamp(?::BIGINT), payload_id"
                " FROM new_logs", [seq, now_us])
            con.unregister("new_logs")
        if payload_rows:
            cols = list(zip(*payload_rows))
            new_payloads = pa.table({
                "payload_id": pa.array(cols[0], pa.int64()), "segment": pa.array(cols[1], pa.int32()),
                "byte_offset": pa.array(cols[2], pa.int64()), "length": pa.array(cols[3], pa.int32()),
                "signal": pa.array(cols[4], pa.string())})
            con.register("new_payloads", new_payloads)
            con.execute("INSERT INTO payloads SELECT *, make_timestamp(?::BIGINT), ?::BIGINT FROM new_payloads",
                        [now_us, seq])
            con.unregister("new_payloads")
        moved = low is not None and low > self.replay_from
        if moved:
            self._write_replay_from(low)
        con.commit()
        if moved:
            self.replay_from = low
        if stored_keys:          # only what is committed: a failed commit stored nothing to remember
            self._dedup.remember(np.concatenate(stored_keys), seq)
        if dup_total:
            self.stats.add("spans_duplicate", None, dup_total)
        if self._followers and (new_spans is not None or new_evals is not None):
            committed = Committed(seq, new_spans, new_evals)   # before the notify: waiters find it queued
            for follower in self._followers:
                try:
                    follower(committed)
                except Exception:  # the rows are committed; a follower's bug must not fail the commit
                    log.exception("a commit follower failed")
        with self._commit_cond:
            self.committed_seq = seq
            self._commit_cond.notify_all()
        return results


_IDENTITY = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("s", "<u8")])


def _identities(tasks: list[_Task]) -> np.ndarray:
    """The spans' whole identities (trace_id_hi, trace_id_lo, span_id), in order, as one record array."""
    out = np.empty(sum(t.batch.accepted for t in tasks), dtype=_IDENTITY)
    pos = 0
    for t in tasks:
        n = t.batch.accepted
        for field, col in (("hi", "trace_id_hi"), ("lo", "trace_id_lo"), ("s", "span_id_int")):
            out[field][pos:pos + n] = t.batch.spans.column(col).to_numpy()
        pos += n
    return out


def _connect(path: Path, settings: dict) -> duckdb.DuckDBPyConnection:
    """The writer's connection: the store file attached with ``ROW_GROUP_ROWS``-row groups.

    A row group is written straight to the file once full ("optimistic write"); until then its
    rows go through DuckDB's own WAL and are written again at the next checkpoint. With DuckDB's
    default (122,880 rows) none of our commits (16-32k spans) fills one, so every span was
    written twice; the segment log is the write-ahead log that matters here anyway. The size
    is a property of the attachment, not the file: every writing session must ask for it.
    """
    # Spills next to the store (DuckDB's default for an in-memory database is ./.tmp, wherever serve was
    # started), inside the owner-only data dir and the sandbox's allowed directories.
    config = {"temp_directory": f"{path}.tmp", **{k: str(v) for k, v in settings.items()}}
    con = duckdb.connect(config=config)
    name = path.stem       # the catalog name a plain duckdb.connect(path) gives, so SQL reads the same
    quoted_path = str(path).replace("'", "''")
    con.execute(f"ATTACH '{quoted_path}' AS \"{name}\" (ROW_GROUP_SIZE {ROW_GROUP_ROWS})")
    con.execute(f'USE "{name}"')
    # The query socket's cursors share this database instance: lock it down now that the store is
    # attached (the writer itself needs no file access beyond the store's own files).
    sandbox(con)
    return con


def _const(value: int, n: int) -> pa.Array:
    return pa.repeat(pa.scalar(value, pa.int64()), n) if hasattr(pa, "repeat") else pa.array([value] * n, pa.int64())


def _ts_literal(us: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(us // 1_000_000)) + f".{us % 1_000_000:06d}"
