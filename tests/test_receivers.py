"""The OTLP surface of a real `shadowlens serve`: both transports, every documented outcome."""
from __future__ import annotations

import gzip
import json
import os
import random
import urllib.error
import urllib.request

import grpc
import pytest
from google.rpc import code_pb2, status_pb2
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from otlp_builders import T0, log_request, random_spans, span_request

TRACE_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
LOGS_METHOD = "/opentelemetry.proto.collector.logs.v1.LogsService/Export"


def grpc_export(endpoint: str, body: bytes, method: str = TRACE_METHOD, compression=None, resp=ExportTraceServiceResponse):
    with grpc.insecure_channel(endpoint) as ch:
        call = ch.unary_unary(method, request_serializer=None, response_deserializer=resp.FromString)
        return call(body, timeout=30, compression=compression)


def send_chunked(conn, body: bytes, chunk: int, path: str = "/v1/traces") -> None:
    """POST ``body`` on an open http.client connection as a chunked protobuf body, ``chunk`` bytes a chunk."""
    conn.putrequest("POST", path)
    conn.putheader("Content-Type", "application/x-protobuf")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    for i in range(0, len(body), chunk):
        part = body[i:i + chunk]
        conn.send(f"{len(part):x}\r\n".encode() + part + b"\r\n")
    conn.send(b"0\r\n\r\n")


def http_post(url: str, body: bytes, ctype="application/x-protobuf", headers=None):
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": ctype, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def count(server, where="true") -> int:
    return server.query(f"select count(*) as n from spans_core where {where}")[0]["n"]


# -- official SDK exporters ------------------------------------------------------------------------
@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_official_sdk_exporter_spans_are_stored_and_normalized(server, transport):
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    if transport == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        exporter = OTLPSpanExporter(endpoint=server.grpc_endpoint, insecure=True)
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        exporter = OTLPSpanExporter(endpoint=server.http_endpoint + "/v1/traces")
    tp = TracerProvider(resource=Resource.create({"service.name": "sdk-agent", "cohort.tier": "enterprise"}))
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = tp.get_tracer("test")
    with tracer.start_as_current_span("agent.run", attributes={
            "shadow.route": "candidate", "shadow.request_id": "req-1", "cohort.intent": "refund"}) as root:
        with tracer.start_as_current_span("chat", attributes={
                "gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o-mini",
                "gen_ai.response.model": "gpt-4o-mini-2024-07-18", "gen_ai.usage.input_tokens": 321,
                "gen_ai.usage.output_tokens": 45, "agent.trajectory.step": 2}):
            pass
        trace_hex = format(root.get_span_context().trace_id, "032x")
    tp.shutdown()
    rows = {r["name"]: r for r in server.query(
        f"select * exclude (attributes, resource_attributes, events), attributes from spans where trace_id = '{trace_hex}'")}
    assert set(rows) == {"agent.run", "chat"}
    root_row, chat = rows["agent.run"], rows["chat"]
    assert root_row["route"] == "candidate" and root_row["request_id"] == "req-1" and root_row["intent"] == "refund"
    assert root_row["tier"] == "enterprise"             # from the resource
    assert root_row["service_name"] == "sdk-agent"
    assert chat["span_kind"] == "LLM" and chat["step"] == 2
    assert chat["model"] == "gpt-4o-mini-2024-07-18" and chat["request_model"] == "gpt-4o-mini"
    assert (chat["input_tokens"], chat["output_tokens"]) == (321, 45)
    assert chat["cache_read_tokens"] is None and chat["reasoning_tokens"] is None   # unknown, never 0
    assert chat["parent_span_id"] == root_row["span_id"]
    assert json.loads(chat["attributes"])["gen_ai.usage.input_tokens"] == 321


