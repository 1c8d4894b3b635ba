"""OTLP/HTTP receiver: POST /v1/traces and /v1/logs, protobuf or JSON, gzip, chunked bodies.

The size limit is checked on the declared length, while reading a chunked body, and again
after decompression. Errors answer with a google.rpc.Status body in the request's encoding.

Every connection has a worker thread, so every way a client can hold one is bounded: a connection
waits at most ``idle_timeout`` for its next request line, a request's headers and body must arrive
within ``read_timeout``, and at most ``max_connections`` workers exist. At the cap the oldest idle
connection is closed to make room, and otherwise new connections wait in the listen backlog.
"""
from __future__ import annotations

import io
import logging
import queue
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ..decode import codec
from ..errors import PermanentError, TooLarge
from ..security import BearerToken, ServerTLS, TLSServerMixin
from ..settings import Endpoint
from .export import ExportHandler
from .status import classify

log = logging.getLogger("shadowlens.http")

PATHS = {"/v1/traces": codec.TRACES, "/v1/logs": codec.LOGS}
DRAIN_MAX_BYTES = 64 << 20      # an over-limit body up to this much larger is read (and dropped) before the 413
WRITE_TIMEOUT_S = 30.0          # a reply is a few hundred bytes; a client that takes longer to take it is gone
RECLAIM_IDLE_AFTER_S = 1.0      # younger idle connections are left alone: their request may be on its way
MAX_TRAILER_BYTES = 64 << 10
LISTEN_BACKLOG = 1024           # where connections wait while every connection thread is taken
WORKER_IDLE_S = 60.0            # a connection worker with nothing to do for this long ends

# RFC 9112: Content-Length is 1*DIGIT and a chunk size 1*HEXDIG. int() would also take "-1", "+5",
# "1_0" and " 0x1", and a negative length made rfile.read() read until the client closed.
_DIGITS = re.compile(rb"[0-9]+")
_HEXDIGITS = re.compile(rb"[0-9A-Fa-f]+")


def _content_length(headers) -> int | None:
    values = headers.get_all("Content-Length") or []
    if not values:
        return None
    fields = {v.strip() for value in values for v in value.split(",")}
    if len(fields) != 1 or not _DIGITS.fullmatch(next(iter(fields)).encode("latin-1", "replace")):
        shown = ", ".join(values)
        raise PermanentError(f"bad Content-Length {shown!r}: it must be one non-negative decimal number")
    digits = next(iter(fields)).lstrip("0") or "0"
    if len(digits) > 18:        # past any limit, and int() refuses over 4300 digits
        raise TooLarge(f"body of {digits[:20]}... bytes is over the limit")
    return int(digits)


def _read_exactly(rfile, n: int) -> bytes:
    data = rfile.read(n)
    if len(data) != n:
        # The client closed early: a prefix of a protobuf can parse, and acknowledging it would
        # drop the rest of the request silently.
        raise PermanentError(f"request body ended after {len(data)} of {n} bytes; send the whole body")
    return data


def _read_chunked(rfile, limit: int) -> bytes:
    parts, total = [], 0
    while True:
        line = rfile.readline(1024)
        if not line.endswith(b"\n"):
            raise PermanentError("malformed chunked request body: a chunk-size line is cut off or over 1 KiB")
        size_text = line.split(b";", 1)[0].strip()
        if not _HEXDIGITS.fullmatch(size_text):
            raise PermanentError(f"malformed chunked request body: chunk size {size_text[:40]!r} "
                                 "is not a hexadecimal number")
        size = int(size_text, 16)
        if size == 0:
            trailer = 0
            while (line := rfile.readline(1024)) not in (b"\r\n", b"\n"):
                trailer += len(line)
                if not line or trailer > MAX_TRAILER_BYTES:
                    raise PermanentError("malformed chunked request body: the trailer does not end "
                                         f"within {MAX_TRAILER_BYTES >> 10} KiB")
            return b"".join(parts)
        total += size
        if total > limit:
            raise TooLarge(f"body is over the limit of {limit >> 20} MiB")
        parts.append(_read_exactly(rfile, size))
        if rfile.readline(8) not in (b"\r\n", b"\n"):
            raise PermanentError("malformed chunked request body: a chunk is longer than its size says")


