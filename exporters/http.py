"""The metrics endpoint: GET /metrics (text or OpenMetrics by Accept), /healthz, /readyz, and JSON
routes such as /gate (GET, and POST for webhook callers like Flagger that post a JSON body).

With ``metrics.tls`` it serves HTTPS (optionally requiring client certificates), and with
``metrics.auth.bearer_token_file`` /metrics and the JSON routes need ``Authorization: Bearer``;
/healthz and /readyz stay open, as kubelet probes carry no credentials."""
from __future__ import annotations

import json
import re
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import exposition
from prometheus_client.registry import CollectorRegistry

from shadowlens.collector.security import BearerToken, ServerTLS, TLSServerMixin

OPEN_PATHS = ("/healthz", "/readyz")
MAX_POST_BYTES = 1 << 20        # a webhook's payload (the answer does not depend on it)
# RFC 9112: Content-Length is 1*DIGIT; int() would also take "-1" (read until the client closes), "+5", "1_0"
_DIGITS = re.compile(r"[0-9]+")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "shadowlens"
    app: "MetricsServer"
    # the socket's timeout: a client that stops sending (inside a request or idle between scrapes) is let
    # go after it, instead of holding a thread
    timeout = 30

    def log_message(self, fmt, *args):
        pass

    def _reply(self, status: int, ctype: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _refuse(self, status: int, message: str) -> None:
        """Answers ``status`` and closes: what is left of the request cannot be framed."""
        self.close_connection = True
        body = (message + "\n").encode("utf-8", "backslashreplace")
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _skip_body(self) -> bool:
        """Reads (and drops) a POST body; False after answering a request whose body cannot be read."""
        if self.headers.get("Transfer-Encoding") is not None:
            self._refuse(411, "send the request body with a Content-Length (Transfer-Encoding is not accepted here)")
            return False
        values = self.headers.get_all("Content-Length") or []
        fields = {v.strip() for value in values for v in value.split(",")}
        if not values:
            return True
        if len(fields) != 1 or not _DIGITS.fullmatch(text := next(iter(fields))):
            shown = ", ".join(values)[:100]
            self._refuse(400, f"bad Content-Length {shown!r}: it must be one non-negative decimal number")
            return False
        digits = text.lstrip("0") or "0"
        length = int(digits) if len(digits) <= 18 else MAX_POST_BYTES + 1     # int() refuses over 4,300 digits
        if length > MAX_POST_BYTES:
            self._refuse(413, f"request body of {text[:20]} bytes is over the limit of {MAX_POST_BYTES} bytes")
            return False
        try:
            got = len(self.rfile.read(length)) if length else 0
        except TimeoutError:
            self._refuse(408, f"the request body did not arrive within {self.timeout} s")
            return False
        if got != length:
            self._refuse(400, f"request body ended after {got} of {length} bytes; send the whole body")
            return False
        return True

    def _authorized(self, path: str) -> bool:
        """False after answering 401 when the path needs the bearer token and the request lacks it."""
        token = self.app.token
        if token is None or path in OPEN_PATHS:
            return True
        why = token.check(self.headers.get("Authorization"))
        if why is None:
            return True
        body = (why + "\n").encode()
        self.close_connection = True         # a POST body may be unread
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Bearer realm="shadowlens"')
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        return False

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        app = self.app
        if not self._authorized(path):
            return
        if path == "/metrics":
            encoder, ctype = exposition.choose_encoder(self.headers.get("Accept", ""))
            body = encoder(app.registry)
            if app.extra is not None:
                openmetrics = ctype.startswith("application/openmetrics-text")
                extra = app.extra(openmetrics).encode()
                if openmetrics and body.endswith(b"# EOF\n"):
                    body = body[:-len(b"# EOF\n")] + extra + b"# EOF\n"
                else:
                    body += extra
            self._reply(200, ctype, body)
        elif path == "/healthz":
            self._reply(200, "text/plain; charset=utf-8", b"ok\n")
        elif path == "/readyz":
            ready, why = app.ready()
            self._reply(200 if ready else 503, "text/plain; charset=utf-8", (why + "\n").encode())
        elif path in app.json_routes:
            self._json(path)
        else:
            paths = ", ".join(["/metrics", "/healthz", "/readyz", *app.json_routes])
            self._reply(404, "text/plain; charset=utf-8", f"not found; try {paths}\n".encode())


    def _json(self, path: str) -> None:
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query))
        status, doc = self.app.json_routes[path](query)
        self._reply(status, "application/json", json.dumps(doc, indent=2).encode() + b"\n")

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        if not self._authorized(path):
            return
        if not self._skip_body():
            return
        if path in self.app.json_routes:
            self._json(path)
        else:
            self._reply(405 if path in ("/metrics", "/healthz", "/readyz") else 404, "text/plain; charset=utf-8",
                        b"POST is accepted only on JSON routes such as /gate\n")


class _Server(TLSServerMixin, ThreadingHTTPServer):
    daemon_threads = True


class MetricsServer:
    def __init__(self, host: str, port: int, registry: CollectorRegistry, ready: Callable[[], tuple[bool, str]],
                 tls: ServerTLS | None = None, token: BearerToken | None = None):
        self.host, self.port = host, port
        self.tls, self.token = tls, token
        self.registry = registry
        self.ready = ready
        self.json_routes: dict[str, Callable[[dict], tuple[int, object]]] = {}   # path -> f(query) -> (status, doc)
        # fast-rendered families appended after the registry's (exporters/exposition.py)
        self.extra: Callable[[bool], str] | None = None
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        handler = type("MetricsHandler", (_Handler,), {"app": self})
        self._server = _Server((self.host, self.port), handler)
        self._server.tls = self.tls
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 5.0) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
