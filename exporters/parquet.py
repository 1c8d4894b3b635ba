"""The Parquet lake: the store's tables as Hive-partitioned Parquet files, one per UTC hour and source.

    DIR/<table>/date=YYYY-MM-DD/<YYYYMMDD>T<HH>-<source>.parquet        (zstd, plain Parquet types)

A file holds one whole hour of one table as one store (``source``) knew it when it was written, so the
name alone decides what a rewrite replaces: exporting an hour again, from the command line or from
``serve``, overlapping ranges or not, leaves each row once. Files are written under a hidden temporary
name (``.<name>.<pid>.tmp``, which neither ``*.parquet`` globs nor pyarrow's discovery read), fsynced and
renamed, so a reader sees a whole old file or a whole new one, never part of one.

The rows come from ``run(sql) -> pyarrow.Table``: the read-only query path of ``shadowlens query`` (a
running server's socket, or the file) on the command line, a cursor of the store inside ``serve``. The
Parquet is written here with pyarrow, so the store's SQL never needs file access (it has none: the
query sandbox).
"""
from __future__ import annotations

import logging
import math
import os
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Iterable

import pyarrow as pa

from .catalog import EXPORT_METRICS

log = logging.getLogger("shadowlens.export")

HOUR_US = 3_600_000_000
# Rows per query and row group. They bound memory on both read paths: serve's DuckDB has 128 MB
# (store.duckdb_memory_limit) and a span's JSON is a few kB (50k spans of bench traffic ran out of it).
SLICE_ROWS = {"spans": 10_000, "traces": 50_000, "evals": 50_000, "logs": 20_000}
SOURCE_FILE = "export-source"  # in the data dir: this store's name in the lake's file names
META_ROWS, META_SEQ = b"shadowlens.rows", b"shadowlens.max_ingest_seq"
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

Run = Callable[[str], pa.Table]


@dataclass(frozen=True)
class TableSpec:
    name: str
    select: str       # every column; {where} filters on the partition time; JSON as text (no extension type)
    time_sql: str     # the partition time (over the select's FROM)
    time_ns: bool     # TIMESTAMP_NS (else TIMESTAMP, microseconds)
    seq_sql: str      # grows whenever a row of the hour is added or replaced
    source: str       # FROM of the signature query


def _json_text(*cols: str) -> str:
    return ", ".join(f"CAST({c} AS VARCHAR) AS {c}" for c in cols)


_EVALS_FROM = ("evals e LEFT JOIN payloads p ON p.payload_id = e.payload_id"
               " LEFT JOIN spans_core s ON e.source <> 'log' AND s.payload_id = e.payload_id"
               " AND s.span_id_int = TRY_CAST('0x' || e.span_id AS UBIGINT)"
               " AND s.trace_id_hi = TRY_CAST('0x' || substr(e.trace_id, 1, 16) AS UBIGINT)"
               " AND s.trace_id_lo = TRY_CAST('0x' || substr(e.trace_id, 17, 16) AS UBIGINT)")
_EVALS_TIME = "coalesce(s.start_time, CAST(p.received_at AS TIMESTAMP_NS))"

TABLES: dict[str, TableSpec] = {t.name: t for t in (
    # spans: the whole view, attributes / resource_attributes / events as JSON text; the signature reads
    # spans_core alone (no payload decoding)
    TableSpec("spans", f"SELECT * REPLACE ({_json_text('attributes', 'resource_attributes', 'events')}) FROM spans"
                       " WHERE {where} ORDER BY start_time, trace_id, span_id",
              "start_time", True, "ingest_seq", "spans_core"),
    # a late span replaces its trace's row with a higher max_ingest_seq
    TableSpec("traces", "SELECT * FROM traces WHERE {where} ORDER BY start_time, trace_id",
              "start_time", True, "max_ingest_seq", "traces"),
    # evals carry no time of their own: one that came with its span (attribute, event) falls in the span's
    # hour, one from a log record in the hour its request arrived; both stay where they are put
    TableSpec("evals", f"SELECT e.*, p.received_at FROM {_EVALS_FROM} WHERE {{where}}"
                       " ORDER BY e.trace_id, e.span_id, e.name, e.ingest_seq",
              _EVALS_TIME, True, "e.ingest_seq", _EVALS_FROM),
    # a record without a time (time_unix_nano 0 is allowed by OTLP) falls in the hour it arrived
    TableSpec("logs", f"SELECT * REPLACE ({_json_text('body', 'attributes', 'resource_attributes')}) FROM logs"
                      " WHERE {where} ORDER BY time, ingest_seq",
              "coalesce(nullif(time, TIMESTAMP '1970-01-01'), received_at)", False, "ingest_seq", "logs"),
)}
TABLE_NAMES = tuple(TABLES)


