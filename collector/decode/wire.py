"""A tolerant reader of OTLP values from protobuf bytes: what the decoder and the ``spans`` view fall
back to when the protobuf library refuses a payload the receiver acknowledged.

The receiver's check (the C scanner's dry run) reads the request's structure, the span headers and
the alias-table attributes; it does not read every attribute value or event. The protobuf library,
given the same bytes, refuses the whole message for one value it cannot read: a string that is not
UTF-8, a value nested deeper than its recursion limit (100 messages, ~31 levels of kvlists), or
corrupt bytes inside an event. Here one such value costs that value, never its neighbours:

- invalid UTF-8 is replaced with U+FFFD (as the C scanner reads strings);
- a value nested more than ``MAX_DEPTH`` arrays/kvlists deep becomes the ``TOO_DEEP`` marker text;
- bytes that are not a valid message become the ``UNREADABLE`` marker text (or, for a KeyValue or an
  event, are skipped), and what was read before them is kept.

Results have the shapes of ``anyvalue.to_python`` (JSON-able) and ``anyvalue.raw_value`` (the
scanners' raw form), and equal them for every value the protobuf library reads (tested).
"""
from __future__ import annotations

import math
import struct
from typing import Any

MAX_DEPTH = 20       # arrays/kvlists inside one another; real attributes nest a few levels
TOO_DEEP = f"[shadowlens: value nested deeper than {MAX_DEPTH} levels, not decoded]"
UNREADABLE = "[shadowlens: malformed value, not decoded]"

_DOUBLE = struct.Struct("<d")


class Malformed(ValueError):
    """Bytes that are not a valid protobuf message at this point."""


def _varint(buf: bytes, i: int, end: int) -> tuple[int, int]:
    v = shift = 0
    while i < end:
        b = buf[i]
        i += 1
        v |= (b & 0x7F) << shift
        if not b & 0x80:
            return v & 0xFFFFFFFFFFFFFFFF, i
        shift += 7
        if shift >= 70:
            break
    raise Malformed("truncated or overlong varint")


def fields(buf: bytes, i: int = 0, end: int | None = None):
    """(field number, wire type, value) of each field in ``buf[i:end]``: an int for varint and fixed
    fields, a (start, end) pair for length-delimited ones. Raises Malformed where the bytes break."""
    end = len(buf) if end is None else end
    while i < end:
        tag = buf[i]
        if tag < 0x80:           # one-byte tags and lengths are the rule: no call for them
            i += 1
        else:
            tag, i = _varint(buf, i, end)
        f, wt = tag >> 3, tag & 7
        if f == 0:
            raise Malformed("field number 0")
        if wt == 0:
            v, i = _varint(buf, i, end)
        elif wt == 1:
            if end - i < 8:
                raise Malformed("truncated fixed64")
            v = int.from_bytes(buf[i:i + 8], "little")
            i += 8
        elif wt == 5:
            if end - i < 4:
                raise Malformed("truncated fixed32")
            v = int.from_bytes(buf[i:i + 4], "little")
            i += 4
        elif wt == 2:
            if i < end and buf[i] < 0x80:
                n = buf[i]
                i += 1
            else:
                n, i = _varint(buf, i, end)
            if n > end - i:
                raise Malformed("length past end of message")
            v = (i, i + n)
            i += n
        else:
            raise Malformed("unsupported wire type")
        yield f, wt, v


def text(buf: bytes, span: tuple[int, int]) -> str:
    return buf[span[0]:span[1]].decode("utf-8", "replace")


def _int64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _oneof(buf: bytes, i: int, end: int) -> tuple[int, int, Any]:
    """An AnyValue's value field: (field number, wire type, value); (0, 0, None) when empty. The last
    value field wins, as in protobuf's oneof."""
    kind = (0, 0, None)
    for f, wt, v in fields(buf, i, end):
        if f in (1, 5, 6, 7) and wt == 2 or f in (2, 3) and wt == 0 or f == 4 and wt == 1:
            kind = (f, wt, v)
    return kind


def _scalar(buf: bytes, f: int, v: Any) -> Any:
    if f == 1:
        return text(buf, v)
    if f == 2:
        return v != 0
    if f == 3:
        return _int64(v)
    return _DOUBLE.unpack(v.to_bytes(8, "little"))[0]


def any_value_json(buf: bytes, i: int = 0, end: int | None = None, depth: int = 0) -> Any:
    """AnyValue bytes -> what ``anyvalue.to_python`` gives (bytes as hex, kvlists as dicts)."""
    end = len(buf) if end is None else end
    try:
        f, _, v = _oneof(buf, i, end)
    except Malformed:
        return UNREADABLE
    if f == 0:
        return None
    if f == 7:                   # bytes_value
        return buf[v[0]:v[1]].hex()
    if f in (5, 6):              # array_value, kvlist_value
        if depth >= MAX_DEPTH:
            return TOO_DEEP
        return (_array_json if f == 5 else _kvlist_json)(buf, v[0], v[1], depth + 1)
    out = _scalar(buf, f, v)
    if f == 4 and not math.isfinite(out):
        return str(out)
    return out


