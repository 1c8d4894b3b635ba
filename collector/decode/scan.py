"""Scanners: an ExportTraceServiceRequest's bytes -> span columns with only alias-table attributes.

Two implementations with one output (documented in ``_wirescan.c``): the C extension, used
when it was built, and this module's pure-Python reference over the protobuf API. Tests hold
them equal; the config key ``receivers.scanner: python`` forces the reference.
"""
from __future__ import annotations

import struct

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from .anyvalue import raw_value

try:
    from . import _wirescan
except ImportError:  # no compiler at install time
    _wirescan = None

# One span's fixed columns, as the C scanner writes them (little-endian, 64 bytes; _wirescan.c;
# ids.SPAN_RECORD reads them).
_RECORD = struct.Struct("<16s8s8sQQiiiBBxx")
ZERO_TRACE, ZERO_SPAN = bytes(16), bytes(8)
# The latest span time the store can hold: DuckDB's TIMESTAMP_NS is a signed 64-bit count and refuses
# 2^63 - 1 itself (its "infinity"); a later time passed the end-before-start check and then failed the
# whole commit group ("Overflow in subtraction of INT64"). _wirescan.c's MAX_TIME_NS is the same number.
MAX_TIME_NS = 2**63 - 2


def invalid_reason(t: bytes, s: bytes, p: bytes, start: int, end: int) -> str | None:
    """Why a span is rejected (OTLP partial success), or None: the C scanner applies the same rule."""
    if len(t) != 16 or t == ZERO_TRACE:
        return "invalid_trace_id"
    if len(s) != 8 or s == ZERO_SPAN:
        return "invalid_span_id"
    if p and (len(p) != 8 or p == ZERO_SPAN):
        return "invalid_parent_span_id"
    if start > MAX_TIME_NS or end > MAX_TIME_NS:
        return "invalid_time"
    if end < start:
        return "end_before_start"
    return None


def _u8(v: int) -> int:
    return v if 0 <= v < 256 else 255      # as the C scanner caps enum values it does not know


def _fixed(raw: bytes, width: int) -> bytes:
    return raw if len(raw) == width else bytes(width)


def python_scan(payload: bytes, keys: dict, nslots: int, prefixes: tuple, event_names) -> dict:
    try:
        req = ExportTraceServiceRequest.FromString(payload)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"malformed protobuf: {exc}") from None
    names, messages, scopes, records, invalid = [], [], [], [], []
    slots = [[[], []] for _ in range(nslots)]
    prefixed, events, resources = [], [], []
    for rs_idx, rs in enumerate(req.resource_spans):
        res = []
        for kv in rs.resource.attributes:
            slot = keys.get(kv.key.encode())
            if slot is not None:
                res.append((slot, raw_value(kv.value)))
        resources.append(res)
        for ss_idx, ss in enumerate(rs.scope_spans):
            scope = ss.scope.name or None
            for sp_idx, s in enumerate(ss.spans):
                i = len(records)
                start, end = s.start_time_unix_nano, s.end_time_unix_nano
                if invalid_reason(s.trace_id, s.span_id, s.parent_span_id, start, end):
                    invalid.append((i, s.trace_id, s.span_id, s.parent_span_id, start, end, s.name))
                records.append(_RECORD.pack(_fixed(s.trace_id, 16), _fixed(s.span_id, 8), _fixed(s.parent_span_id, 8),
                                            start, end, rs_idx, ss_idx, sp_idx, _u8(s.kind), _u8(s.status.code)))
                names.append(s.name)
                messages.append(s.status.message if s.HasField("status") and s.status.message else None)
                scopes.append(scope)
                for kv in s.attributes:
                    k = kv.key.encode()
                    slot = keys.get(k)
                    if slot is not None:
                        slots[slot][0].append(i)
                        slots[slot][1].append(raw_value(kv.value))
                    elif k.startswith(prefixes):
                        prefixed.append((i, kv.key, raw_value(kv.value)))
                for e in s.events:
                    if e.name.encode() in event_names:
                        events.append((i, e.SerializeToString()))
    return dict(n=len(records), spans=b"".join(records), invalid=invalid, name=names, status_message=messages,
                scope=scopes, slots=slots, prefixed=prefixed, events=events, resources=resources)


def python_merge_column(n: int, pairs: list, exact: type | None, convert, known: dict | None = None) -> list | None:
    """One concept's column from the scanner's per-key ``[span_indexes, values]`` pairs, best key
    first; None when no pair has a value. A span takes the first value (best key first; within a
    key, the last occurrence first) that is of type ``exact`` or that ``convert`` turns into
    something other than None, so a value that cannot be read as the concept's type falls back to
    the next key. ``known``: answers of ``convert`` for str values, which the C version looks up
    instead of calling it (here it changes nothing). The reference for ``_wirescan.merge_column``.
    """
    col = None
    for idxs, vals in pairs:
        if not idxs:
            continue
        if col is None:
            col = [None] * n
        for i, v in zip(reversed(idxs), reversed(vals)):
            if col[i] is not None:
                continue
            if type(v) is not exact:
                v = convert(v)
                if v is None:
                    continue
            col[i] = v
    return col


def scanner(choice: str = "auto"):
    """The scan function for ``receivers.scanner``: auto (C when built), c, or python."""
    if choice == "python" or (choice == "auto" and _wirescan is None):
        return python_scan
    if _wirescan is None:
        raise RuntimeError("receivers.scanner is 'c' but the C scanner was not built (no compiler at install time?)")
    return _wirescan.scan_traces


def column_merger(choice: str = "auto"):
    """``merge_column`` for ``receivers.scanner``: C when built (auto, c), else the reference."""
    if choice == "python" or _wirescan is None:
        return python_merge_column
    return _wirescan.merge_column


def validator(choice: str = "auto"):
    """The C dry-run validator for ``receivers.scanner``, or None with the pure-Python scanner."""
    if choice == "python" or _wirescan is None:
        return None
    return _wirescan.validate_traces