class ExportError(Exception):
    """What was wrong, and what to do."""


def parse_tables(text: str | Iterable[str]) -> tuple[str, ...]:
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    bad = [t for t in names if t not in TABLES]
    if bad or not names:
        raise ExportError(f"tables {','.join(bad) or '(none)'}: choose from {','.join(TABLE_NAMES)}")
    return tuple(dict.fromkeys(names))


# -- hours and names --------------------------------------------------------------------------

def hour_start(hour: int) -> datetime:
    return _EPOCH + timedelta(hours=hour)


def file_path(out: Path, table: str, hour: int, source: str) -> Path:
    t = hour_start(hour)
    return Path(out) / table / f"date={t:%Y-%m-%d}" / f"{t:%Y%m%dT%H}-{source}.parquet"


def _sanitize(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or "store"


def store_source(data_dir: Path, configured: str = "") -> str:
    """This store's name in file names: export.parquet.source, else one made once per store (host name
    plus a random suffix, kept in DATA_DIR/export-source): stable across restarts and host renames, and
    two stores never share it, so sidecars writing into one lake never replace each other's files."""
    if configured:
        return _sanitize(configured)
    path = Path(data_dir) / SOURCE_FILE
    try:
        return _sanitize(path.read_text().strip())
    except FileNotFoundError:
        pass
    name = f"{_sanitize(socket.gethostname())}-{secrets.token_hex(3)}"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:          # another exporter of this store won the race: use its name
        return _sanitize(path.read_text().strip())
    with os.fdopen(fd, "w") as f:
        f.write(name + "\n")
    return name


# -- reading the store ------------------------------------------------------------------------

def _ts_literal(spec: TableSpec, us: int) -> str:
    return f"make_timestamp_ns({us * 1000})" if spec.time_ns else f"make_timestamp({us})"


def _range_sql(spec: TableSpec, start_us: int | None, end_us: int | None) -> str:
    parts = [f"{spec.time_sql} IS NOT NULL"]
    if start_us is not None:
        parts.append(f"{spec.time_sql} >= {_ts_literal(spec, start_us)}")
    if end_us is not None:
        parts.append(f"{spec.time_sql} < {_ts_literal(spec, end_us)}")
    return " AND ".join(parts)


def hour_signatures(run: Run, spec: TableSpec, start_us: int | None, end_us: int | None) -> dict[int, tuple[int, int]]:
    """hour -> (rows, max seq) of the hours of ``spec`` that have rows in [start, end)."""
    t = run(f"SELECT floor(epoch_us({spec.time_sql}) / {HOUR_US})::BIGINT AS h, count(*) AS n,"
            f" coalesce(max({spec.seq_sql}), -1) AS seq FROM {spec.source}"
            f" WHERE {_range_sql(spec, start_us, end_us)} GROUP BY h")
    return {h: (n, seq) for h, n, seq in zip(*(t.column(c).to_pylist() for c in ("h", "n", "seq")))}


def _plain(table: pa.Table) -> pa.Table:
    """Types every Parquet reader agrees on: timestamps in microseconds, UTC (Spark reads no
    nanoseconds; the store's TIMESTAMP_NS span times lose their sub-microsecond digits), no
    extension types."""
    for i, f in enumerate(table.schema):
        typ = f.type
        if isinstance(typ, pa.ExtensionType):
            table = table.set_column(i, f.name, table.column(i).cast(typ.storage_type))
            typ = typ.storage_type
        if pa.types.is_timestamp(typ) and (typ.unit != "us" or typ.tz != "UTC"):
            table = table.set_column(i, f.name, table.column(i).cast(pa.timestamp("us", tz="UTC"), safe=False))
    return table.replace_schema_metadata(None)


def stored_signature(path: Path) -> tuple[int, int] | None:
    import pyarrow.parquet as pq  # here, not at the top: serve loads it only when the lake is on (~5 MB)
    try:
        meta = pq.read_metadata(path).metadata or {}
        return int(meta[META_ROWS]), int(meta[META_SEQ])
    except (OSError, KeyError, ValueError, pa.ArrowInvalid):
        return None


# -- writing ----------------------------------------------------------------------------------

def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def export_hour(run: Run, spec: TableSpec, hour: int, rows_hint: int, seq: int, out: Path, source: str,
                stop: threading.Event | None = None) -> tuple[int, int]:
    """Write one hour of one table; (rows, bytes). No rows: no file, and an older file stays (rows only
    vanish from the store through retention, and the lake outlives it)."""
    target = file_path(out, spec.name, hour, source)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    start = hour * HOUR_US
    edges = [start, start + HOUR_US]
    slices = math.ceil(rows_hint / SLICE_ROWS[spec.name])
    if slices > 1:        # cut at quantiles of the time: rows arrive in bursts, not spread over the hour
        qs = ", ".join(f"{i / slices:.6f}" for i in range(1, slices))
        cuts = run(f"SELECT quantile_disc(epoch_us({spec.time_sql}), [{qs}]) AS q FROM {spec.source}"
                   f" WHERE {_range_sql(spec, *edges)}").column("q").to_pylist()[0] or []
        edges = sorted({start, start + HOUR_US, *(c for c in cuts if c is not None and start < c < start + HOUR_US)})
    import pyarrow.parquet as pq
    writer = None
    rows = 0
    try:
        for a, b in zip(edges, edges[1:]):
            if stop is not None and stop.is_set():
                raise InterruptedError("stopping")
            table = _plain(run(spec.select.format(where=_range_sql(spec, a, b))))
            if table.num_rows == 0:
                continue
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema, compression="zstd", compression_level=3)
            writer.write_table(table, row_group_size=SLICE_ROWS[spec.name])
            rows += table.num_rows
        if writer is None:
            return 0, 0
        writer.add_key_value_metadata({META_ROWS: str(rows).encode(), META_SEQ: str(seq).encode()})
        writer.close()
        writer = None
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        return rows, target.stat().st_size
    finally:
        if writer is not None:
            writer.close()
        if tmp.exists():
            tmp.unlink()


