"""LiteLLM's traffic mirroring (``silent_model``) through a real ``shadowlens serve`` (docs/litellm.md).

``drive_litellm.py`` runs the real LiteLLM Router (tests/requirements-litellm.txt) against the fake OpenAI
server, in its three settings (no ambient span; an ambient span with USE_OTEL_LITELLM_REQUEST_SPAN=true; an
ambient span with LiteLLM's default), exporting through LiteLLM's own ``otel`` callback (OTLP/HTTP). The store
must then hold every LiteLLM call as an LLM span with the model and tokens the fake server returned, priced
(LiteLLM's reported cost, or the price table where LiteLLM reports 0.0 for a model it cannot price), the silent
root calls as the candidate and their primaries as the baseline (``routes`` config), and the default
setting's application spans as ``mixed``, counted and logged once; the calls under a shared parent compared
call by call (analyzers/units.py). The same run sends ``REGRESSION`` more requests inside an application span
whose ``cohort.language`` alternates de / fr, and the fake server refuses most fr requests on the silent model
only: the gate must block, naming language=fr. Run: ``pytest -m realinst tests/realinst/test_litellm.py``
(about 30 s, most of it importing litellm).
"""
from __future__ import annotations

import importlib.util
import json
import re
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))

import drive_litellm
from fake_openai import FakeOpenAI

pytestmark = [pytest.mark.realinst, pytest.mark.timeout(180)]

REQUESTS = 2                      # per setting
REGRESSION = 96                   # requests of the planted regression (half of them fr)
# USD per million input / output tokens of the silent model (LiteLLM has none): gpt-4o-mini's, so that the
# planted regression is the refusals alone (a refusal's shorter answer costs less)
SILENT_PRICE = (0.15, 0.6)
ENV = {
    "SHADOWLENS_TRACES__IDLE_SECONDS": "1",
    "SHADOWLENS_PRICES": f"[{{match: 'my-rlaif-1(-\\d{{4}}-\\d{{2}}-\\d{{2}})?', input: {SILENT_PRICE[0]}, "
                         f"output: {SILENT_PRICE[1]}}}]",
    "SHADOWLENS_ROUTES": "{baseline: ['gpt-4o-mini']}",
    # the planted regression's rule: a difference (the default ratio rule cannot bound a ratio over a baseline
    # that never refuses, as here, in a few dozen pairs)
    "SHADOWLENS_GATE__REFRESH": "1s", "SHADOWLENS_GATE__MIN_SAMPLES": "20",
    "SHADOWLENS_GATE__RULES": "[{name: refusal_rate, measure: refusal_rate, max_increase: 0.1}]",
}
# spans per request: bare 2 calls x (litellm_request + raw_gen_ai_request); app_span agent.run + 2 x 2;
# app_default agent.run + 2 raw_gen_ai_request
EXPECTED_SPANS = REQUESTS * (4 + 5 + 3) + REGRESSION * 5
_REQUEST_NO = re.compile(r"\[lang=fr\] Request (\d+):")


def planted_refusal(model: str, prompt: str) -> bool:
    """The silent model refuses seven fr requests in eight (the primary, and every de request, never)."""
    m = _REQUEST_NO.match(prompt)
    return model == drive_litellm.SILENT and m is not None and int(m.group(1)) % 16 != 1

