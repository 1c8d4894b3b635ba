"""OTLP/HTTP receiver: POST /v1/traces and /v1/logs, protobuf or JSON, gzip, chunked bodies.

The size limit is checked on the declared length, while reading a chunked body, and again
after decompression. Errors answer with a google.rpc.Status body in the request's encoding.
"""
from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ..config import Endpoint
from ..decode import codec
from ..errors import PermanentError, TooLarge
from .export import ExportHandler
from .status import classify

log = logging.getLogger("shadowlens.http")

PATHS = {"/v1/traces": codec.TRACES, "/v1/logs": codec.LOGS}
DRAIN_MAX_BYTES = 64 << 20      # an over-limit body up to this much larger is read (and dropped) before the 413


def read_body(rfile, headers, limit: int) -> bytes:
    """The request body (Content-Length or chunked), refusing more than ``limit`` bytes."""
    if "chunked" in headers.get("Transfer-Encoding", "").lower():
        parts, total = [], 0
        while True:
            line = rfile.readline(1024)
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                raise PermanentError("malformed chunked request body") from None
            if size == 0:
                while rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(parts)
            total += size
            if total > limit:
                raise TooLarge(f"body is over the limit of {limit >> 20} MiB")
            parts.append(rfile.read(size))
            rfile.readline(8)
    length = headers.get("Content-Length")
    if length is None:
        return b""
    try:
        n = int(length)
    except ValueError:
        raise PermanentError(f"bad Content-Length {length!r}") from None
    if n > limit:
        if n - limit <= DRAIN_MAX_BYTES:
            # Read the body before answering: closing with it unread resets the connection, and a
            # client still sending sees the reset instead of the 413.
            left = n
            while left > 0 and (chunk := rfile.read(min(left, 1 << 20))):
                left -= len(chunk)
        raise TooLarge(f"body of {n} bytes is over the limit of {limit >> 20} MiB")
    return rfile.read(n)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "shadowlens"
    receiver: "HttpReceiver"

    def log_message(self, fmt, *args):  # per-request logging would swamp the sidecar's log
        pass

    def _reply(self, status: int, content_type: str, body: bytes, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _fail(self, content_type: str, status: int, message: str, retry_after: float | None = None,
              rpc_code: int = 3, details=()) -> None:
        extra = {"Retry-After": str(max(1, round(retry_after)))} if retry_after is not None else {}
        if status in (413, 400, 415):
            # The rest of the body may be unread: don't try to reuse this connection.
            extra["Connection"] = "close"
            self.close_connection = True
        self._reply(status, content_type, codec.status_bytes(content_type, rpc_code, message, details), extra)

    def do_POST(self) -> None:  # noqa: N802
        with self.receiver.inflight:
            self.receiver.inflight_count += 1
        try:
            self._post()
        finally:
            with self.receiver.inflight:
                self.receiver.inflight_count -= 1
                self.receiver.inflight.notify_all()

    def _post(self) -> None:
        path = self.path.split("?", 1)[0]
        signal = PATHS.get(path)
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        reply_type = codec.JSON if ctype == codec.JSON else codec.PROTOBUF
        if signal is None:
            self._fail(reply_type, 404, f"no OTLP endpoint at {path}; use /v1/traces or /v1/logs", rpc_code=5)
            return
        if ctype not in (codec.PROTOBUF, codec.JSON):
            self._fail(reply_type, 415, f"unsupported Content-Type {ctype!r}; use application/x-protobuf or "
                                        "application/json")
            return
        limit = self.receiver.max_body_bytes
        try:
            body = read_body(self.rfile, self.headers, limit)
            encoding = self.headers.get("Content-Encoding", "").strip().lower()
            if encoding == "gzip":
                body = codec.gunzip(body, limit)
            elif encoding not in ("", "identity"):
                raise PermanentError(f"unsupported Content-Encoding {encoding!r}; use gzip or none")
            out = self.receiver.handler.export(signal, ctype, body, "http")
        except Exception as exc:  # noqa: BLE001 - every failure is classified and answered
            f = classify(exc)
            if f.http_status == 500:
                log.exception("HTTP %s export failed", signal.name)
            self._fail(reply_type, f.http_status, f.message, f.retry_after_s, f.rpc_code, f.details())
            return
        self._reply(200, reply_type, out)

    def do_GET(self) -> None:  # noqa: N802
        self._fail(codec.JSON, 405, "OTLP/HTTP accepts POST only", rpc_code=12)

    do_PUT = do_DELETE = do_PATCH = do_GET


class HttpReceiver:
    def __init__(self, endpoint: Endpoint, handler: ExportHandler, max_body_bytes: int):
        self.endpoint = endpoint
        self.handler = handler
        self.max_body_bytes = max_body_bytes
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None
        self.inflight = threading.Condition()
        self.inflight_count = 0

    def start(self) -> None:
        handler_cls = type("OtlpHttpHandler", (_Handler,), {"receiver": self})
        server = ThreadingHTTPServer((self.endpoint.host, self.endpoint.port), handler_cls)
        server.daemon_threads = True
        server.block_on_close = False
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, name="otlp-http", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop accepting, then wait for in-flight Exports (they finish once their commit lands)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
            with self.inflight:
                self.inflight.wait_for(lambda: self.inflight_count == 0, timeout)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None


