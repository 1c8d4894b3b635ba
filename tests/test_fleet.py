"""The fleet gate with the real parts (issue 19 part 2): `shadowlens gate --prometheus` over three sidecars.

One shadow-traffic run of the regression scenario (shadowlens/traffic.py) is split across three ``serve``
processes by request (both traces of a request go to one sidecar, as in a pod), and all of it also goes to
a fourth ``serve``, the reference. A healthy run goes to three more sidecars. One real Prometheus scrapes the
six sidecars every second (OpenMetrics, exemplar storage on), labelled fleet="regression" / "healthy".

Pass when the fleet's verdict from Prometheus is the reference's: the same verdict, the same failing (rule,
cohort) results, the same effects (exact for the paired sums, within the sketch's stated error for p99);
each regression sidecar alone is inconclusive while the fleet blocks naming the cohort; the healthy fleet
does not block; and the failing results carry candidate trace ids from the sidecars' exemplars.
"""
from __future__ import annotations

import json
import math
import threading
import time
import urllib.error
import urllib.request
import uuid

import numpy as np
import pytest
from click.testing import CliRunner
from harness import new_server, wait_for
from prometheus_server import PrometheusServer, prometheus_binary

from shadowlens.analyzers.fleet import GAMMA
from shadowlens.cli import main
from shadowlens.otlp import span, trace_request
from shadowlens.traffic import MODELS, SCENARIOS, sample_request

pytestmark = pytest.mark.timeout(240)

N_REQUESTS = 2400       # calibrated: all of it blocks on intent=billing, a third of it does not yet
N_HEALTHY = 1200
SEED = 20
PER_REQUEST = 150       # traces per OTLP request
ENV = {"SHADOWLENS_TRACES__IDLE_SECONDS": "1", "SHADOWLENS_GATE__REFRESH": "2s"}


def plan_spans(plan, t0_ns: int, rng: np.random.Generator) -> list[tuple[str, str, list]]:
    """A request's traces as OTLP spans: a root carrying route, pair id, cohort, refusal, escalation and
    the task_completion eval; one LLM child per step (its tokens, reported cost and step number)."""
    out = []
    for tp in plan.traces:
        tid, root = rng.bytes(16), rng.bytes(8)
        end = t0_ns + int(tp.duration_s * 1e9)
        attrs = {"shadow.route": tp.route, "shadow.request_id": plan.request_id,
                 **{f"cohort.{k}": v for k, v in plan.cohort.items()}, "agent.refused": tp.refused,
                 "agent.escalated": tp.escalated, "eval.name": "task_completion", "eval.passed": tp.passed}
        spans = [span(tid, root, name="agent.run", kind=2, start=t0_ns, end=end, attrs=attrs)]
        step_ns = (end - t0_ns) // (len(tp.steps) + 1)
        for i, call in enumerate(tp.steps):
            spans.append(span(tid, rng.bytes(8), parent=root, name="chat", kind=3, start=t0_ns + i * step_ns,
                              end=t0_ns + (i + 1) * step_ns,
                              attrs={"gen_ai.operation.name": "chat", "gen_ai.request.model": MODELS[tp.route],
                                     "gen_ai.usage.input_tokens": call.input_tokens,
                                     "gen_ai.usage.output_tokens": call.output_tokens, "llm.cost.total": call.cost_usd,
                                     "agent.trajectory.step": i + 1}))
        out.append((tp.route, tid.hex(), spans))
    return out


def workload(scenario: str, seed: int, n: int, now_ns: int):
    """[(sidecar 0..2, [(route, trace id hex, spans)], cohort)] per request."""
    rng, ids = np.random.default_rng(seed), np.random.default_rng(seed + 1000)
    out = []
    for i in range(n):
        plan = sample_request(rng, SCENARIOS[scenario])
        plan.request_id = plan.request_id or uuid.uuid4().hex
        t0 = now_ns - int(300e9) + i * int(50e6)
        sidecar = int(uuid.UUID(plan.request_id).int % 3)     # by request: a pair stays on one sidecar
        out.append((sidecar, plan_spans(plan, t0, ids), plan.cohort))
    return out


