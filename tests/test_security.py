"""TLS, mTLS and bearer tokens on the receivers and the metrics endpoint (CONTRACT §8), exercised with the
official OpenTelemetry SDK exporters and a real Prometheus, and their files' rotation while serving."""
from __future__ import annotations

import os
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request

import grpc
import pytest
from cryptography import x509
from harness import REPO, SHADOWLENS, server_env, wait_for
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from otlp_builders import random_spans, span_request
from prometheus_server import PrometheusServer
from tls_certs import CA

from shadowlens.collector.security import exposure_warnings
from shadowlens.config import load

TOKEN = "s3cret-token-0123456789"
TRACE_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


@pytest.fixture(autouse=True)
def _no_ca_bundle_override(monkeypatch):
    # requests lets these variables override a session's own CA file (the SDK's HTTP exporter sets
    # its certificate_file there), so with them set the exporter would not trust the test CA.
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def pki(tmp_path):
    ca = CA(tmp_path / "pki")
    other = CA(tmp_path / "pki-other", name="another CA")
    token = tmp_path / "pki" / "token"
    token.write_text(TOKEN + "\n")
    return {"ca": ca, "server": ca.issue("server"), "client": ca.issue("client", client=True),
            "stranger": other.issue("stranger", client=True), "other": other, "token": token}


def _tls_env(prefix: str, pair, client_ca=None) -> dict:
    env = {f"{prefix}__TLS__CERT_FILE": pair.cert, f"{prefix}__TLS__KEY_FILE": pair.key}
    if client_ca is not None:
        env[f"{prefix}__TLS__CLIENT_CA_FILE"] = client_ca
    return env


def receivers_env(pki, mtls: bool = False) -> dict:
    ca = pki["ca"].path if mtls else None
    return {**_tls_env("SHADOWLENS_RECEIVERS__GRPC", pki["server"], ca),
            **_tls_env("SHADOWLENS_RECEIVERS__HTTP", pki["server"], ca),
            "SHADOWLENS_RECEIVERS__AUTH__BEARER_TOKEN_FILE": pki["token"]}


