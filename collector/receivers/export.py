"""The Export handler both transports call: check -> make durable -> response bytes.

The handler only checks the request (the C scanner's dry run: span count, invalid spans, the
partial-success message); the intake (ingest/intake.py) makes the payload durable before it
returns, and the decoder process builds the columns after the acknowledgement.
"""
from __future__ import annotations

import threading

from ..counters import IngestCounters
from ..decode import codec

# Checking is GIL-bound Python: many receiver threads checking at once only trade the GIL back and
# forth (measured: 4 concurrent decoders ran ~35% slower in total than one at a time). Threads queue
# here instead, and the payload log's I/O (which releases the GIL) overlaps with the one check.
DECODE_CONCURRENCY = 1


class ExportHandler:
    """Returns the response body on success; raises a classified error otherwise (see status.py)."""

    def __init__(self, checker, intake, stats: IngestCounters):
        """``checker``: a decode.check.Checker. ``intake``: has ``persist(payload, signal, spans)``,
        durable on return (ingest.intake.Intake)."""
        self.checker = checker
        self.intake = intake
        self.stats = stats
        self._decoding = threading.BoundedSemaphore(DECODE_CONCURRENCY)

    def export(self, signal: codec.Signal, content_type: str, body: bytes, receiver: str) -> bytes:
        if signal is codec.TRACES:
            # protobuf bodies go straight to the scanner; JSON is re-encoded once to protobuf
            with self._decoding:
                payload = body if content_type == codec.PROTOBUF else codec.decode_json(signal, body).SerializeToString()
                check = self.checker.check_traces(payload)
            self.stats.add("spans_received", receiver, check.received)
            if check.rejected:
                self.stats.add_many("spans_rejected", check.reasons)
        else:
            with self._decoding:
                request, payload = codec.decode(signal, content_type, body)
                check = self.checker.check_logs(request)
            self.stats.add("logs_received", receiver, check.received)
            if check.rejected:
                self.stats.add_many("logs_rejected", check.reasons)
        if check.accepted:
            self.intake.persist(payload, signal.name, check.accepted)
        return codec.response_bytes(signal, content_type, check.rejected, check.message)
