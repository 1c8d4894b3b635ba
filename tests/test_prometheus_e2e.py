"""A real Prometheus server scrapes a running `shadowlens serve` (CONTRACT §6).

A seeded synthetic workload (baseline and candidate traces of one cohort, trace durations drawn from a
lognormal over 0.2 s - 60 s, i.e. across a dozen duration buckets) goes in over raw OTLP/gRPC. Once every
trace is complete and the sliding window has been refreshed, Prometheus scrapes ``/metrics`` and:

* ``histogram_quantile(0.99, sum by (le, route) (shadowlens_trace_duration_seconds_bucket))`` and the
  exact windowed gauge ``shadowlens_window_trace_duration_seconds{quantile="0.99"}`` agree within the
  width of the bucket that holds the gauge's value;
* the gauge equals the p99 computed here from the generated durations (numpy's linear interpolation,
  the same definition as DuckDB's ``quantile_cont``);
* ``sum(shadowlens_traces_total)`` is the number of traces sent, and every duration histogram's
  ``le="+Inf"`` bucket equals its ``_count``.
"""
from __future__ import annotations

import math
import time
import urllib.request

import grpc
import numpy as np
import pytest
from harness import wait_for
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from otlp_builders import span_request
from prometheus_client.parser import text_string_to_metric_families
from prometheus_server import PrometheusServer, prometheus_binary, value

from shadowlens.analyzers.aggregates import DURATION_BUCKETS

TRACE_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
SEED = 20_261_128
TRACES_PER_ROUTE = 1_200
# Per route: lognormal (median seconds, sigma), clipped to [0.2, 60] s.
DISTRIBUTIONS = {"baseline": (3.0, 1.0), "candidate": (2.0, 0.8)}
COHORT = {"cohort.intent": "billing", "cohort.language": "de", "cohort.tier": "enterprise"}
BATCH_TRACES = 200

pytestmark = pytest.mark.timeout(180)


