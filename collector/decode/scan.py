"""Scanners: an ExportTraceServiceRequest's bytes -> span columns with only alias-table attributes.

Two implementations with one output (documented in ``_wirescan.c``): the C extension, used
when it was built, and this module's pure-Python reference over the protobuf API. Tests hold
them equal; the config key ``receivers.scanner: python`` forces the reference.
"""
from __future__ import annotations

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from .anyvalue import raw_value

try:
    from . import _wirescan
except ImportError:  # no compiler at install time
    _wirescan = None

COLUMNS = ("trace_id", "span_id", "parent_span_id", "name", "kind", "start", "end", "status_code",
           "status_message", "scope", "rs_idx", "ss_idx", "sp_idx")


def python_scan(payload: bytes, keys: dict, nslots: int, prefixes: tuple, event_names) -> dict:
    try:
        req = ExportTraceServiceRequest.FromString(payload)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"malformed protobuf: {exc}") from None
    cols = {c: [] for c in COLUMNS}
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
                i = len(cols["trace_id"])
                for c, v in zip(COLUMNS, (s.trace_id, s.span_id, s.parent_span_id, s.name, s.kind,
                                          s.start_time_unix_nano, s.end_time_unix_nano, s.status.code,
                                          s.status.message if s.HasField("status") and s.status.message else None,
                                          scope, rs_idx, ss_idx, sp_idx)):
                    cols[c].append(v)
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
    return dict(cols, slots=slots, prefixed=prefixed, events=events, resources=resources)


def scanner(choice: str = "auto"):
    """The scan function for ``receivers.scanner``: auto (C when built), c, or python."""
    if choice == "python" or (choice == "auto" and _wirescan is None):
        return python_scan
    if _wirescan is None:
        raise RuntimeError("receivers.scanner is 'c' but the C scanner was not built (no compiler at install time?)")
    return _wirescan.scan_traces


def validator(choice: str = "auto"):
    """The C dry-run validator for ``receivers.scanner``, or None with the pure-Python scanner."""
    if choice == "python" or _wirescan is None:
        return None
    return _wirescan.validate_traces
