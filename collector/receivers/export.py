"""The Export handler both transports call: check (or normalize) -> store -> response bytes.

Two kinds of store. ``serve``'s frontend has a RemoteStore with ``submit_record``: the handler only
checks the request (the C scanner's dry run: span count, invalid spans, the partial-success
message), the store makes the payload durable, and the decoder process builds the columns after
the acknowledgement. An in-process StoreWriter (tests, tools) gets fully normalized batches.
"""
from __future__ import annotations

import threading
from concurrent.futures import TimeoutError as FutureTimeout

from ..decode import codec
from ..errors import Overloaded
from ..stats import IngestStats

COMMIT_TIMEOUT_S = 60.0
# Decoding is GIL-bound Python: many receiver threads decoding at once only trade the GIL back and
# forth (measured: 4 concurrent decoders ran ~35% slower in total than one at a time). Threads queue
# here instead, and the store's I/O (which releases the GIL) overlaps with the one decoder.
DECODE_CONCURRENCY = 1


class ExportHandler:
    """Returns the response body on success; raises a classified error otherwise (see status.py)."""

    def __init__(self, normalizer, store, stats: IngestStats):
        """``normalizer``: a decode.normalize.Normalizer, or for a deferring store (``submit_record``)
        a decode.check.Checker, which only checks."""
        self.normalizer = normalizer
        self.store = store
        self.stats = stats
        self._decoding = threading.BoundedSemaphore(DECODE_CONCURRENCY)

    def export(self, signal: codec.Signal, content_type: str, body: bytes, receiver: str) -> bytes:
        deferred = hasattr(self.store, "submit_record")
        if signal is codec.TRACES:
            # protobuf bodies go straight to the scanner; JSON is re-encoded once to protobuf
            with self._decoding:
                payload = body if content_type == codec.PROTOBUF else codec.decode_json(signal, body).SerializeToString()
                batch = self.normalizer.check_traces(payload) if deferred else self.normalizer.normalize_traces(payload)
            self.stats.add("spans_received", receiver, batch.received)
            if batch.rejected:
                self.stats.add_many("spans_rejected", batch.reasons)
            if getattr(batch, "unpriced", None):
                self.stats.add_many("unpriced_spans", batch.unpriced)
            if deferred:
                if batch.accepted:
                    self.store.submit_record(payload, "traces", batch.accepted)
                return codec.response_bytes(signal, content_type, batch.rejected, batch.message)
        else:
            with self._decoding:
                request, payload = codec.decode(signal, content_type, body)
                batch = self.normalizer.check_logs(request) if deferred else self.normalizer.normalize_logs(request, payload)
            self.stats.add("logs_received", receiver, batch.received)
            if batch.rejected:
                self.stats.add_many("logs_rejected", batch.reasons)
            if deferred:
                if batch.accepted:
                    self.store.submit_record(payload, "logs", batch.accepted)
                return codec.response_bytes(signal, content_type, batch.rejected, batch.message)
        if batch.accepted:
            future = self.store.submit(batch)
            try:
                future.result(COMMIT_TIMEOUT_S)
            except FutureTimeout:
                raise Overloaded("the store did not commit within 60 s; retry (duplicates are stored once)", 5.0)
        return codec.response_bytes(signal, content_type, batch.rejected, batch.message)