def sdk_spans(name: str, n: int = 3):
    """ReadableSpans made by the SDK's own tracer, to hand to an exporter."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "tls-test"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("test")
    for _ in range(n):
        with tracer.start_as_current_span(name):
            pass
    provider.shutdown()
    return memory.get_finished_spans()


def grpc_sdk(srv, pki, token: str | None = TOKEN, client=None, trust=None):
    ca = (trust or pki["ca"]).path.read_bytes()
    creds = grpc.ssl_channel_credentials(ca, client.key.read_bytes() if client else None,
                                         client.cert.read_bytes() if client else None)
    headers = {"authorization": f"Bearer {token}"} if token else None
    return GrpcExporter(endpoint=f"localhost:{srv.grpc_port}", credentials=creds, headers=headers, timeout=5)


def http_sdk(srv, pki, token: str | None = TOKEN, client=None, scheme="https"):
    headers = {"authorization": f"Bearer {token}"} if token else None
    return HttpExporter(endpoint=f"{scheme}://localhost:{srv.http_port}/v1/traces", certificate_file=str(pki["ca"].path),
                        client_key_file=str(client.key) if client else None,
                        client_certificate_file=str(client.cert) if client else None, headers=headers, timeout=5)


def export(exporter, name: str, n: int = 3) -> SpanExportResult:
    try:
        return exporter.export(sdk_spans(name, n))
    finally:
        exporter.shutdown()


def stored(srv) -> dict[str, int]:
    rows = srv.query("select name, count(*) as n from spans group by name")
    return {r["name"]: r["n"] for r in rows}


def wait_stored(srv, expected: dict[str, int], timeout: float = 10.0) -> None:
    wait_for(lambda: stored(srv) == expected, timeout, 0.2, what=f"stored spans {expected}",
             detail=lambda: f"stored: {stored(srv)}")


def https_get(url: str, pki, token: str | None = None, client=None):
    ctx = ssl.create_default_context(cafile=str(pki["ca"].path))
    if client is not None:
        ctx.load_cert_chain(client.cert, client.key)
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10, context=ctx) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_sdk_exporters_over_tls_need_the_token(serve_factory, pki):
    srv = serve_factory(env=receivers_env(pki))
    assert export(grpc_sdk(srv, pki), "grpc-token") == SpanExportResult.SUCCESS
    assert export(http_sdk(srv, pki), "http-token") == SpanExportResult.SUCCESS
    assert export(grpc_sdk(srv, pki, token=None), "grpc-none") == SpanExportResult.FAILURE
    assert export(grpc_sdk(srv, pki, token="wrong"), "grpc-wrong") == SpanExportResult.FAILURE
    assert export(http_sdk(srv, pki, token=None), "http-none") == SpanExportResult.FAILURE
    assert export(http_sdk(srv, pki, token="wrong"), "http-wrong") == SpanExportResult.FAILURE
    # the server's certificate is checked: a client trusting another CA does not connect
    assert export(grpc_sdk(srv, pki, trust=pki["other"]), "grpc-untrusted") == SpanExportResult.FAILURE
    wait_stored(srv, {"grpc-token": 3, "http-token": 3})

    # the answers themselves: UNAUTHENTICATED / 401 with a WWW-Authenticate challenge
    body = span_request(random_spans(2)).SerializeToString()
    with grpc.secure_channel(f"localhost:{srv.grpc_port}",
                             grpc.ssl_channel_credentials(pki["ca"].path.read_bytes())) as ch:
        with pytest.raises(grpc.RpcError) as err:
            ch.unary_unary(TRACE_METHOD)(body, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "authorization" in err.value.details()
    ctx = ssl.create_default_context(cafile=str(pki["ca"].path))
    req = urllib.request.Request(f"https://localhost:{srv.http_port}/v1/traces", data=body, method="POST",
                                 headers={"Content-Type": "application/x-protobuf"})
    with pytest.raises(urllib.error.HTTPError) as http_err:
        urllib.request.urlopen(req, timeout=10, context=ctx)
    assert http_err.value.code == 401 and http_err.value.headers["WWW-Authenticate"].startswith("Bearer")
    # plain HTTP to the TLS port gets no answer, and nothing was stored by any of it
    with pytest.raises(OSError):
        urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{srv.http_port}/v1/traces", data=body,
                                                      headers={"Content-Type": "application/x-protobuf"}), timeout=10)
    assert stored(srv) == {"grpc-token": 3, "http-token": 3}


def test_mtls_requires_a_client_certificate_from_the_client_ca(serve_factory, pki):
    srv = serve_factory(env=receivers_env(pki, mtls=True))
    assert export(grpc_sdk(srv, pki, client=pki["client"]), "grpc-client") == SpanExportResult.SUCCESS
    assert export(http_sdk(srv, pki, client=pki["client"]), "http-client") == SpanExportResult.SUCCESS
    assert export(grpc_sdk(srv, pki), "grpc-nocert") == SpanExportResult.FAILURE
    assert export(http_sdk(srv, pki), "http-nocert") == SpanExportResult.FAILURE
    assert export(grpc_sdk(srv, pki, client=pki["stranger"]), "grpc-stranger") == SpanExportResult.FAILURE
    assert export(http_sdk(srv, pki, client=pki["stranger"]), "http-stranger") == SpanExportResult.FAILURE
    # a client certificate does not replace the token
    assert export(grpc_sdk(srv, pki, client=pki["client"], token=None), "grpc-notoken") == SpanExportResult.FAILURE
    wait_stored(srv, {"grpc-client": 3, "http-client": 3})


def test_metrics_endpoint_tls_token_and_prometheus_scrape(serve_factory, pki, tmp_path):
    ctx = ssl.create_default_context(cafile=str(pki["ca"].path))
    srv = serve_factory(env={**_tls_env("SHADOWLENS_METRICS", pki["server"]),
                             "SHADOWLENS_METRICS__AUTH__BEARER_TOKEN_FILE": pki["token"]}, start=False)
    srv.ssl_context = ctx
    srv.start()
    base = f"https://localhost:{srv.metrics_port}"
    status, headers, _ = https_get(base + "/metrics", pki)
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert https_get(base + "/metrics", pki, token="wrong")[0] == 401
    status, _, text = https_get(base + "/metrics", pki, token=TOKEN)
    assert status == 200 and b"shadowlens_spans_received_total" in text
    assert https_get(base + "/gate", pki)[0] == 401
    assert https_get(base + "/gate", pki, token=TOKEN)[0] in (200, 503)      # 503: first evaluation pending
    assert https_get(base + "/healthz", pki)[0] == 200                       # probes carry no token
    assert https_get(base + "/readyz", pki)[0] == 200
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/healthz", timeout=10)

    token_file = tmp_path / "prom-token"
    token_file.write_text(TOKEN)
    prom = PrometheusServer(f"localhost:{srv.metrics_port}", tmp_path / "prom", scrape={
        "scheme": "https", "tls_config": {"ca_file": str(pki["ca"].path)},
        "authorization": {"type": "Bearer", "credentials_file": str(token_file)}}).start()
    try:
        prom.wait_for('up{job="shadowlens"}', lambda r: r and float(r[0]["value"][1]) == 1)
        prom.wait_for("count(shadowlens_open_traces)", lambda r: r and float(r[0]["value"][1]) == 1)
    finally:
        prom.stop()
    # Prometheus without the token is refused and says why
    prom = PrometheusServer(f"localhost:{srv.metrics_port}", tmp_path / "prom-no-token", scrape={
        "scheme": "https", "tls_config": {"ca_file": str(pki["ca"].path)}}).start()
    try:
        prom.wait_for('up{job="shadowlens"}', lambda r: r and float(r[0]["value"][1]) == 0)
        assert "401" in str(prom.targets())
    finally:
        prom.stop()


def _peer_serial(port: int, alpn: str | None = None) -> int:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE      # we only read which certificate it is
    if alpn:
        ctx.set_alpn_protocols([alpn])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            return x509.load_der_x509_certificate(s.getpeercert(binary_form=True)).serial_number


def _replace(path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)        # as a secret volume's symlink swap: readers see old or new, never half


def test_rotated_certificates_and_tokens_are_used_without_a_restart(serve_factory, pki, tmp_path):
    live = tmp_path / "live"
    live.mkdir()
    cert, key, token = live / "tls.crt", live / "tls.key", live / "token"
    cert.write_bytes(pki["server"].cert.read_bytes())
    key.write_bytes(pki["server"].key.read_bytes())
    token.write_text(TOKEN)
    pair = type(pki["server"])(cert, key, pki["server"].serial)
    ctx = ssl.create_default_context(cafile=str(pki["ca"].path))
    srv = serve_factory(env={**_tls_env("SHADOWLENS_RECEIVERS__GRPC", pair), **_tls_env("SHADOWLENS_RECEIVERS__HTTP", pair),
                             **_tls_env("SHADOWLENS_METRICS", pair), "SHADOWLENS_RECEIVERS__AUTH__BEARER_TOKEN_FILE": token,
                             "SHADOWLENS_METRICS__AUTH__BEARER_TOKEN_FILE": token}, start=False)
    srv.ssl_context = ctx
    srv.start()
    ports = {"grpc": (srv.grpc_port, "h2"), "http": (srv.http_port, None), "metrics": (srv.metrics_port, None)}
    assert {k: _peer_serial(p, a) for k, (p, a) in ports.items()} == dict.fromkeys(ports, pki["server"].serial)

    new = pki["ca"].issue("server-rotated")
    _replace(key, new.key.read_bytes())
    _replace(cert, new.cert.read_bytes())
    _replace(token, b"rotated-token\nsecond-token\n")
    wait_for(lambda: {k: _peer_serial(p, a) for k, (p, a) in ports.items()} == dict.fromkeys(ports, new.serial), 10,
             0.25, what="every listener serving the rotated certificate")
    base = f"https://localhost:{srv.metrics_port}/metrics"
    assert https_get(base, pki, token=TOKEN)[0] == 401
    assert https_get(base, pki, token="rotated-token")[0] == 200
    assert https_get(base, pki, token="second-token")[0] == 200
    assert export(http_sdk(srv, pki, token="rotated-token"), "after") == SpanExportResult.SUCCESS
    assert export(grpc_sdk(srv, pki, token="second-token"), "after") == SpanExportResult.SUCCESS
    assert export(grpc_sdk(srv, pki, token=TOKEN), "old-token") == SpanExportResult.FAILURE

    # a rotation caught half-way (a key that is not the certificate's) keeps the working pair
    _replace(key, pki["client"].key.read_bytes())
    time.sleep(1.5)
    assert _peer_serial(srv.http_port) == new.serial
    assert https_get(base, pki, token="rotated-token")[0] == 200
    wait_stored(srv, {"after": 6})
    assert "cannot be used" in srv.log()


def _serve_exit(tmp_path, env: dict) -> subprocess.CompletedProcess:
    full = server_env(0, 0, 0, **env)
    return subprocess.run(SHADOWLENS + ["serve", "--data-dir", str(tmp_path / "d")], env=full, capture_output=True,
                          text=True, cwd=REPO, timeout=60)


def test_unusable_tls_or_token_settings_stop_serve_with_the_key_named(tmp_path, pki):
    out = _serve_exit(tmp_path, {"SHADOWLENS_METRICS__TLS__CERT_FILE": pki["server"].cert})
    assert out.returncode == 2 and "metrics.tls.key_file" in out.stderr, out.stderr
    out = _serve_exit(tmp_path, {"SHADOWLENS_RECEIVERS__GRPC__TLS__CERT_FILE": tmp_path / "missing.crt",
                                 "SHADOWLENS_RECEIVERS__GRPC__TLS__KEY_FILE": pki["server"].key})
    assert out.returncode == 2 and "receivers.grpc.tls.cert_file" in out.stderr and "missing.crt" in out.stderr
    out = _serve_exit(tmp_path, {"SHADOWLENS_RECEIVERS__HTTP__TLS__CERT_FILE": pki["server"].cert,
                                 "SHADOWLENS_RECEIVERS__HTTP__TLS__KEY_FILE": pki["client"].key})
    assert out.returncode == 2 and "receivers.http.tls" in out.stderr and "private key" in out.stderr
    empty = tmp_path / "empty-token"
    empty.write_text("\n")
    out = _serve_exit(tmp_path, {"SHADOWLENS_METRICS__AUTH__BEARER_TOKEN_FILE": empty})
    assert out.returncode == 2 and "metrics.auth.bearer_token_file" in out.stderr and "no token" in out.stderr
    assert not (tmp_path / "d").exists()        # nothing was created


def test_a_non_loopback_listener_without_tls_or_token_is_named_in_a_warning(tmp_path, pki, serve_factory):
    env = lambda **kv: {f"SHADOWLENS_{k}": str(v) for k, v in kv.items()}
    assert len(exposure_warnings(load(None, env={}))) == 1                 # the default metrics 0.0.0.0:9464
    [line] = exposure_warnings(load(None, env={}))
    assert line.startswith("metrics.endpoint 0.0.0.0:9464") and "no TLS (metrics.tls.cert_file)" in line \
        and "no bearer token (metrics.auth.bearer_token_file)" in line
    secured = env(METRICS__TLS__CERT_FILE="c", METRICS__TLS__KEY_FILE="k", METRICS__AUTH__BEARER_TOKEN_FILE="t",
                  RECEIVERS__GRPC__ENDPOINT="0.0.0.0:4317", RECEIVERS__AUTH__BEARER_TOKEN_FILE="t")
    [line] = exposure_warnings(load(None, env=secured))
    assert line.startswith("receivers.grpc.endpoint 0.0.0.0:4317") and "no TLS (receivers.grpc.tls" in line \
        and "bearer token" not in line
    loopback = env(METRICS__ENDPOINT="127.0.0.1:9464", RECEIVERS__HTTP__ENDPOINT="localhost:4318",
                   RECEIVERS__GRPC__ENDPOINT="127.0.0.2:4317")
    assert exposure_warnings(load(None, env=loopback)) == []
    # and serve logs it
    srv = serve_factory(start=False)
    srv.env["SHADOWLENS_METRICS__ENDPOINT"] = f"0.0.0.0:{srv.metrics_port}"
    srv.start()
    assert f"WARNING shadowlens.serve: metrics.endpoint 0.0.0.0:{srv.metrics_port} is not a loopback" in srv.log()