# -- OTLP/JSON -------------------------------------------------------------------------------------
def test_hand_written_otlp_json_request(server):
    trace_id, span_id = os.urandom(16).hex(), os.urandom(8).hex()
    doc = {"resourceSpans": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "json-agent"}}]},
        "someFutureField": {"ignored": True},
        "scopeSpans": [{"scope": {"name": "handmade"}, "spans": [{
            "traceId": trace_id.upper(), "spanId": span_id, "name": "chat", "kind": 3,
            "startTimeUnixNano": str(T0), "endTimeUnixNano": T0 + 2_500_000_000,
            "attributes": [
                {"key": "llm.token_count.prompt", "value": {"intValue": "1234"}},
                {"key": "llm.token_count.completion", "value": {"intValue": 56}},
                {"key": "openinference.span.kind", "value": {"stringValue": "LLM"}},
                {"key": "llm.model_name", "value": {"stringValue": "claude-x"}}],
            "status": {"code": 2, "message": "boom"}, "unknownSpanField": 7}]}]}]}
    status, headers, body = http_post(server.http_endpoint + "/v1/traces", json.dumps(doc).encode(), "application/json")
    assert status == 200, body
    assert headers["Content-Type"] == "application/json"
    assert "partialSuccess" not in json.loads(body) or not json.loads(body)["partialSuccess"].get("rejectedSpans")
    (row,) = server.query(f"select * exclude (attributes, resource_attributes, events) from spans where span_id = '{span_id}'")
    assert row["trace_id"] == trace_id                  # stored lower-case
    assert (row["input_tokens"], row["output_tokens"], row["model"]) == (1234, 56, "claude-x")
    assert row["duration_seconds"] == pytest.approx(2.5)
    assert row["status_code"] == "ERROR" and row["status_message"] == "boom" and row["kind"] == "CLIENT"


# -- partial success -------------------------------------------------------------------------------
def _mixed_request():
    rng = random.Random(7)
    good = random_spans(6, rng)
    bad = [
        {"trace_id": b"\x01" * 15, "span_id": rng.randbytes(8), "name": "short-trace-id"},
        {"trace_id": bytes(16), "span_id": rng.randbytes(8), "name": "zero-trace-id"},
        {"trace_id": rng.randbytes(16), "span_id": bytes(8), "name": "zero-span-id"},
        {"trace_id": rng.randbytes(16), "span_id": rng.randbytes(8), "name": "backwards", "start": T0 + 10, "end": T0},
    ]
    return span_request(good[:3] + bad + good[3:]), good


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_invalid_spans_are_rejected_and_the_rest_stored(server, transport):
    req, good = _mixed_request()
    if transport == "grpc":
        resp = grpc_export(server.grpc_endpoint, req.SerializeToString())
    else:
        status, _, body = http_post(server.http_endpoint + "/v1/traces", req.SerializeToString())
        assert status == 200
        resp = ExportTraceServiceResponse.FromString(body)
    assert resp.partial_success.rejected_spans == 4
    msg = resp.partial_success.error_message
    assert "4 of 10 spans rejected" in msg and "end before start" in msg and "invalid trace id" in msg
    stored = {r["span_id"] for r in server.query("select span_id from spans_core")}
    assert stored == {d["span_id"].hex() for d in good}
    metrics = server.metrics_text()
    assert 'shadowlens_spans_rejected_total{reason="invalid_trace_id"} 2.0' in metrics
    assert 'shadowlens_spans_rejected_total{reason="end_before_start"} 1.0' in metrics


# -- whole-request failures ------------------------------------------------------------------------
def test_garbage_body_is_invalid_argument_over_grpc(server):
    with pytest.raises(grpc.RpcError) as err:
        grpc_export(server.grpc_endpoint, b"\xff\xfe this is not protobuf \x00\x01")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid OTLP traces protobuf" in err.value.details()


@pytest.mark.parametrize("ctype,body", [("application/x-protobuf", b"\xff\xfe\x00garbage"),
                                        ("application/json", b"{not json"),
                                        ("application/json", b'{"resourceSpans": 5}')])
def test_garbage_body_is_http_400_with_rpc_status(server, ctype, body):
    status, headers, out = http_post(server.http_endpoint + "/v1/traces", body, ctype)
    assert status == 400
    if ctype == "application/json":
        st = json.loads(out)
        assert st["code"] == code_pb2.INVALID_ARGUMENT and st["message"]
    else:
        st = status_pb2.Status.FromString(out)
        assert st.code == code_pb2.INVALID_ARGUMENT and "protobuf" in st.message


