"""OTLP request/response codecs: protobuf and OTLP/JSON, plus gzip with a size limit.

OTLP/JSON differs from the protobuf JSON mapping: trace and span ids are hex, not base64
(spec: "OTLP/HTTP JSON encoding"). Unknown fields are ignored, int64 may be a string or a number.
"""
from __future__ import annotations

import base64
import binascii
import json
import zlib
from dataclasses import dataclass

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from google.rpc import status_pb2
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from ..errors import PermanentError, TooLarge


@dataclass(frozen=True)
class Signal:
    """One OTLP signal's request and response types (one handler serves every signal)."""
    name: str
    request_type: type
    response_type: type
    resource_field: str
    scope_field: str
    items_field: str
    rejected_field: str
    id_fields: tuple[str, ...]


TRACES = Signal("traces", trace_service_pb2.ExportTraceServiceRequest, trace_service_pb2.ExportTraceServiceResponse,
                "resourceSpans", "scopeSpans", "spans", "rejected_spans", ("traceId", "spanId", "parentSpanId"))
LOGS = Signal("logs", logs_service_pb2.ExportLogsServiceRequest, logs_service_pb2.ExportLogsServiceResponse,
              "resourceLogs", "scopeLogs", "logRecords", "rejected_log_records", ("traceId", "spanId"))

PROTOBUF = "application/x-protobuf"
JSON = "application/json"


def gunzip(data: bytes, limit: int) -> bytes:
    """Decompress gzip, refusing output over ``limit`` bytes (a zip bomb must not reach memory)."""
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(data, limit + 1)
    except zlib.error as exc:
        raise PermanentError(f"body is not valid gzip: {exc}") from None
    if len(out) > limit or d.unconsumed_tail:
        raise TooLarge(f"decompressed body is over the limit of {limit >> 20} MiB")
    return out


def decode_protobuf(signal: Signal, data: bytes):
    try:
        return signal.request_type.FromString(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise PermanentError(f"body is not a valid OTLP {signal.name} protobuf request: {exc}") from None


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in name)


def _hex_to_b64(value) -> str:
    if not isinstance(value, str):
        return ""
    try:
        raw = binascii.unhexlify(value)
    except (binascii.Error, ValueError):
        # Not hex: leave an id of the wrong length, so the span is rejected by validation.
        return ""
    return base64.b64encode(raw).decode()


def _fix_ids(signal: Signal, doc: dict) -> None:
    for rs in _items(doc, signal.resource_field):
        for ss in _items(rs, signal.scope_field):
            for item in _items(ss, signal.items_field):
                if not isinstance(item, dict):
                    continue
                for name in signal.id_fields:
                    for key in (name, _snake(name)):
                        if key in item:
                            item[key] = _hex_to_b64(item[key])
                for link in _items(item, "links"):
                    if isinstance(link, dict):
                        for key in ("traceId", "trace_id", "spanId", "span_id"):
                            if key in link:
                                link[key] = _hex_to_b64(link[key])


def _items(node, camel: str):
    if not isinstance(node, dict):
        return []
    value = node.get(camel, node.get(_snake(camel)))
    return value if isinstance(value, list) else []


def decode_json(signal: Signal, data: bytes):
    try:
        doc = json.loads(data)
    except RecursionError:
        raise PermanentError("body is not valid OTLP/JSON: arrays or objects nest deeper than ~1,000 levels;"
                             " send attribute values that nest less deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise PermanentError(f"body is not valid JSON: {readable(str(exc))}") from None
    if not isinstance(doc, dict):
        raise PermanentError(f"OTLP/JSON {signal.name} request must be a JSON object")
    _fix_ids(signal, doc)
    msg = signal.request_type()
    try:
        json_format.ParseDict(doc, msg, ignore_unknown_fields=True)
    except RecursionError:
        raise PermanentError(f"body is not a valid OTLP/JSON {signal.name} request: attribute values nest too"
                             " deeply for the protobuf mapping; send values that nest less deeply") from None
    except Exception as exc:  # the document is the client's: json_format and the protobuf
        # runtime fail on it with ParseError, ValueError, TypeError, but also SystemError (an enum given as a
        # lone surrogate) and others; whatever they raise, it is this body that could not be mapped
        why = str(exc) if isinstance(exc, (json_format.ParseError, ValueError, TypeError)) else \
            f"a field's value does not fit its type ({type(exc).__name__})"
        raise PermanentError(f"body is not a valid OTLP/JSON {signal.name} request: {readable(why)}") from None
    return msg


MESSAGE_MAX_CHARS = 1_000


def readable(message: str) -> str:
    """``message`` as text every client can take: lone surrogates escaped (they cannot be encoded in UTF-8,
    and json_format quotes the client's values in its errors) and at most MESSAGE_MAX_CHARS characters."""
    if len(message) > MESSAGE_MAX_CHARS:
        message = message[:MESSAGE_MAX_CHARS] + "..."
    return message.encode("utf-8", "backslashreplace").decode("utf-8")


def decode(signal: Signal, content_type: str, data: bytes):
    """-> (request message, protobuf bytes of it). JSON is re-encoded once so the store keeps one format."""
    if content_type == PROTOBUF:
        return decode_protobuf(signal, data), data
    msg = decode_json(signal, data)
    return msg, msg.SerializeToString()


def response_bytes(signal: Signal, content_type: str, rejected: int, message: str) -> bytes:
    resp = signal.response_type()
    if rejected or message:
        setattr(resp.partial_success, signal.rejected_field, rejected)
        resp.partial_success.error_message = readable(message)
    if content_type == JSON:
        return json_format.MessageToJson(resp, indent=None).encode()
    return resp.SerializeToString()


def status_bytes(content_type: str, code: int, message: str, details=()) -> bytes:
    st = status_pb2.Status(code=code, message=readable(message))
    for d in details:
        st.details.add().Pack(d)
    if content_type == JSON:
        return json_format.MessageToJson(st, indent=None).encode()
    return st.SerializeToString()