def read_body(rfile, headers, limit: int) -> bytes:
    """The request body (Content-Length or chunked), refusing more than ``limit`` bytes."""
    te = headers.get("Transfer-Encoding")
    if te is not None:
        codings = [c.strip().lower() for c in te.split(",") if c.strip()]
        if codings != ["chunked"]:
            raise PermanentError(f"unsupported Transfer-Encoding {te!r}; send Content-Length or "
                                 "Transfer-Encoding: chunked (compress with Content-Encoding: gzip)")
        return _read_chunked(rfile, limit)
    n = _content_length(headers)
    if n is None:
        return b""
    if n > limit:
        if n - limit <= DRAIN_MAX_BYTES:
            # Read the body before answering: closing with it unread resets the connection, and a
            # client still sending sees the reset instead of the 413.
            left = n
            while left > 0 and (chunk := rfile.read(min(left, 1 << 20))):
                left -= len(chunk)
        raise TooLarge(f"body of {n} bytes is over the limit of {limit >> 20} MiB")
    return _read_exactly(rfile, n)


class _DeadlineReader(socket.SocketIO):
    """A socket reader whose every recv ends by one deadline, so a client trickling a byte at a
    time cannot stretch a request past it (a per-recv timeout alone would be reset by each byte)."""

    deadline = float("inf")

    def readinto(self, b):
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("read deadline passed")
        self._sock.settimeout(left)
        return super().readinto(b)


class _SocketWriter(io.BufferedIOBase):
    """Unbuffered writes, as StreamRequestHandler's own writer (wbufsize 0) does."""

    def __init__(self, sock: socket.socket):
        self._sock = sock

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self._sock.sendall(b)
        return len(memoryview(b))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "shadowlens"
    receiver: "HttpReceiver"

    def log_message(self, fmt, *args):  # per-request logging would swamp the sidecar's log
        pass

    def setup(self) -> None:
        self.connection = self.request
        self._reader = _DeadlineReader(self.connection, "rb")
        self.rfile = io.BufferedReader(self._reader)
        self.wfile = _SocketWriter(self.connection)

    def handle_one_request(self) -> None:
        # Waiting for the request line is idle time: bounded by idle_timeout, and the connection
        # may be closed to make room for a new one (the server's cap).
        self._reader.deadline = time.monotonic() + self.receiver.idle_timeout_s
        self.server.idle_begins(self)
        try:
            super().handle_one_request()
        finally:
            self.server.idle_ends(self)

    def parse_request(self) -> bool:
        # A request line arrived: headers and body together get read_timeout.
        self.server.idle_ends(self)
        self._reader.deadline = time.monotonic() + self.receiver.read_timeout_s
        return super().parse_request()

    def _reply(self, status: int, content_type: str, body: bytes, extra: dict | None = None) -> None:
        self.connection.settimeout(WRITE_TIMEOUT_S)
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
        if status in (413, 400, 415, 408):
            # The rest of the body may be unread: don't try to reuse this connection.
            extra["Connection"] = "close"
            self.close_connection = True
        self._reply(status, content_type, codec.status_bytes(content_type, rpc_code, message, details), extra)

    def do_POST(self) -> None:
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
        if self.receiver.token is not None:
            why = self.receiver.token.check(self.headers.get("Authorization"))
            if why is not None:
                self.close_connection = True        # the body is left unread
                self._reply(401, reply_type, codec.status_bytes(reply_type, 16, why, ()),
                            {"WWW-Authenticate": 'Bearer realm="shadowlens"', "Connection": "close"})
                return
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
        except TimeoutError:
            self._fail(reply_type, 408, f"the request was not received within {self.receiver.read_timeout_s:g} s "
                                        "(receivers.http.read_timeout); send it faster or raise the timeout",
                       rpc_code=4)
            return
        except (PermanentError, TooLarge) as exc:
            f = classify(exc)
            self._fail(reply_type, f.http_status, f.message, f.retry_after_s, f.rpc_code, f.details())
            return
        except OSError:
            self.close_connection = True     # the client went away mid-body: no one to answer
            return
        try:
            encoding = self.headers.get("Content-Encoding", "").strip().lower()
            if encoding == "gzip":
                body = codec.gunzip(body, limit)
            elif encoding not in ("", "identity"):
                raise PermanentError(f"unsupported Content-Encoding {encoding!r}; use gzip or none")
            out = self.receiver.handler.export(signal, ctype, body, "http")
        except Exception as exc:  # every failure is classified and answered
            f = classify(exc)
            if f.http_status == 500:
                log.exception("HTTP %s export failed", signal.name)
            self._fail(reply_type, f.http_status, f.message, f.retry_after_s, f.rpc_code, f.details())
            return
        self._reply(200, reply_type, out)

    def do_GET(self) -> None:
        self._fail(codec.JSON, 405, "OTLP/HTTP accepts POST only", rpc_code=12)

    do_PUT = do_DELETE = do_PATCH = do_GET