def test_oversized_bodies_are_refused(serve_factory):
    srv = serve_factory(env={"SHADOWLENS_RECEIVERS__HTTP__MAX_BODY_MIB": "1",
                             "SHADOWLENS_RECEIVERS__GRPC__MAX_MESSAGE_MIB": "1"})
    big = span_request(random_spans(8, per_trace=8)).SerializeToString()
    pad = span_request([{"trace_id": os.urandom(16), "span_id": os.urandom(8),
                         "attrs": {"blob": "z" * (2 << 20)}}]).SerializeToString()
    status, _, body = http_post(srv.http_endpoint + "/v1/traces", pad)
    assert status == 413 and "over the limit" in status_pb2.Status.FromString(body).message
    # gzip that is small on the wire but over the limit once decompressed
    status, _, body = http_post(srv.http_endpoint + "/v1/traces", gzip.compress(pad), headers={"Content-Encoding": "gzip"})
    assert status == 413 and "decompressed" in status_pb2.Status.FromString(body).message
    with pytest.raises(grpc.RpcError) as err:
        grpc_export(srv.grpc_endpoint, pad)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert grpc_export(srv.grpc_endpoint, big).partial_success.rejected_spans == 0   # the server lives on
    assert count(srv) == 8


def test_empty_request_is_success(server):
    assert grpc_export(server.grpc_endpoint, b"").partial_success.rejected_spans == 0
    status, _, body = http_post(server.http_endpoint + "/v1/traces", b"")
    assert status == 200 and ExportTraceServiceResponse.FromString(body).partial_success.rejected_spans == 0
    status, _, body = http_post(server.http_endpoint + "/v1/traces", b"{}", "application/json")
    assert status == 200


def test_wrong_content_type_and_path(server):
    assert http_post(server.http_endpoint + "/v1/traces", b"x", "text/plain")[0] == 415
    assert http_post(server.http_endpoint + "/v1/metrics", b"", "application/x-protobuf")[0] == 404


# -- gzip ------------------------------------------------------------------------------------------
def test_gzip_on_both_transports(server):
    a = span_request(random_spans(5, random.Random(1)))
    b = span_request(random_spans(7, random.Random(2)))
    grpc_export(server.grpc_endpoint, a.SerializeToString(), compression=grpc.Compression.Gzip)
    status, _, _ = http_post(server.http_endpoint + "/v1/traces", gzip.compress(b.SerializeToString()),
                             headers={"Content-Encoding": "gzip"})
    assert status == 200
    assert count(server) == 12


def test_chunked_http_body_is_accepted(server):
    import http.client
    body = span_request(random_spans(4, random.Random(3))).SerializeToString()
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    send_chunked(conn, body, 1000)
    assert conn.getresponse().status == 200
    assert count(server) == 4


# -- duplicates ------------------------------------------------------------------------------------
def test_duplicates_are_stored_once_and_counted(server):
    spans = random_spans(10, random.Random(4))
    body = span_request(spans).SerializeToString()
    grpc_export(server.grpc_endpoint, body)
    grpc_export(server.grpc_endpoint, body)                       # a client's retry
    http_post(server.http_endpoint + "/v1/traces", span_request(spans[:3] + spans[:3]).SerializeToString())
    assert count(server) == 10
    assert "shadowlens_spans_duplicate_total 16.0" in server.metrics_text()


def test_duplicates_are_recognised_after_a_restart(serve_factory, tmp_path):
    srv = serve_factory(data_dir=tmp_path / "d")
    body = span_request(random_spans(6, random.Random(5))).SerializeToString()
    grpc_export(srv.grpc_endpoint, body)
    assert srv.stop() == 0
    srv2 = serve_factory(data_dir=tmp_path / "d")
    grpc_export(srv2.grpc_endpoint, body)
    assert count(srv2) == 6


# -- logs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_eval_log_records_join_their_span(server, transport):
    tid, sid = os.urandom(16), os.urandom(8)
    grpc_export(server.grpc_endpoint, span_request([{"trace_id": tid, "span_id": sid, "name": "agent.run"}]).SerializeToString())
    logs = log_request([
        {"trace_id": tid, "span_id": sid, "event_name": "gen_ai.evaluation.result",
         "attrs": {"gen_ai.evaluation.name": "task_completion", "gen_ai.evaluation.score.label": "fail",
                   "gen_ai.evaluation.score.value": 0.2}},
        {"trace_id": tid, "span_id": sid, "event_name": "gen_ai.evaluation.result",
         "attrs": {"gen_ai.evaluation.name": "relevance", "gen_ai.evaluation.score.value": 0.9}},
        {"event_name": "gen_ai.user.message", "body": "hello"},       # no span: stored and counted
    ]).SerializeToString()
    if transport == "grpc":
        grpc_export(server.grpc_endpoint, logs, LOGS_METHOD, resp=ExportLogsServiceResponse)
    else:
        assert http_post(server.http_endpoint + "/v1/logs", logs)[0] == 200
    evals = server.query(
        "select e.name, e.passed, e.score, s.name as span_name from evals e join spans_core s using (trace_id, span_id) "
        "order by e.name")
    assert [(e["name"], e["passed"], e["span_name"]) for e in evals] == [
        ("relevance", True, "agent.run"), ("task_completion", False, "agent.run")]
    assert server.query("select count(*) as n from logs")[0]["n"] == 3


