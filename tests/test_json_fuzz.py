"""Malformed OTLP/JSON gets a 400 with a readable message, never a 500 or a closed connection; /gate answers
every request, whatever its framing (issue 18 part 3). Through a real ``serve``; tests/json_fuzz.py has the
mutations and the oracle, bench/fuzz_json.py runs it longer."""
from __future__ import annotations

import json
import random
import time

import hypothesis
import hypothesis.strategies as st
import json_fuzz
import pytest
from harness import start_server

# the named failures of the issue, each a body that used to get a 500 or no answer
NAMED = {
    "deep array": b'{"resourceSpans":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "deep AnyValue": json_fuzz.dumps({"resourceSpans": [{"resource": {"attributes": [
        {"key": "a", "value": json_fuzz.Deep(random.Random(2), 900)}]}}]}),
    "surrogate enum": b'{"resourceSpans":[{"scopeSpans":[{"spans":[{"kind":"\\ud800"}]}]}]}',
    "surrogate key and value": b'{"resourceSpans":[{"scopeSpans":[{"spans":[{"\\ud800":1,"name":"\\ud800"}]}]}]}',
    "surrogate log severity": b'{"resourceLogs":[{"scopeLogs":[{"logRecords":[{"severityNumber":"\\udfff"}]}]}]}',
}


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("jsonfuzz") / "data")
    yield s
    s.stop(timeout=30)


@pytest.mark.parametrize("name", list(NAMED))
def test_named_malformed_json_bodies_get_400(srv, name):
    path = "/v1/logs" if "log" in name else "/v1/traces"
    status, _, body = json_fuzz.post_json(srv.http_port, path, NAMED[name])
    assert json_fuzz.judge_otlp(status, body) is None
    assert status == 400
    msg = json.loads(body)["message"]
    assert "OTLP/JSON" in msg or "JSON" in msg, msg


def test_a_lone_surrogate_in_the_error_message_is_written_escaped(srv):
    # json_format names the offending value in its message; the 400 must still be written
    body = b'{"resourceSpans":[{"scopeSpans":[{"spans":[{"kind":"SPAN_KIND_\\ud800"}]}]}]}'
    status, _, out = json_fuzz.post_json(srv.http_port, "/v1/traces", body)
    assert status == 400, out
    out.decode("utf-8")            # well-formed UTF-8: no raw surrogate
    assert json.loads(out)["code"] == 3


@hypothesis.settings(max_examples=400, deadline=None, derandomize=True,
                     suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(st.randoms(use_true_random=False))
def test_fuzzed_json_bodies_get_200_or_400(srv, rnd):
    path, body = json_fuzz.random_body(rnd)
    status, _, out = json_fuzz.post_json(srv.http_port, path, body)
    assert json_fuzz.judge_otlp(status, out) is None, (json_fuzz.judge_otlp(status, out), body[:500])


@pytest.mark.parametrize("length", json_fuzz.CONTENT_LENGTHS)
def test_gate_post_with_a_bad_content_length_gets_an_answer(srv, length):
    raw = f"POST /gate HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n".encode()
    t0 = time.monotonic()
    status, _, body = json_fuzz.exchange(srv.metrics_port, raw, timeout=10)
    assert status is not None, f"Content-Length {length!r}: connection closed without an answer"
    assert time.monotonic() - t0 < 5
    if length.strip().isdigit() and length.isascii() and int(length) == 0:
        assert status in (200, 503)
    elif not (length.isascii() and length.isdigit()):
        assert status == 400 and b"Content-Length" in body, (length, status, body)


@hypothesis.settings(max_examples=300, deadline=None, derandomize=True,
                     suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(st.randoms(use_true_random=False))
def test_fuzzed_gate_requests_get_an_answer(srv, rnd):
    raw = json_fuzz.random_gate_request(rnd)
    status, _, _ = json_fuzz.exchange(srv.metrics_port, raw, timeout=10)
    assert json_fuzz.judge_gate(status) is None, (json_fuzz.judge_gate(status), raw[:300])
