"""The one table from error class to gRPC code (+RetryInfo) and HTTP status (+Retry-After).

Follows the OTLP spec's "Failures" sections: retryable = UNAVAILABLE / 503 (or 429 / RESOURCE_EXHAUSTED
with RetryInfo); not retryable = INVALID_ARGUMENT / 400, and over-size = RESOURCE_EXHAUSTED / 413
without RetryInfo (so a client does not retry a request that can never fit).
"""
from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf.duration_pb2 import Duration
from google.rpc import code_pb2, error_details_pb2

from ..errors import Overloaded, PermanentError, TooLarge


@dataclass(frozen=True)
class Failure:
    grpc_code: grpc.StatusCode
    rpc_code: int
    http_status: int
    message: str
    retry_after_s: float | None = None

    def details(self):
        if self.retry_after_s is None:
            return ()
        secs = int(self.retry_after_s)
        return (error_details_pb2.RetryInfo(retry_delay=Duration(
            seconds=secs, nanos=int((self.retry_after_s - secs) * 1e9))),)


def classify(exc: BaseException) -> Failure:
    if isinstance(exc, TooLarge):
        return Failure(grpc.StatusCode.RESOURCE_EXHAUSTED, code_pb2.RESOURCE_EXHAUSTED, 413, str(exc))
    if isinstance(exc, PermanentError):
        return Failure(grpc.StatusCode.INVALID_ARGUMENT, code_pb2.INVALID_ARGUMENT, 400, str(exc))
    if isinstance(exc, Overloaded):
        return Failure(grpc.StatusCode.UNAVAILABLE, code_pb2.UNAVAILABLE, 503, str(exc), exc.retry_after_s)
    return Failure(grpc.StatusCode.INTERNAL, code_pb2.INTERNAL, 500,
                   f"internal error: {type(exc).__name__}: {exc}")