def post(srv, spans: list) -> None:
    body = trace_request(spans, {"service.name": "agent"}).SerializeToString()
    req = urllib.request.Request(srv.http_endpoint + "/v1/traces", data=body, method="POST",
                                 headers={"Content-Type": "application/x-protobuf"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.status == 200


def send(srv, requests: list) -> None:
    traces = [t for _, ts, _ in requests for t in ts]
    for i in range(0, len(traces), PER_REQUEST):
        post(srv, [s for _, _, spans in traces[i:i + PER_REQUEST] for s in spans])


def traces_total(srv) -> float:
    text = srv.metrics_text()
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith("shadowlens_traces_total{"))


def cli(*args) -> tuple[int, dict | str, str]:
    """The command in-process (click's runner): (exit status, the JSON document or the text, stderr)."""
    result = CliRunner().invoke(main, list(args))
    try:
        doc = json.loads(result.stdout)
    except ValueError:
        doc = result.stdout
    return result.exit_code, doc, result.stderr


def sidecar_gate(srv) -> dict:
    """A sidecar's own verdict (/gate, recomputed every gate.refresh), once it has judged every trace it got."""
    def get():
        try:
            with urllib.request.urlopen(srv.metrics_url + "/gate", timeout=30) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:        # 409 on block
            return json.loads(e.read())
    want = traces_total(srv)
    return wait_for(lambda: (lambda d: d if sum(d.get("traces", {}).values()) >= want else None)(get()), 60, 0.5,
                    what="the sidecar's gate over all of its traces")


def failing(doc: dict) -> set[tuple[str, str]]:
    return {(r["rule"], r["cohort"]) for r in doc["rules"] if r["state"] == "fail"}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    prometheus_binary()
    root = tmp_path_factory.mktemp("fleet")
    servers = {name: new_server(root / name / "data", ENV) for name in
               ("r0", "r1", "r2", "reference", "h0", "h1", "h2")}
    t_start = time.monotonic()
    mark = lambda what: print(f"\n[fleet] {what}: {time.monotonic() - t_start:.1f} s", flush=True)
    starters = [threading.Thread(target=s.start, kwargs={"timeout": 150}) for s in servers.values()]
    try:
        for t in starters:
            t.start()
        for t in starters:
            t.join()
        for s in servers.values():
            assert s.proc is not None and s._ready(), s.log()
        target = lambda names: [f"127.0.0.1:{servers[n].metrics_port}" for n in names]
        prom = PrometheusServer(target="", workdir=root / "prom", extra_args=("--enable-feature=exemplar-storage",),
                                scrape={"static_configs": [
                                    {"targets": target(["r0", "r1", "r2"]), "labels": {"fleet": "regression"}},
                                    {"targets": target(["h0", "h1", "h2"]), "labels": {"fleet": "healthy"}}]})
        mark("7 serve started")
        prom.start()
        mark("prometheus started")
        now = time.time_ns()
        regression = workload("regression", SEED, N_REQUESTS, now)
        healthy = workload("healthy", SEED + 1, N_HEALTHY, now)
        jobs = [(servers["reference"], regression)]
        jobs += [(servers[f"r{k}"], [r for r in regression if r[0] == k]) for k in range(3)]
        jobs += [(servers[f"h{k}"], [r for r in healthy if r[0] == k]) for k in range(3)]
        senders = [threading.Thread(target=send, args=job) for job in jobs]
        for t in senders:
            t.start()
        for t in senders:
            t.join()
        mark("traffic built and sent")
        for srv, reqs in jobs:
            expected = 2 * len(reqs)
            wait_for(lambda: traces_total(srv) >= expected, 60, 0.25, what=f"{expected} traces completed")
        for fl, n in (("regression", N_REQUESTS), ("healthy", N_HEALTHY)):
            prom.wait_for(f'sum(shadowlens_pairs_total{{status="matched", fleet="{fl}"}})',
                          lambda r, n=n: r and float(r[0]["value"][1]) >= n, timeout=30)
        mark("traces completed and scraped")
        time.sleep(1.5)       # one more scrape of every sidecar: the sketch is counted with the pairs
        yield {"servers": servers, "prom": prom, "regression": regression}
    finally:
        for s in servers.values():
            s.stop()
        if "prom" in locals():
            prom.stop()


def test_the_fleet_gives_the_reference_verdict_and_effects(fleet):
    prom = fleet["prom"]
    ref = sidecar_gate(fleet["servers"]["reference"])
    assert ref["verdict"] == "block", ref["reasons"]
    rc, doc, err = cli("gate", "--prometheus", prom.url, "--match", '{fleet="regression"}', "--format", "json")
    assert doc["verdict"] == "block" and rc == 1, err or doc
    assert doc["source"] == "prometheus" and doc["sidecars"] == 3
    assert failing(doc) == failing(ref) and ("steps", "intent=billing") in failing(doc)
    assert doc["pairs"]["matched"] == ref["pairs"]["matched"] == N_REQUESTS
    assert doc["traces"] == ref["traces"]
    fleet_results = {(r["rule"], r["cohort"]): r for r in doc["rules"]}
    compared = quantiles = 0
    for r in ref["rules"]:
        f = fleet_results[(r["rule"], r["cohort"])]
        assert f["state"] == r["state"] or r["rule"] == "p99_latency", (f, r)
        if r["effect"] is None:
            continue
        if r["rule"] == "p99_latency":
            # within the sketch's stated error: each route's p99 within sqrt(GAMMA), their ratio within GAMMA;
            # the fleet's interval is wider by the bucket width, never narrower
            assert 1 / GAMMA <= f["effect"] / r["effect"] <= GAMMA, (f, r)
            assert f["lower"] <= r["lower"] * GAMMA and f["upper"] >= r["upper"] / GAMMA, (f, r)
            quantiles += 1
            continue
        assert f["n_baseline"] == r["n_baseline"], (f, r)
        for k in ("effect", "lower", "upper"):
            assert math.isclose(f[k], r[k], rel_tol=1e-5, abs_tol=1e-6), (k, f, r)
        compared += 1
    assert compared >= 40 and quantiles >= 3, (compared, quantiles)
    # the failing results carry candidate trace ids of their cohort, from the exemplars Prometheus stored
    cohort_of = {tid: (route, cohort) for _, traces, cohort in fleet["regression"] for route, tid, _ in traces}
    for r in doc["rules"]:
        if r["state"] == "fail":
            assert r["examples"], r
            label, _, value = r["cohort"].partition("=")
            for e in r["examples"]:
                route, cohort = cohort_of[e["candidate_trace_id"]]
                assert route == "candidate" and cohort[label] == value


def test_each_sidecar_alone_is_inconclusive_while_the_fleet_blocks(fleet):
    for k in range(3):
        doc = sidecar_gate(fleet["servers"][f"r{k}"])
        assert doc["verdict"] == "inconclusive" and not failing(doc), doc["reasons"]
    rc, text, _ = cli("gate", "--prometheus", fleet["prom"].url, "--match", '{fleet="regression"}')
    assert rc == 1 and "steps fails for intent=billing" in text, text
    assert "source: prometheus (3 sidecars contributed" in text


def test_a_healthy_fleet_does_not_block(fleet):
    rc, doc, err = cli("gate", "--prometheus", fleet["prom"].url, "--match", 'fleet="healthy"', "--format", "json")
    assert doc["verdict"] != "block" and rc in (0, 3), err or doc["reasons"]
    assert doc["sidecars"] == 3 and doc["pairs"]["matched"] == N_HEALTHY


def test_the_report_reads_the_fleet_too(fleet):
    rc, text, err = cli("report", "--prometheus", fleet["prom"].url, "--match", '{fleet="regression"}')
    assert rc == 0 and text.startswith("verdict: block") and "source: prometheus" in text, err or text


def test_errors_are_one_line_and_exit_2(fleet):
    rc, _, err = cli("gate", "--prometheus", fleet["prom"].url, "--match", '{fleet=~"("}')
    assert rc == 2 and err.count("\n") == 1 and "--match" in err, err
    rc, _, err = cli("gate", "--prometheus", "http://127.0.0.1:9")
    assert rc == 2 and err.count("\n") == 1 and "cannot reach Prometheus" in err, err
