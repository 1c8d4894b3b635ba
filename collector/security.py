"""TLS and bearer tokens for the listeners (CONTRACT §8), modelled on the OpenTelemetry Collector's
``configtls`` server settings and its ``bearertokenauth`` extension.

- ``ServerTLS``: a certificate and key, and optionally a client CA (then every client must present a
  certificate it signed: mTLS). TLS 1.2 at least, as configtls's default ``min_version``.
- ``BearerToken``: requests must carry ``Authorization: Bearer <token>``; the file holds one token
  per line (more than one while a token is rotated), compared in constant time.

Both re-read their files when they change (cert-manager and Kubernetes secret volumes replace them
in place, by a symlink swap): a listener checks the files' identity (inode, size, mtime) at most once
a second, on a new connection or request, so a rotation takes effect within about a second and no
watcher thread is needed. A rotation caught half-way (a certificate that does not match its key, an
empty token file) keeps the previous material, logs a warning and is tried again.
"""
from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Callable

from .errors import ConfigError

log = logging.getLogger("shadowlens.security")

CHECK_INTERVAL_S = 1.0
HANDSHAKE_TIMEOUT_S = 10.0      # a TLS handshake holds a connection thread: a client gets this long for it


@dataclass(frozen=True)
class TLSFiles:
    """``<prefix>.tls`` of the config: certificate and key, optional client CA (mTLS)."""
    cert_file: str
    key_file: str
    client_ca_file: str | None
    key: str            # the config key, for messages ("receivers.grpc.tls")


def tls_files(section, key: str) -> TLSFiles | None:
    """The ``tls`` mapping of the config as TLSFiles, None when TLS is off; raises ConfigError when
    the keys do not make sense together."""
    if section in (None, ""):
        return None
    if not hasattr(section, "get"):
        raise ConfigError(f"{key} must be a mapping with cert_file, key_file and optionally client_ca_file")
    cert, pkey, ca = (str(section.get(k) or "") for k in ("cert_file", "key_file", "client_ca_file"))
    if not cert and not pkey:
        if ca:
            raise ConfigError(f"{key}.client_ca_file needs {key}.cert_file and {key}.key_file: client "
                              "certificates are checked on top of the server's own TLS")
        return None
    if not cert or not pkey:
        missing = "cert_file" if not cert else "key_file"
        raise ConfigError(f"{key}.cert_file and {key}.key_file go together; set {key}.{missing} too")
    return TLSFiles(cert, pkey, ca or None, key)


def _signature(path: str):
    """What changes when a file is replaced or rewritten (a symlink swap included: stat follows it)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return ("missing", exc.errno)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _read(path: str, key: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path} ({exc.strerror or exc})") from None


class _Watched:
    """Material built from files, rebuilt when their signature changes (checked at most once per
    ``CHECK_INTERVAL_S``). ``load()`` builds it from the paths and raises ConfigError when it can't."""

    def __init__(self, paths: list[str], load: Callable[[], object], what: str,
                 clock: Callable[[], float] = time.monotonic):
        self._paths = paths
        self._load = load
        self._what = what
        self._clock = clock
        self._lock = threading.Lock()
        self._sig = self._signatures()
        self.value = load()              # at start a bad file is an error: serve does not start
        self.generation = 1
        self._next_check = clock() + CHECK_INTERVAL_S
        self._failed_sig = None

    def _signatures(self):
        return tuple(_signature(p) for p in self._paths)

    def current(self):
        now = self._clock()
        if now < self._next_check:
            return self.value
        with self._lock:
            if now < self._next_check:
                return self.value
            self._next_check = now + CHECK_INTERVAL_S
            sig = self._signatures()
            if sig == self._sig:
                return self.value
            try:
                value = self._load()
            except (ConfigError, ssl.SSLError, OSError, ValueError) as exc:
                if sig != self._failed_sig:     # once per state of the files, not once a second
                    self._failed_sig = sig
                    log.warning("%s changed but cannot be used (%s); still using the previous one, will retry",
                                self._what, exc)
                return self.value
            self.value, self._sig, self._failed_sig = value, sig, None
            self.generation += 1
            log.info("%s reloaded", self._what)
            return value


class ServerTLS:
    """The server side of TLS for one listener, reloaded when its files change."""

    def __init__(self, files: TLSFiles, clock: Callable[[], float] = time.monotonic):
        self.files = files
        paths = [files.cert_file, files.key_file] + ([files.client_ca_file] if files.client_ca_file else [])
        self._watched = _Watched(paths, self._load, f"TLS certificate ({files.key})", clock)
        self._grpc_generation = self._watched.generation

    @property
    def mutual(self) -> bool:
        return self.files.client_ca_file is not None

    def _load(self):
        f = self.files
        cert = _read(f.cert_file, f"{f.key}.cert_file")
        key = _read(f.key_file, f"{f.key}.key_file")
        ca = _read(f.client_ca_file, f"{f.key}.client_ca_file") if f.client_ca_file else None
        # The SSL context checks what gRPC would only find at the first handshake: PEM that parses,
        # a key that matches the certificate, a CA file that holds certificates.
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(f.cert_file, f.key_file)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"{f.key}: {f.cert_file} and {f.key_file} are not a PEM certificate and its"
                              f" private key ({exc})") from None
        if ca is not None:
            try:
                ctx.load_verify_locations(cadata=ca.decode("ascii", "replace"))
            except (ssl.SSLError, ValueError) as exc:
                raise ConfigError(f"{f.key}.client_ca_file: {f.client_ca_file} holds no PEM CA certificate"
                                  f" ({exc})") from None
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx, cert, key, ca

    def context(self) -> ssl.SSLContext:
        """The current SSL context (for http.server-based listeners)."""
        return self._watched.current()[0]

    def grpc_credentials(self):
        """Server credentials whose certificate gRPC fetches again on each new connection."""
        import grpc
        _, cert, key, ca = self._watched.value

        def fetch():
            # Called by gRPC before each handshake; None keeps the configuration it has.
            try:
                value = self._watched.current()
                if self._watched.generation == self._grpc_generation:
                    return None
                self._grpc_generation = self._watched.generation
                return grpc.ssl_server_certificate_configuration([(value[2], value[1])], root_certificates=value[3])
            except Exception:  # an error here would fail the handshake; the old files serve on
                log.exception("reloading the gRPC TLS certificate (%s) failed", self.files.key)
                return None

        initial = grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)
        return grpc.dynamic_ssl_server_credentials(initial, fetch, require_client_authentication=self.mutual)