class _Server(TLSServerMixin, ThreadingHTTPServer):
    """A connection per worker thread, at most ``max_connections`` of them.

    Workers are kept: one that finished a connection takes the next. A thread per connection, started
    as the last one's slot freed, briefly made cap + 1 threads while the old one was still exiting
    (under churn, as idle connections are closed to make room; CPython cannot join an OS thread). A
    worker idle for ``WORKER_IDLE_S`` ends, so a burst's workers do not stay.

    At the cap the acceptor stops accepting, so a new connection waits in the listen backlog (its
    request is served as soon as a worker is free) rather than being answered 503: OTLP exporters
    give an export one timeout (10 s by default) and a 503 costs them a back-off of a second or more,
    while a worker frees in milliseconds under a burst. To free one, the acceptor closes the
    connection that has waited longest for its next request (an idle keep-alive connection, or one
    that sent no complete request line); connections inside a request are bounded by read_timeout.
    """

    daemon_threads = True
    block_on_close = False
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address, handler_cls, max_connections: int):
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        self._lock = threading.Lock()
        self._idle: dict[_Handler, float] = {}      # insertion order = longest idle first
        self._work: queue.SimpleQueue = queue.SimpleQueue()     # accepted connections for the workers
        self._workers = 0               # alive, under _lock
        self.closing = False
        super().__init__(address, handler_cls)

    def idle_begins(self, handler: _Handler) -> None:
        with self._lock:
            self._idle[handler] = time.monotonic()

    def idle_ends(self, handler: _Handler) -> None:
        with self._lock:
            self._idle.pop(handler, None)

    def _close_oldest_idle(self) -> None:
        with self._lock:
            oldest = next(iter(self._idle.items()), None)
            if oldest is None or time.monotonic() - oldest[1] < RECLAIM_IDLE_AFTER_S:
                return
            handler = oldest[0]
            del self._idle[handler]
        try:
            # Wakes the thread's blocked read with end-of-file; it then ends the connection.
            handler.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def process_request(self, request, client_address) -> None:
        while not self._slots.acquire(blocking=False):
            self._close_oldest_idle()
            if self._slots.acquire(timeout=0.1):
                break
            if self.closing:
                self.shutdown_request(request)
                return
        try:
            with self._lock:
                self._work.put((request, client_address))
                # Below the cap a new worker is started, even if one is idle: counting idle workers races
                # with their taking work. At the cap none is needed: each queued connection holds a slot a
                # worker gave back on its way to take the next one.
                start = self._workers < self.max_connections
                if start:
                    self._workers += 1
            if start:
                threading.Thread(target=self._worker, name="otlp-http-worker", daemon=True).start()
        except BaseException:
            self._slots.release()
            raise

    def _worker(self) -> None:
        while True:
            try:
                request, client_address = self._work.get(timeout=WORKER_IDLE_S)
            except queue.Empty:
                with self._lock:
                    if not self._work.qsize():       # otherwise one came as the wait ended
                        self._workers -= 1
                        return
                continue
            try:
                self.process_request_thread(request, client_address)
            finally:
                self._slots.release()

    def handle_error(self, request, client_address) -> None:
        # A connection that breaks (reset, closed to make room) is the client's business; the
        # default prints a traceback to stderr for each.
        log.debug("OTLP/HTTP connection from %s ended with an error", client_address, exc_info=True)


class HttpReceiver:
    def __init__(self, endpoint: Endpoint, handler: ExportHandler, max_body_bytes: int,
                 read_timeout_s: float = 30.0, idle_timeout_s: float = 60.0, max_connections: int = 128,
                 tls: ServerTLS | None = None, token: BearerToken | None = None):
        self.tls = tls
        self.token = token
        self.endpoint = endpoint
        self.handler = handler
        self.max_body_bytes = max_body_bytes
        self.read_timeout_s = read_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.max_connections = max_connections
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None
        self.inflight = threading.Condition()
        self.inflight_count = 0

    def start(self) -> None:
        handler_cls = type("OtlpHttpHandler", (_Handler,), {"receiver": self})
        server = _Server((self.endpoint.host, self.endpoint.port), handler_cls, self.max_connections)
        server.tls = self.tls
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, name="otlp-http", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop accepting, then wait for in-flight Exports (they finish once their commit lands)."""
        if self._server is not None:
            self._server.closing = True
            self._server.shutdown()
            self._server.server_close()
            self._server = None
            with self.inflight:
                self.inflight.wait_for(lambda: self.inflight_count == 0, timeout)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
