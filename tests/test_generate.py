"""``shadowlens generate`` and ``shadowlens demo``: the sampler's statistics, and real processes on loopback."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from harness import REPO, SHADOWLENS, free_port, server_env, wait_for

from shadowlens.demo import gate_summary
from shadowlens.traffic import MODEL, MODELS, SCENARIOS, sample_request

SUMMARY = re.compile(r"generate: done, (\d+) traces sent \((\d+) requests\), (\d+) spans, (\d+) failed")
PROGRESS = re.compile(r"^generate: \d+ traces sent \(\d+ requests\), [\d.]+ traces/s, scenario \w+$", re.M)


def _sample(scenario: str, n: int, seed: int = 7):
    rng = np.random.default_rng(seed)
    return [sample_request(rng, SCENARIOS[scenario]) for _ in range(n)]


def _ratio(reqs, quantity, sel=lambda r: True):
    """Candidate / baseline mean of one quantity over the requests that have both traces."""
    get = {"refusal_rate": lambda t: t.refused, "steps": lambda t: len(t.steps), "duration": lambda t: t.duration_s,
           "cost": lambda t: sum(c.cost_usd for c in t.steps), "passed": lambda t: t.passed}[quantity]
    pairs = [r.traces for r in reqs if len(r.traces) == 2 and sel(r)]
    b = np.mean([get(p[0]) for p in pairs])
    c = np.mean([get(p[1]) for p in pairs])
    return c / b


# ------------------------------------------------------------------------------------------ the sampler

def test_healthy_candidate_matches_baseline_and_pairs_are_correlated():
    reqs = _sample("healthy", 8000)
    assert all(len(r.traces) == 2 and r.request_id for r in reqs)
    assert [t.route for t in reqs[0].traces] == ["baseline", "candidate"]
    assert {reqs[0].traces[0].model, reqs[0].traces[1].model} == set(MODELS.values())
    for q in ("steps", "duration", "cost", "passed"):
        assert _ratio(reqs, q) == pytest.approx(1.0, abs=0.05), q
    base = [r.traces[0] for r in reqs]
    assert 0.85 <= np.mean([t.passed for t in base]) <= 0.92
    assert np.mean([t.refused for t in base]) == pytest.approx(MODEL.refusal_rate, abs=0.01)
    assert np.mean([t.escalated for t in base]) == pytest.approx(MODEL.escalation_rate, abs=0.01)
    assert np.mean([len(t.steps) for t in base]) == pytest.approx(3.06, abs=0.1)
    assert np.std(np.log([t.duration_s for t in base])) == pytest.approx(0.46, abs=0.04)
    tokens = [c.input_tokens for t in base for c in t.steps]
    assert np.mean(tokens) == pytest.approx(800, abs=15) and np.std(tokens) == pytest.approx(200, abs=15)
    # Correlated pairs: outcomes agree on almost every request; durations correlate through z.
    assert np.mean([r.traces[0].passed != r.traces[1].passed for r in reqs]) < 0.03
    logs = np.log([[r.traces[0].duration_s, r.traces[1].duration_s] for r in reqs])
    assert np.corrcoef(logs.T)[0, 1] > 0.3


def test_regression_plants_exactly_the_tabled_effects():
    reqs = _sample("regression", 12000)
    quantity = {"refusal_rate": "refusal_rate", "duration": "duration", "steps": "steps"}
    for e in SCENARIOS["regression"].effects:
        in_cohort = lambda r, e=e: r.cohort[e.label] == e.value
        out_cohort = lambda r, e=e: r.cohort[e.label] != e.value
        tol = 0.6 if e.quantity == "refusal_rate" else 0.08     # refusals are rare: a wider band
        assert _ratio(reqs, quantity[e.quantity], in_cohort) == pytest.approx(e.factor, abs=tol), e
        assert _ratio(reqs, quantity[e.quantity], out_cohort) == pytest.approx(1.0, abs=tol / 2), e
    billing = lambda r: r.cohort["intent"] == "billing"
    assert _ratio(reqs, "cost", billing) == pytest.approx(1.4, abs=0.08)      # cost follows steps
    ent = [r for r in reqs if r.cohort["tier"] == "enterprise"]
    p99 = [np.quantile([r.traces[i].duration_s for r in ent], 0.99) for i in (0, 1)]
    assert p99[1] / p99[0] == pytest.approx(1.5, abs=0.25)
    assert _ratio(reqs, "passed") == pytest.approx(1.0, abs=0.02)             # no planted eval effect


def test_noisy_drops_candidates_and_request_ids_without_a_true_regression():
    reqs = _sample("noisy", 8000)
    s = SCENARIOS["noisy"]
    assert np.mean([len(r.traces) == 1 for r in reqs]) == pytest.approx(s.drop_candidate, abs=0.01)
    assert np.mean([r.request_id is None for r in reqs]) == pytest.approx(s.drop_request_id, abs=0.01)
    assert np.std(np.log([r.traces[0].duration_s for r in reqs])) == pytest.approx(0.7, abs=0.05)
    for q in ("steps", "duration", "refusal_rate"):
        assert _ratio(reqs, q) == pytest.approx(1.0, abs=0.15 if q == "refusal_rate" else 0.05), q


def test_cli_scenarios_match_the_table():
    from shadowlens.cli import SCENARIO_NAMES
    assert tuple(SCENARIO_NAMES) == tuple(SCENARIOS)


def test_gate_summary_names_the_failing_cohorts():
    doc = {"verdict": "block", "rules": [
        {"rule": "refusal_rate", "cohort": "language=de", "state": "fail", "effect": 2.9, "margin": 2.0},
        {"rule": "task_completion", "cohort": "all", "state": "pass", "effect": -0.004, "margin": 0.02},
        {"rule": "p99_latency", "cohort": "tier=enterprise", "state": "fail", "effect": 1.52, "margin": 1.3}]}
    line = gate_summary(doc)
    assert line.startswith("gate: block — refusal_rate fails for language=de (×2.90, margin ×2)")
    assert "p99_latency fails for tier=enterprise" in line and "\n" not in line
    assert gate_summary({"verdict": "inconclusive", "rules": []}) == "gate: inconclusive — no rules judged yet"


# ------------------------------------------------------------------------------- real processes

def _generate(srv, protocol: str, *args: str) -> subprocess.CompletedProcess:
    endpoint = srv.grpc_endpoint if protocol == "grpc" else f"127.0.0.1:{srv.http_port}"
    return subprocess.run(SHADOWLENS + ["generate", "--endpoint", endpoint, "--protocol", protocol, *args],
                          env=srv.env, capture_output=True, text=True, cwd=REPO, timeout=120)


@pytest.mark.parametrize("protocol,scenario", [("grpc", "healthy"), ("http", "noisy")])
def test_every_generated_trace_is_stored(serve_factory, protocol, scenario):
    srv = serve_factory()
    out = _generate(srv, protocol, "--rate", "60", "--duration", "3", "--scenario", scenario)
    assert out.returncode == 0, out.stderr
    assert PROGRESS.search(out.stderr), out.stderr
    traces, requests, spans, failed = map(int, SUMMARY.search(out.stderr).groups())
    assert requests == 180 and failed == 0
    time.sleep(0.5)
    [row] = srv.query("select count(distinct trace_id) as t, count(*) as s from spans")
    assert (row["t"], row["s"]) == (traces, spans)

    roots = srv.query("select route, request_id, intent, language, tier, refused, escalated from spans"
                      " where parent_span_id is null")
    assert len(roots) == traces
    assert all(r["intent"] and r["language"] and r["tier"] for r in roots)
    by_id: dict = {}
    for r in roots:
        by_id.setdefault(r["request_id"], []).append(r["route"])
    if scenario == "healthy":
        assert traces == 2 * requests
        assert len(by_id) == requests and all(sorted(v) == ["baseline", "candidate"] for v in by_id.values())
    else:
        assert None in by_id                                                    # requests with no id at all
        ids = {k: v for k, v in by_id.items() if k is not None}
        assert any(v == ["baseline"] for v in ids.values())                     # crashed candidates
        assert all(sorted(v) in (["baseline"], ["baseline", "candidate"]) for v in ids.values())
    # Refusals and escalations round-trip exactly: the generator is seeded (default --seed 1).
    plans = _sample(scenario, requests, seed=1)
    expected = [sum(getattr(t, k) for p in plans for t in p.traces) for k in ("refused", "escalated")]
    assert [sum(bool(r[k]) for r in roots) for k in ("refused", "escalated")] == expected
    assert 0 < expected[0] / traces < 0.1 and expected[1] / traces < 0.08

    [llm] = srv.query("select count(*) as n, count(step) as step, count(model) as model,"
                      " count(input_tokens) as tin, count(cost_usd) as cost, min(cost_usd) as min_cost"
                      " from spans where span_kind = 'LLM'")
    assert llm["n"] > traces and llm["step"] == llm["model"] == llm["tin"] == llm["cost"] == llm["n"]
    assert llm["min_cost"] > 0
    [tool] = srv.query("select count(*) as n, count(step) as step from spans where span_kind = 'TOOL'")
    assert tool["n"] > 0 and tool["step"] == tool["n"]
    [bad] = srv.query("select count(*) as n from spans c join spans p on c.parent_span_id = p.span_id"
                      " and c.trace_id = p.trace_id where c.start_time < p.start_time or c.end_time > p.end_time")
    assert bad["n"] == 0                                                        # children lie within the root


def test_ctrl_c_stops_generate_cleanly_and_flushes(serve_factory):
    srv = serve_factory()
    proc = subprocess.Popen(SHADOWLENS + ["generate", "--endpoint", srv.grpc_endpoint, "--rate", "50", "--duration", "0"],
                            env=srv.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    time.sleep(2.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    traces, requests, spans, failed = map(int, SUMMARY.search(err).groups())
    assert requests >= 50 and traces == 2 * requests and failed == 0
    time.sleep(0.5)
    [row] = srv.query("select count(distinct trace_id) as t, count(*) as s from spans")
    assert (row["t"], row["s"]) == (traces, spans)


@pytest.mark.parametrize("args,needle", [
    (["--rate", "0"], "--rate"), (["--duration", "-1"], "--duration"), (["--scenario", "nope"], "--scenario"),
    (["--endpoint", "nohost"], "--endpoint"), (["--protocol", "udp"], "--protocol"), (["--bogus"], "--bogus")])
def test_bad_generate_flags_exit_2_with_one_line(args, needle):
    out = subprocess.run(SHADOWLENS + ["generate", *args], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shadowlens: error:") and needle in lines[0], out.stderr


def test_demo_serves_both_routes_and_stops_cleanly_on_sigterm(tmp_path):
    g, h, m = free_port(), free_port(), free_port()
    env = server_env(g, h, m, SHADOWLENS_TRACES__IDLE_SECONDS="1")
    proc = subprocess.Popen(SHADOWLENS + ["demo", "--data-dir", str(tmp_path / "demo"), "--rate", "20"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    try:
        first = proc.stdout.readline()
        serve_pid = int(re.search(r"pid (\d+)", first).group(1))
        text = [""]

        def both_routes_counted() -> bool:
            assert proc.poll() is None, proc.stdout.read()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{m}/metrics", timeout=5) as r:
                    text[0] = r.read().decode()
            except OSError:
                pass
            return all(re.search(rf'^shadowlens_traces_total\{{[^}}]*route="{route}"', text[0], re.M)
                       for route in ("baseline", "candidate"))
        wait_for(both_routes_counted, 40, 0.5, what="shadowlens_traces_total series for both routes",
                 detail=lambda: text[0][-2000:])
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=90)
        assert proc.returncode == 0, first + rest
        assert "demo: stopped" in rest and "curl http://127.0.0.1:" in first + rest
        with pytest.raises(ProcessLookupError):
            os.kill(serve_pid, 0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_agent_pool_is_the_same_bytes_for_a_seed_and_marks_every_trace_and_request_id():
    """The load pool (shadowlens/traffic_pool.py): fixed bytes for (seed, clock), exactly N spans a request,
    every trace id ending in the marker and every ``shadow.request_id`` in its hex, realistic sizes."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    from shadowlens.traffic_pool import agent_pool
    now = 1_765_000_000 * 10**9
    pool = agent_pool(3, seed=5, spans_per_request=64, now_ns=now)
    assert pool.payloads == agent_pool(3, seed=5, spans_per_request=64, now_ns=now).payloads
    assert pool.payloads != agent_pool(3, seed=6, spans_per_request=64, now_ns=now).payloads
    routes = set()
    for payload, roots in zip(pool.payloads, pool.roots):
        req = ExportTraceServiceRequest.FromString(payload)
        spans = [s for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans]
        assert len(spans) == 64 and all(s.trace_id.endswith(pool.marker) for s in spans)
        request_ids = [kv.value.string_value for s in spans for kv in s.attributes if kv.key == "shadow.request_id"]
        assert len(request_ids) == roots > 0 and all(r.endswith(pool.marker.hex()) for r in request_ids)
        routes |= {kv.value.string_value for s in spans for kv in s.attributes if kv.key == "shadow.route"}
        assert all(now - 120 * 10**9 <= s.start_time_unix_nano < now for s in spans)
    assert routes == {"baseline", "candidate"}
    assert 1500 < sum(map(len, pool.payloads)) / (3 * 64) < 4000      # bytes a span
    assert sum(pool.kinds.values()) == 3 * 64 and set(pool.kinds) == {"AGENT", "LLM", "TOOL"}
