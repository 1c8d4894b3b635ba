"""Store tables (CONTRACT §5) as data: the Arrow batch the normalizer produces and the DuckDB DDL.

The narrow, typed columns live in DuckDB table ``spans_core``; each span's bulky part
(attributes, events, resource) stays in the raw OTLP payload it arrived in, kept in
append-only segment files and referenced by ``payload_id`` + indexes. The ``spans`` view
decodes it to JSON on read, so ingest never pays DuckDB's cost for wide text columns.
"""
from __future__ import annotations

import pyarrow as pa

# Columns the normalizer fills for every span, in order (cohort columns are appended per config).
SPAN_FIELDS: list[tuple[str, pa.DataType, str]] = [
    ("trace_id_hi", pa.uint64(), "UBIGINT"),          # the ids as big-endian integers: see ID_COLUMNS
    ("trace_id_lo", pa.uint64(), "UBIGINT"),
    ("span_id_int", pa.uint64(), "UBIGINT"),
    ("parent_span_id_int", pa.uint64(), "UBIGINT"),
    ("name", pa.string(), "VARCHAR"),
    ("kind", pa.string(), "VARCHAR"),
    ("span_kind", pa.string(), "VARCHAR"),
    ("service_name", pa.string(), "VARCHAR"),
    ("scope_name", pa.string(), "VARCHAR"),
    ("start_ns", pa.int64(), None),
    ("end_ns", pa.int64(), None),
    ("status_code", pa.string(), "VARCHAR"),
    ("status_message", pa.string(), "VARCHAR"),
    ("route", pa.string(), "VARCHAR"),
    ("request_id", pa.string(), "VARCHAR"),
    ("session_id", pa.string(), "VARCHAR"),
    ("step", pa.int64(), "BIGINT"),
    ("model", pa.string(), "VARCHAR"),
    ("request_model", pa.string(), "VARCHAR"),
    ("input_tokens", pa.int64(), "BIGINT"),
    ("output_tokens", pa.int64(), "BIGINT"),
    ("cache_read_tokens", pa.int64(), "BIGINT"),
    ("cache_write_tokens", pa.int64(), "BIGINT"),
    ("reasoning_tokens", pa.int64(), "BIGINT"),
    ("reported_cost_usd", pa.float64(), "DOUBLE"),
    ("cost_usd", pa.float64(), "DOUBLE"),
    ("finish_reason", pa.string(), "VARCHAR"),
    ("refused", pa.bool_(), "BOOLEAN"),
    ("escalated", pa.bool_(), "BOOLEAN"),
    ("rs_idx", pa.int32(), "INTEGER"),
    ("ss_idx", pa.int32(), "INTEGER"),
    ("sp_idx", pa.int32(), "INTEGER"),
]

EVAL_FIELDS: list[tuple[str, pa.DataType, str]] = [
    ("trace_id", pa.string(), "VARCHAR"),
    ("span_id", pa.string(), "VARCHAR"),
    ("name", pa.string(), "VARCHAR"),
    ("score", pa.float64(), "DOUBLE"),
    ("label", pa.string(), "VARCHAR"),
    ("passed", pa.bool_(), "BOOLEAN"),
    ("explanation", pa.string(), "VARCHAR"),
    ("source", pa.string(), "VARCHAR"),
]

LOG_FIELDS: list[tuple[str, pa.DataType, str]] = [
    ("trace_id", pa.string(), "VARCHAR"),
    ("span_id", pa.string(), "VARCHAR"),
    ("time_ns", pa.int64(), None),
    ("event_name", pa.string(), "VARCHAR"),
    ("severity_text", pa.string(), "VARCHAR"),
    ("service_name", pa.string(), "VARCHAR"),
    ("body", pa.string(), "JSON"),
    ("attributes", pa.string(), "JSON"),
    ("resource_attributes", pa.string(), "JSON"),
]


