"""Pairing by parent span through a real ``serve``: a gateway's two calls under one application span are
compared call by call (analyzers/units.py, docs/litellm.md).

The spans are shaped as LiteLLM 1.110.2 emits them with USE_OTEL_LITELLM_REQUEST_SPAN=true inside an
application span (tests/test_litellm_decode.py's keys); the expected rows are written out here.
"""
from __future__ import annotations

import time

import pytest
from harness import wait_for
from test_litellm_decode import litellm_attrs
from test_receivers import grpc_export

from shadowlens.otlp import span, trace_request

NS = 1_000_000_000
T0 = int(time.time()) * NS - 60 * NS
FAST = {"SHADOWLENS_TRACES__IDLE_SECONDS": "1"}


def app_trace(n: int, calls: list[tuple[str, bool, float]], language: str = "de") -> tuple[str, list, list]:
    """Trace ``n``: an ``agent.run`` span (scope app, cohort attributes) with LiteLLM calls under it,
    each (model, silent, seconds). Returns the trace id and the app's and LiteLLM's spans."""
    tid = n.to_bytes(16, "big")
    root = span(tid, b"\x01" * 8, name="agent.run", start=T0, end=T0 + 3 * NS,
                attrs={"cohort.language": language, "cohort.intent": "billing"})
    children = [span(tid, bytes([2 + i]) * 8, parent=b"\x01" * 8, name="litellm_request", start=T0 + i * NS // 100,
                     end=T0 + i * NS // 100 + int(secs * NS), attrs=litellm_attrs(model, silent=silent))
                for i, (model, silent, secs) in enumerate(calls)]
    return tid.hex(), [root], children


def send(server, app, calls) -> None:
    for req in (trace_request(app, {"service.name": "billing-agent"}, scope="billing-agent"),
                trace_request(calls, {"service.name": "billing-agent", "cohort.tier": "pro"}, scope="litellm")):
        assert grpc_export(server.grpc_endpoint, req.SerializeToString()).partial_success.rejected_spans == 0


def pairs_total(server) -> dict:
    out = {}
    for line in server.metrics_text().splitlines():
        if line.startswith("shadowlens_pairs_total{"):
            out[line.split('status="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from harness import start_server

    srv = start_server(tmp_path_factory.mktemp("units") / "data", FAST)
    yield srv
    assert srv.stop() == 0, srv.log()[-3000:]


def test_calls_under_one_parent_are_compared_call_by_call(server):
    paired, p_app, p_calls = app_trace(1, [("gpt-4o-mini", False, 0.4), ("my-rlaif-1", True, 0.9)])
    alone, a_app, a_calls = app_trace(2, [("my-rlaif-1", True, 0.5)], language="fr")
    crowd, c_app, c_calls = app_trace(3, [("gpt-4o-mini", False, 0.3), ("gpt-4o-mini", False, 0.3),
                                          ("my-rlaif-1", True, 0.3)])
    plain, n_app, n_calls = app_trace(4, [("gpt-4o-mini", False, 0.3)])     # no silent call: an ordinary trace
    for app, calls in ((p_app, p_calls), (a_app, a_calls), (c_app, c_calls), (n_app, n_calls)):
        send(server, app, calls)
    ids = f"('{paired}', '{alone}', '{crowd}', '{plain}')"
    wait_for(lambda: server.query(f"SELECT count(DISTINCT trace_id) AS n FROM traces WHERE trace_id IN {ids}")[0]["n"]
             == 4, 20,
             what="trace rows", detail=server.log)
    rows = server.query("SELECT trace_id, route, request_id, language, tier, call_span_id, duration_seconds, model, "
                        f"input_tokens, llm_calls, steps FROM traces WHERE trace_id IN {ids} "
                        "ORDER BY trace_id, call_span_id NULLS FIRST")
    by_trace: dict[str, list[dict]] = {}
    for r in rows:
        by_trace.setdefault(r["trace_id"], []).append(r)
    # the paired trace: its own row is routed 'calls' (never compared), and each call is a unit row
    whole, base, cand = by_trace[paired]
    assert (whole["route"], whole["call_span_id"], whole["llm_calls"]) == ("calls", None, 2)
    key = f"{paired}:{'01' * 8}"
    assert [(u["route"], u["request_id"], u["call_span_id"], u["model"], u["llm_calls"], u["steps"]) for u in
            (base, cand)] == [("baseline", key, "02" * 8, "gpt-4o-mini-2024-07-18", 1, 1),
                              ("candidate", key, "03" * 8, "my-rlaif-1-2024-07-18", 1, 1)]
    assert [u["duration_seconds"] for u in (base, cand)] == [pytest.approx(0.4), pytest.approx(0.9)]
    # cohorts come from the application's span and the resource, as for the trace
    assert {(u["language"], u["tier"]) for u in (whole, base, cand)} == {("de", "pro")}
    # a silent call with no sibling: a candidate unit alone (unmatched), the trace not compared
    assert [(r["route"], r["call_span_id"]) for r in by_trace[alone]] == [("calls", None), ("candidate", "02" * 8)]
    # two primaries and one silent call under one parent: not paired for sure, counted ambiguous, no unit
    assert [(r["route"], r["call_span_id"]) for r in by_trace[crowd]] == [("calls", None)]
    assert [(r["route"], r["call_span_id"]) for r in by_trace[plain]] == [(None, None)]
    wait_for(lambda: pairs_total(server).get("ambiguous") == 1, 10, what="the ambiguous count", detail=server.log)
    assert pairs_total(server) == {"matched": 1, "unmatched_baseline": 0, "unmatched_candidate": 0, "ambiguous": 1}


def test_a_late_span_replaces_the_units_with_the_trace_row(server):
    tid, app, calls = app_trace(5, [("gpt-4o-mini", False, 0.4), ("my-rlaif-1", True, 0.9)])
    send(server, app, calls)
    wait_for(lambda: len(server.query(f"SELECT 1 FROM traces WHERE trace_id = '{tid}'")) == 3, 20, what="rows")
    wait_for(lambda: pairs_total(server).get("matched", 0) >= 1, 10, what="the pair")
    matched = pairs_total(server)["matched"]
    late = span(bytes.fromhex(tid), b"\x09" * 8, parent=b"\x01" * 8, name="tool", start=T0, end=T0 + NS,
                attrs={"gen_ai.operation.name": "execute_tool"})
    send(server, [late], [])
    wait_for(lambda: server.query(f"SELECT max(revision) AS r FROM traces WHERE trace_id = '{tid}'")[0]["r"] == 1,
             20, what="the revision", detail=server.log)
    rows = server.query(f"SELECT route, revision FROM traces WHERE trace_id = '{tid}' ORDER BY call_span_id NULLS FIRST")
    assert rows == [{"route": "calls", "revision": 1}, {"route": "baseline", "revision": 1},
                    {"route": "candidate", "revision": 1}]
    assert pairs_total(server)["matched"] == matched      # the revision is not paired again


def test_calls_that_come_after_their_trace_completed_are_compared_once(server):
    # the application's span exported first: its trace completes alone, then LiteLLM's calls revise it
    tid, app, calls = app_trace(6, [("gpt-4o-mini", False, 0.4), ("my-rlaif-1", True, 0.9)])
    before = pairs_total(server).get("matched", 0)
    send(server, app, [])
    wait_for(lambda: server.query(f"SELECT route FROM traces WHERE trace_id = '{tid}'") == [{"route": None}], 20,
             what="the application's trace row", detail=server.log)
    send(server, [], calls)
    wait_for(lambda: len(server.query(f"SELECT 1 FROM traces WHERE trace_id = '{tid}'")) == 3, 20,
             what="the revision with the calls", detail=server.log)
    wait_for(lambda: pairs_total(server)["matched"] == before + 1, 10, what="the pair counted")
    assert [r["route"] for r in server.query(f"SELECT route FROM traces WHERE trace_id = '{tid}' "
                                             "ORDER BY call_span_id NULLS FIRST")] == ["calls", "baseline", "candidate"]


def root_call(n: int, model: str, silent: bool, start_ms: int, prompt: str):
    """A LiteLLM call at the root of its own trace (LiteLLM without an application span), with its input messages."""
    attrs = {**litellm_attrs(model, silent=silent),
             "gen_ai.input.messages": f'[{{"role": "user", "parts": [{{"type": "text", "content": "{prompt}"}}]}}]'}
    start = T0 + start_ms * NS // 1000
    return (100 + n).to_bytes(16, "big").hex(), span((100 + n).to_bytes(16, "big"), b"\x01" * 8,
                                                     name="litellm_request", start=start, end=start + NS // 2,
                                                     attrs=attrs)


def test_root_calls_with_identical_content_close_in_time_share_a_request_id(server):
    calls = [root_call(1, "gpt-4o-mini", False, 0, "total of INV-1"),       # a primary and its silent twin 50 ms on
             root_call(2, "my-rlaif-1", True, 50, "total of INV-1"),
             root_call(3, "my-rlaif-1", True, 5000, "total of INV-1"),       # the same prompt 5 s on: no twin
             root_call(4, "gpt-4o-mini", False, 10000, "hello"),             # two primaries of one prompt at once,
             root_call(5, "gpt-4o-mini", False, 10010, "hello"),             # then a silent call: which is its twin?
             root_call(6, "my-rlaif-1", True, 10050, "hello"),
             root_call(7, "gpt-4o-mini", False, 20000, "bye"),               # two calls of one route never pair
             root_call(8, "gpt-4o-mini", False, 20010, "bye")]
    ids = [t for t, _ in calls]
    before = pairs_total(server).get("ambiguous", 0)
    send(server, [], [s for _, s in calls])
    where = "trace_id IN (" + ", ".join(f"'{t}'" for t in ids) + ")"
    wait_for(lambda: len(server.query(f"SELECT 1 FROM traces WHERE {where}")) == len(ids), 20, what="rows",
             detail=server.log)
    got = {r["trace_id"]: r["request_id"] for r in server.query(f"SELECT trace_id, request_id FROM traces WHERE {where}")}
    assert got[ids[0]] == got[ids[1]] == f"content:{ids[0]}"
    assert [got[t] for t in ids[2:]] == [f"content:{t}" for t in ids[2:]]      # each its own
    wait_for(lambda: pairs_total(server)["ambiguous"] == before + 1, 10, what="the ambiguous count")
