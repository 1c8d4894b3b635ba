"""Protobuf bytes built by hand, for what the protobuf library refuses to encode (invalid UTF-8 in a
string, nesting past its recursion limit, corrupt bytes inside a message). Independent of shadowlens."""
from __future__ import annotations

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def ld(field: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return varint(field << 3 | 2) + varint(len(payload)) + payload


def string_value(raw: bytes) -> bytes:
    """AnyValue{string_value: raw}, raw taken as it is (any bytes)."""
    return ld(1, raw)


def key_value(key: bytes, any_value: bytes) -> bytes:
    return ld(1, key) + ld(2, any_value)


def nested_kvlist(depth: int, leaf: bytes = b"") -> bytes:
    """AnyValue: ``depth`` kvlists inside one another ({"k": {"k": ... "x"}}), the innermost value the string ``leaf``."""
    av = string_value(leaf or b"x")
    key = b"k"
    for _ in range(depth):
        av = ld(6, ld(1, key_value(key, av)))      # kvlist_value (6) > KeyValueList.values (1)
    return av


def nested_array(depth: int) -> bytes:
    """AnyValue: ``depth`` arrays inside one another around int 1, built without recursion."""
    size, prefixes, inner = 2, [], b"\x18\x01"
    for _ in range(depth):
        arr = b"\x0a" + varint(size)
        size += len(arr)
        av = b"\x2a" + varint(size)
        size += len(av)
        prefixes.append(av + arr)
    return b"".join(reversed(prefixes)) + inner


def event(name: bytes, attributes: bytes = b"", time_ns: int = 0) -> bytes:
    """Span.Event: time (fixed64, field 1), name (2), then ``attributes`` (KeyValue fields 3, or any bytes)."""
    return b"\x09" + time_ns.to_bytes(8, "little") + ld(2, name) + attributes


def with_span_extras(req: ExportTraceServiceRequest, extras: dict[tuple[int, int, int], bytes]) -> bytes:
    """``req`` serialized, with raw bytes appended to the span at (rs, ss, sp) for each entry of ``extras``
    (appending fields to a message is valid protobuf: fields may come in any order)."""
    out = b""
    for r, rs in enumerate(req.resource_spans):
        body = ld(1, rs.resource.SerializeToString())
        for s, ss in enumerate(rs.scope_spans):
            ssb = ld(1, ss.scope.SerializeToString())
            for p, span in enumerate(ss.spans):
                ssb += ld(2, span.SerializeToString() + extras.get((r, s, p), b""))
            body += ld(2, ssb)
        out += ld(1, body)
    return out


def attribute(key: bytes, any_value: bytes) -> bytes:
    """A span attribute field (Span.attributes is field 9)."""
    return ld(9, key_value(key, any_value))


def span_event(ev: bytes) -> bytes:
    """A span event field (Span.events is field 11)."""
    return ld(11, ev)