# -- the workload ----------------------------------------------------------------------------------
def generate(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Trace durations in whole microseconds, per route (exact on the wire and in the store)."""
    out = {}
    for route, (median, sigma) in DISTRIBUTIONS.items():
        d = np.clip(rng.lognormal(math.log(median), sigma, TRACES_PER_ROUTE), 0.2, 60.0)
        out[route] = np.round(d * 1e6).astype(np.int64)
    return out


def trace_spans(rng: np.random.Generator, route: str, request_id: str, start_us: int, dur_us: int) -> list[dict]:
    """A root span and two LLM child spans; the trace lasts ``dur_us`` from the first start to the last end.

    Every other trace has a root that ends before its last child (an async agent): the trace's duration is
    still max(end) - min(start), not the root's duration.
    """
    tid, root = rng.bytes(16), rng.bytes(8)
    ns = lambda us: int(us) * 1_000
    end_us = start_us + dur_us
    root_end = end_us if int(request_id[1:]) % 2 == 0 else start_us + dur_us * 9 // 10
    c1 = (start_us + dur_us // 20, start_us + dur_us * 2 // 5)
    c2 = (start_us + dur_us // 2, end_us)
    chat = {"gen_ai.operation.name": "chat", "gen_ai.system": "openai",
            "gen_ai.request.model": "gpt-4o-mini" if route == "candidate" else "gpt-4o",
            "gen_ai.usage.input_tokens": 420, "gen_ai.usage.output_tokens": 42}
    return [
        {"trace_id": tid, "span_id": root, "name": "agent.run", "kind": 2, "start": ns(start_us), "end": ns(root_end),
         "attrs": {"shadow.route": route, "shadow.request_id": request_id, **COHORT}},
        {"trace_id": tid, "span_id": rng.bytes(8), "parent": root, "name": "chat", "kind": 3,
         "start": ns(c1[0]), "end": ns(c1[1]), "attrs": chat},
        {"trace_id": tid, "span_id": rng.bytes(8), "parent": root, "name": "chat", "kind": 3,
         "start": ns(c2[0]), "end": ns(c2[1]), "attrs": chat},
    ]


def send(endpoint: str, durations: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, tuple]:
    """Baseline and candidate traces of the same request interleaved; returns trace_id (hex) -> (route, seconds)."""
    # Spans are timestamped in the recent past (the store's retention works on span time).
    now_us = time.time_ns() // 1_000
    traces, sent = [], {}
    for i in range(TRACES_PER_ROUTE):
        for route in DISTRIBUTIONS:
            dur = int(durations[route][i])
            start = now_us - 120_000_000 - dur + int(rng.integers(0, 1_000_000))
            traces.append(trace_spans(rng, route, f"r{i}", start, dur))
            sent[traces[-1][0]["trace_id"].hex()] = (route, dur / 1e6)
    with grpc.insecure_channel(endpoint) as ch:
        call = ch.unary_unary(TRACE_METHOD, request_serializer=None,
                              response_deserializer=ExportTraceServiceResponse.FromString)
        for i in range(0, len(traces), BATCH_TRACES):
            spans = [s for t in traces[i:i + BATCH_TRACES] for s in t]
            resp = call(span_request(spans, {"service.name": "support-agent"}).SerializeToString(), timeout=30)
            assert resp.partial_success.rejected_spans == 0, resp.partial_success.error_message
    assert len(sent) == len(traces)
    return sent


# -- shadowlens' own /metrics ----------------------------------------------------------------------
def scrape(srv) -> dict[str, list]:
    """Sample name -> [(labels, value)] from the server's exposition."""
    with urllib.request.urlopen(srv.metrics_url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def wait_until(what: str, fn, timeout: float, srv) -> dict:
    last: list[dict] = [{}]

    def reached():
        last[0] = scrape(srv)
        return fn(last[0]) and last[0]
    return wait_for(reached, timeout, 0.2, what=what, detail=lambda: (
        f"traces_total={last[0].get('shadowlens_traces_total')}, open={last[0].get('shadowlens_open_traces')}, "
        f"window={last[0].get('shadowlens_window_traces')}\nserve log:\n{srv.log()[-4000:]}"))


def per_route(samples: list, name_filter=lambda labels: True) -> dict[str, float]:
    out: dict[str, float] = {}
    for labels, v in samples or []:
        if name_filter(labels):
            out[labels["route"]] = out.get(labels["route"], 0.0) + v
    return out


def bucket_of(v: float) -> tuple[float, float]:
    """(lower, upper) bounds of the duration bucket holding ``v`` (``le`` semantics: v <= upper)."""
    lower = 0.0
    for upper in DURATION_BUCKETS:
        if v <= upper:
            return lower, upper
        lower = upper
    return lower, math.inf


# -- the test --------------------------------------------------------------------------------------
def test_prometheus_histogram_quantile_agrees_with_window_p99(serve_factory, tmp_path):
    prometheus_binary()                             # skip (or fail under CI) before doing any work
    t_start = time.monotonic()
    srv = serve_factory(env={"SHADOWLENS_TRACES__IDLE_SECONDS": "1", "SHADOWLENS_ANALYZERS__WINDOW_REFRESH": "1s"})
    rng = np.random.default_rng(SEED)
    durations = generate(rng)
    trace_ids = send(srv.grpc_endpoint, durations, rng)
    sent = len(trace_ids)
    seconds = {route: d / 1e6 for route, d in durations.items()}
    exact_p99 = {route: float(np.percentile(s, 99, method="linear")) for route, s in seconds.items()}
    # The workload spans several buckets on both routes.
    for route, s in seconds.items():
        assert len({bucket_of(x) for x in s}) >= 8, route

    # Every trace completed (root present + 1 s idle), and a window refresh has seen them all.
    wait_until("all traces completed",
               lambda m: sum(v for _, v in m.get("shadowlens_traces_total", [])) == sent, 45, srv)
    m = wait_until("the window to hold every trace",
                   lambda m: per_route(m.get("shadowlens_window_traces")) == {r: TRACES_PER_ROUTE for r in durations}
                   and len(per_route(m.get("shadowlens_window_trace_duration_seconds"),
                                     lambda lab: lab["quantile"] == "0.99")) == len(durations), 20, srv)
    own_gauge = per_route(m["shadowlens_window_trace_duration_seconds"], lambda lab: lab["quantile"] == "0.99")

    with PrometheusServer(target=f"127.0.0.1:{srv.metrics_port}", workdir=tmp_path / "prometheus",
                          extra_args=("--enable-feature=exemplar-storage",)) as prom:
        # At least two successful scrapes, the last one after the window was complete.
        prom.wait_for('count_over_time(up{job="shadowlens"}[5m])',
                      lambda r: len(r) == 1 and value(r[0]) >= 2, timeout=30)
        up = prom.query('up{job="shadowlens"}')
        assert [value(s) for s in up] == [1.0], (up, prom.targets())

        total = prom.query("sum(shadowlens_traces_total)")
        assert value(total[0]) == sent

        quantile = {s["metric"]["route"]: value(s) for s in prom.query(
            "histogram_quantile(0.99, sum by (le, route) (shadowlens_trace_duration_seconds_bucket))")}
        gauges = prom.query('shadowlens_window_trace_duration_seconds{quantile="0.99"}')
        gauge = {}
        for s in gauges:
            assert s["metric"]["intent"] == "billing" and s["metric"]["language"] == "de" \
                and s["metric"]["tier"] == "enterprise", s["metric"]
            assert s["metric"]["route"] not in gauge, f"more than one p99 series per route: {gauges}"
            gauge[s["metric"]["route"]] = value(s)
        assert set(quantile) == set(gauge) == set(durations), (quantile, gauge)

        for route in durations:
            lower, upper = bucket_of(gauge[route])
            width = upper - lower
            print(f"{route}: histogram_quantile p99 = {quantile[route]:.4f} s, window p99 gauge = "
                  f"{gauge[route]:.6f} s, exact p99 = {exact_p99[route]:.6f} s, bucket ({lower}, {upper}]")
            assert gauge[route] == pytest.approx(own_gauge[route], rel=1e-12), "Prometheus stored a different value"
            assert gauge[route] == pytest.approx(exact_p99[route], rel=1e-6), route
            assert abs(quantile[route] - gauge[route]) <= width, (
                f"{route}: histogram_quantile {quantile[route]} vs window p99 {gauge[route]}: "
                f"further apart than the bucket ({lower}, {upper}]")

        # The +Inf bucket of every duration histogram is its _count (matched series by series).
        inf = prom.query('shadowlens_trace_duration_seconds_bucket{le="+Inf"}')
        counts = prom.query("shadowlens_trace_duration_seconds_count")
        assert len(inf) == len(counts) == len(durations), (inf, counts)
        equal = prom.query('shadowlens_trace_duration_seconds_bucket{le="+Inf"} '
                           '== ignoring(le) shadowlens_trace_duration_seconds_count')
        assert len(equal) == len(counts), (inf, counts)
        assert prom.query('shadowlens_trace_duration_seconds_bucket{le="+Inf"} '
                          '!= ignoring(le) shadowlens_trace_duration_seconds_count') == []
        assert sorted(value(s) for s in counts) == [TRACES_PER_ROUTE] * len(durations)

        # The duration buckets carry trace_id exemplars (OpenMetrics): each names a trace that was sent,
        # of that route, whose duration is the exemplar's value and lies in the exemplar's bucket.
        exemplars = prom.api("query_exemplars", query="shadowlens_trace_duration_seconds_bucket",
                             start=time.time() - 600, end=time.time() + 60)
        seen = 0
        for series in exemplars:
            lab = series["seriesLabels"]
            upper = float(lab["le"])
            lower = max([b for b in (0.0, *DURATION_BUCKETS) if b < upper], default=0.0)
            for ex in series["exemplars"]:
                route, secs = trace_ids[ex["labels"]["trace_id"]]
                assert route == lab["route"], (ex, lab)
                assert float(ex["value"]) == pytest.approx(secs, abs=1e-5), (ex, secs)
                assert lower < float(ex["value"]) <= upper, (ex, lab)
                seen += 1
        assert seen >= 8 * len(durations), exemplars

    assert time.monotonic() - t_start < 60, "the end-to-end test should stay under a minute"
