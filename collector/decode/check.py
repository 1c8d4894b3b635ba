"""Pure: what a receiver must know before it acknowledges a request (OTLP partial success).

The span count, the invalid spans with their reasons, and the message, without building any
columns. The ingest frontend process imports only this (no numpy, pyarrow or DuckDB: ~55 MB
less resident memory in that process); ``normalize.py`` shares its rules, so the verdict given
at acknowledgement is the one the decoder later stores.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Mapping

from ..errors import PermanentError
from . import aliases as A
from .scan import MAX_TIME_NS, invalid_reason, python_scan, validator

PREFIXES = (A.OPENINFERENCE_EVAL_PREFIX.encode(),)
EVENT_NAMES = frozenset({A.EVAL_EVENT_NAME.encode()})


@dataclass
class Check:
    """A request's verdict before it is acknowledged (OTLP partial success)."""
    received: int
    rejected: int
    reasons: Counter
    message: str

    @property
    def accepted(self) -> int:
        return self.received - self.rejected


def alias_index(cohort_labels: Mapping[str, tuple[str, ...]]) -> dict[str, tuple[tuple[str, int], ...]]:
    """Attribute key -> its concepts: the alias table plus one ``cohort:<label>`` concept per label."""
    return A.key_index({f"cohort:{name}": tuple(keys) for name, keys in cohort_labels.items()})


class Checker:
    """``check_traces`` / ``check_logs``: the verdicts ``Normalizer`` would give, without its columns."""

    def __init__(self, cohort_labels: Mapping[str, tuple[str, ...]], scanner_choice: str = "auto"):
        self.index = index = alias_index(cohort_labels)
        self.key_slots = {key.encode(): i for i, key in enumerate(index)}   # what the scanners report
        self.nslots = len(index)
        self._validate = validator(scanner_choice)

    def check_traces(self, payload: bytes) -> Check:
        """``payload``: ExportTraceServiceRequest bytes. Raises PermanentError if malformed.

        The C scanner's dry run reads everything the full scan reads, so a payload that passes
        here normalizes later (in the decoder process) without an error.
        """
        try:
            if self._validate is not None:
                n, invalid = self._validate(payload, self.key_slots, PREFIXES, EVENT_NAMES)
            else:                     # the pure-Python reference scanner: scan and keep the verdict
                sc = python_scan(payload, self.key_slots, self.nslots, PREFIXES, EVENT_NAMES)
                n, invalid = sc["n"], sc["invalid"]
        except ValueError as exc:
            raise PermanentError(f"body is not a valid OTLP traces protobuf request: {exc}") from None
        reasons, message = span_rejections(invalid, n)
        return Check(n, len(invalid), reasons, message)

    def check_logs(self, request) -> Check:
        """``request``: a decoded ExportLogsServiceRequest."""
        received, rejected, reasons, first = 0, 0, Counter(), ""
        for rl in request.resource_logs:
            for sl in rl.scope_logs:
                for rec in sl.log_records:
                    received += 1
                    bad = log_rejection(rec.trace_id, rec.span_id, log_time(rec))
                    if bad:
                        rejected += 1
                        reasons[bad] += 1
                        first = first or log_rejection_text(received - 1, bad)
        return Check(received, rejected, reasons, log_message(rejected, received, first))


def span_rejections(invalid: list[tuple], n: int) -> tuple[Counter, str]:
    """Reason counts and the partial-success message for ``invalid`` spans
    ``(index, trace_id, span_id, parent_span_id, start, end, name)`` out of ``n``."""
    reasons: Counter = Counter(invalid_reason(*row[1:6]) for row in invalid)
    if not invalid:
        return reasons, ""
    i, t, s_, p, a, b, name = invalid[0]
    reason = invalid_reason(t, s_, p, a, b)
    first = (f"span {i} (name {name!r}) rejected: {reason.replace('_', ' ')}"
             f" (trace_id {t.hex() or 'empty'}, span_id {s_.hex() or 'empty'})")
    if reason == "invalid_time":
        first += f": start_time_unix_nano {a}, end_time_unix_nano {b}; the latest storable time is {MAX_TIME_NS} (2262-04-11)"
    summary = ", ".join(f"{k} {r.replace('_', ' ')}" for r, k in sorted(reasons.items()))
    return reasons, f"{len(invalid)} of {n} spans rejected ({summary}); first: {first}"


def log_time(rec) -> int:
    """The time stored for a log record: when it happened, else when it was observed."""
    return rec.time_unix_nano or rec.observed_time_unix_nano


def log_rejection(trace_id: bytes, span_id: bytes, time_ns: int = 0) -> str | None:
    """Why a log record is rejected, or None. Ids are optional on log records; present, they must fit;
    its time must fit the store (as a span's: scan.MAX_TIME_NS)."""
    if trace_id and len(trace_id) != 16:
        return "invalid_trace_id"
    if span_id and len(span_id) != 8:
        return "invalid_span_id"
    if time_ns > MAX_TIME_NS:
        return "invalid_time"
    return None


def log_rejection_text(index: int, reason: str) -> str:
    return f"log record {index} rejected: {reason.replace('_', ' ')}"


def log_message(rejected: int, received: int, first: str) -> str:
    return f"{rejected} of {received} log records rejected; first: {first}" if rejected else ""