@dataclass
class ExportResult:
    rows: dict[str, int] = field(default_factory=dict)
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0


def export(run: Run, out: Path, source: str, tables: Iterable[str], since_us: int | None = None,
           until_us: int | None = None, only_changed: bool = False, stop: threading.Event | None = None,
           on_rows: Callable[[str, int], None] | None = None) -> ExportResult:
    """Write every hour that has rows in [since, until), each whole (the range is widened to whole
    hours). ``only_changed``: skip an hour whose file records the same rows and ingest sequence (what
    ``serve`` does on each pass; new or replaced rows raise the sequence)."""
    t0 = time.monotonic()
    res = ExportResult()
    lo = None if since_us is None else since_us // HOUR_US * HOUR_US
    hi = None if until_us is None else -(-until_us // HOUR_US) * HOUR_US
    for name in tables:
        spec = TABLES[name]
        res.rows.setdefault(name, 0)
        for hour, (n, seq) in sorted(hour_signatures(run, spec, lo, hi).items()):
            if only_changed:
                old = stored_signature(file_path(out, name, hour, source))
                if old is not None and seq <= old[1] and n <= old[0]:
                    continue
            rows, size = export_hour(run, spec, hour, n, seq, out, source, stop)
            if rows:
                res.rows[name] += rows
                res.files += 1
                res.bytes += size
                if on_rows is not None:
                    on_rows(name, rows)
    res.seconds = time.monotonic() - t0
    return res


# -- inside serve: closed hours, on its own thread --------------------------------------------

class ParquetRunner:
    """``export.parquet`` in ``serve``: every ``interval``, write the closed hours (ended ``delay`` ago)
    that are new or changed since their file was written. Reads through its own cursor on its own
    thread, so ingest never waits for it; a failed pass is counted, logged and retried (10 s, doubling
    up to the interval)."""

    def __init__(self, cursor_factory: Callable, out: Path, source: Callable[[], str], tables: tuple[str, ...],
                 interval_s: float, delay_s: float, clock: Callable[[], float] = time.time):
        """``source``: gives the file names' source on the first pass (it may create DATA_DIR/export-source,
        which must not happen before the store has started)."""
        self.cursor_factory = cursor_factory
        self.out = Path(out)
        self._source = source
        self.source: str | None = None
        self.tables = tables
        self.interval_s = interval_s
        self.delay_s = delay_s
        self.clock = clock
        self.rows = {t: 0 for t in tables}
        self.failures = 0
        self.passes = 0
        self.complete_until_s = self._closed_until()   # the lake holds every closed hour before this
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _closed_until(self) -> float:
        return (self.clock() - self.delay_s) // 3600 * 3600

    def lag_seconds(self) -> float:
        return max(0.0, self.clock() - self.complete_until_s)

    def run_once(self) -> ExportResult:
        closed = self._closed_until()
        if self.source is None:
            self.source = self._source()
        cur = self.cursor_factory()
        try:
            res = export(lambda sql: cur.sql(sql).to_arrow_table(), self.out, self.source, self.tables,
                         until_us=int(closed) * 1_000_000, only_changed=True, stop=self._stop,
                         on_rows=self._count)
        finally:
            cur.close()
        self.complete_until_s = closed
        self.passes += 1
        if res.files:
            log.info("export.parquet: wrote %d files (%s rows) to %s in %.1f s", res.files,
                     ", ".join(f"{t} {n}" for t, n in res.rows.items() if n), self.out, res.seconds)
        return res

    def _count(self, table: str, rows: int) -> None:
        self.rows[table] = self.rows.get(table, 0) + rows

    def _loop(self) -> None:
        retry = 10.0
        while not self._stop.is_set():
            try:
                self.run_once()
                wait, retry = self.interval_s, 10.0
            except Exception as exc:  # counted, logged, retried; ingest goes on
                if self._stop.is_set():
                    return
                self.failures += 1
                wait, retry = min(retry, self.interval_s), min(retry * 2, max(self.interval_s, 10.0))
                log.warning("export.parquet to %s failed (%s: %s); retrying in %.0f s (shadowlens_export_parquet_"
                            "failures_total counts these)", self.out, type(exc).__name__, exc, wait)
            if self._stop.wait(wait):
                return

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="export-parquet", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None


class ExportCollector:
    """The runner's figures at scrape time (no store access)."""

    def __init__(self, runner: ParquetRunner):
        self.runner = runner

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        specs = {m.name: m for m in EXPORT_METRICS}
        lag = GaugeMetricFamily("shadowlens_export_parquet_lag_seconds",
                                specs["shadowlens_export_parquet_lag_seconds"].help)
        lag.add_metric([], self.runner.lag_seconds())
        yield lag
        fail = CounterMetricFamily("shadowlens_export_parquet_failures",
                                   specs["shadowlens_export_parquet_failures"].help)
        fail.add_metric([], self.runner.failures)
        yield fail
        rows = CounterMetricFamily("shadowlens_export_parquet_rows", specs["shadowlens_export_parquet_rows"].help,
                                   labels=["table"])
        for table, n in sorted(self.runner.rows.items()):
            rows.add_metric([table], n)
        yield rows