def _array_json(buf: bytes, i: int, end: int, depth: int) -> list:
    out = []
    try:
        for f, wt, v in fields(buf, i, end):
            if f == 1 and wt == 2:
                out.append(any_value_json(buf, v[0], v[1], depth))
    except Malformed:
        out.append(UNREADABLE)
    return out


def _kvlist_json(buf: bytes, i: int, end: int, depth: int) -> dict:
    out: dict = {}
    try:
        for f, wt, v in fields(buf, i, end):
            if f == 1 and wt == 2:
                kv = key_value(buf, v[0], v[1])
                if kv is not None:
                    out[kv[0]] = any_value_json(buf, kv[1][0], kv[1][1], depth) if kv[1] else None
    except Malformed:
        pass             # the pairs read before the break are kept
    return out


def key_value(buf: bytes, i: int, end: int) -> tuple[str, tuple[int, int] | None] | None:
    """A KeyValue -> (key, the AnyValue's (start, end) or None); None when it cannot be read."""
    key, val = "", None
    try:
        for f, wt, v in fields(buf, i, end):
            if f == 1 and wt == 2:
                key = text(buf, v)
            elif f == 2 and wt == 2:
                val = v
    except Malformed:
        return None
    return key, val


def attributes_json(buf: bytes, spans: list[tuple[int, int]]) -> dict:
    """KeyValues at ``spans`` -> {key: to_python-like value}; an unreadable KeyValue is left out."""
    out: dict = {}
    for s, e in spans:
        kv = key_value(buf, s, e)
        if kv is not None:
            out[kv[0]] = any_value_json(buf, kv[1][0], kv[1][1]) if kv[1] else None
    return out


def raw_value(buf: bytes, i: int, end: int) -> Any:
    """AnyValue bytes -> the scanners' raw form (``anyvalue.raw_value``): a scalar, a list for an
    array of scalars, the AnyValue's bytes for other composites; None when unreadable."""
    try:
        f, _, v = _oneof(buf, i, end)
        if f == 0:
            return None
        if f in (6, 7):
            return bytes(buf[i:end])
        if f == 5:
            items = []
            for af, awt, av in fields(buf, v[0], v[1]):
                if af != 1 or awt != 2:
                    continue
                g, _, w = _oneof(buf, av[0], av[1])
                if g in (5, 6, 7):
                    return bytes(buf[i:end])
                items.append(None if g == 0 else _scalar(buf, g, w))
            return items
        return _scalar(buf, f, v)
    except Malformed:
        return None


def event_raw_attributes(buf: bytes) -> dict:
    """An Event's bytes -> {attribute key: raw value}; what is readable before any break."""
    out: dict = {}
    try:
        for f, wt, v in fields(buf):
            if f == 3 and wt == 2:
                kv = key_value(buf, v[0], v[1])
                if kv is not None:
                    out[kv[0]] = raw_value(buf, kv[1][0], kv[1][1]) if kv[1] else None
    except Malformed:
        pass
    return out


class Request:
    """An ExportTraceServiceRequest read tolerantly, keeping only where each part's bytes are:
    ``resources[rs]`` -> the resource's KeyValue spans; ``spans[(rs, ss, sp)]`` -> (attribute
    KeyValue spans, event spans). Indexes count as the scanners count them."""

    def __init__(self, payload: bytes):
        self.buf = payload
        self.resources: list[list[tuple[int, int]]] = []
        self.spans: dict[tuple[int, int, int], tuple[list, list]] = {}
        try:
            for f, wt, v in fields(payload):
                if f == 1 and wt == 2:
                    self._resource_spans(len(self.resources), v)
        except Malformed:
            pass

    def _resource_spans(self, rs: int, where: tuple[int, int]) -> None:
        attrs: list = []
        self.resources.append(attrs)
        ss = 0
        try:
            for f, wt, v in fields(self.buf, *where):
                if f == 1 and wt == 2:
                    attrs.extend(v2 for f2, wt2, v2 in _safe_fields(self.buf, v) if f2 == 1 and wt2 == 2)
                elif f == 2 and wt == 2:
                    self._scope_spans(rs, ss, v)
                    ss += 1
        except Malformed:
            pass

    def _scope_spans(self, rs: int, ss: int, where: tuple[int, int]) -> None:
        sp = 0
        for f, wt, v in _safe_fields(self.buf, where):
            if f == 2 and wt == 2:
                attrs, events = [], []
                for f2, wt2, v2 in _safe_fields(self.buf, v):
                    if f2 == 9 and wt2 == 2:
                        attrs.append(v2)
                    elif f2 == 11 and wt2 == 2:
                        events.append(v2)
                self.spans[(rs, ss, sp)] = (attrs, events)
                sp += 1

    def event_json(self, where: tuple[int, int]) -> dict:
        name, time_ns, attrs = "", 0, []
        for f, wt, v in _safe_fields(self.buf, where):
            if f == 1 and wt == 1:
                time_ns = v
            elif f == 2 and wt == 2:
                name = text(self.buf, v)
            elif f == 3 and wt == 2:
                attrs.append(v)
        return {"name": name, "time_unix_nano": time_ns, "attributes": attributes_json(self.buf, attrs)}


def _safe_fields(buf: bytes, where: tuple[int, int]):
    """``fields`` of a message, stopping quietly where its bytes break (what came before is kept)."""
    try:
        yield from fields(buf, *where)
    except Malformed:
        return
