"""The window's trace rows in memory, columnar, fed by the trace assembler's writes (``TraceAssembler.writes``).

``WindowQuery.refresh`` read the whole window from DuckDB every ``analyzers.window_refresh``: 160-170 ms at
62k-100k traces, ~0.045 cores of serve at 1,000 spans/s with the window full. ``WindowState`` keeps what the
snapshot needs of each row (its route and cohort values as one code, duration, steps, cost, refused,
escalated, completed_at; ~9 MB at 100k traces) and of each row's evals (name code, failed, count), and computes
the same ``WindowSnapshot`` (a refresh at 100k traces in 1,000 combinations, 5 s of writes at 1,000 spans/s
applied: ~35 ms of CPU on a loaded 2-core machine, where the SQL took 115-130):

* every write to ``traces`` by the assembler (first completions, revisions, call units) replaces the rows of
  its trace ids, as ``derived.replace_traces`` does in the table (a trace's rows, its own and its call units',
  share its trace id and are always written together);
* rows leave at the window's edge (``completed_at < now - window``), their evals with them;
* the rows of all but the newest ``exact_traces`` traces (the assembler's horizon of revisions) are folded
  into sums per bucket of completed_at (analyzers/window_buckets.py), so the state does not grow with rate x
  window (a closed loop held 150 s kept ~1M traces' rows); a folded bucket leaves when all of it is past the
  edge, a combination with folded rows reads its quantiles off sketch counts (within 1 %), and a write that
  revises a folded trace reads the state from the store again (at 300k traces of 128 combinations: 8 MB held
  where the rows took 31, a refresh after 5,000 new traces as costly, one with nothing new half as);
* the state is seeded from the store at start (``WindowQuery.seed_rows_sql`` and ``seed_evals_sql``) and
  seeded again after any other derived write that can change trace rows: a reprice (costs), an unknown
  name. Retention deletes trace rows only when the disk budget removes whole segments (by age it deletes
  spans, evals and logs, not traces): after a retention write one count of the window's rows in the store
  tells whether it removed any, and only then is the state seeded again.

The eval fail ratios count the evals each trace row was written with (see ``window.window_evals``).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Mapping

import numpy as np
import polars as pl

from shadowlens.collector.store.database import frame

from .aggregates import ROUTES
from .assembly import RECENT_COMPLETED
from .buckets import unpack
from .cohorts import OVERFLOW
from .window import QUANTILES, WindowQuery, WindowSnapshot
from .window_buckets import SUMS, FoldedRows, quantiles_by_group, sum_exprs

log = logging.getLogger("shadowlens.window")

OTHER_ROUTE = "other"
# Derived writes that never change trace rows the state could not see: the assembler's own (followed
# through TraceAssembler.writes) and quarantine's (rows of the quarantine table).
_FOLLOWED = frozenset({"traces", "quarantine"})
_RETENTION = "retention"
# the window's edge in this many buckets of folded rows (at least a second): 15 s for the default 15 minutes
_BUCKETS_PER_WINDOW = 60


class _Unreachable(Exception):
    """A write revises a trace whose earlier row was folded into sums: the state is read from the store again."""


class WindowState:
    """The window's rows in memory; ``refresh()`` gives what ``WindowQuery.refresh()`` gives over the store.

    ``derived``: the store's counts of committed derived writes by name (``StoreWriter.derived.done``);
    None: the state is seeded once and follows the assembler's writes only.

    ``exact_traces``: the newest traces kept as rows (the assembler's horizon of revisions); older ones are folded
    into sums per ``bucket_s`` of completed_at (analyzers/window_buckets.py; default: the window / 60)."""

    def __init__(self, query: WindowQuery, derived: Mapping[str, int] | None = None, *,
                 exact_traces: int = RECENT_COMPLETED, bucket_s: float | None = None):
        self.query = query
        self.labels = query.labels
        self.window_s = query.window_s
        self.now: Callable[[], float] = query.now
        self.derived = derived
        self._lock = threading.Lock()
        self._pending: list[tuple[pl.DataFrame, pl.DataFrame, list[str]]] = []     # guarded by _lock
        self._writes = 0                   # assembler writes received (guarded by _lock)
        self._seen: dict[str, int] | None = None   # the derived counts at the last seed (None: never seeded)
        self._next_key = 0                 # trace keys: a row's evals refer to it by key, not by its trace id
        self._combos: list[tuple] = []     # (route, *cohort values) by code
        self._combo_ids: dict[tuple, int] = {}
        self._names: list[str] = []        # eval names by code
        self._name_ids: dict[str, int] = {}
        self._seeded_us = -1               # rows completed up to this time may be in the last seed
        self._group_cache: dict | None = None   # _groups' work for the last set of live combinations
        self._rows = self._empty_rows()
        self._evals = self._empty_evals()
        self.exact_traces = exact_traces
        self._bucket_s = bucket_s if bucket_s is not None else max(1.0, self.window_s / _BUCKETS_PER_WINDOW)
        self._folded = FoldedRows(self._bucket_s)
        self.seeds = 0                     # times seeded from the store (tests, and a log line)

    # -- the assembler's side ----------------------------------------------------------------------
    def on_write(self, written: pl.DataFrame, evals: pl.DataFrame, replaced: list[str]) -> None:
        """``TraceAssembler.writes`` follower, on the assembler's thread: only queued here, so that nothing
        in it can fail a round whose rows are already committed (the round's sinks would then miss them)."""
        with self._lock:
            self._pending.append((written, evals, replaced))
            self._writes += 1

    # -- the refresher's side ----------------------------------------------------------------------
    def generation(self) -> int:
        """Changes whenever the result may: an assembler write, or a derived write the state does not follow."""
        with self._lock:
            writes = self._writes
        return writes + sum(self._others().values())

    def refresh(self) -> WindowSnapshot:
        t0 = time.perf_counter()
        now = self.now()
        cutoff_us = int((now - self.window_s) * 1e6)
        others = self._others()
        if self._seen is None or self._rewritten(others):
            self._seed(cutoff_us, others)
        else:
            try:
                self._apply(self._take())
            except _Unreachable as e:
                log.info("%s; reading the window from the store", e)
                self._seed(cutoff_us, others)
            except Exception:       # a write it cannot read: the store has the rows, read them there
                log.exception("the window could not apply the assembler's writes; reading the window from the store")
                self._seed(cutoff_us, others)
            self._expire(cutoff_us)
            if others.get(_RETENTION, 0) != self._seen.get(_RETENTION, 0):
                self._seen[_RETENTION] = others.get(_RETENTION, 0)
                if self._deleted_elsewhere(cutoff_us):
                    log.info("retention deleted trace rows of the window; reading the window from the store")
                    self._seed(cutoff_us, others)
        self._expire(cutoff_us)
        self._fold()
        traces, evals, oldest = self._stats()
        return WindowSnapshot(traces, evals, now, time.perf_counter() - t0, oldest)

    def _rewritten(self, others: dict[str, int]) -> bool:
        """Whether a derived write other than retention (a reprice, a name unknown here) committed since the seed."""
        return any(others.get(k, 0) != self._seen.get(k, 0) for k in others.keys() | self._seen.keys()
                   if k != _RETENTION)

    def rows(self) -> int:
        """Trace rows the window counts: kept as rows, and folded into sums."""
        return self._rows.height + (self._folded.rows() if self._folded else 0)

    def exact_rows(self) -> int:
        return self._rows.height

    def footprint(self) -> int:
        """Bytes held by the state's columns and sums (an estimate: polars' buffers)."""
        return int(self._rows.estimated_size() + self._evals.estimated_size() + self._folded.nbytes())

    # -- internals ---------------------------------------------------------------------------------
    def _others(self) -> dict[str, int]:
        if self.derived is None:
            return {}
        while True:
            try:
                return {k: v for k, v in dict(self.derived).items() if k not in _FOLLOWED}
            except RuntimeError:     # the writer counted a new name meanwhile: read again
                continue

    def _take(self) -> list[tuple[pl.DataFrame, pl.DataFrame, list[str]]]:
        with self._lock:
            pending, self._pending = self._pending, []
        return pending

    def _seed(self, cutoff_us: int, others: dict[str, int]) -> None:
        # Writes queued before this point are in the store already (a follower is called after the commit);
        # a write queued after it may be too: applying it again replaces its traces' rows by the same rows.
        self._take()
        con = self.query.cursor_factory()
        try:
            con.execute("BEGIN TRANSACTION READ ONLY")      # the rows and their evals from one snapshot
            try:
                rows = frame(con, self.query.seed_rows_sql, {"cutoff": cutoff_us})
                evals_from = int(rows["min_ingest_seq"].min() or 0) if rows.height else 0
                evals = frame(con, self.query.seed_evals_sql, {"cutoff": cutoff_us, "evals_from": evals_from}) \
                    if rows.height else self._raw_evals()
            finally:
                con.execute("ROLLBACK")
        finally:
            con.close()
        self._rows, self._evals, self._seeded_us = self._empty_rows(), self._empty_evals(), -1
        self._folded = FoldedRows(self._bucket_s)
        self._apply([(rows, evals, [])])
        # the assembler's clock (completed_at), not the window's: a round that started before this may have
        # committed before the read above
        self._seeded_us = int(time.time() * 1e6)
        self._seen = dict(others)
        self.seeds += 1

    def _deleted_elsewhere(self, cutoff_us: int) -> bool:
        """Whether the store lost rows of the window the state holds. Rows the state has not seen yet were
        completed after its newest row (a round's time follows the previous round's write), so the store
        holds exactly the state's rows up to that one unless something deleted some (or a revision in
        flight replaced one: then the state is read again for nothing). Counted from the first bucket of
        folded rows inside the window (they are counted per bucket)."""
        folded = self._folded
        if not self._rows.height and not folded:
            return False
        start = -(-cutoff_us // folded.bucket_us) * folded.bucket_us if folded else cutoff_us
        newest = max(int(self._rows["completed_us"].max()) if self._rows.height else 0, folded.newest_us() or 0)
        held = self._rows.filter(pl.col("completed_us") >= start).height + (folded.rows_from(start) if folded else 0)
        con = self.query.cursor_factory()
        try:
            n = con.execute("SELECT count(*) FROM traces WHERE completed_at >= make_timestamp($start::BIGINT)"
                            " AND completed_at <= make_timestamp($newest::BIGINT)",
                            {"start": start, "newest": newest}).fetchone()[0]
        finally:
            con.close()
        return n != held

    def _apply(self, writes: list[tuple[pl.DataFrame, pl.DataFrame, list[str]]]) -> None:
        """As ``replace_traces`` in the table: a write deletes the rows of the trace ids it revises, then adds its
        rows. Rows that may be in the last seed already (completed before it read the store) replace their
        trace's seeded rows instead of doubling them."""
        writes = [w for w in writes if w[0].height or w[2]]
        if not writes:
            return
        # one frame for the batch: polars' fixed cost per operation, not the rows, is most of a refresh's
        rows = self._shape_rows(_stack([w[0] for w in writes], _ROW_COLUMNS + self.labels))
        rows = rows.with_columns(_write_index([w[0].height for w in writes]),
                                 pl.Series("combo", self._codes(rows), pl.Int32))
        revised = [(t, i) for i, w in enumerate(writes) for t in w[2]]
        if revised and self._folded:
            self._check_reachable(rows, revised)
        gone = {t for t, _ in revised}
        if rows.height and rows["completed_us"].min() <= self._seeded_us:
            gone.update(rows.filter(pl.col("completed_us") <= self._seeded_us)["trace_id"].to_list())
        if revised:       # a later write of the batch revises an earlier one's trace
            last = pl.DataFrame(revised, schema={"trace_id": pl.String, "_r": pl.Int32}, orient="row").group_by(
                "trace_id").agg(pl.col("_r").max())
            rows = rows.join(last, on="trace_id", how="left").filter(
                pl.col("_r").is_null() | (pl.col("_w") >= pl.col("_r"))).drop("_r")
        if gone and self._rows.height:
            hit = pl.col("trace_id").is_in(pl.Series(list(gone), dtype=pl.String).implode())
            dropped = self._rows.filter(hit)["key"]
            if dropped.len():
                self._rows = self._rows.filter(~hit)
                self._evals = self._evals.filter(~pl.col("key").is_in(dropped.implode()))
        keys = rows.select("trace_id", "_w").unique(maintain_order=True).with_columns(
            (pl.int_range(pl.len(), dtype=pl.Int64) + self._next_key).alias("key"))
        self._next_key += keys.height
        rows = rows.join(keys, on=["trace_id", "_w"], how="inner", maintain_order="left")
        evals = self._shape_evals(_stack([w[1] for w in writes], ("trace_id", "name", "passed", "n")).with_columns(
            _write_index([w[1].height for w in writes])))
        if evals.height:
            # each of a trace's rows (its own, its call units') counts the trace's evals, as the SQL's join does
            evals = evals.join(rows.select("trace_id", "_w", "key", "combo", "completed_us"), on=["trace_id", "_w"],
                               how="inner").select(self._evals.columns)
            self._evals = pl.concat([self._evals, evals], how="vertical")
        self._rows = pl.concat([self._rows, rows.select(self._rows.columns)], how="vertical")

    def _check_reachable(self, rows: pl.DataFrame, revised: list[tuple[str, int]]) -> None:
        """Raises _Unreachable if a revised trace's earlier row is neither a row here nor in an earlier write of
        the batch: it may be in the folded sums, which cannot take one row away."""
        ids = pl.Series([t for t, _ in revised], dtype=pl.String).implode()
        held = set(self._rows.filter(pl.col("trace_id").is_in(ids))["trace_id"].to_list())
        first = dict(rows.filter(pl.col("trace_id").is_in(ids)).group_by("trace_id").agg(pl.col("_w").min()).iter_rows())
        missing = sum(1 for t, i in revised if t not in held and first.get(t, i) >= i)
        if missing:
            raise _Unreachable(f"{missing} revised trace(s) older than the window's {self.exact_traces} newest "
                               "(folded into its sums)")

    def _fold(self) -> None:
        """The rows of all but the newest ``exact_traces`` traces go into the folded sums (in chunks of an
        eighth of them: a fold is a few polars passes whatever its size)."""
        limit = self.exact_traces + self.exact_traces // 8
        if self._rows.height <= limit:
            return
        keys = self._rows["key"].unique().sort().to_numpy()
        if keys.size <= limit:
            return
        edge = keys[-self.exact_traces] if self.exact_traces else keys[-1] + 1
        old = pl.col("key") < edge
        self._folded.fold(self._rows.filter(old), self._evals.filter(old))
        self._rows = self._rows.filter(~old).rechunk()
        self._evals = self._evals.filter(~old).rechunk()

    def _codes(self, rows: pl.DataFrame) -> list[int]:
        """One number per (route, cohort values): the rows keep it, not their strings."""
        codes, combos = self._combo_ids, self._combos
        out = []
        for combo in zip(rows["route"].to_list(), *(rows[label].to_list() for label in self.labels)):
            code = codes.get(combo)
            if code is None:
                code = codes[combo] = len(combos)
                combos.append(combo)
            out.append(code)
        return out

    def _expire(self, cutoff_us: int) -> None:
        if self._rows.height and self._rows["completed_us"].min() < cutoff_us:
            # one chunk again: the statistics' passes over a frame of many chunks took half as long again
            self._rows = self._rows.filter(pl.col("completed_us") >= cutoff_us).rechunk()
            self._evals = self._evals.filter(pl.col("completed_us") >= cutoff_us).rechunk()
        self._folded.expire(cutoff_us)
        if len(self._combos) > 2 * max(1000, len(self._live_combos())):
            self._recode()
        if len(self._names) > 2 * max(100, self._evals["name"].n_unique()):
            self._rename()

    def _live_combos(self) -> np.ndarray:
        counts = np.bincount(self._rows["combo"].to_numpy(), minlength=len(self._combos))
        if self._folded:
            counts[self._folded.totals().combos] += 1
        return np.flatnonzero(counts)

    def _recode(self) -> None:
        """Combinations of cohort values no row has any more are forgotten (values come from clients)."""
        live = self._live_combos()
        new = np.full(len(self._combos), -1, np.int32)
        new[live] = np.arange(len(live), dtype=np.int32)
        self._combos = [self._combos[i] for i in live]
        self._combo_ids = {c: i for i, c in enumerate(self._combos)}
        self._group_cache = None
        remap = lambda col: pl.Series("combo", new[col.to_numpy()], pl.Int32)
        self._rows = self._rows.with_columns(remap(self._rows["combo"]))
        self._evals = self._evals.with_columns(remap(self._evals["combo"]))
        self._folded.recode(new)

    def _rename(self) -> None:
        """Eval names no eval of the window has any more are forgotten (names come from clients)."""
        folded = self._folded.names() if self._folded else np.zeros(0, np.int64)
        live = np.union1d(self._evals["name"].to_numpy(), folded).astype(np.int64)
        new = np.full(len(self._names), -1, np.int32)
        new[live] = np.arange(len(live), dtype=np.int32)
        self._names = [self._names[i] for i in live]
        self._name_ids = {n: i for i, n in enumerate(self._names)}
        self._evals = self._evals.with_columns(pl.Series("name", new[self._evals["name"].to_numpy()], pl.Int32))
        self._folded.recode(None, new)

    def _shape_rows(self, rows: pl.DataFrame) -> pl.DataFrame:
        route = pl.col("route")
        return rows.select(
            pl.col("trace_id").cast(pl.String),
            pl.when(route.is_in(list(ROUTES))).then(route).otherwise(pl.lit(OTHER_ROUTE)).alias("route"),
            *[pl.col(label).cast(pl.String).fill_null("unknown").alias(label) for label in self.labels],
            pl.col("duration_seconds").cast(pl.Float64), pl.col("steps").cast(pl.Int64),
            pl.col("cost_usd").cast(pl.Float64), pl.col("refused").cast(pl.Boolean),
            pl.col("escalated").cast(pl.Boolean), _epoch_us(rows, "completed_at").alias("completed_us"))

    def _shape_evals(self, evals: pl.DataFrame) -> pl.DataFrame:
        schema = {"trace_id": pl.String, "name": pl.Int32, "failed": pl.Boolean, "_w": pl.Int32, "n": pl.Int64}
        evals = evals.filter(pl.col("name").is_not_null())
        if not evals.height:
            return pl.DataFrame(schema=schema)
        ids, names = self._name_ids, self._names
        codes = []
        for name in evals["name"].cast(pl.String).to_list():
            code = ids.get(name)
            if code is None:
                code = ids[name] = len(names)
                names.append(name)
            codes.append(code)
        return (evals.with_columns(pl.Series("name", codes, pl.Int32))
                .group_by(pl.col("trace_id").cast(pl.String), "name",
                          (pl.col("passed") == False).fill_null(False).alias("failed"), "_w")  # noqa: E712
                .agg(pl.col("n").sum().cast(pl.Int64)).cast(schema))

    @staticmethod
    def _empty_rows() -> pl.DataFrame:
        return pl.DataFrame(schema={"trace_id": pl.String, "combo": pl.Int32, "duration_seconds": pl.Float64,
                                    "steps": pl.Int64, "cost_usd": pl.Float64, "refused": pl.Boolean,
                                    "escalated": pl.Boolean, "completed_us": pl.Int64, "key": pl.Int64})

    @staticmethod
    def _empty_evals() -> pl.DataFrame:
        return pl.DataFrame(schema={"key": pl.Int64, "combo": pl.Int32, "name": pl.Int32, "failed": pl.Boolean,
                                    "n": pl.Int64, "completed_us": pl.Int64})

    @staticmethod
    def _raw_evals() -> pl.DataFrame:
        return pl.DataFrame(schema={"trace_id": pl.String, "name": pl.String, "passed": pl.Boolean, "n": pl.Int64})

    def _stats(self) -> tuple[pl.DataFrame, pl.DataFrame, float | None]:
        labels = list(self.labels)
        rows = self._rows
        traces_schema = {"route": pl.String, **{label: pl.String for label in labels}, "n": pl.Int64,
                         "q": pl.List(pl.Float64), "steps_mean": pl.Float64, "cost_mean": pl.Float64,
                         "refusal_ratio": pl.Float64, "escalation_ratio": pl.Float64}
        evals_schema = {"route": pl.String, **{label: pl.String for label in labels}, "eval": pl.String,
                        "fail_ratio": pl.Float64, "n": pl.Int64}
        folded = self._folded.totals() if self._folded else None
        if not rows.height and folded is None:
            return pl.DataFrame(schema=traces_schema), pl.DataFrame(schema=evals_schema), None
        # the shown combinations: several combinations past a cap share one (__overflow__)
        group_of, groups = self._groups()
        n_groups = groups.height
        g = group_of[rows["combo"].to_numpy()]
        # the rows' sums per group, and their exact quantiles; the folded sums are added to the sums
        exact = rows.select(pl.Series("g", g, pl.UInt32), "duration_seconds", "steps", "cost_usd", "refused",
                            "escalated").group_by("g").agg(
            *sum_exprs(),
            pl.concat_list([pl.col("duration_seconds").quantile(x, interpolation="linear") for x in QUANTILES]).alias("q"))
        sums = np.zeros((n_groups, len(SUMS)))
        q = np.full((n_groups, len(QUANTILES)), np.nan)
        at = exact["g"].to_numpy().astype(np.int64)
        sums[at] = exact.select(SUMS).to_numpy()
        if at.size:
            q[at] = np.array(exact["q"].to_list(), dtype=np.float64).reshape(at.size, len(QUANTILES))
        if folded is not None:
            np.add.at(sums, group_of[folded.combos], folded.sums)
            self._sketched_quantiles(q, g, group_of, folded)
        present = np.flatnonzero(sums[:, 0])
        ratio = lambda m: pl.Series(_ratio(sums[present, SUMS.index(f"{m}_sum")],
                                           sums[present, SUMS.index(f"{m}_known")])).fill_nan(None)
        traces = pl.DataFrame({"g": present.astype(np.uint32), "n": sums[present, 0].astype(np.int64),
                               "q": [[None if x != x else x for x in r] for r in q[present].tolist()],
                               "steps_mean": ratio("steps"), "cost_mean": ratio("cost_usd"),
                               "refusal_ratio": ratio("refused"), "escalation_ratio": ratio("escalated")},
                              schema_overrides={"q": pl.List(pl.Float64)})
        traces = groups.join(traces, on="g", how="inner").cast(traces_schema).select(list(traces_schema))
        evals = pl.DataFrame(schema=evals_schema)
        k = len(self._names)
        cells, weights, failures = [], [], []
        if self._evals.height:
            cells.append(group_of[self._evals["combo"].to_numpy()].astype(np.int64) * k + self._evals["name"].to_numpy())
            n = self._evals["n"].to_numpy().astype(np.float64)
            weights.append(n)
            failures.append(n * self._evals["failed"].to_numpy())
        if folded is not None and folded.evals.size:
            combo, name = unpack(folded.evals)
            cells.append(group_of[combo].astype(np.int64) * k + name)
            weights.append(folded.eval_sums[:, 0])
            failures.append(folded.eval_sums[:, 1])
        if cells:
            cell = np.concatenate(cells)
            total = np.bincount(cell, weights=np.concatenate(weights), minlength=n_groups * k)
            failed = np.bincount(cell, weights=np.concatenate(failures), minlength=n_groups * k)
            hit = np.flatnonzero(total)
            evals = pl.DataFrame({"g": (hit // k).astype(np.uint32), "eval": [self._names[i] for i in hit % k],
                                  "fail_ratio": failed[hit] / total[hit], "n": total[hit].astype(np.int64)})
            evals = self.query._cap_evals(groups.join(evals, on="g", how="inner").cast(evals_schema)
                                          .select(list(evals_schema)))
        oldest = [int(rows["completed_us"].min())] if rows.height else []
        if folded is not None:
            oldest.append(self._folded.leaves_at())
        return traces, evals, min(oldest) / 1e6

    def _sketched_quantiles(self, q: np.ndarray, g: np.ndarray, group_of: np.ndarray, folded) -> None:
        """The quantiles of the groups with folded durations, read off sketch counts: the folded ones and the
        rows' own (within the sketch's relative error of the exact ones)."""
        combo, keys = unpack(folded.durations)
        fg = group_of[combo].astype(np.int64)
        mine = np.isin(g, np.unique(fg))
        d = self._rows["duration_seconds"].to_numpy()
        mine &= ~np.isnan(d)
        own = self._folded.keys(d[mine])
        read = quantiles_by_group(np.concatenate([fg, g[mine].astype(np.int64)]), np.concatenate([keys, own]),
                                  np.concatenate([folded.counts, np.ones(own.size, np.int32)]), q.shape[0],
                                  QUANTILES, self._folded.sketch.gamma)
        sketched = np.unique(fg)
        q[sketched] = read[sketched]

    def _groups(self) -> tuple[np.ndarray, pl.DataFrame]:
        """Each combination's shown group (a row of the frame of shown (g, route, cohort values)), as the SQL
        path maps them: the limiter per label, then the series cap. The limiters are asked every refresh (their
        answers change as values come and go, and asking keeps the window's values alive in them); what
        follows from the same combinations and the same answers is kept (8 of a refresh's ~30 ms at 1,000
        combinations)."""
        q = self.query
        live = self._live_combos()
        cache = self._group_cache
        if cache is None or not np.array_equal(cache["live"], live):
            combos = [self._combos[i] for i in live]
            distinct = [list(dict.fromkeys(c[i] for c in combos)) for i in range(1, len(self.labels) + 1)]
            cache = self._group_cache = {"live": live, "combos": combos, "distinct": distinct}
        as_label = [dict(zip(values, q.limiter.map(label, values, count=False)))
                    for label, values in zip(self.labels, cache["distinct"])]
        if cache.get("as_label") != as_label:
            cache["as_label"] = as_label
            cache["shown"] = [tuple(m[v] for m, v in zip(as_label, c[1:])) for c in cache["combos"]]
            cache["order"] = list(dict.fromkeys(cache["shown"]))
            cache.pop("kept", None)
        kept = None
        if q.combos is not None and self.labels:
            order = cache["order"]
            kept = {c for c, m in zip(order, q.combos.map("series", order, count=False)) if m != OVERFLOW}
        if "kept" not in cache or cache["kept"] != kept:
            cache["kept"] = kept
            overflow = (OVERFLOW,) * len(self.labels)
            index: dict[tuple, int] = {}
            group_of = np.zeros(len(self._combos), np.uint32)
            for code, combo, labels in zip(live, cache["combos"], cache["shown"]):
                if kept is not None and labels not in kept:
                    labels = overflow
                group_of[code] = index.setdefault((combo[0], *labels), len(index))
            cache["group_of"] = group_of
            cache["groups"] = pl.DataFrame(list(index), schema={"route": pl.String, **{x: pl.String for x in self.labels}},
                                           orient="row").with_row_index("g")
        return cache["group_of"], cache["groups"]


def _ratio(total: np.ndarray, known: np.ndarray) -> np.ndarray:
    """sum / known values, nan where none is known (null, as avg over no values)."""
    return np.divide(total, known, out=np.full(total.shape, np.nan), where=known > 0)


_ROW_COLUMNS = ("trace_id", "route", "duration_seconds", "steps", "cost_usd", "refused", "escalated", "completed_at")


def _stack(frames: list[pl.DataFrame], columns) -> pl.DataFrame:
    """The columns the state keeps of several writes' frames, one after the other."""
    columns = list(dict.fromkeys(columns))
    return pl.concat([f.select(columns) for f in frames], how="vertical_relaxed")


def _write_index(heights: list[int]) -> pl.Series:
    """Which write of a batch each stacked row came from."""
    return pl.Series("_w", np.repeat(np.arange(len(heights), dtype=np.int32), heights), pl.Int32)


def _epoch_us(rows: pl.DataFrame, column: str) -> pl.Expr:
    """completed_at as microseconds since the epoch, whatever form the frame holds it in (a datetime, or
    the seed query's integer)."""
    dtype = rows.schema[column]
    if dtype.is_integer():
        return pl.col(column).cast(pl.Int64)
    return pl.col(column).dt.epoch("us")