# ``spans_core`` stores ids as integers and shows them as hex text through virtual columns, so queries
# read ``trace_id`` / ``span_id`` / ``parent_span_id`` as text. Random 32-character strings are the costliest
# columns to insert and checkpoint (DuckDB analyses each for compression and finds none): integers measure
# 5.1 instead of 7.6 us a row, and the longest commit 0.4 instead of 1.5 s (docs/performance.md).
# (text column, its SQL, ((storage column, its SQL from the text {t}), ...))
ID_COLUMNS: list[tuple[str, str, tuple[tuple[str, str], ...]]] = [
    ("trace_id", "printf('%016x%016x', trace_id_hi, trace_id_lo)",
     (("trace_id_hi", "('0x' || substr({t}, 1, 16))::UBIGINT"), ("trace_id_lo", "('0x' || substr({t}, 17, 16))::UBIGINT"))),
    ("span_id", "printf('%016x', span_id_int)", (("span_id_int", "('0x' || {t})::UBIGINT"),)),
    ("parent_span_id", "printf('%016x', parent_span_id_int)", (("parent_span_id_int", "('0x' || {t})::UBIGINT"),)),
]
ID_STORAGE = {name: tuple(col for col, _ in ints) for name, _, ints in ID_COLUMNS}


TRACE_ID_SQL = ID_COLUMNS[0][1]      # spans_core's text trace id, from its integers


def with_trace_id_ints(relation: str) -> str:
    """SQL relation: ``relation`` (with a hex ``trace_id``) plus ``trace_id_hi`` / ``trace_id_lo``, so a
    join with ``spans_core`` can use the stored integers instead of formatting every span's id."""
    ints = ", ".join(f"{sql.format(t='trace_id')} AS {col}" for col, sql in ID_COLUMNS[0][2])
    return f"(SELECT *, {ints} FROM {relation})"


def ids_from_hex(column: str, expr: str) -> str:
    """SQL giving the storage integers of hex id ``column`` (one of ID_COLUMNS) from text ``expr``."""
    return ", ".join(sql.format(t=expr) for _, sql in next(ints for name, _, ints in ID_COLUMNS if name == column))


def span_schema(cohort_labels) -> pa.Schema:
    fields = [pa.field(n, t) for n, t, _ in SPAN_FIELDS]
    fields += [pa.field(label, pa.string()) for label in cohort_labels]
    return pa.schema(fields)


EVAL_SCHEMA = pa.schema([pa.field(n, t) for n, t, _ in EVAL_FIELDS])
LOG_SCHEMA = pa.schema([pa.field(n, t) for n, t, _ in LOG_FIELDS])


def _ts(col_ns: str) -> str:
    return f"make_timestamp_ns({col_ns})"


def spans_core_ddl(cohort_labels) -> str:
    cols = []
    for name, _, sql in SPAN_FIELDS:
        if name == "start_ns":
            cols += ["start_time TIMESTAMP_NS", "end_time TIMESTAMP_NS", "duration_seconds DOUBLE"]
        elif name == "end_ns":
            continue
        else:
            cols.append(f"{name} {sql}")
    cols += [f'"{label}" VARCHAR' for label in cohort_labels]
    cols += ["payload_id BIGINT", "ingest_seq BIGINT", "received_at TIMESTAMP"]
    cols += [f"{name} VARCHAR GENERATED ALWAYS AS ({sql}) VIRTUAL" for name, sql, _ in ID_COLUMNS]
    return "CREATE TABLE IF NOT EXISTS spans_core (" + ", ".join(cols) + ")"


def spans_insert_select(cohort_labels, source: str) -> str:
    """INSERT INTO spans_core from an Arrow relation named ``source``; parameters ``$seq`` and ``$now``."""
    targets, exprs = [], []
    for name, _, _ in SPAN_FIELDS:
        if name == "start_ns":
            targets += ["start_time", "end_time", "duration_seconds"]
            exprs += [_ts("start_ns"), _ts("end_ns"), "(end_ns - start_ns) / 1e9"]
        elif name == "end_ns":
            continue
        else:
            targets.append(name)
            exprs.append(name)
    for label in cohort_labels:
        targets.append(f'"{label}"')
        exprs.append(f'"{label}"')
    targets += ["payload_id", "ingest_seq", "received_at"]
    exprs += ["payload_id", "$seq::BIGINT", "$now::TIMESTAMP"]
    return f"INSERT INTO spans_core ({', '.join(targets)}) SELECT {', '.join(exprs)} FROM {source}"


EVALS_DDL = ("CREATE TABLE IF NOT EXISTS evals (" + ", ".join(f"{n} {s}" for n, _, s in EVAL_FIELDS)
             + ", ingest_seq BIGINT, payload_id BIGINT)")
