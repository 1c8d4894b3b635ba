"""Opening the store: the writer's connection, DDL and migrations, the repair of a crash's torn tail, the
``spans`` view and the JSON-decoding function it needs."""
from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from pathlib import Path

import duckdb
import pyarrow as pa
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from .. import schema
from ..decode import wire
from ..decode.anyvalue import attributes_to_dict, to_python
from .segments import SEGMENTS_DIR, SegmentReader, segment_lengths

DB_FILE = "shadowlens.duckdb"
SOCKET_FILE = "serve.sock"
log = logging.getLogger("shadowlens.store")


def db_path(data_dir: Path) -> Path:
    return Path(data_dir) / DB_FILE


# What a connection that runs users' SQL may do (CONTRACT §8: the store's tables and no other file).
# External access off: no file functions (read_csv, read_text, glob, COPY, ATTACH, ...), no replacement
# scans, no extensions; DuckDB still reaches the database's own files (the file, its WAL and temp
# directory), and the ``spans`` view's decoding is a Python function, outside DuckDB's file access.
# The configuration is then locked, so that SQL cannot switch any of it back. These are settings of
# the database instance, so they hold for every cursor of the connection.
SANDBOX_SETTINGS = (
    ("autoinstall_known_extensions", "false"),
    ("autoload_known_extensions", "false"),
    ("enable_external_access", "false"),
    ("lock_configuration", "true"),          # last: nothing can be set after it
)


def sandbox(con: duckdb.DuckDBPyConnection) -> None:
    """Lock ``con``'s database instance down; set any other option before this."""
    for name, value in SANDBOX_SETTINGS:
        con.execute(f"SET {name} = {value}")


