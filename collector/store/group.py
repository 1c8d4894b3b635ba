"""One group commit's rows: the records of a group as the Arrow tables the writer inserts.

Each record that stores anything gets a payload row (its place in the segment log) and its
``payload_id`` on every span, eval and log row; spans the deduplication dropped leave out their
evals too. The writer inserts the tables in one transaction on its thread (``insert_group``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import duckdb
import numpy as np
import pyarrow as pa

from ..decode.normalize import NormalizedBatch
from .commit import CommitReceipt


@dataclass
class GroupRows:
    results: list[CommitReceipt] = field(default_factory=list)       # each record's answer, in the group's order
    spans: list[pa.Table] = field(default_factory=list)
    evals: list[pa.Table] = field(default_factory=list)
    logs: list[pa.Table] = field(default_factory=list)
    payloads: list[tuple] = field(default_factory=list)       # (payload_id, segment, offset, length, signal)
    duplicates: int = 0
    next_payload_id: int = 0

    def payload_table(self) -> pa.Table:
        cols = list(zip(*self.payloads))
        return pa.table({
            "payload_id": pa.array(cols[0], pa.int64()), "segment": pa.array(cols[1], pa.int32()),
            "byte_offset": pa.array(cols[2], pa.int64()), "length": pa.array(cols[3], pa.int32()),
            "signal": pa.array(cols[4], pa.string())})


def group_rows(batches: Sequence[NormalizedBatch], refs: Sequence[tuple[int, int, int]],
               keeps: Sequence[np.ndarray | None], seq: int, payload_id: int) -> GroupRows:
    """The rows of records ``batches`` (appended at ``refs``) committed as ``seq``; ``keeps``: per record,
    True for the spans to store (None: all); payload ids count up from ``payload_id``."""
    rows = GroupRows()
    for b, ref, keep in zip(batches, refs, keeps):
        dups = 0 if keep is None else int(len(keep) - np.count_nonzero(keep))
        stored = b.accepted - dups
        rows.duplicates += dups
        rows.results.append(CommitReceipt(seq, stored, dups))
        if stored == 0 and b.logs is None and b.evals is None:
            continue
        seg, off, length = ref
        rows.payloads.append((payload_id, seg, off, length, b.signal))
        if b.spans is not None and stored:
            t = b.spans if not dups else b.spans.filter(pa.array(keep))
            rows.spans.append(t.append_column("payload_id", _const(payload_id, t.num_rows)))
        if b.evals is not None:
            ev = _evals_of_kept(b, keep) if dups else b.evals
            if ev.num_rows:
                rows.evals.append(ev.append_column("payload_id", _const(payload_id, ev.num_rows)))
        if b.logs is not None:
            rows.logs.append(b.logs.append_column("payload_id", _const(payload_id, b.logs.num_rows)))
        payload_id += 1
    rows.next_payload_id = payload_id
    return rows


def insert_group(con: duckdb.DuckDBPyConnection, rows: GroupRows, insert_spans: str, seq: int,
                 now_us: int) -> tuple[pa.Table | None, pa.Table | None]:
    """Insert a group's rows in the open transaction (``insert_spans``: ``schema.spans_insert_select``);
    the spans and evals inserted (for the writer's followers)."""
    new_spans = new_evals = None
    if rows.spans:
        new_spans = pa.Table.from_batches(rows.spans)
        con.register("new_spans", new_spans)
        con.execute(insert_spans, {"seq": seq, "now": _ts_literal(now_us)})
        con.unregister("new_spans")
    if rows.evals:
        new_evals = pa.Table.from_batches(rows.evals)
        con.register("new_evals", new_evals)
        con.execute("INSERT INTO evals SELECT * EXCLUDE (payload_id), ?::BIGINT, payload_id FROM new_evals", [seq])
        con.unregister("new_evals")
    if rows.logs:
        con.register("new_logs", pa.Table.from_batches(rows.logs))
        con.execute(
            "INSERT INTO logs SELECT trace_id, span_id, make_timestamp(time_ns // 1000), event_name, severity_text,"
            " service_name, body, attributes, resource_attributes, ?::BIGINT, make_timestamp(?::BIGINT), payload_id"
            " FROM new_logs", [seq, now_us])
        con.unregister("new_logs")
    if rows.payloads:
        con.register("new_payloads", rows.payload_table())
        con.execute("INSERT INTO payloads SELECT *, make_timestamp(?::BIGINT), ?::BIGINT FROM new_payloads",
                    [now_us, seq])
        con.unregister("new_payloads")
    return new_spans, new_evals


def _evals_of_kept(b: NormalizedBatch, keep: np.ndarray) -> pa.Table:
    """``b``'s evals without those of the spans deduplication dropped."""
    gone = b.spans.filter(pa.array(~keep))
    dropped = {f"{hi:016x}{lo:016x}{s_:016x}" for hi, lo, s_ in zip(
        *(gone.column(c).to_pylist() for c in ("trace_id_hi", "trace_id_lo", "span_id_int")))}
    ev = b.evals
    mask = [(t_ + s_) not in dropped for t_, s_ in zip(ev.column(0).to_pylist(), ev.column(1).to_pylist())]
    return ev.filter(pa.array(mask))


def _const(value: int, n: int) -> pa.Array:
    return pa.repeat(pa.scalar(value, pa.int64()), n) if hasattr(pa, "repeat") else pa.array([value] * n, pa.int64())


def _ts_literal(us: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(us // 1_000_000)) + f".{us % 1_000_000:06d}"