LOGS_DDL = ("CREATE TABLE IF NOT EXISTS logs (trace_id VARCHAR, span_id VARCHAR, time TIMESTAMP, event_name VARCHAR,"
            " severity_text VARCHAR, service_name VARCHAR, body JSON, attributes JSON, resource_attributes JSON,"
            " ingest_seq BIGINT, received_at TIMESTAMP, payload_id BIGINT)")
PAYLOADS_DDL = ("CREATE TABLE IF NOT EXISTS payloads (payload_id BIGINT PRIMARY KEY, segment INTEGER, byte_offset BIGINT,"
                " length INTEGER, signal VARCHAR, received_at TIMESTAMP, ingest_seq BIGINT)")
META_DDL = "CREATE TABLE IF NOT EXISTS shadowlens_meta (key VARCHAR PRIMARY KEY, value VARCHAR)"
# Where a start replays the payload log from (store/writer.py): appended to, never updated (why: writer.py).
REPLAY_FROM_DDL = "CREATE TABLE IF NOT EXISTS shadowlens_replay_from (segment BIGINT)"


def spans_view_ddl(cohort_labels) -> str:
    """The contract's ``spans`` table: narrow columns plus JSON decoded from the raw payload."""
    cohort = "".join(f', s."{label}"' for label in cohort_labels)
    return (
        "CREATE OR REPLACE VIEW spans AS SELECT s.trace_id, s.span_id, s.parent_span_id, s.name, s.kind, s.span_kind,"
        " s.service_name, s.scope_name, s.start_time, s.end_time, s.duration_seconds, s.status_code, s.status_message,"
        f" s.route, s.request_id{cohort}, s.session_id, s.step, s.model, s.request_model, s.input_tokens,"
        " s.output_tokens, s.cache_read_tokens, s.cache_write_tokens, s.reasoning_tokens, s.cost_usd,"
        " s.reported_cost_usd, s.finish_reason, s.refused, s.escalated,"
        " CAST(shadowlens_span_json(p.segment, p.byte_offset, p.length, s.rs_idx, s.ss_idx, s.sp_idx, 'attributes') AS JSON)"
        " AS attributes,"
        " CAST(shadowlens_span_json(p.segment, p.byte_offset, p.length, s.rs_idx, s.ss_idx, s.sp_idx, 'resource') AS JSON)"
        " AS resource_attributes,"
        " CAST(shadowlens_span_json(p.segment, p.byte_offset, p.length, s.rs_idx, s.ss_idx, s.sp_idx, 'events') AS JSON)"
        " AS events,"
        " s.received_at, s.ingest_seq, s.payload_id"
        " FROM spans_core s LEFT JOIN payloads p USING (payload_id)"
    )


# Columns added to ``traces`` after the first release: (name, type); migrate() adds them to old stores.
TRACES_ADDED_COLUMNS = (
    ("eval_names", "VARCHAR[]"),      # evals with a known outcome on the trace (the gate reads these
    ("failed_evals", "VARCHAR[]"),    # instead of joining the evals table)
    ("call_span_id", "VARCHAR"),      # a call compared on its own (analyzers/units.py); NULL: the whole trace
)
TRACES_ADDED_COLUMNS_DDL = "".join(f", {n} {t}" for n, t in TRACES_ADDED_COLUMNS)


def traces_ddl(cohort_labels) -> str:
    """One row per completed trace (CONTRACT §5); a late span replaces the row (``revision`` + 1)."""
    cohort = "".join(f', "{label}" VARCHAR' for label in cohort_labels)
    return (
        "CREATE TABLE IF NOT EXISTS traces (trace_id VARCHAR, route VARCHAR, request_id VARCHAR"
        f"{cohort}, start_time TIMESTAMP_NS, end_time TIMESTAMP_NS, duration_seconds DOUBLE, steps BIGINT,"
        " llm_calls BIGINT, tool_calls BIGINT, input_tokens BIGINT, output_tokens BIGINT, cache_read_tokens BIGINT,"
        " cache_write_tokens BIGINT, reasoning_tokens BIGINT, cost_usd DOUBLE, evals_total BIGINT,"
        " evals_failed BIGINT, refused BOOLEAN, escalated BOOLEAN, model VARCHAR, models VARCHAR,"
        " incomplete BOOLEAN, span_count BIGINT, session_id VARCHAR, service_name VARCHAR, root_name VARCHAR,"
        " min_ingest_seq BIGINT, max_ingest_seq BIGINT, completed_at TIMESTAMP, revision INTEGER"
        f"{TRACES_ADDED_COLUMNS_DDL})"
    )