class BearerToken:
    """``Authorization: Bearer <token>`` checking against a token file, re-read when it changes."""

    def __init__(self, path: str, key: str, clock: Callable[[], float] = time.monotonic):
        self.path = path
        self.key = key
        self._watched = _Watched([path], self._load, f"bearer token file ({key})", clock)

    def _load(self) -> tuple[bytes, ...]:
        text = _read(self.path, self.key)
        tokens = tuple(line.strip() for line in text.splitlines() if line.strip())
        if not tokens:
            raise ConfigError(f"{self.key}: {self.path} holds no token (one token a line)")
        return tokens

    def check(self, header: str | None) -> str | None:
        """None when ``header`` (the Authorization value) carries an accepted token, else why not."""
        if not header or not header.strip():
            return (f"missing authorization header: send `authorization: Bearer <token>` with the token of"
                    f" {self.key}")
        scheme, _, given = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return f"the authorization header is not `Bearer <token>` (the token of {self.key})"
        try:
            offered = given.strip().encode("latin-1")      # http.server decoded the header's bytes as latin-1
        except UnicodeEncodeError:
            offered = given.strip().encode("utf-8", "surrogateescape")
        ok = False
        for token in self._watched.current():
            ok |= hmac.compare_digest(offered, token)        # every token compared: no early exit
        return None if ok else f"the bearer token does not match {self.key}"


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False        # a host name other than localhost: assume it is reachable from outside


def exposure_warnings(cfg) -> list[str]:
    """One line per listener on a non-loopback address that lacks TLS or a bearer token."""
    r = cfg.receivers
    listeners = [
        ("receivers.grpc.endpoint", r.grpc, r.grpc_tls, "receivers.grpc.tls", r.token_file, "receivers.auth",
         "send spans"),
        ("receivers.http.endpoint", r.http, r.http_tls, "receivers.http.tls", r.token_file, "receivers.auth",
         "send spans"),
        ("metrics.endpoint", cfg.metrics, cfg.metrics_tls, "metrics.tls", cfg.metrics_token_file, "metrics.auth",
         "read /metrics and /gate"),
    ]
    out = []
    for key, ep, tls, tls_key, token, auth_key, what in listeners:
        if is_loopback(ep.host):
            continue
        missing = ([f"no TLS ({tls_key}.cert_file)"] if tls is None else []) + \
                  ([f"no bearer token ({auth_key}.bearer_token_file)"] if token is None else [])
        if missing:
            out.append(f"{key} {ep} is not a loopback address and has {' and '.join(missing)}: anyone who can"
                       f" reach it can {what}" + ("" if tls else ", in clear text") +
                       "; set the keys named, or listen on 127.0.0.1")
    return out


class TLSServerMixin:
    """TLS for a ``socketserver`` server (http.server's): set ``tls`` to a ServerTLS.

    The handshake runs in the connection's own thread, not in the accepting one, so a client that
    stalls in it holds only its own connection (for at most HANDSHAKE_TIMEOUT_S). Each connection
    takes the current context, so a rotated certificate serves the next connection."""

    tls: ServerTLS | None = None

    def finish_request(self, request, client_address) -> None:
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        timeout = request.gettimeout()
        request.settimeout(HANDSHAKE_TIMEOUT_S)
        try:
            conn = self.tls.context().wrap_socket(request, server_side=True)
        except OSError as exc:      # ssl.SSLError included: a plain-HTTP client, an unknown CA, a timeout
            log.debug("TLS handshake with %s failed: %s", client_address, exc)
            return
        conn.settimeout(timeout)
        try:
            super().finish_request(conn, client_address)
        finally:
            self.shutdown_request(conn)


@dataclass
class Listeners:
    """The TLS and token settings of every listener, loaded (files read and checked)."""
    grpc_tls: ServerTLS | None
    http_tls: ServerTLS | None
    receivers_token: BearerToken | None
    metrics_tls: ServerTLS | None
    metrics_token: BearerToken | None


def load(cfg) -> Listeners:
    """Read every configured file; ConfigError names the key of the first that is unusable."""
    r = cfg.receivers
    tls = lambda files: ServerTLS(files) if files is not None else None
    token = lambda path, key: BearerToken(path, key) if path else None
    return Listeners(tls(r.grpc_tls), tls(r.http_tls), token(r.token_file, "receivers.auth.bearer_token_file"),
                     tls(cfg.metrics_tls), token(cfg.metrics_token_file, "metrics.auth.bearer_token_file"))
