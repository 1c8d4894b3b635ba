"""OTLP/gRPC receiver: TraceService/Export and LogsService/Export (gzip handled by gRPC).

Requests arrive as raw bytes (no deserializer) so that an undecodable body maps to
INVALID_ARGUMENT through status.py, like every other failure.
"""
from __future__ import annotations

import logging
from concurrent import futures

import grpc

from ..decode import codec
from ..security import BearerToken, ServerTLS
from ..settings import Endpoint
from .export import ExportHandler
from .status import classify

log = logging.getLogger("shadowlens.grpc")

_SERVICES = {
    "opentelemetry.proto.collector.trace.v1.TraceService": codec.TRACES,
    "opentelemetry.proto.collector.logs.v1.LogsService": codec.LOGS,
}


class _BearerAuth(grpc.ServerInterceptor):
    """UNAUTHENTICATED for a call without the token, decided on its metadata before the handler runs."""

    def __init__(self, token: BearerToken):
        self.token = token

    def intercept_service(self, continuation, details):
        header = next((v for k, v in details.invocation_metadata or () if k == "authorization"), None)
        why = self.token.check(header if isinstance(header, str) else None)
        if why is None:
            return continuation(details)

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, why)
        return grpc.unary_unary_rpc_method_handler(deny)


class GrpcReceiver:
    def __init__(self, endpoint: Endpoint, handler: ExportHandler, max_message_bytes: int, max_workers: int,
                 tls: ServerTLS | None = None, token: BearerToken | None = None):
        self.tls = tls
        self.token = token
        self.endpoint = endpoint
        self.handler = handler
        self.max_message_bytes = max_message_bytes
        self.max_workers = max_workers
        self._server: grpc.Server | None = None
        self.port: int | None = None

    def _method(self, signal: codec.Signal):
        def export(body: bytes, context: grpc.ServicerContext) -> bytes:
            try:
                return self.handler.export(signal, codec.PROTOBUF, body, "grpc")
            except Exception as exc:  # every failure is classified and answered
                failure = classify(exc)
                if failure.http_status >= 500 and failure.retry_after_s is None:
                    log.exception("gRPC %s export failed", signal.name)
                context.set_trailing_metadata((("grpc-status-details-bin", codec.status_bytes(
                    codec.PROTOBUF, failure.rpc_code, failure.message, failure.details())),))
                context.abort(failure.grpc_code, failure.message)
        return grpc.unary_unary_rpc_method_handler(export)

    def start(self) -> None:
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix="otlp-grpc"),
            options=[("grpc.max_receive_message_length", self.max_message_bytes),
                     ("grpc.max_send_message_length", 16 << 20),
                     ("grpc.so_reuseport", 0)],
            maximum_concurrent_rpcs=self.max_workers * 4,
            interceptors=[_BearerAuth(self.token)] if self.token is not None else None,
        )
        self._server.add_generic_rpc_handlers([
            grpc.method_handlers_generic_handler(service, {"Export": self._method(signal)})
            for service, signal in _SERVICES.items()])
        host = self.endpoint.host
        bind = f"[{host}]:{self.endpoint.port}" if ":" in host else f"{host}:{self.endpoint.port}"
        try:
            if self.tls is not None:
                self.port = self._server.add_secure_port(bind, self.tls.grpc_credentials())
            else:
                self.port = self._server.add_insecure_port(bind)
        except RuntimeError:     # grpcio >= 1.60 raises where older versions returned port 0
            self.port = 0
        if not self.port:
            raise OSError(f"cannot listen for OTLP/gRPC on {self.endpoint} (receivers.grpc.endpoint):"
                          " address already in use?")
        self._server.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop accepting; in-flight Exports finish (they are waiting for their commit)."""
        if self._server is not None:
            self._server.stop(grace=timeout).wait(timeout)
            self._server = None