if importlib.util.find_spec("litellm") is None:
    pytest.skip("litellm not installed: pip install -r tests/requirements-litellm.txt", allow_module_level=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The three settings driven once; yields (serve, drive's JSON line, fake server records)."""
    from harness import start_server, wait_for

    srv = start_server(tmp_path_factory.mktemp("litellm") / "data", ENV)
    try:
        with FakeOpenAI(refuse=planted_refusal) as fake:
            out = drive_litellm.run(fake.base_url, srv.http_endpoint, REQUESTS, REGRESSION)
            records = list(fake.records)
        wait_for(lambda: srv.query("SELECT count(*) AS n FROM spans")[0]["n"] >= EXPECTED_SPANS, 20,
                 what="LiteLLM's spans in the store", detail=srv.log)
        # every trace row written (idle 1 s): bare 2 traces a request, the ambient settings 1, and the calls
        # under a shared parent (app_span, regression) one row each
        rows = 2 * REQUESTS + 2 * REQUESTS + 2 * REQUESTS + 3 * REGRESSION
        wait_for(lambda: srv.query("SELECT count(*) AS n FROM traces")[0]["n"] >= rows, 20,
                 what="trace rows", detail=srv.log)
        yield srv, out, records
    finally:
        assert srv.stop() == 0, srv.log()[-3000:]


def spans(srv, where: str) -> list[dict]:
    return srv.query("SELECT trace_id, span_id, parent_span_id, name, scope_name, span_kind, route, model, "
                     "request_model, input_tokens, output_tokens, reported_cost_usd, cost_usd, intent, language, "
                     f"tier FROM spans WHERE {where} ORDER BY start_time")


def in_traces(ids: list[str]) -> str:
    assert ids and all(len(t) == 32 and all(c in "0123456789abcdef" for c in t) for t in ids), ids
    return "trace_id IN (" + ", ".join(f"'{t}'" for t in ids) + ")"


def test_litellm_calls_are_priced_llm_calls(run):
    srv, out, records = run
    assert len(records) == 2 * (3 * REQUESTS + REGRESSION)   # the primary and the silent call of every request
    served = {(r.response_model, r.request_model, r.prompt_tokens, r.completion_tokens) for r in records}
    calls = spans(srv, "name = 'litellm_request'")
    assert len(calls) == 2 * (2 * REQUESTS + REGRESSION)     # not app_default: it writes onto agent.run
    for c in calls:
        assert c["scope_name"] == "litellm" and c["span_kind"] == "LLM", c
        assert (c["model"], c["request_model"], c["input_tokens"], c["output_tokens"]) in served, c
        if c["request_model"] == drive_litellm.PRIMARY:      # LiteLLM knows gpt-4o-mini's price: used as is
            assert c["reported_cost_usd"] > 0 and c["cost_usd"] == c["reported_cost_usd"], c
        else:                                                # it reports 0.0 for my-rlaif-1: the table prices it
            assert c["reported_cost_usd"] is None, c
            want = (c["input_tokens"] * SILENT_PRICE[0] + c["output_tokens"] * SILENT_PRICE[1]) / 1e6
            assert c["cost_usd"] == pytest.approx(want), c
    raw = spans(srv, "name = 'raw_gen_ai_request'")
    assert raw and all(r["span_kind"] is None and r["input_tokens"] is None for r in raw)   # never counted twice


def test_litellm_bare_calls_route_silent_candidate_primary_baseline(run):
    srv, _, _ = run
    roots = spans(srv, "name = 'litellm_request' AND parent_span_id IS NULL")
    assert len(roots) == 2 * REQUESTS
    assert sorted(r["route"] or "-" for r in roots) == ["-"] * REQUESTS + ["candidate"] * REQUESTS
    assert all(r["route"] == "candidate" for r in roots if r["request_model"] == drive_litellm.SILENT)
    traces = srv.query(f"SELECT route, model, llm_calls, cost_usd, tier FROM traces WHERE "
                       f"{in_traces([r['trace_id'] for r in roots])} ORDER BY route")
    # the primary's trace: the routes config maps its request model; the silent one keeps its candidate route
    assert [(t["route"], t["model"].split("-2024")[0]) for t in traces] == \
        [("baseline", drive_litellm.PRIMARY)] * REQUESTS + [("candidate", drive_litellm.SILENT)] * REQUESTS
    assert all(t["llm_calls"] == 1 and t["cost_usd"] > 0 and t["tier"] == "pro" for t in traces), traces
    # paired by identical input messages within traces.content_pairing_seconds: one request id per request,
    # held by its baseline and its candidate trace
    keyed = srv.query(f"SELECT request_id, list(route ORDER BY route) AS routes FROM traces WHERE "
                      f"{in_traces([r['trace_id'] for r in roots])} GROUP BY request_id")
    assert len(keyed) == REQUESTS and all(k["request_id"].startswith("content:") for k in keyed), keyed
    assert all(k["routes"] == ["baseline", "candidate"] for k in keyed), keyed


def test_litellm_request_span_setting_puts_both_calls_under_the_ambient_span(run):
    srv, out, _ = run
    ids = out["ambient_trace_ids"]["app_span"]
    rows = spans(srv, in_traces(ids))
    for tid in ids:
        ambient = [r for r in rows if r["trace_id"] == tid and r["name"] == "agent.run"]
        calls = [r for r in rows if r["trace_id"] == tid and r["name"] == "litellm_request"]
        assert len(ambient) == 1 and ambient[0]["route"] is None and ambient[0]["language"] == "de"
        assert sorted(c["request_model"] for c in calls) == [drive_litellm.PRIMARY, drive_litellm.SILENT]
        assert all(c["parent_span_id"] == ambient[0]["span_id"] for c in calls)
        # the per-call route: the silent call is the candidate wherever it is; the primary carries no mark
        assert sorted((c["request_model"], c["route"]) for c in calls) == \
            [(drive_litellm.PRIMARY, None), (drive_litellm.SILENT, "candidate")]
        # compared call by call: the trace is routed 'calls', each call is a unit row keyed by the shared parent
        units = srv.query(f"SELECT route, request_id, call_span_id, language, tier, model FROM traces "
                          f"WHERE trace_id = '{tid}' ORDER BY call_span_id NULLS FIRST")
        by_span = {c["span_id"]: c for c in calls}
        assert units[0]["route"] == "calls" and units[0]["call_span_id"] is None
        assert sorted((u["route"], by_span[u["call_span_id"]]["request_model"]) for u in units[1:]) == \
            [("baseline", drive_litellm.PRIMARY), ("candidate", drive_litellm.SILENT)]
        assert {(u["request_id"], u["language"], u["tier"]) for u in units[1:]} == \
            {(f"{tid}:{ambient[0]['span_id']}", "de", "pro")}


def test_litellm_default_setting_with_an_ambient_span_is_mixed_counted_and_logged_once(run):
    srv, out, _ = run
    ids = out["ambient_trace_ids"]["app_default"]
    ambient = spans(srv, f"{in_traces(ids)} AND name = 'agent.run'")
    assert len(ambient) == REQUESTS
    assert all(a["route"] == "mixed" and a["scope_name"] == "billing-agent" for a in ambient), ambient
    traces = srv.query(f"SELECT route FROM traces WHERE {in_traces(ids)}")
    assert [t["route"] for t in traces] == ["mixed"] * REQUESTS          # stored, never compared
    deadline = time.monotonic() + 10                                     # decoder counters reach /metrics in ~0.5 s
    while True:
        fams = {f.name: f for f in text_string_to_metric_families(srv.metrics_text())}
        got = {s.labels["gateway"]: s.value for s in fams["shadowlens_mixed_spans"].samples
               if s.name.endswith("_total")}
        if got.get("litellm") == REQUESTS or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert got == {"litellm": REQUESTS}
    warnings = [ln for ln in srv.log().splitlines() if "metadata.is_silent_experiment" in ln]
    assert len(warnings) == 1, warnings                                  # once per interval, not per span


def gate(srv) -> dict:
    with urllib.request.urlopen(srv.metrics_url + "/gate", timeout=10) as r:      # 200 promote, 409 block
        return json.loads(r.read())


def test_planted_refusals_of_the_silent_model_in_one_language_block_the_gate_naming_it(run):
    from harness import wait_for

    srv, out, records = run
    refused = [r for r in records if r.finish_reason == "content_filter"]
    assert refused and {r.request_model for r in refused} == {drive_litellm.SILENT}
    ids = out["ambient_trace_ids"]["regression"]
    assert len(ids) == REGRESSION
    units = srv.query(f"SELECT language, route, count(*) AS n, sum(refused::INT)::INT AS refused FROM traces WHERE "
                      f"{in_traces(ids)} AND call_span_id IS NOT NULL GROUP BY ALL ORDER BY ALL")
    half = REGRESSION // 2
    assert [(u["language"], u["route"], u["n"], u["refused"]) for u in units] == [
        ("de", "baseline", half, 0), ("de", "candidate", half, 0),
        ("fr", "baseline", half, 0), ("fr", "candidate", half, half - half // 8)]
    last: list[dict] = [{}]

    def failing() -> set:
        try:
            last[0] = gate(srv)
        except urllib.error.HTTPError as exc:       # 409: the gate blocks
            last[0] = json.loads(exc.read())
        return {(r["rule"], r["cohort"]) for r in last[0].get("rules", []) if r["state"] == "fail"}
    wait_for(lambda: ("refusal_rate", "language=fr") in failing(), 30, 0.5, what="the gate failing language=fr",
             detail=lambda: json.dumps([r for r in last[0].get("rules", []) if r["rule"] == "refusal_rate"])[:4000])
    assert last[0]["verdict"] == "block"
    assert ("refusal_rate", "language=de") not in failing()