def test_log_records_with_malformed_ids_are_rejected_and_the_rest_stored(server):
    tid, sid = os.urandom(16), os.urandom(8)
    logs = log_request([
        {"trace_id": tid, "span_id": sid, "event_name": "gen_ai.user.message", "body": "kept"},
        {"trace_id": tid[:15], "span_id": sid, "event_name": "gen_ai.user.message", "body": "short trace id"},
        {"trace_id": tid, "span_id": sid + b"x", "event_name": "gen_ai.user.message", "body": "long span id"},
        {"event_name": "gen_ai.user.message", "body": "no ids: kept"},
    ]).SerializeToString()
    resp = grpc_export(server.grpc_endpoint, logs, LOGS_METHOD, resp=ExportLogsServiceResponse)
    assert resp.partial_success.rejected_log_records == 2
    assert resp.partial_success.error_message == "2 of 4 log records rejected; first: log record 1 rejected: invalid trace id"
    bodies = server.query("select body from logs order by body")
    assert [json.loads(b["body"]) for b in bodies] == ["kept", "no ids: kept"]


def test_span_eval_sources_and_refusal(server):
    tid = os.urandom(16)
    spans = [
        {"trace_id": tid, "span_id": os.urandom(8), "name": "a",
         "attrs": {"eval.name": "refusal", "eval.label": "failed"}},
        {"trace_id": tid, "span_id": os.urandom(8), "name": "b",
         "attrs": {"evaluations.0.evaluation.name": "hallucination", "evaluations.0.evaluation.score": 0.1,
                   "evaluations.1.evaluation.name": "toxicity", "evaluations.1.evaluation.label": "safe"}},
        {"trace_id": tid, "span_id": os.urandom(8), "name": "c",
         "events": [("gen_ai.evaluation.result", {"gen_ai.evaluation.name": "task_completion",
                                                   "gen_ai.evaluation.score.value": 0.75})]},
        {"trace_id": tid, "span_id": os.urandom(8), "name": "d", "attrs": {"agent.escalated": True}},
    ]
    grpc_export(server.grpc_endpoint, span_request(spans).SerializeToString())
    evals = {e["name"]: e for e in server.query("select e.*, s.name as span from evals e join spans_core s using (span_id)")}
    assert {k: (v["passed"], v["span"]) for k, v in evals.items()} == {
        "refusal": (False, "a"), "hallucination": (False, "b"), "toxicity": (True, "b"), "task_completion": (True, "c")}
    flags = {r["name"]: (r["refused"], r["escalated"]) for r in server.query("select name, refused, escalated from spans_core")}
    assert flags["a"][0] is True and flags["d"][1] is True and flags["b"] == (None, None)


def test_pure_python_scanner_serves_the_same(serve_factory):
    """receivers.scanner: python (the fallback without a compiler) stores what the C scanner stores."""
    server = serve_factory(env={"SHADOWLENS_RECEIVERS__SCANNER": "python"})
    spans = random_spans(12, random.Random(12))
    grpc_export(server.grpc_endpoint, span_request(spans).SerializeToString())
    rows = server.query("select span_id, input_tokens from spans_core where input_tokens is not null order by span_id")
    want = sorted((d["span_id"].hex(), d["attrs"]["gen_ai.usage.input_tokens"]) for d in spans
                  if "gen_ai.usage.input_tokens" in d.get("attrs", {}))
    assert [(r["span_id"], r["input_tokens"]) for r in rows] == want


def test_the_frontend_process_loads_no_columnar_libraries(server):
    """The receivers' process only checks requests: numpy, pyarrow and DuckDB stay out of its memory
    (the decoder and store processes build and store the columns)."""
    import re
    pid = int(re.search(r"frontend pid (\d+)", server.log()).group(1))
    mapped = open(f"/proc/{pid}/maps").read()
    assert "grpc" in mapped                       # the receivers are in this process
    for lib in ("libarrow", "duckdb", "numpy"):
        assert lib not in mapped, f"the frontend process maps {lib}"
