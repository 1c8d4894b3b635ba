"""Records set aside: acknowledged payloads the store could not take, kept where a person can look.

The receivers check every value before they acknowledge (decode/check.py), so this is the last
line of defence, for a record that passed the check and still fails to decode or to insert (a bug,
or a rule DuckDB has and the check lacks). Without it such a record failed its whole commit group
every time, at every start: `serve` crash-looped on its own data directory. Now the record is
copied to ``DATA_DIR/quarantine/`` with a note saying why, listed in the ``quarantine`` table,
counted in ``shadowlens_records_quarantined_total{stage}`` and named in the log; ingest goes on.

Recovery: fix the cause, then send the file again as an OTLP/HTTP body, e.g.
``curl -H 'Content-Type: application/x-protobuf' --data-binary @FILE http://127.0.0.1:4318/v1/traces``.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import duckdb

from ..counters import IngestCounters
from .files import make_private_dir, open_private
from .segments import SegmentReader

log = logging.getLogger("shadowlens.quarantine")

QUARANTINE_DIR = "quarantine"       # under the data dir
DDL = ("CREATE TABLE IF NOT EXISTS quarantine (segment INTEGER, byte_offset BIGINT, length INTEGER, signal VARCHAR,"
       " stage VARCHAR, reason VARCHAR, file VARCHAR, quarantined_at TIMESTAMP)")
STAGES = ("decode", "insert")       # where the record failed: the label values of the metric
MAX_REASON = 2000

# The errors that say "this record's values", not "this store": worth isolating a culprit for.
# Anything else (I/O, a full disk, a broken database) fails every record alike; setting records
# aside for it would empty the log into the quarantine.
# Code bugs (a binder error, a KeyError) fail every record alike too, and are not listed.
DATA_ERRORS: tuple[type[BaseException], ...] = (
    duckdb.DataError, duckdb.ConversionException, duckdb.InvalidInputException, duckdb.ConstraintException,
    duckdb.TypeMismatchException, ValueError, TypeError, OverflowError, ArithmeticError, UnicodeError,
)


def is_data_error(exc: BaseException) -> bool:
    import pyarrow as pa
    return isinstance(exc, DATA_ERRORS + (pa.ArrowException,)) and not isinstance(exc, duckdb.IOException)


class Quarantine:
    """Sets records aside (file + ``quarantine`` row + counter + log line); knows which are set aside."""

    def __init__(self, data_dir: Path, segments_dir: Path, stats: IngestCounters):
        self.dir = Path(data_dir) / QUARANTINE_DIR
        self.segments_dir = Path(segments_dir)
        self.stats = stats

    def set_aside(self, con: duckdb.DuckDBPyConnection, ref: tuple[int, int, int], signal: str, stage: str,
                  error: BaseException | str, payload: bytes | None = None) -> Path:
        """Copy the record's payload (read from the segment log unless given) and say why.

        ``con`` is the writer's connection, outside a transaction: the row is committed at once,
        so a restart's replay skips the record instead of failing on it again."""
        seg, off, length = ref
        reason = (error if isinstance(error, str) else f"{type(error).__name__}: {error}")[:MAX_REASON]
        make_private_dir(self.dir)
        path = self.dir / f"{seg:08d}-{off:012d}.{signal}.pb"
        if payload is None:
            reader = SegmentReader(self.segments_dir)
            try:
                payload = reader.read(seg, off, length)
            except OSError as exc:      # the bytes are gone (retention, a torn tail): say so, keep the row
                payload, reason = b"", f"{reason} (payload unreadable: {exc})"
            finally:
                reader.close()
        _write_durably(path, payload)
        _write_durably(path.with_suffix(".txt"), (
            f"segment {seg}, offset {off}, {length} bytes, {signal}\nstage: {stage}\nreason: {reason}\n"
            f"set aside at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n").encode())
        con.execute("INSERT INTO quarantine VALUES (?, ?, ?, ?, ?, ?, ?, now()::TIMESTAMP)",
                    [seg, off, length, signal, stage, reason, str(path)])
        self.stats.add("records_quarantined", stage)
        log.error("set aside an acknowledged %s record (segment %d, offset %d) that failed to %s: %s; its payload"
                  " is in %s (see the README's runbook, ShadowlensRecordsQuarantined)", signal, seg, off, stage, reason,
                  path)
        return path

    @staticmethod
    def offsets(con: duckdb.DuckDBPyConnection, segment: int) -> set[int]:
        return {r[0] for r in con.execute("SELECT byte_offset FROM quarantine WHERE segment = ?", [segment]).fetchall()}


def _write_durably(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with os.fdopen(open_private(tmp, os.O_WRONLY | os.O_TRUNC), "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