def migrate(con: duckdb.DuckDBPyConnection, cohort_labels) -> None:
    con.execute(schema.META_DDL)
    con.execute(schema.REPLAY_FROM_DDL)
    _migrate_text_ids(con)
    con.execute(schema.spans_core_ddl(cohort_labels))
    existing = {r[0] for r in con.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'spans_core'").fetchall()}
    for label in cohort_labels:
        if label not in existing:   # a cohort label added to the config later
            con.execute(f'ALTER TABLE spans_core ADD COLUMN "{label}" VARCHAR')
    con.execute(schema.EVALS_DDL)
    con.execute(schema.LOGS_DDL)
    con.execute(schema.PAYLOADS_DDL)
    con.execute(schema.spans_view_ddl(cohort_labels))
    con.execute(schema.traces_ddl(cohort_labels))
    existing = {r[0] for r in con.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'traces'").fetchall()}
    for label in cohort_labels:
        if label not in existing:
            con.execute(f'ALTER TABLE traces ADD COLUMN "{label}" VARCHAR')
    for name, type_ in schema.TRACES_ADDED_COLUMNS:
        if name not in existing:
            con.execute(f"ALTER TABLE traces ADD COLUMN {name} {type_}")


def _migrate_text_ids(con: duckdb.DuckDBPyConnection) -> None:
    """A store written before ids were integers (schema.ID_COLUMNS): rebuild ``spans_core`` once."""
    cols = [r[0] for r in con.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'spans_core' "
        "ORDER BY ordinal_position").fetchall()]
    if not cols or "trace_id_hi" in cols:
        return
    rows = con.execute("SELECT count(*) FROM spans_core").fetchall()[0][0]
    log.info("store: converting %d spans to integer ids (once, after an upgrade)", rows)
    ids = [name for name, _, _ in schema.ID_COLUMNS]
    kept = [c for c in cols if c not in ids]
    known = {n for n, _, _ in schema.SPAN_FIELDS} | {"start_time", "end_time", "duration_seconds", "payload_id",
                                                     "ingest_seq", "received_at"}
    labels = [c for c in kept if c not in known]
    targets = [t for name in ids for t in schema.ID_STORAGE[name]] + kept
    exprs = [schema.ids_from_hex(name, name) for name in ids] + [f'"{c}"' for c in kept]
    con.begin()
    con.execute("DROP VIEW IF EXISTS spans")
    con.execute("ALTER TABLE spans_core RENAME TO spans_core_text_ids")
    con.execute(schema.spans_core_ddl(labels))
    con.execute(f"INSERT INTO spans_core ({', '.join(targets)}) SELECT {', '.join(exprs)} FROM spans_core_text_ids")
    con.execute("DROP TABLE spans_core_text_ids")
    con.commit()


class SegmentPayloads:
    """Decodes spans' bulky parts from segment files, caching recently decoded requests."""

    def __init__(self, data_dir: Path, cache_requests: int = 64):
        self.segments = SegmentReader(Path(data_dir) / SEGMENTS_DIR)
        self._cache: OrderedDict[tuple[int, int], ExportTraceServiceRequest] = OrderedDict()
        self._lock = threading.Lock()
        self._size = cache_requests
        self._logged = False

    def _request(self, seg: int, off: int, length: int) -> ExportTraceServiceRequest | wire.Request:
        key = (seg, off)
        with self._lock:
            req = self._cache.get(key)
            if req is not None:
                self._cache.move_to_end(key)
                return req
        req = decode_payload(self.segments.read(seg, off, length))
        with self._lock:
            self._cache[key] = req
            while len(self._cache) > self._size:
                self._cache.popitem(last=False)
        return req

    def part_json(self, seg, off, length, rs, ss, sp, part) -> str | None:
        if seg is None:
            return None
        try:
            req = self._request(seg, off, length)
        except (OSError, ValueError):
            return None   # payload removed by retention, or never written
        try:
            return span_part_json(req, rs, ss, sp, part)
        except (IndexError, KeyError):
            return None
        except Exception:  # one span's JSON must not fail every query that reads the view
            if not self._logged:
                self._logged = True
                log.exception("store: the %s of span (%s, %s, %s) in segment %s at %s could not be read; it reads"
                              " as NULL (logged once)", part, rs, ss, sp, seg, off)
            return None

    def arrow_udf(self, seg, off, length, rs, ss, sp, part):
        cols = [c.to_pylist() for c in (seg, off, length, rs, ss, sp, part)]
        return pa.array([self.part_json(*row) for row in zip(*cols)], pa.string())

    def close(self) -> None:
        self.segments.close()


def decode_payload(payload: bytes) -> ExportTraceServiceRequest | wire.Request:
    """A stored traces payload, for ``span_part_json``."""
    try:
        return ExportTraceServiceRequest.FromString(payload)
    except DecodeError:
        # Acknowledged, so readable: the protobuf library refuses a whole request for one value (bad
        # UTF-8, nesting past its limit, corrupt bytes inside an event); wire.py reads the rest.
        return wire.Request(payload)


def span_part_json(req: ExportTraceServiceRequest | wire.Request, rs: int, ss: int, sp: int, part: str) -> str | None:
    """One span's ``attributes`` / ``events`` or its ``resource``'s attributes as JSON text (the
    ``spans`` view's columns). Raises IndexError or KeyError when the request has no such span."""
    if isinstance(req, wire.Request):
        return _tolerant_part_json(req, rs, ss, sp, part)
    return _part_json(req, rs, ss, sp, part)


def _part_json(req: ExportTraceServiceRequest, rs: int, ss: int, sp: int, part: str) -> str | None:
    resource_spans = req.resource_spans[rs]
    if part == "resource":
        return json.dumps(attributes_to_dict(resource_spans.resource.attributes), ensure_ascii=False)
    span = resource_spans.scope_spans[ss].spans[sp]
    if part == "attributes":
        return json.dumps(attributes_to_dict(span.attributes), ensure_ascii=False)
    if part == "events":
        return json.dumps([{
            "name": e.name, "time_unix_nano": e.time_unix_nano,
            "attributes": attributes_to_dict(e.attributes)} for e in span.events], ensure_ascii=False)
    return None


def _tolerant_part_json(req: wire.Request, rs: int, ss: int, sp: int, part: str) -> str | None:
    """``_part_json`` of a request the protobuf library refused (the same JSON for every readable value)."""
    if part == "resource":
        return json.dumps(wire.attributes_json(req.buf, req.resources[rs]), ensure_ascii=False)
    attrs, events = req.spans[(rs, ss, sp)]          # KeyError: no such span, read as NULL
    if part == "attributes":
        return json.dumps(wire.attributes_json(req.buf, attrs), ensure_ascii=False)
    if part == "events":
        return json.dumps([req.event_json(e) for e in events], ensure_ascii=False)
    return None


def register_functions(con: duckdb.DuckDBPyConnection, decoder: SegmentPayloads) -> None:
    from duckdb.sqltypes import BIGINT, INTEGER, VARCHAR
    con.create_function("shadowlens_span_json", decoder.arrow_udf,
                        [INTEGER, BIGINT, INTEGER, INTEGER, INTEGER, INTEGER, VARCHAR], VARCHAR,
                        type="arrow", null_handling="special", side_effects=False)

_ = to_python  # re-exported for callers decoding single values


def frame(con: duckdb.DuckDBPyConnection, sql: str, params=None):
    """Run a query and return a polars DataFrame (through Arrow, without the DB-API copy)."""
    import polars as pl
    return pl.from_arrow(con.sql(sql, params=params).to_arrow_table())


# Measured (one DuckDB thread, 786k benchmark spans in 32k-row commits): 6.0 us/row with DuckDB's
# default 122,880-row groups (3.6 of it in COMMIT: WAL, then checkpoints); 16,384: 4.7, worst commit 0.44 -> 0.18 s.
ROW_GROUP_ROWS = 16384


def connect_writer(path: Path, settings: dict) -> duckdb.DuckDBPyConnection:
    """The writer's connection: the store file attached with ``ROW_GROUP_ROWS``-row groups.

    A row group is written straight to the file once full ("optimistic write"); until then its
    rows go through DuckDB's own WAL and are written again at the next checkpoint. With DuckDB's
    default (122,880 rows) none of our commits (16-32k spans) fills one, so every span was
    written twice; the segment log is the write-ahead log that matters here anyway. The size
    is a property of the attachment, not the file: every writing session must ask for it.
    """
    # Spills next to the store (DuckDB's default for an in-memory database is ./.tmp, wherever serve was
    # started), inside the owner-only data dir and the sandbox's allowed directories.
    # async_threads: DuckDB 2 starts 8 threads per database for asynchronous (remote) I/O whatever
    # ``threads`` says; the store is a local file and external access is off, so one is plenty: serve's
    # process has 7 threads fewer (30 -> 23), each with its stack and allocator caches.
    # allocator_background_threads: DuckDB's allocator gives freed pages back to the system from a thread of
    # its own, on a timer; without it they went back only when DuckDB allocated again, and serve's process
    # kept what a checkpoint freed (bench/footprint.py, 100 s at 1,000 spans/s with the writer's quiet
    # checkpoints: 316 -> 298 MB summed, CPU the same; docs/performance.md).
    config = {"temp_directory": f"{path}.tmp", "async_threads": "1", "allocator_background_threads": "true",
              **{k: str(v) for k, v in settings.items()}}
    con = duckdb.connect(config=config)
    name = path.stem       # the catalog name a plain duckdb.connect(path) gives, so SQL reads the same
    quoted_path = str(path).replace("'", "''")
    con.execute(f"ATTACH '{quoted_path}' AS \"{name}\" (ROW_GROUP_SIZE {ROW_GROUP_ROWS})")
    con.execute(f'USE "{name}"')
    # The query socket's cursors share this database instance: lock it down now that the store is
    # attached (the writer itself needs no file access beyond the store's own files).
    sandbox(con)
    return con


def drop_torn_payloads(con: duckdb.DuckDBPyConnection, segments_dir: Path) -> None:
    """After a crash, rows may reference payload bytes whose fdatasync never finished (DuckDB
    commits while the payload sync runs; neither was acknowledged). Such rows are deleted, so
    a client's retry of those spans is stored again instead of being taken for a duplicate."""
    sizes = segment_lengths(segments_dir)      # of the original log, compressed or not
    ends = con.execute("SELECT segment, max(byte_offset + length) FROM payloads GROUP BY segment").fetchall()
    torn = [(seg, sizes.get(seg, 0)) for seg, end in ends if end > sizes.get(seg, 0)]
    if not torn:
        return
    con.begin()
    for seg, size in torn:
        ids = "SELECT payload_id FROM payloads WHERE segment = $seg AND byte_offset + length > $size"
        for table in ("spans_core", "evals", "logs"):
            con.execute(f"DELETE FROM {table} WHERE payload_id IN ({ids})", {"seg": seg, "size": size})
        con.execute("DELETE FROM payloads WHERE segment = $seg AND byte_offset + length > $size",
                    {"seg": seg, "size": size})
    con.commit()
    log.warning("removed rows of %d torn payload segment tail(s) left by a crash (never acknowledged)", len(torn))
